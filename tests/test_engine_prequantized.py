"""Pre-quantized checkpoints (GPTQ, AWQ), packed by tests/support/gptq.py from a random Llama: every TP shard
holds exactly the weights they stand for, greedy tokens equal transformers' on those weights at TP=1 and TP=2,
the planner counts the bytes the engine holds, and a malformed checkpoint is refused in one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hexgen.coordinator.specs import MODELS, SpecError, resolve_model
from hexgen.engine.config import ConfigError, load_config
from hexgen.engine.layers import Shard
from hexgen.engine.layout import uniform_layout
from hexgen.engine.llm import LLM
from hexgen.engine.loader import CheckpointError, load_weights, quantized_linears
from hexgen.engine.models import build_model
from hexgen.engine.quant import Grouped, QuantizedWeight, paths, weight_bytes
from hexgen.engine.quant_bytes import prequantized_bytes
from hexgen.engine.sequence import SamplingParams
from hexgen.testing.checkpoints import LLAMA_GQA, random_prompts, reference_greedy, save_random_checkpoint
from hexgen.testing.cli import assert_one_line_error, join, run_main
from hexgen.testing.gptq import Variant, write_prequantized
from hexgen.testing.replica_driver import generate
from hexgen.testing.threads import one_thread

VARIANTS = {
    "gptq4-g32": Variant(),
    "gptq4-act-order": Variant(act_order=True),
    "gptq4-act-order-per-linear": Variant(act_order=True, shared_order=False),
    "gptq8-g32": Variant(bits=8),
    "gptq4-row-v2": Variant(group=-1, v2=True),
    "gptq4-sym-g64": Variant(group=64, sym=True),
    "awq4-g32": Variant(method="awq"),
}
LAYERS = LLAMA_GQA["num_hidden_layers"]
LINEAR_SHAPES = [(64 + 2 * 32, 64), (64, 64), (2 * 96, 64), (64, 96)]  # qkv, o, gate_up, down of LLAMA_GQA


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_checkpoint("llama-gqa", tmp_path_factory.mktemp("gptq") / "source", seed=3)


@pytest.fixture(scope="module")
def checkpoints(source: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (the packed checkpoint, the full-precision one of the weights it stands for)."""
    out = {}
    for name, variant in VARIANTS.items():
        packed, plain = source.parent / name, source.parent / f"{name}-dequantized"
        write_prequantized(source, packed, plain, variant)
        out[name] = (packed, plain)
    return out


