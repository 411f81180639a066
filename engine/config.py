"""Model configuration read from a Hugging Face `config.json`, reduced to what the engine's two families need."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A checkpoint's config.json is missing, malformed or describes an unsupported model."""


_FAMILIES = {"llama": "llama", "mistral": "llama", "opt": "opt"}
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "OPTForCausalLM": "opt"}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only model. ``family`` is "llama" or "opt"."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position: int
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    hidden_act: str = "silu"
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int = 0
    final_layer_norm: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read ``model_dir/config.json``; raise ConfigError naming the problem."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (a checkpoint directory needs config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a parsed Hugging Face config dictionary."""
    family = _family(raw)
    return _llama(raw) if family == "llama" else _opt(raw)


def _family(raw: dict[str, Any]) -> str:
    for arch in raw.get("architectures") or []:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    model_type = raw.get("model_type")
    if model_type in _FAMILIES:
        return _FAMILIES[model_type]
    named = raw.get("architectures") or model_type
    raise ConfigError(f"unsupported architecture {named!r}; supported: {sorted(_ARCHITECTURES)}")


def _int(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _eos(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(raw: dict[str, Any]) -> dict[str, Any]:
    return {
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_ids": _eos(raw),
        "torch_dtype": str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        "extra": raw,
    }


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or None
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    if params and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    if scaling is None:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return theta, None
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
    if kind not in required:
        raise ConfigError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")
    missing = [k for k in required[kind] if k not in scaling]
    if missing:
        raise ConfigError(f"rope scaling {kind!r} needs {', '.join(missing)}")
    return theta, {**scaling, "rope_type": kind}


def _llama(raw: dict[str, Any]) -> ModelConfig:
    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    kv_heads = _int(raw, "num_key_value_heads", heads)
    head_dim = raw.get("head_dim") or hidden // heads
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"unsupported hidden_act {act!r} for a Llama model (expected silu)")
    theta, scaling = _rope(raw)
    return ModelConfig(
        family="llama",
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=_int(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        intermediate_size=_int(raw, "intermediate_size"),
        max_position=_int(raw, "max_position_embeddings", 2048),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        hidden_act="silu",
        **_common(raw),
    )


def _opt(raw: dict[str, Any]) -> ModelConfig:
    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    if hidden % heads:
        raise ConfigError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    act = raw.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        raise ConfigError(f"unsupported activation_function {act!r} for an OPT model (expected relu or gelu)")
    layer_norm_before = bool(raw.get("do_layer_norm_before", True))
    return ModelConfig(
        family="opt",
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=_int(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=_int(raw, "ffn_dim"),
        max_position=_int(raw, "max_position_embeddings", 2048),
        norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_bias=bool(raw.get("enable_bias", True)),
        mlp_bias=bool(raw.get("enable_bias", True)),
        hidden_act=act,
        do_layer_norm_before=layer_norm_before,
        word_embed_proj_dim=int(raw.get("word_embed_proj_dim") or hidden),
        final_layer_norm=layer_norm_before and not raw.get("_remove_final_layer_norm", False),
        **_common(raw),
    )
