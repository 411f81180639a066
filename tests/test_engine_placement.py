"""Pure decisions about where and how a worker runs: the attention path and its block size, and the KV
cache's share of device memory."""

from __future__ import annotations

import pytest
import torch

from hexgen.engine.attention import choose_attention
from hexgen.engine.memory import MemoryProfile, fixed_budget_blocks, kv_cache_blocks

BF16 = torch.bfloat16


@pytest.mark.parametrize(
    ("args", "backend", "block", "why"),
    [
        (("cuda", (9, 0), True, BF16, 0), "flash-attn", 256, "flash-attn"),
        (("cuda", (8, 0), True, torch.float16, 512), "flash-attn", 512, "flash-attn"),
        (("cuda", (7, 5), True, BF16, 0), "sdpa", 16, "capability 7.5 is below 8.0"),
        (("cuda", None, True, BF16, 0), "sdpa", 16, "capability unknown"),
        (("cuda", (9, 0), False, BF16, 0), "sdpa", 16, "not installed"),
        (("cuda", (9, 0), True, torch.float32, 0), "sdpa", 16, "needs fp16 or bf16"),
        (("cuda", (9, 0), True, BF16, 16), "sdpa", 16, "block size 16 is not a multiple of 256"),
        (("cuda", (8, 6), True, BF16, 128), "sdpa", 128, "not a multiple of 256"),
        (("cpu", None, True, BF16, 0), "sdpa", 16, "the device is cpu"),
        (("cpu", None, False, torch.float32, 256), "sdpa", 256, "the device is cpu"),
    ],
)
def test_choose_attention(args: tuple, backend: str, block: int, why: str) -> None:
    choice = choose_attention(*args)
    assert (choice.backend, choice.block_size) == (backend, block)
    assert why in choice.reason


def test_choose_attention_rejects_a_negative_block_size() -> None:
    with pytest.raises(ValueError, match="block size"):
        choose_attention("cuda", (9, 0), True, BF16, -1)


GB = 1 << 30


def test_kv_cache_gets_what_is_left_of_the_fraction() -> None:
    # a 24 GB card: 90% is 21.6 GB; 14 GB of weights + 3 GB peak activations, 1 GB CUDA context and NCCL
    profile = MemoryProfile(total=24 * GB, peak_allocated=17 * GB, non_torch=1 * GB)
    blocks = kv_cache_blocks(profile, 0.9, 2 << 20)
    assert blocks == (int(24 * GB * 0.9) - 18 * GB) // (2 << 20)
    assert blocks * (2 << 20) + 18 * GB <= 0.9 * 24 * GB  # the headroom holds


def test_kv_cache_gets_nothing_when_the_peak_exceeds_the_fraction() -> None:
    assert kv_cache_blocks(MemoryProfile(24 * GB, 23 * GB, 0), 0.9, 1 << 20) == 0


@pytest.mark.parametrize(
    ("profile", "utilization", "block"),
    [
        (MemoryProfile(GB, 0, 0), 0.0, 1),
        (MemoryProfile(GB, 0, 0), 1.5, 1),
        (MemoryProfile(GB, 0, 0), 0.9, 0),
        (MemoryProfile(GB, -1, 0), 0.9, 1),
    ],
)
def test_kv_cache_sizing_rejects_nonsense(profile: MemoryProfile, utilization: float, block: int) -> None:
    with pytest.raises(ValueError):
        kv_cache_blocks(profile, utilization, block)


def test_cpu_keeps_the_fixed_budget() -> None:
    assert fixed_budget_blocks(256 << 20, 1 << 20) == 256
    assert fixed_budget_blocks(0, 1 << 20) == 0


# ------------------------------------------------------------------- the profiling pass, run on CPU


@pytest.mark.parametrize(("first", "last"), [(True, True), (True, False), (False, True)])
def test_profile_forward_runs_the_largest_batch_without_a_cache(tiny_models: dict, first: bool, last: bool) -> None:
    from hexgen.engine.config import load_config
    from hexgen.engine.layers import Shard
    from hexgen.engine.model_runner import CacheConfig, ModelRunner
    from hexgen.testing.checkpoints import LLAMA_GQA

    model_dir = tiny_models["llama-gqa"]
    config = load_config(model_dir)
    layers = LLAMA_GQA["num_hidden_layers"]
    start, end = (0 if first else 2), (layers if last else 2)
    runner = ModelRunner(
        model_dir, config, Shard(start, end, layers), torch.float32, torch.device("cpu"), CacheConfig(), allocate=False
    )
    out = runner.profile_forward(100, 8)  # 100 tokens in 8 sequences of 12 or 13
    if last:
        assert out is not None and out.shape == (8, config.vocab_size) and torch.isfinite(out).all()
    else:
        assert out is not None and out.shape == (100, config.hidden_size)
    assert runner.kv_cache.numel() == 0
    runner.allocate_cache(runner.blocks_that_fit(100, 8))
    assert runner.num_blocks == CacheConfig().memory_bytes // runner.block_bytes  # CPU keeps the fixed budget
    with pytest.raises(RuntimeError, match="before the KV cache"):
        runner.profile_forward(10, 2)
