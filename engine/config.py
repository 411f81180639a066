"""Model configuration read from a Hugging Face `config.json`, reduced to what the engine's families need."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hexgen.engine.quant_bytes import Prequantized, prequantized_of


class ConfigError(ValueError):
    """A checkpoint's config.json is missing, malformed or describes an unsupported model."""


# model_type -> architecture class; every decoder but OPT runs on the Llama-style decoder (engine/llama.py)
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "opt": "OPTForCausalLM",
}
_MODEL_TYPES = {arch: model_type for model_type, arch in _ARCHITECTURES.items()}
# what is known and refused, with the feature it lacks
_REFUSED = {
    "Qwen2MoeForCausalLM": "Qwen2-MoE's shared expert",
    "Qwen3MoeForCausalLM": "Qwen3-MoE's expert routing without renormalisation",
    "Gemma3ForCausalLM": "Gemma 3's per-layer rope bases",
    "Gemma3ForConditionalGeneration": "Gemma 3's vision tower",
    "Phi3SmallForCausalLM": "Phi-3-small's block-sparse attention",
}
_GELU = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only model. ``family`` is "llama" or "opt"; ``arch`` the Hugging Face model_type.

    ``layer_windows[i]`` is layer i's sliding attention window in tokens (0: full attention); ``attn_scale``
    0 means head_dim ** -0.5; softcaps 0 mean none; ``norm_offset`` 1 makes RMSNorm scale by (1 + w) (Gemma);
    ``num_experts`` > 0 replaces the MLP by a top-``experts_per_token`` mixture of experts.
    """

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
    arch: str = ""
    o_bias: bool = False
    qk_norm: bool = False
    layer_windows: tuple[int, ...] = ()
    attn_scale: float = 0.0
    attn_softcap: float = 0.0
    logit_softcap: float = 0.0
    norm_offset: float = 0.0
    embed_scale: bool = False
    sandwich_norms: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    prequantized: Prequantized | None = None  # the weight quantization the checkpoint ships (GPTQ, AWQ)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def window(self, layer: int) -> int:
        """Layer ``layer``'s attention window in tokens, 0 for full attention."""
        return self.layer_windows[layer] if self.layer_windows else 0

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
    model_type = _model_type(raw)
    return _opt(raw) if model_type == "opt" else _decoder(raw, model_type)


def _model_type(raw: dict[str, Any]) -> str:
    for arch in raw.get("architectures") or []:
        if arch in _REFUSED:
            raise ConfigError(f"unsupported architecture {arch!r}: {_REFUSED[arch]} is not implemented")
        if arch in _MODEL_TYPES:
            return _MODEL_TYPES[arch]
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type in _ARCHITECTURES:
        return model_type
    named = raw.get("architectures") or model_type
    raise ConfigError(f"unsupported architecture {named!r}; supported: {sorted(_MODEL_TYPES)}")


