"""Hardware and model specifications the planner reasons about: GPU types, model shapes."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from hexgen.engine.quant_bytes import Prequantized, check_scheme, linear_bytes, prequantized_bytes, prequantized_of


class SpecError(ValueError):
    """A GPU type, model name or model config the planner cannot use."""


@dataclass(frozen=True)
class GPUType:
    name: str
    tflops: float
    hbm_gbps: float
    memory_gb: float
    price_per_hour: float
    intra_host_gbps: float


GPU_TYPES: dict[str, GPUType] = {
    t.name: t
    for t in (
        GPUType("H100", tflops=989.0, hbm_gbps=3350.0, memory_gb=80.0, price_per_hour=3.69, intra_host_gbps=450.0),
        GPUType("A100", tflops=312.0, hbm_gbps=2039.0, memory_gb=80.0, price_per_hour=1.99, intra_host_gbps=300.0),
        GPUType("L40", tflops=181.0, hbm_gbps=864.0, memory_gb=48.0, price_per_hour=1.29, intra_host_gbps=25.0),
        GPUType("A6000", tflops=155.0, hbm_gbps=768.0, memory_gb=48.0, price_per_hour=0.79, intra_host_gbps=25.0),
    )
}


def gpu_type(name: str) -> GPUType:
    """Look up a GPU type by name, case-insensitively."""
    for known in GPU_TYPES.values():
        if known.name.lower() == name.strip().lower():
            return known
    raise SpecError(f"unknown GPU type {name!r} (known: {', '.join(GPU_TYPES)})")


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, enough to cost it."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    bytes_per_param: int = 2
    gated_mlp: bool = True
    tied_embeddings: bool = False
    max_context: int = 4096
    explicit_head_dim: int = 0  # Qwen3, Gemma: heads * head_dim need not equal hidden
    experts: int = 0  # a mixture of experts (Mixtral): the MLP is ``experts`` gated MLPs and a router
    experts_per_token: int = 0
    quantize: str | None = None  # the layers' linear weights: None (full precision), "int8" or "int4"
    prequantized: Prequantized | None = None  # the quantization its checkpoint ships (GPTQ, AWQ)

    def __post_init__(self) -> None:
        try:
            check_scheme(self.quantize)
        except ValueError as exc:
            raise SpecError(f"model {self.name}: {exc}") from None
        if self.quantize is not None and self.prequantized is not None:
            raise SpecError(
                f"model {self.name}: its checkpoint ships quantized weights ({self.prequantized.name}); "
                f"it cannot be quantized again with {self.quantize} (use --quantize none)"
            )
        for field_name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "bytes_per_param"):
            if getattr(self, field_name) < 1:
                raise SpecError(f"model {self.name}: {field_name} must be positive")
        if (self.hidden % self.heads and not self.explicit_head_dim) or self.heads % self.kv_heads:
            raise SpecError(f"model {self.name}: heads must divide hidden and kv_heads must divide heads")

    @cached_property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden // self.heads

    def _layer_params(self, mlps: int) -> int:
        attention = 2 * self.hidden * (self.heads + self.kv_heads) * self.head_dim
        router = self.hidden * self.experts
        return attention + router + mlps * (3 if self.gated_mlp else 2) * self.hidden * self.intermediate

    @cached_property
    def layer_params(self) -> int:
        """Parameters one layer holds: every expert of a mixture (memory)."""
        return self._layer_params(self.experts or 1)

    @cached_property
    def active_layer_params(self) -> int:
        """Parameters one token's pass through a layer uses: only its top-k experts (FLOPs)."""
        return self._layer_params(self.experts_per_token or 1)

    @cached_property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @cached_property
    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @cached_property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.head_params

    def _linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of each linear weight of a layer the engine quantizes: attention and every expert's MLP
        (the router stays in full precision)."""
        attention = (self.heads + 2 * self.kv_heads) * self.head_dim
        mlp = [(2 * self.intermediate, self.hidden)] if self.gated_mlp else [(self.intermediate, self.hidden)]
        mlp.append((self.hidden, self.intermediate))
        return [(attention, self.hidden), (self.hidden, self.heads * self.head_dim), *mlp * (self.experts or 1)]

    @cached_property
    def layer_bytes(self) -> float:
        """Bytes one layer's weights take in memory, and what a decode step reads of them; quantized linear
        weights count their codes, scales and offsets (engine.quant_bytes)."""
        if self.quantize is None and self.prequantized is None:
            return self.layer_params * self.bytes_per_param
        linears = sum(self.quantized_linear_bytes(o, i) for o, i in self._linear_shapes())
        return linears + self.hidden * self.experts * self.bytes_per_param

    def quantized_linear_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes a [out, in] linear weight of a layer takes, quantized as the model says. O(1)."""
        if self.prequantized is not None:
            return prequantized_bytes(out_features, in_features, self.prequantized, self.bytes_per_param)
        return linear_bytes(out_features, in_features, self.quantize, self.bytes_per_param)

    @cached_property
    def weight_bytes(self) -> float:
        """Bytes of every weight: the layers' (quantized or not) and the embedding and head (never quantized)."""
        if self.quantize is None and self.prequantized is None:
            return self.params * self.bytes_per_param
        return self.layers * self.layer_bytes + (self.embedding_params + self.head_params) * self.bytes_per_param

    @cached_property
    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.bytes_per_param

    @cached_property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes for one token across all layers: 2 * layers * kv_heads * head_dim * bytes."""
        return self.layers * self.kv_bytes_per_token_layer


LLAMA_2_70B = ModelSpec("llama-2-70b", layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=32000)
MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec(
            "opt-30b",
            layers=48,
            hidden=7168,
            heads=56,
            kv_heads=56,
            intermediate=28672,
            vocab=50272,
            gated_mlp=False,
            tied_embeddings=True,
            max_context=2048,
        ),
        ModelSpec("llama-2-7b", layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32000),
        ModelSpec("llama-2-13b", layers=40, hidden=5120, heads=40, kv_heads=40, intermediate=13824, vocab=32000),
        LLAMA_2_70B,
        replace(LLAMA_2_70B, name="llama-3-70b", vocab=128256, max_context=8192),  # its layers, a larger vocabulary
    )
}

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp32": 4, "fp16": 2, "bf16": 2}


def _dtype_bytes(config: dict[str, Any]) -> int:
    dtype = str(config.get("torch_dtype", "float16"))
    if dtype not in _DTYPE_BYTES:
        raise SpecError(f"unsupported torch_dtype {dtype!r} (supported: {', '.join(_DTYPE_BYTES)})")
    return _DTYPE_BYTES[dtype]


_DECODERS = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "gemma", "gemma2")


def model_from_hf_config(config: dict[str, Any], name: str = "custom") -> ModelSpec:
    """Build a ModelSpec from a Hugging Face ``config.json`` mapping (Llama family or OPT); a pre-quantized
    checkpoint's (GPTQ, AWQ: a ``quantization_config``) linear weights counted as it ships them."""
    kind = str(config.get("model_type", "")).lower()
    try:
        shipped = prequantized_of(config)
    except ValueError as exc:
        raise SpecError(f"model {name}: {exc}") from None
    spec = _spec(config, name, kind)
    return spec if shipped is None else replace(spec, prequantized=shipped)


