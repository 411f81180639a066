"""GPU and model specs: the public figures, hand-computed parameter and KV sizes, HF config parsing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from hexgen.coordinator.specs import (
    GPU_TYPES,
    MODELS,
    ModelSpec,
    SpecError,
    gpu_type,
    model_from_hf_config,
    resolve_model,
)

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"

OPT_30B_CONFIG = {
    "model_type": "opt",
    "hidden_size": 7168,
    "num_hidden_layers": 48,
    "num_attention_heads": 56,
    "ffn_dim": 28672,
    "vocab_size": 50272,
    "torch_dtype": "float16",
    "word_embed_proj_dim": 7168,
}


def test_gpu_table_has_the_public_figures_and_prices() -> None:
    # dense bf16 TFLOPS / HBM GB/s / GB, intra-host GB/s, $/h (docs/architecture.md, the cost model)
    expected = {
        "H100": (989, 3350, 80, 450, 3.69),
        "A100": (312, 2039, 80, 300, 1.99),
        "L40": (181, 864, 48, 25, 1.29),
        "A6000": (155, 768, 48, 25, 0.79),
    }
    assert set(GPU_TYPES) == set(expected)
    for name, (tflops, hbm, mem, intra, price) in expected.items():
        t = GPU_TYPES[name]
        assert (t.tflops, t.hbm_gbps, t.memory_gb, t.intra_host_gbps, t.price_per_hour) == (
            tflops,
            hbm,
            mem,
            intra,
            price,
        )


def test_gpu_type_lookup_ignores_case_and_rejects_unknown() -> None:
    assert gpu_type(" h100 ").name == "H100"
    assert gpu_type("a6000").name == "A6000"
    with pytest.raises(SpecError, match="unknown GPU type 'V100'"):
        gpu_type("V100")


@pytest.mark.parametrize(
    ("name", "kv_bytes"),
    [
        ("llama-2-70b", 327_680),  # 2 * 80 layers * 8 KV heads * 128 head dim * 2 bytes
        ("opt-30b", 1_376_256),  # 2 * 48 * 56 * 128 * 2
        ("llama-2-7b", 524_288),  # 2 * 32 * 32 * 128 * 2
        ("llama-2-13b", 819_200),  # 2 * 40 * 40 * 128 * 2
    ],
)
def test_kv_bytes_per_token_fp16(name: str, kv_bytes: int) -> None:
    assert MODELS[name].kv_bytes_per_token == kv_bytes


@pytest.mark.parametrize(
    ("name", "params"),
    [
        # per layer: q,o 2*8192^2 + k,v 2*8192*1024 + SwiGLU 3*8192*28672 = 855,638,016; * 80 layers
        # + untied embedding and head 2*32000*8192. The HF count 68,976,648,192 adds the RMSNorm
        # weights (80*2*8192 + 8192 = 1,318,912), which the cost model leaves out.
        ("llama-2-70b", 68_975_329_280),
        # per layer: 4*4096^2 + 3*4096*11008 = 202,375,168; * 32 + 2*32000*4096 (HF: 6,738,415,616 with norms)
        ("llama-2-7b", 6_738_149_376),
        # per layer: 4*5120^2 + 3*5120*13824 = 317,194,240; * 40 + 2*32000*5120 (HF: 13,015,864,320 with norms)
        ("llama-2-13b", 13_015_449_600),
        # per layer: 4*7168^2 + 2*7168*28672 = 616,562,688; * 48 + tied embedding 50272*7168
        ("opt-30b", 29_955_358_720),
    ],
)
def test_parameter_counts(name: str, params: int) -> None:
    assert MODELS[name].params == params


def test_weight_bytes_are_params_times_dtype() -> None:
    assert MODELS["llama-2-70b"].weight_bytes == 137_950_658_560
    assert replace(MODELS["llama-2-70b"], bytes_per_param=1).weight_bytes == 68_975_329_280


def test_opt_config_dict_gives_the_opt_30b_preset() -> None:
    spec = model_from_hf_config(OPT_30B_CONFIG, name="opt-30b")
    assert spec == MODELS["opt-30b"]
    assert spec.kv_heads == spec.heads == 56
    assert not spec.gated_mlp and spec.tied_embeddings


def test_opt_config_defaults_ffn_to_four_times_hidden() -> None:
    config = {k: v for k, v in OPT_30B_CONFIG.items() if k != "ffn_dim"}
    config["hidden_size"] = 768
    config["num_attention_heads"] = 12
    config["num_hidden_layers"] = 12
    spec = model_from_hf_config(config)
    assert spec.intermediate == 3072
    # per layer 4*768^2 + 2*768*3072 = 7,077,888; * 12 + tied embedding 50272*768 = 38,608,896
    assert spec.params == 123_543_552


def test_llama_config_dict() -> None:
    config = {
        "model_type": "llama",
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "intermediate_size": 28672,
        "vocab_size": 32000,
        "torch_dtype": "bfloat16",
    }
    spec = model_from_hf_config(config, name="llama-2-70b")
    assert spec == MODELS["llama-2-70b"]


def test_llama_config_without_kv_heads_is_mha() -> None:
    config = {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 32000,
    }
    assert model_from_hf_config(config, name="llama-2-7b") == MODELS["llama-2-7b"]


@pytest.mark.skipif(not (STORIES / "config.json").is_file(), reason=f"tiny model not present at {STORIES}")
def test_stories260k_config_from_disk() -> None:
    spec = resolve_model(str(STORIES))
    assert spec.name == "stories260K"
    assert (spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.head_dim) == (5, 64, 8, 4, 8)
    assert (spec.intermediate, spec.vocab, spec.bytes_per_param) == (172, 512, 4)
    assert spec.tied_embeddings and spec.gated_mlp
    # per layer: q,o 2*64^2 + k,v 2*64*32 + 3*64*172 = 45,312; * 5 + tied embedding 512*64
    assert spec.params == 259_328
    # 2 * 5 layers * 4 KV heads * 8 head dim * 4 bytes (float32)
    assert spec.kv_bytes_per_token == 1_280
    assert resolve_model(str(STORIES / "config.json")) == spec


def test_resolve_model_presets_ignore_case() -> None:
    assert resolve_model("Llama-2-70B") is MODELS["llama-2-70b"]


def test_resolve_model_reads_a_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my-opt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(OPT_30B_CONFIG))
    spec = resolve_model(str(folder))
    assert spec.name == "my-opt"
    assert spec.layers == 48


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read model config"),
        ("[1, 2]", "is not a JSON object"),
        (json.dumps({"model_type": "gpt2", "n_layer": 12}), "unsupported model_type 'gpt2'"),
        (json.dumps({"model_type": "llama", "hidden_size": 64}), "missing or has a bad field"),
        (json.dumps({**OPT_30B_CONFIG, "hidden_size": "wide"}), "missing or has a bad field"),
    ],
)
def test_bad_model_configs(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(SpecError, match=message):
        resolve_model(str(path))


def test_unknown_model_name() -> None:
    with pytest.raises(SpecError, match="unknown model 'gpt-5'"):
        resolve_model("gpt-5")


def test_head_dim_is_hidden_over_heads() -> None:
    spec = ModelSpec("m", layers=2, hidden=96, heads=6, kv_heads=2, intermediate=10, vocab=7)
    assert spec.head_dim == 16
    # attention 2*96^2 + 2*96*32 = 24,576; gated MLP 3*96*10 = 2,880
    assert spec.layer_params == 27_456
