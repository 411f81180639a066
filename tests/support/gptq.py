"""Tiny GPTQ and AWQ checkpoints, packed from a full-precision Llama checkpoint by a reference packer written
from the formats' descriptions (independent of hexgen.engine.prequantized), beside a full-precision checkpoint
of exactly the weights they stand for (for transformers to run).

The codes are round-to-nearest (GPTQ's error-compensating search changes which codes, not how they are
stored). GPTQ: ``qweight`` [K b / 32, N] int32 packing b-bit codes along the input, lowest bits first;
``qzeros`` [G, N b / 32] packing zeros along the output, stored as zero - 1 in the original format (a reader
adds 1 back to the masked value, so a zero of 0 reads as 2^b) and as they are in "gptq_v2"; ``scales``
[G, N] float16; ``g_idx`` [K] (act order: the groups follow a permutation of the columns). AWQ GEMM:
``qweight`` [K, N / 8] and ``qzeros`` [G, N / 8] packing 4-bit values along the output, nibble i of each int32
holding output ORDER[i] of its eight; ``scales`` [G, N].
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

AWQ_NIBBLE_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LINEARS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Variant:
    """How a test checkpoint is quantized: ``group`` -1 is one group per input row."""

    method: str = "gptq"
    bits: int = 4
    group: int = 32
    act_order: bool = False
    sym: bool = False
    v2: bool = False
    shared_order: bool = True  # act order: linears of one input (q, k, v; gate, up) share it, as GPTQ's do

    def quantization_config(self) -> dict[str, object]:
        if self.method == "awq":
            return {"quant_method": "awq", "bits": 4, "group_size": self.group, "zero_point": True, "version": "gemm"}
        config: dict[str, object] = {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group,
            "desc_act": self.act_order,
            "sym": self.sym,
        }
        if self.v2:
            config["checkpoint_format"] = "gptq_v2"
        return config


def _group_index(k: int, variant: Variant, seed: int) -> np.ndarray:
    size = variant.group if variant.group > 0 else k
    if not variant.act_order:
        return np.arange(k) // size
    order = np.random.default_rng(seed).permutation(k)  # act order: columns taken in a permuted order
    g_idx = np.empty(k, dtype=np.int64)
    g_idx[order] = np.arange(k) // size
    return g_idx


def _quantize(w: np.ndarray, g_idx: np.ndarray, variant: Variant) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes [N, K], zeros [N, G] and float16 scales [N, G] of w [N, K], min-max per group (GPTQ's range
    always holds 0)."""
    maxq = (1 << variant.bits) - 1
    groups = int(g_idx.max()) + 1
    zeros = np.zeros((w.shape[0], groups), dtype=np.int64)
    scales = np.zeros((w.shape[0], groups), dtype=np.float16)
    codes = np.zeros(w.shape, dtype=np.int64)
    for g in range(groups):
        cols = g_idx == g
        low, high = np.minimum(w[:, cols].min(1), 0), np.maximum(w[:, cols].max(1), 0)
        if variant.sym:
            scale = (np.maximum(-low, high) * 2 / maxq).astype(np.float16)
            zero = np.full(w.shape[0], (maxq + 1) // 2)
        else:
            scale = ((high - low) / maxq).astype(np.float16)
            zero = np.round(-low / scale.astype(np.float32)).astype(np.int64)
        scales[:, g], zeros[:, g] = scale, zero
        step = scale.astype(np.float32)[:, None]
        codes[:, cols] = np.clip(np.round(w[:, cols] / step) + zero[:, None], 0, maxq)
    return codes, zeros, scales


def _pack(values: np.ndarray, bits: int, axis: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """Pack ``values`` (non-negative, < 2^bits) along ``axis``, 32 / bits to an int32, value j of each run in
    bits [bits * i, bits * (i + 1)) where order[i] = j (lowest bits first when order is None)."""
    per = 32 // bits
    order = order or tuple(range(per))
    v = np.moveaxis(values.astype(np.uint64) & ((1 << bits) - 1), axis, 0)
    runs = v.reshape(v.shape[0] // per, per, *v.shape[1:])
    packed = np.zeros(runs[:, 0].shape, dtype=np.uint64)
    for i, j in enumerate(order):
        packed |= runs[:, j] << np.uint64(bits * i)
    return np.moveaxis(packed.astype(np.uint32).view(np.int32), 0, axis)


def _order_seed(base: str, index: int, variant: Variant) -> int:
    """The seed of a linear's act order: GPTQ orders columns by its input's statistics, which q, k and v (and
    gate and up) share."""
    if not variant.shared_order:
        return index
    shared = base.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
    return sum(shared.encode())


def _layer_tensors(w: torch.Tensor, variant: Variant, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The tensors standing for one linear weight [N, K], and the float32 weight a reader dequantizes them to."""
    w_np = w.float().numpy()
    g_idx = _group_index(w_np.shape[1], variant, seed)
    codes, zeros, scales = _quantize(w_np, g_idx, variant)
    if variant.method == "awq":
        read_zeros = zeros
        tensors = {
            "qweight": _pack(codes.T, 4, 1, AWQ_NIBBLE_ORDER),
            "qzeros": _pack(zeros.T, 4, 1, AWQ_NIBBLE_ORDER),
        }
    else:
        stored = zeros if variant.v2 else zeros - 1
        masked = stored & ((1 << variant.bits) - 1)
        read_zeros = masked if variant.v2 else masked + 1
        tensors = {"qweight": _pack(codes.T, variant.bits, 0), "qzeros": _pack(stored.T, variant.bits, 1)}
        tensors["g_idx"] = g_idx.astype(np.int32)
    out = {name: torch.from_numpy(np.ascontiguousarray(t)) for name, t in tensors.items()}
    out["scales"] = torch.from_numpy(np.ascontiguousarray(scales.T))
    dequantized = (codes - read_zeros[:, g_idx]).astype(np.float32) * scales.astype(np.float32)[:, g_idx]
    return out, torch.from_numpy(dequantized)


def write_prequantized(source: Path, packed_dir: Path, dequantized_dir: Path, variant: Variant) -> None:
    """Pack every layer's linear weights of the checkpoint at ``source`` (one model.safetensors) as ``variant``
    says into ``packed_dir``, and write the weights they dequantize to, in float32, into ``dequantized_dir``."""
    weights = load_file(str(source / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    packed, plain = dict(weights), dict(weights)
    for index, name in enumerate(sorted(n for n in weights if n.removesuffix(".weight").endswith(LINEARS))):
        base = name.removesuffix(".weight")
        tensors, dequantized = _layer_tensors(weights[name], variant, _order_seed(base, index, variant))
        del packed[name]
        packed |= {f"{base}.{part}": t for part, t in tensors.items()}
        plain[name] = dequantized
    for out, tensors, extra in (
        (packed_dir, packed, {"quantization_config": variant.quantization_config()}),
        (dequantized_dir, plain, {}),
    ):
        out.mkdir(parents=True)
        for other in source.iterdir():
            if other.name not in ("model.safetensors", "config.json"):
                shutil.copy(other, out / other.name)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config | extra, indent=1))