def _loaded(model_dir: Path, shard: Shard, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = build_model(load_config(model_dir), shard)
    load_weights(model, model_dir, dtype)
    return model


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_tp_shard_holds_exactly_the_dequantized_weights(checkpoints, name):
    """TP=1 and both ranks of TP=2 (column shards of q, k, v, gate, up; row shards of o and down, whose 48
    inputs per rank cut a group of 32 in two): each linear equals the reference dequantization bit for bit."""
    packed, plain = checkpoints[name]
    for tp, rank in ((1, 0), (2, 0), (2, 1)):
        shard = Shard(0, LAYERS, LAYERS, tp_size=tp, tp_rank=rank)
        model, reference = _loaded(packed, shard), _loaded(plain, shard)
        expected, held = dict(reference.named_parameters()), dict(model.named_parameters())
        for param, linear in quantized_linears(model).items():
            weight = held[param] if linear.quantized is None else linear.quantized.dequantized()
            assert torch.equal(weight, expected[param]), (tp, rank, param)
        others = set(expected) - set(quantized_linears(model))
        assert all(torch.equal(held[p], expected[p]) for p in others)


@pytest.mark.parametrize(
    ("bits", "order", "n", "path"),
    [
        (4, "in order", 48, "int4-mm-cpu"),
        (4, "act order", 48, "int4-mm-cpu"),
        (4, "act order", 40, "int4-dequant"),  # 40 outputs: not the kernel's multiple of 16
        (4, "unequal", 48, "int4-dequant"),
        (8, "in order", 48, "int8-grouped-dequant"),
    ],
)
def test_a_grouped_linear_computes_with_the_weight_it_ships(bits, order, n, path):
    """x W^T of a checkpoint's groups (64 of 128 inputs) equals x times its exact dequantization."""
    gen = torch.Generator().manual_seed(bits)
    k, groups = 128, 2
    g_idx = {
        "in order": torch.arange(k) // 64,
        "act order": torch.randperm(k, generator=gen) // 64,
        "unequal": (torch.arange(k) >= 40).long(),
    }[order]
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    zeros = torch.randint(0, (1 << bits) + 1, (n, groups), generator=gen)
    grouped = Grouped(codes, zeros, torch.rand(n, groups, generator=gen).half(), g_idx, bits)
    weight = QuantizedWeight(grouped, "gptq", torch.float32, torch.device("cpu"))
    assert weight.path == path
    assert torch.equal(weight.dequantized(), grouped.dequantized())
    x = torch.randn(3, 5, k, generator=gen)
    assert torch.allclose(weight(x), x @ grouped.dequantized().T, atol=1e-4, rtol=1e-5)


def test_linears_run_the_path_their_groups_allow(checkpoints):
    """Groups of 32 run torch's int4 kernel, in order or (act order) with the input permuted; 8 bits and a TP
    row shard's unequal groups dequantize per call; q, k and v whose act orders differ cannot share one group
    index and load dequantized (o, gate_up, down stay packed)."""
    whole = Shard(0, LAYERS, LAYERS)
    counts = {name: paths(_loaded(checkpoints[name][0], whole)) for name in VARIANTS}
    assert counts["gptq4-g32"] == counts["awq4-g32"] == counts["gptq4-act-order"] == {"int4-mm-cpu": 4 * LAYERS}
    assert counts["gptq8-g32"] == {"int8-grouped-dequant": 4 * LAYERS}
    assert counts["gptq4-act-order-per-linear"] == {"int4-mm-cpu": 2 * LAYERS}  # o and down; the rest plain
    tp2 = paths(_loaded(checkpoints["gptq4-act-order"][0], Shard(0, LAYERS, LAYERS, tp_size=2, tp_rank=1)))
    assert tp2 == {"int4-mm-cpu": 2 * LAYERS, "int4-dequant": 2 * LAYERS}  # column shards keep every input


@pytest.mark.parametrize("name", ["gptq4-g32", "awq4-g32"])
def test_progress_hears_the_packed_bytes_read(checkpoints, name):
    """A whole model reads every tensor of the file once; each TP=2 rank its share of every qweight."""
    packed = checkpoints[name][0]
    file_bytes = sum(t.numel() * t.element_size() for t in load_file(str(packed / "model.safetensors")).values())
    read = []
    for tp, rank in ((1, 0), (2, 0)):
        heard: list[tuple[int, int]] = []
        model = build_model(load_config(packed), Shard(0, LAYERS, LAYERS, tp_size=tp, tp_rank=rank))
        load_weights(
            model, packed, torch.float32, progress=lambda done, total, heard=heard: heard.append((done, total))
        )
        assert heard[-1][0] == heard[-1][1]
        read.append(heard[-1][1])
    assert read[0] == file_bytes and file_bytes / 2 < read[1] < file_bytes


@pytest.mark.parametrize("name", ["gptq4-g32", "gptq4-act-order", "gptq8-g32"])
def test_planner_counts_the_bytes_the_engine_holds(checkpoints, name):
    packed = checkpoints[name][0]
    spec = resolve_model(str(packed))  # its config names no torch_dtype the planner reads: 2 bytes
    model = _loaded(packed, Shard(0, LAYERS, LAYERS), torch.bfloat16)
    assert spec.prequantized == load_config(packed).prequantized
    held = sum(weight_bytes(linear) for linear in quantized_linears(model).values())
    assert spec.bytes_per_param == 2 and held == LAYERS * spec.layer_bytes
    assert spec.layer_bytes == sum(prequantized_bytes(o, i, spec.prequantized, 2) for o, i in LINEAR_SHAPES)
    full = resolve_model(str(checkpoints[name][1]))
    assert spec.weight_bytes < full.weight_bytes
    assert spec.weight_bytes - spec.layers * spec.layer_bytes == full.weight_bytes - full.layers * full.layer_bytes


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(3, LLAMA_GQA["vocab_size"], seed=11)


@pytest.mark.parametrize("name", ["gptq4-act-order", "awq4-g32"])
def test_greedy_tokens_equal_transformers_on_the_dequantized_weights(checkpoints, prompts, name):
    packed, plain = checkpoints[name]
    expected = reference_greedy(plain, prompts, 16)
    ours = LLM(packed).generate(prompts, SamplingParams(max_tokens=16))
    assert [c.token_ids for c in ours] == expected


def test_tp2_replica_gives_transformers_greedy_tokens(checkpoints, prompts):
    packed, plain = checkpoints["gptq4-g32"]
    expected = reference_greedy(plain, prompts, 16)
    assert generate(packed, uniform_layout(LAYERS, 1, 2), prompts, SamplingParams(max_tokens=16)) == expected


def _rewrite(checkpoint: Path, to: Path, config: dict | None = None, change=None) -> Path:
    """A copy of ``checkpoint`` with its quantization_config updated by ``config`` and its tensors by ``change``."""
    to.mkdir()
    raw = json.loads((checkpoint / "config.json").read_text())
    raw["quantization_config"] |= config or {}
    (to / "config.json").write_text(json.dumps(raw))
    tensors = load_file(str(checkpoint / "model.safetensors"))
    if change is not None:
        change(tensors)
    save_file(tensors, str(to / "model.safetensors"))
    return to


Q, K = "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"
PARTS = ("qweight", "qzeros", "scales", "g_idx")


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"bits": 3}, "gptq checkpoints of 3 bits are not supported"),
        ({"group_size": 0}, "group_size must be a positive integer or -1"),
        ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' are not supported"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
    ],
)
def test_unsupported_quantization_configs_are_refused_in_one_line(checkpoints, tmp_path, config, fragment):
    bad = _rewrite(checkpoints["gptq4-g32"][0], tmp_path / "bad", config)
    for error, load in ((ConfigError, lambda: LLM(bad)), (SpecError, lambda: resolve_model(str(bad)))):
        with pytest.raises(error) as caught:
            load()
        assert fragment in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda t: t.pop(f"{Q}.scales"), f"lacks tensor '{Q}.scales'"),
        (
            lambda t: t.update({f"{Q}.{p}": t[f"{K}.{p}"].clone() for p in PARTS}),
            f"{Q} has 32 along dim 0; this shard needs [0:64]",
        ),
        (
            lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"][:, :4].contiguous()}),
            f"{Q}.scales has shape [2, 64] where",
        ),
        (lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:1]}), f"{Q}.scales has 1 groups where 64 inputs"),
        (lambda t: t.update({f"{Q}.qzeros": t[f"{Q}.qzeros"].float()}), f"{Q}.qzeros is F32, not int32"),
        (lambda t: t.update({f"{Q}.g_idx": t[f"{Q}.g_idx"] + 5}), f"{Q}.g_idx names groups outside [0, 2)"),
    ],
)
def test_malformed_packed_tensors_are_a_checkpoint_error(checkpoints, tmp_path, change, fragment):
    bad = _rewrite(checkpoints["gptq4-g32"][0], tmp_path / "bad", change=change)
    with pytest.raises(CheckpointError) as caught:
        LLM(bad)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_a_shipped_quantization_is_not_quantized_again(checkpoints):
    packed = checkpoints["gptq4-g32"][0]
    with pytest.raises(CheckpointError, match=r"ship quantized \(gptq int4, groups of 32\); load it without"):
        LLM(packed, quantize="int8")
    spec = resolve_model(str(packed))
    with pytest.raises(SpecError, match="cannot be quantized again with int4"):
        dataclasses.replace(spec, quantize="int4")