def _spec(config: dict[str, Any], name: str, kind: str) -> ModelSpec:
    try:
        if kind == "opt":
            hidden = int(config["hidden_size"])
            return ModelSpec(
                name=name,
                layers=int(config["num_hidden_layers"]),
                hidden=hidden,
                heads=int(config["num_attention_heads"]),
                kv_heads=int(config["num_attention_heads"]),
                intermediate=int(config.get("ffn_dim", 4 * hidden)),
                vocab=int(config["vocab_size"]),
                bytes_per_param=_dtype_bytes(config),
                gated_mlp=False,
                max_context=int(config.get("max_position_embeddings", 2048)),
                tied_embeddings=bool(config.get("tie_word_embeddings", True)),
            )
        if kind in _DECODERS:
            heads = int(config["num_attention_heads"])
            return ModelSpec(
                name=name,
                layers=int(config["num_hidden_layers"]),
                hidden=int(config["hidden_size"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                intermediate=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]),
                bytes_per_param=_dtype_bytes(config),
                gated_mlp=True,
                max_context=int(config.get("max_position_embeddings", 4096)),
                tied_embeddings=bool(config.get("tie_word_embeddings", kind.startswith("gemma"))),
                explicit_head_dim=int(config.get("head_dim") or 0),
                experts=int(config.get("num_local_experts") or 0),
                experts_per_token=int(config.get("num_experts_per_tok") or 0),
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"model config is missing or has a bad field: {exc}") from None
    raise SpecError(f"unsupported model_type {kind!r} (supported: {', '.join(_DECODERS)}, opt)")


def resolve_model(name_or_path: str) -> ModelSpec:
    """A model by preset name (``llama-2-70b``), or a checkpoint directory / ``config.json`` path."""
    preset = MODELS.get(name_or_path.strip().lower())
    if preset is not None:
        return preset
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SpecError(f"unknown model {name_or_path!r}: not a preset ({', '.join(MODELS)}) nor a config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"cannot read model config {path}: {exc}") from None
    if not isinstance(config, dict):
        raise SpecError(f"model config {path} is not a JSON object")
    return model_from_hf_config(config, name=path.parent.name or "custom")
