"""Weight-only int8 and int4 quantization: round-trip error bounds, quantized linears against the
dequantized weights, quantized TP shards and a TP=2 replica, and quantized stories260K against the full-precision model."""

from __future__ import annotations

import pytest
import torch

from hexgen.engine.config import load_config
from hexgen.engine.layers import Linear, Shard
from hexgen.engine.llm import LLM
from hexgen.engine.loader import load_weights, quantized_linears
from hexgen.engine.models import build_model
from hexgen.engine.quant import (
    INT4_GROUP,
    QuantizedWeight,
    dequantize_int4,
    dequantize_int8,
    linear_bytes,
    pack_nibbles,
    paths,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
    weight_bytes,
)
from hexgen.engine.sequence import SamplingParams
from hexgen.testing.ranks import free_port, run_ranks
from hexgen.testing.threads import one_thread

# greedy tokens of quantized stories260K that match the full-precision model's before the first divergence,
# for "Once upon a time" (measured on CPU: int8 60 of 60, int4 16 of 60: groups of 32 on a 64-wide model)
INT8_AGREEMENT_FLOOR = 40
INT4_AGREEMENT_FLOOR = 8
PROMPT = "Once upon a time"
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


def _matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_int8_round_trip_within_half_a_step():
    w = _matrix(48, 100, 0) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different ranges
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    error = (dequantize_int8(q, scale) - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-6).all()
    assert torch.allclose(scale, w.abs().amax(dim=1) / 127)


@pytest.mark.parametrize("cols", [64, 100])
def test_int4_round_trip_within_half_a_step(cols):
    w = _matrix(20, cols, 1)
    q, scale, zero = quantize_int4(w)
    padded = -(-cols // INT4_GROUP) * INT4_GROUP
    assert q.shape == (20, padded) and int(q.max()) <= 15
    assert scale.shape == zero.shape == (20, padded // INT4_GROUP)
    back = dequantize_int4(q, scale, zero)[:, :cols]
    step = scale.repeat_interleave(INT4_GROUP, dim=1)[:, :cols]
    assert ((back - w).abs() <= step / 2 + 1e-5).all()
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)


@pytest.mark.parametrize(
    ("scheme", "shape", "dtype", "path"),
    [
        ("int8", (40, 100), torch.float32, "int8-mm"),
        ("int8", (40, 96), torch.bfloat16, "int8-mm"),
        ("int8", (40, 100), torch.bfloat16, "int8-dequant"),
        ("int4", (48, 100), torch.float32, "int4-mm-cpu"),
        ("int4", (48, 100), torch.bfloat16, "int4-mm-cpu"),
        ("int4", (40, 100), torch.float32, "int4-dequant"),
    ],
)
def test_quantized_linear_equals_dequantized_matmul(scheme, shape, dtype, path):
    w = _matrix(*shape, 2)
    weight = QuantizedWeight(w, scheme, dtype, CPU)
    assert weight.path == path
    x = _matrix(3 * 5, shape[1], 3).reshape(3, 5, shape[1]).to(dtype)
    reference = x.float() @ weight.dequantized().T
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2 * reference.abs().max().item()
    assert torch.allclose(weight(x).float(), reference, atol=tolerance, rtol=0)
    assert (weight.dequantized() - w).abs().max() < 0.5  # close to the weight it stands for, not garbage


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 100), (40, 64)])
def test_linear_bytes_is_what_a_quantized_weight_holds(scheme, dtype, shape):
    weight = QuantizedWeight(_matrix(*shape, 6), scheme, dtype, CPU)
    assert weight_bytes(weight) == linear_bytes(*shape, scheme, dtype.itemsize)
    assert linear_bytes(*shape, None, dtype.itemsize) == shape[0] * shape[1] * dtype.itemsize


