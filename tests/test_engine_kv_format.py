"""One KV format per deployment: a prefill and a decode replica whose block size or dtype differ refuse the
hand-off on both sides, with a message naming both formats, and the decode worker carries on."""

from __future__ import annotations

import traceback

import pytest

from hexgen.engine.kv_format import KVFormat, KVFormatError, mismatch, replica_format
from hexgen.testing.checkpoints import LLAMA_GQA
from hexgen.testing.ranks import free_port, run_ranks

F16 = KVFormat(16, "float32", 4, 4, 8)


def test_equal_formats_move() -> None:
    assert mismatch(F16, KVFormat(16, "float32", 4, 4, 8)) is None


@pytest.mark.parametrize(
    ("other", "named"),
    [
        (KVFormat(256, "bfloat16", 4, 4, 8), "block size, dtype"),
        (KVFormat(16, "float32", 4, 2, 8), "num kv heads"),
        (KVFormat(16, "float32", 4, 4, 16), "head dim"),
    ],
)
def test_a_mismatch_names_both_formats(other: KVFormat, named: str) -> None:
    why = mismatch(F16, other)
    assert why is not None and f"({named})" in why
    assert F16.describe() in why and other.describe() in why


def test_format_round_trips_and_garbage_is_refused() -> None:
    assert KVFormat.from_bytes(F16.to_bytes()) == F16
    for raw in [
        b"",
        b"[]",
        b"{}",
        b'{"block_size": 0, "dtype": "x", "num_layers": 1, "num_kv_heads": 1, "head_dim": 1}',
        "text",
        b"x" * 4096,
        None,
    ]:
        with pytest.raises(KVFormatError):
            KVFormat.from_bytes(raw)


def test_a_replica_whose_ranks_disagree_is_refused() -> None:
    with pytest.raises(KVFormatError, match="disagree"):
        replica_format([F16, KVFormat(32, "float32", 4, 4, 8)], "replica 0")


# ---------------------------------------------------------------------------------------- two workers

PROMPT = [5, 17, 33, 2, 90, 41, 7]


def _rank(rank: int, port: int, model_dir: str, decode: dict, exchange_port: int | None) -> str | None:
    try:
        import torch
        import torch.distributed as dist

        from hexgen.engine.layout import uniform_layout
        from hexgen.engine.model_runner import CacheConfig
        from hexgen.engine.replica import (
            ExchangeConfig,
            ReplicaSpec,
            ReplicaWorker,
            Request,
            init_world,
            replica_groups,
        )
        from hexgen.engine.sequence import SamplingParams

        torch.set_num_threads(1)
        init_world(rank, 2, port)
        layout = uniform_layout(LLAMA_GQA["num_hidden_layers"], 1, 1)
        prefill = ReplicaSpec(model_dir, layout, mode="prefill", cache=CacheConfig(block_size=16))
        decode = ReplicaSpec(
            model_dir,
            layout,
            first_rank=1,
            mode="decode",
            cache=CacheConfig(block_size=decode.get("block_size", 16)),
            dtype=decode.get("dtype", "auto"),
        )
        worker = ReplicaWorker(prefill if rank == 0 else decode, rank, replica_groups([prefill, decode]))
        if exchange_port is None:  # the default world carries the KV and the formats
            worker.peers = [prefill, decode]
        else:  # an exchange group of its own, as the daemon's workers join one per plan epoch
            own = prefill if rank == 0 else decode
            worker.begin_exchange(
                ExchangeConfig("127.0.0.1", exchange_port, "epoch-1", own.first_rank, 2, (prefill, decode))
            )
            worker.await_exchange()
        sampling = SamplingParams(max_tokens=4)
        if rank == 0:
            result = worker.step([Request(1, PROMPT, sampling, dst=1)])
            assert [s.seq_id for s in result.handed_off] == [1]
            refused = worker.refusals(result.handed_off)
            worker.export_routed(result.handed_off)  # sends nothing for the refused sequence, frees its blocks
            assert worker.block_manager.num_free_blocks == worker.block_manager.num_blocks
            dist.barrier()  # rank 0 hosts the world's store: it stays until rank 1 has read the formats
            return refused.get(1)
        else:
            free = worker.block_manager.num_free_blocks
            result = worker.step(imports=[Request(1, [*PROMPT, 3], sampling, src=0)])
            assert [seq_id for seq_id, _ in result.failed] == [1], result
            assert worker.block_manager.num_free_blocks == free and not worker.scheduler.has_unfinished()
            assert worker.step() is not None  # the worker carries on
            dist.barrier()
            return result.failed[0][1]
    except BaseException:
        return "ERROR " + traceback.format_exc()


@pytest.mark.parametrize(
    ("decode", "differ", "named", "exchange"),
    [
        ({"block_size": 32}, "(block size)", "blocks of 32 tokens, float32", False),
        ({"dtype": "bfloat16"}, "(dtype)", "blocks of 16 tokens, bfloat16", False),
        ({"block_size": 32}, "(block size)", "blocks of 32 tokens, float32", True),
    ],
)
def test_mismatched_replicas_refuse_the_hand_off(
    tiny_models: dict, monkeypatch: pytest.MonkeyPatch, decode: dict, differ: str, named: str, exchange: bool
) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    store = None
    exchange_port = None
    if exchange:
        import torch.distributed as dist

        exchange_port = free_port()
        store = dist.TCPStore("127.0.0.1", exchange_port, is_master=True, wait_for_workers=False)
    outcomes = run_ranks(_rank, 2, (free_port(), str(tiny_models["llama-gqa"]), decode, exchange_port), 90)
    del store
    errors = [m for m in outcomes.values() if m is None or m.startswith("ERROR")]
    assert not errors, "\n".join(str(m) for m in errors)
    for rank in (0, 1):  # both sides refuse, with the same message naming both formats
        assert differ in outcomes[rank] and named in outcomes[rank]
        assert "blocks of 16 tokens, float32" in outcomes[rank]
    assert outcomes[0] == outcomes[1]