def test_node_plans_a_gptq_70b_checkpoint_with_its_bytes(tmp_path, capsys):
    """``hexgen-node plan`` on a GPTQ Llama-2-70B config: weights as shipped (4 bits, groups of 128), fewer
    than --quantize int4's groups of 32 take; --quantize on it is refused in one line."""
    pytest.importorskip("hexgen.coordinator.planner")
    shape = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80}
    shape |= {"num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000, "torch_dtype": "float16"}
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    (tmp_path / "config.json").write_text(json.dumps(shape | {"quantization_config": gptq}))
    cluster = Path(__file__).parent.parent / "bench" / "clusters" / "het-1.toml"
    status, out, _ = run_main(capsys, "plan", cluster, "--model", tmp_path, "--json")
    assert status == 0
    shipped = json.loads(out)["weight_bytes"]
    int4 = dataclasses.replace(MODELS["llama-2-70b"], quantize="int4").weight_bytes
    assert 0.8 * int4 < shipped < int4
    status, out, err = run_main(capsys, "plan", cluster, "--model", tmp_path, "--quantize", "int4")
    assert_one_line_error(status, out, err, "ships quantized weights (gptq int4, groups of 128)")
    status, err = join("--model", tmp_path, "--quantize", "int4", tmp_path=tmp_path)
    assert_one_line_error(status, "", err, "ships quantized weights (gptq int4, groups of 128)")
