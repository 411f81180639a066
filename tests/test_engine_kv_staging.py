"""KV hand-off through host buffers: the staging decision, and staged messages arriving byte for byte."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from hexgen.engine import kv_transfer
from hexgen.engine.kv_transfer import KVShard, needs_staging, plan_kv_transfer, recv_kv, send_kv
from hexgen.engine.layout import StageLayout
from hexgen.testing.ranks import free_port, run_ranks


@pytest.mark.parametrize(
    ("device", "backend", "expected"),
    [("cpu", "gloo", False), ("cpu", "nccl", False), ("cuda:0", "gloo", True), ("cuda:1", "nccl", False)],
)
def test_staging_decision(device: str, backend: str, expected: bool) -> None:
    assert needs_staging(torch.device(device), backend) is expected


LAYOUT = (StageLayout(0, 2, 1),)
SHAPE = (2, 2, 6, 4, 2, 8)  # [k/v, layers, blocks, block_size, kv heads, head_dim]
TOKENS = 14  # 4 blocks, the last one partly filled


def _cache(dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(SHAPE, generator=generator).to(dtype)


def _rank(rank: int, port: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    staged = []
    real = kv_transfer._host_buffer
    kv_transfer._host_buffer = lambda like: staged.append(like.shape) or real(like)
    slices = plan_kv_transfer(LAYOUT, LAYOUT, 2)
    shard = KVShard(LAYOUT, 0, 2)
    options = {"timeout": timedelta(seconds=20), "blocks_per_chunk": 3, "stage": True}
    for dtype in (torch.float32, torch.bfloat16):
        if rank == 0:
            send_kv(_cache(dtype), shard, slices, [5, 0, 3, 1], TOKENS, lambda _: 1, **options)
        else:
            cache = torch.zeros(SHAPE, dtype=dtype)
            recv_kv(cache, shard, slices, [2, 4, 0, 3, 1], TOKENS, lambda _: 0, **options)
            sent = _cache(dtype)
            for src, dst in zip([5, 0, 3, 1], [2, 4, 0, 3], strict=True):
                # equal bytes, not merely close values: the staging copies must not convert anything
                assert torch.equal(cache[:, :, dst].view(torch.uint8), sent[:, :, src].view(torch.uint8))
            assert not cache[:, :, [1, 5]].any(), "blocks outside the table were written"
    if rank == 0:
        assert len(staged) == 4, f"expected every sent chunk staged, saw {staged}"
    dist.barrier()


def test_staged_kv_arrives_byte_equal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    outcomes = run_ranks(_rank, 2, (free_port(),), 60)
    errors = {rank: error for rank, error in outcomes.items() if error}
    assert not errors, "\n".join(f"rank {rank}:\n{error}" for rank, error in sorted(errors.items()))