def test_linear_with_bias_runs_quantized():
    linear = Linear(Shard(0, 1, 1), 64, 32, bias=True)
    linear.bias.data = torch.arange(32.0)  # type: ignore[union-attr]  # a biased linear holds its bias
    w = _matrix(32, 64, 4)
    linear.quantize(w, "int8", torch.float32, CPU)
    assert linear.weight is None and linear.quantized is not None
    x = _matrix(2, 64, 5)
    expected = x @ linear.quantized.dequantized().T + torch.arange(32.0)
    assert torch.allclose(linear(x), expected, atol=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_tp_shards_quantize_their_own_slice(stories_dir, scheme):
    """Each TP rank quantizes the slice it loads: its layers dequantize to its full-precision shard's weights
    within half a quantization step, and every linear but none of the rest is quantized."""
    config = load_config(stories_dir)
    for rank in range(2):
        shard = Shard(0, config.num_layers, config.num_layers, tp_size=2, tp_rank=rank)
        full, quantized = build_model(config, shard), build_model(config, shard)
        load_weights(full, stories_dir, torch.float32)
        load_weights(quantized, stories_dir, torch.float32, quantize=scheme)
        exact = dict(full.named_parameters())
        linears = quantized_linears(quantized)
        assert len(linears) == 4 * config.num_layers  # qkv, o, gate_up, down
        for name, linear in linears.items():
            assert linear.quantized is not None
            w = exact[name]
            bound = w.abs().amax(dim=1, keepdim=True) / 127 if scheme == "int8" else (w.max() - w.min()) / 15
            assert ((linear.quantized.dequantized() - w).abs() <= bound / 2 + 1e-6).all()
        kept = {n for n, _ in quantized.named_parameters()}
        assert kept == set(exact) - set(linears)
        assert weight_bytes(quantized) < weight_bytes(full)


def _agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.fixture(scope="module")
def full_precision_tokens(stories_dir):
    return LLM(stories_dir).generate([PROMPT], SamplingParams(max_tokens=60, ignore_eos=True))[0].token_ids


def test_int8_stories_agrees_with_full_precision(stories_dir, full_precision_tokens):
    llm = LLM(stories_dir, quantize="int8")
    assert paths(llm.runner.model) == {"int8-mm": 4 * llm.model_config.num_layers}
    ours = llm.generate([PROMPT], SamplingParams(max_tokens=60, ignore_eos=True))[0]
    assert _agreement(full_precision_tokens, ours.token_ids) >= INT8_AGREEMENT_FLOOR


def test_int4_stories_runs_end_to_end(stories_dir, full_precision_tokens):
    llm = LLM(stories_dir, quantize="int4")
    assert weight_bytes(llm.runner.model) < weight_bytes(LLM(stories_dir, quantize="int8").runner.model)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=60, ignore_eos=True))[0]
    assert len(out.token_ids) == 60
    assert all(0 <= t < llm.model_config.vocab_size for t in out.token_ids)
    assert _agreement(full_precision_tokens, out.token_ids) >= INT4_AGREEMENT_FLOOR


def _tp2_rank(rank: int, port: int, model_dir: str, prompt: list[int]) -> tuple[list[int], dict[str, int]]:
    from hexgen.engine.layout import uniform_layout
    from hexgen.engine.replica import ReplicaSpec, ReplicaWorker, Request, init_world, replica_groups

    torch.set_num_threads(1)
    init_world(rank, 2, port, timeout_s=60)
    spec = ReplicaSpec(model_dir, uniform_layout(load_config(model_dir).num_layers, 1, 2), quantize="int8")
    worker = ReplicaWorker(spec, rank, replica_groups([spec]))
    requests = [Request(0, prompt, SamplingParams(max_tokens=60, ignore_eos=True))] if worker.is_driver else None
    for _ in range(61):
        result = worker.step(requests)
        requests = None
        assert result is not None
        if result.finished:
            return result.finished[0].completion_token_ids, paths(worker.runner.model)
    raise AssertionError("60 tokens took more than 61 steps")


def test_int8_tp2_replica_quantizes_each_shard(stories_dir, full_precision_tokens, monkeypatch):
    """A TP=2 replica whose ranks each quantize their own shard generates as the full-precision model does."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    prompt = LLM(stories_dir).encode(PROMPT)
    outcomes = run_ranks(_tp2_rank, 2, (free_port(), str(stories_dir), prompt), 90)
    errors = [o for o in outcomes.values() if isinstance(o, str)]
    assert not errors, "\n".join(errors)
    (tokens, rank0_paths), (other_tokens, rank1_paths) = outcomes[0], outcomes[1]
    assert tokens == other_tokens
    assert rank0_paths == rank1_paths == {"int8-mm": 4 * load_config(stories_dir).num_layers}
    assert _agreement(full_precision_tokens, tokens) >= INT8_AGREEMENT_FLOOR


@pytest.mark.parametrize("bad", ["fp8", "INT8", "", 4])
def test_unknown_quantization_is_a_value_error(stories_dir, bad):
    with pytest.raises(ValueError, match="unknown quantization"):
        LLM(stories_dir, quantize=bad)