def _int(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _float(raw: dict[str, Any], key: str) -> float:
    """A positive number, or 0.0 where the key is absent or null."""
    value = raw.get(key)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{key} must be a positive number or null, got {value!r}")
    return float(value)


def _eos(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _prequantized(raw: dict[str, Any]) -> Prequantized | None:
    try:
        return prequantized_of(raw)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _common(raw: dict[str, Any]) -> dict[str, Any]:
    return {
        "prequantized": _prequantized(raw),
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_ids": _eos(raw),
        "torch_dtype": str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        "extra": raw,
    }


_ROPE_NEEDS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor",),
    "dynamic": ("factor",),
}


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """The RoPE base and scaling (None, or a dict whose ``rope_type`` is one of _ROPE_NEEDS)."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or None
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise ConfigError(f"unsupported partial_rotary_factor {partial:g}: rotary embedding of part of a head")
    if params and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    if scaling is None:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return theta, None
    if kind not in _ROPE_NEEDS:
        raise ConfigError(f"unsupported rope scaling {kind!r}; supported: default, {', '.join(_ROPE_NEEDS)}")
    missing = [k for k in _ROPE_NEEDS[kind] if scaling.get(k) is None]
    if missing:
        raise ConfigError(f"rope scaling {kind!r} needs {', '.join(missing)}")
    scaling = {**scaling, "rope_type": kind}
    if kind in ("yarn", "dynamic") and not scaling.get("original_max_position_embeddings"):
        scaling["original_max_position_embeddings"] = _int(raw, "max_position_embeddings", 2048)
    return theta, scaling


def _max_position(raw: dict[str, Any], scaling: dict[str, Any] | None) -> int:
    """The longest context: yarn and dynamic NTK scaling stretch the original context by their factor
    (Qwen2.5's long-context configs keep max_position_embeddings at the original 32768)."""
    trained = _int(raw, "max_position_embeddings", 2048)
    if scaling is not None and scaling["rope_type"] in ("yarn", "dynamic"):
        return max(trained, int(int(scaling["original_max_position_embeddings"]) * float(scaling["factor"])))
    return trained


def _windows(raw: dict[str, Any], model_type: str, num_layers: int) -> tuple[int, ...]:
    """Each layer's sliding attention window (0: full), as transformers applies ``sliding_window``."""
    window = raw.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
        window = None
    if window is None or model_type in ("llama", "gemma"):
        return ()
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ConfigError(f"sliding_window must be a positive integer or null, got {window!r}")
    types = raw.get("layer_types")
    if model_type in ("mistral", "mixtral", "phi3") or types is None:
        if model_type == "gemma2":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        elif model_type in ("qwen2", "qwen3"):
            first = int(raw.get("max_window_layers", num_layers))
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        else:
            types = ["sliding_attention"] * num_layers
    if not isinstance(types, list) or len(types) != num_layers:
        raise ConfigError(f"layer_types must list one attention type per layer ({num_layers}), got {types!r}")
    unknown = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
    if unknown:
        raise ConfigError(f"unsupported layer_types {unknown}: only sliding_attention and full_attention")
    return tuple(window if t == "sliding_attention" else 0 for t in types)


def _activation(raw: dict[str, Any], model_type: str) -> str:
    if model_type.startswith("gemma"):
        act = raw.get("hidden_activation") or "gelu_pytorch_tanh"
        if act not in _GELU:
            raise ConfigError(f"unsupported hidden_activation {act!r} for a Gemma model")
        return _GELU[act]
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"unsupported hidden_act {act!r} for a {model_type} model (expected silu)")
    return "silu"


def _arch_features(raw: dict[str, Any], model_type: str) -> dict[str, Any]:
    """What sets this model_type apart from Llama."""
    bias = bool(raw.get("attention_bias", False))
    features: dict[str, Any] = {"attention_bias": bias, "o_bias": bias}
    if model_type == "qwen2":
        features |= {"attention_bias": True, "o_bias": False}
    elif model_type == "qwen3":
        features["qk_norm"] = True
    elif model_type.startswith("gemma"):
        features |= {"norm_offset": 1.0, "embed_scale": True}
    if model_type == "gemma2":
        scalar = _float(raw, "query_pre_attn_scalar")
        features |= {
            "sandwich_norms": True,
            "attn_scale": scalar**-0.5 if scalar else 0.0,
            "attn_softcap": _float(raw, "attn_logit_softcapping"),
            "logit_softcap": _float(raw, "final_logit_softcapping"),
        }
    elif model_type == "mixtral":
        features |= {
            "num_experts": _int(raw, "num_local_experts"),
            "experts_per_token": _int(raw, "num_experts_per_tok"),
        }
        if features["experts_per_token"] > features["num_experts"]:
            raise ConfigError("num_experts_per_tok exceeds num_local_experts")
    return features


def _decoder(raw: dict[str, Any], model_type: str) -> ModelConfig:
    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    kv_heads = _int(raw, "num_key_value_heads", heads)
    head_dim = raw.get("head_dim") or hidden // heads
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    layers = _int(raw, "num_hidden_layers")
    theta, scaling = _rope(raw)
    features: dict[str, Any] = {
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", model_type.startswith("gemma")))
    }
    features |= _arch_features(raw, model_type)
    return ModelConfig(
        family="llama",
        arch=model_type,
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        intermediate_size=_int(raw, "intermediate_size"),
        max_position=_max_position(raw, scaling),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        hidden_act=_activation(raw, model_type),
        layer_windows=_windows(raw, model_type, layers),
        **features,
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
        arch="opt",
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
