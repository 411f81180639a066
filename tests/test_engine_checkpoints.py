"""Bad checkpoints and configs fail with one clear error naming the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hexgen.engine.config import ConfigError, load_config
from hexgen.engine.llm import LLM
from hexgen.engine.loader import CheckpointError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_tensor(tiny_models, tmp_path):
    model_dir = _copy(tiny_models["llama-gqa"], tmp_path / "m")
    _edit_weights(model_dir, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        LLM(model_dir)


def test_wrong_shape(tiny_models, tmp_path):
    model_dir = _copy(tiny_models["opt"], tmp_path / "m")
    _edit_weights(model_dir, lambda t: t.update({"model.decoder.layers.0.fc2.bias": torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"fc2\.bias has shape \[7\].*\[64\]"):
        LLM(model_dir)


def test_config_disagrees_with_weights(tiny_models, tmp_path):
    model_dir = _copy(tiny_models["llama-gqa"], tmp_path / "m")
    _edit_config(model_dir, intermediate_size=128)
    with pytest.raises(CheckpointError, match="gate_proj"):
        LLM(model_dir)


def test_unknown_architecture(tiny_models, tmp_path):
    model_dir = _copy(tiny_models["llama-gqa"], tmp_path / "m")
    _edit_config(model_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ConfigError, match=r"unsupported architecture \['GPT2LMHeadModel'\]"):
        load_config(model_dir)


def test_unsupported_rope_scaling(tiny_models, tmp_path):
    model_dir = _copy(tiny_models["llama-gqa"], tmp_path / "m")
    _edit_config(model_dir, rope_scaling={"rope_type": "longrope", "factor": 4.0})
    with pytest.raises(ConfigError, match="unsupported rope scaling 'longrope'"):
        load_config(model_dir)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architectures": ["Qwen2MoeForCausalLM"]}, r"'Qwen2MoeForCausalLM': Qwen2-MoE's shared expert"),
        ({"partial_rotary_factor": 0.5}, "unsupported partial_rotary_factor 0.5"),
        (
            {"model_type": "gemma2", "architectures": None, "sliding_window": 8, "layer_types": ["chunked"] * 4},
            r"unsupported layer_types \['chunked'\]",
        ),
        ({"model_type": "mistral", "architectures": None, "sliding_window": 0}, "sliding_window must be"),
        ({"model_type": "gemma", "architectures": None, "hidden_activation": "relu"}, "hidden_activation 'relu'"),
        ({"model_type": "mixtral", "architectures": None, "num_local_experts": 2, "num_experts_per_tok": 3}, "exceeds"),
    ],
)
def test_unsupported_features_are_named(tiny_models, tmp_path, changes, message):
    model_dir = _copy(tiny_models["llama-gqa"], tmp_path / "m")
    _edit_config(model_dir, **changes)
    with pytest.raises(ConfigError, match=message):
        load_config(model_dir)


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read it as JSON"):
        load_config(tmp_path)


def test_no_safetensors(tiny_models, tmp_path):
    model_dir = _copy(tiny_models["llama-gqa"], tmp_path / "m")
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights \(found pytorch_model\.bin"):
        LLM(model_dir)


def test_corrupt_safetensors(tiny_models, tmp_path):
    model_dir = _copy(tiny_models["llama-gqa"], tmp_path / "m")
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        LLM(model_dir)


def test_sharded_checkpoint_loads(tiny_models, tmp_path):
    """An index plus several shard files loads like a single file."""
    model_dir = _copy(tiny_models["llama-gqa"], tmp_path / "m")
    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, model_dir / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    prompts = [[5, 6, 7, 8]]
    assert LLM(model_dir).generate(prompts)[0].token_ids == LLM(tiny_models["llama-gqa"]).generate(prompts)[0].token_ids
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing: model-00002-of-00002\.safetensors"):
        LLM(model_dir)


def test_bad_requests(tiny_models):
    llm = LLM(tiny_models["llama-gqa"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.add_request([1, 999])
    with pytest.raises(ValueError, match="empty prompt"):
        llm.add_request([])
    with pytest.raises(ValueError, match=r"no tokenizer\.json"):
        llm.add_request("hello")
    assert not llm.has_unfinished()
