"""Weight-only quantization of linear layers: int8 per output channel, int4 in groups along the input.

int8 is symmetric, one scale per output row: w ~ q * s with q in [-127, 127]. int4 is asymmetric, one scale
and one offset per group of INT4_GROUP input columns: w ~ q * s + m with q in [0, 15], stored as torch's
int4 kernels want it, (q - 8) * s + z with z = m + 8 s. Where torch's own CPU kernels take the shapes
(``torch._weight_int8pack_mm``: in half precision an input size a multiple of 16;
``torch._weight_int4pack_mm_for_cpu``: an output size a multiple of 16) a layer runs them; elsewhere it dequantizes its weight for each call and runs a plain matmul.

A checkpoint's own groups (``Grouped``: GPTQ's and AWQ's codes, integer zeros and scales) are held the same
way, with the offset of b-bit codes 2^(b-1): exactly (q - zero) * s, since both terms are small multiples of s.
Groups of 32 to 256 columns run torch's int4 kernel, in order or put in order by permuting the input (GPTQ's
act order); any other layout (a TP shard cutting a group, unequal groups, 8 bits) dequantizes for each call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from hexgen.engine.quant_bytes import INT4_GROUP, SCHEMES, check_scheme, linear_bytes, padded

# the byte arithmetic lives in quant_bytes (the planner counts it without torch); named here for the engine's users
__all__ = [
    "INT4_GROUP",
    "SCHEMES",
    "Grouped",
    "QuantizedWeight",
    "check_scheme",
    "dequantize_int4",
    "dequantize_int8",
    "linear_bytes",
    "pack_nibbles",
    "padded",
    "paths",
    "quantize_int4",
    "quantize_int8",
    "tensors",
    "unpack_nibbles",
    "weight_bytes",
]

_INT4_PACK_ROWS = 16  # _convert_weight_to_int4pack_for_cpu's constraint on the output size
_INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm_for_cpu takes


@dataclass(frozen=True)
class Grouped:
    """A weight a checkpoint ships quantized in groups of input columns:
    w[n, k] = (codes[n, k] - zeros[n, g_idx[k]]) * scales[n, g_idx[k]].

    ``codes`` [N, K] and ``zeros`` [N, G] are integers in [0, 2^bits] (GPTQ's zero can reach 2^bits),
    ``scales`` [N, G] floats, ``g_idx`` [K] int64 in [0, G)."""

    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1]

    def dequantized(self) -> torch.Tensor:
        """float32 [N, K]. O(N K)."""
        q = self.codes.float() - self.zeros.float()[:, self.g_idx]
        return q * self.scales.float()[:, self.g_idx]

    def group_size(self) -> int:
        """The size of its groups when every group is that many consecutive columns in order (the last one
        possibly shorter), else 0. O(K)."""
        k, groups = self.codes.shape[1], self.scales.shape[1]
        size = -(-k // groups)
        in_order = torch.equal(self.g_idx, torch.arange(k, device=self.g_idx.device) // size)
        return size if in_order and -(-k // size) == groups else 0


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 q [N, K] and float32 scales s [N] with w ~ q * s[:, None]; |error| <= s / 2. O(N K)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] from quantize_int8's output. O(N K)."""
    return q.float() * scale.float()[:, None]


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes q [N, Kp] (uint8 in 0..15), scales s and offsets z [N, Kp / group] (float32), Kp the input size
    padded with zero columns to a multiple of ``group``; w ~ (q - 8) * s + z per group, |error| <= s / 2.
    O(N K)."""
    n, k = w.shape
    w = F.pad(w.float(), (0, padded(k, group) - k)).reshape(n, -1, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(n, -1), scale, low + 8 * scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 [N, Kp] from quantize_int4's output. O(N Kp)."""
    n, groups = scale.shape
    codes = q.reshape(n, groups, -1).float() - 8
    return (codes * scale.float()[..., None] + zero.float()[..., None]).reshape(n, -1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dimension (even size): [..., K] -> [..., K / 2]."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def _int8_kernel_takes(device: torch.device, dtype: torch.dtype, in_features: int) -> bool:
    """Whether torch's CPU int8 kernel runs this shape: in half precision it crashes (torch 2.13) on an
    input size that is not a multiple of 8, so those take the dequantizing path."""
    return device.type == "cpu" and (dtype == torch.float32 or in_features % 16 == 0)


class QuantizedWeight(nn.Module):
    """A quantized [out_features, in_features] weight; calling it computes x W^T on the path ``path``:
    "int8-mm" or "int4-mm-cpu" (torch's kernels) or "int8-dequant" or "int4-dequant" (dequantize, matmul)."""

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor  # int4-dequant only

    g_idx: torch.Tensor | None  # a Grouped weight's, where its groups are not in order
    perm: torch.Tensor | None  # the input order that puts a Grouped weight's groups in order, for the kernel

    def __init__(self, w: torch.Tensor | Grouped, scheme: str, dtype: torch.dtype, device: torch.device) -> None:
        """``w`` a full-precision weight quantized with ``scheme`` ("int8", "int4"), or a checkpoint's
        ``Grouped`` weight held as it is (``scheme`` ignored)."""
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.dtype = dtype
        self.group, self.offset = INT4_GROUP, 8
        self.register_buffer("g_idx", None)
        self.register_buffer("perm", None)
        if isinstance(w, Grouped):
            self._hold(w, device)
            return
        w = w.to(device)  # quantized where it will run: a GPU does it faster
        if scheme == "int8":
            q, scale = quantize_int8(w)
            self.path = "int8-mm" if _int8_kernel_takes(device, dtype, self.in_features) else "int8-dequant"
            self.register_buffer("qweight", q.to(device))
            self.register_buffer("scale", scale.to(device, dtype))
            return
        q, scale, zero = quantize_int4(w)
        self._hold_int4(q, scale, zero, device)

    def _hold_int4(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, device: torch.device) -> None:
        """Codes q [N, Kp] (Kp a multiple of ``self.group``) with (q - 8) * scale + zero per group."""
        self.k_padded = q.shape[1]
        if device.type == "cpu" and self.out_features % _INT4_PACK_ROWS == 0:
            self.path = "int4-mm-cpu"
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            self.register_buffer("qweight", packed)
            # torch's layout: [groups, N, 2] holding (scale, zero)
            pairs = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()
            self.register_buffer("scale", pairs.to(device, self.dtype))
            return
        self.path = "int4-dequant"
        self.register_buffer("qweight", pack_nibbles(q).to(device))
        self.register_buffer("scale", scale.to(device, self.dtype))
        self.register_buffer("zero", zero.to(device, self.dtype))

    def _hold(self, w: Grouped, device: torch.device) -> None:
        """A checkpoint's groups: torch's int4 kernel where they are in order and of a size it takes, else
        codes and per-group scales and offsets (and the group index, where it is out of order)."""
        w = self._in_group_order(w, device)
        size = w.group_size()
        scale = w.scales.to(device, torch.float32)
        self.offset = 1 << (w.bits - 1)
        zero = (self.offset - w.zeros.to(device, torch.float32)) * scale  # (q - zero) s = (q - offset) s + this
        codes = w.codes.to(device)
        if w.bits == 4 and self._int4_kernel_takes(size, device):
            self.group = size
            self._hold_int4(codes, scale, zero, device)
            return
        if size == 0:
            self.register_buffer("g_idx", w.g_idx.to(device, torch.int32))
        self.group = size
        self.path = "int4-dequant" if w.bits == 4 else "int8-grouped-dequant"
        if w.bits == 4:
            codes = pack_nibbles(F.pad(codes, (0, self.in_features % 2)))
        self.register_buffer("qweight", codes.to(torch.uint8))
        self.register_buffer("scale", scale.to(self.dtype))
        self.register_buffer("zero", zero.to(self.dtype))

    def _int4_kernel_takes(self, group: int, device: torch.device) -> bool:
        """Whether torch's CPU int4 kernel runs this weight in groups of ``group`` columns."""
        fits = group in _INT4_KERNEL_GROUPS and self.in_features % group == 0
        return fits and device.type == "cpu" and self.out_features % _INT4_PACK_ROWS == 0

    def _in_group_order(self, w: Grouped, device: torch.device) -> Grouped:
        """A 4-bit weight whose groups are out of order (GPTQ's act order) but of one size torch's int4 kernel
        takes, with its columns sorted by group; ``perm`` then orders each input the same way. ``w`` itself
        otherwise. O(N K)."""
        if w.bits != 4 or w.group_size():
            return w
        order = torch.argsort(w.g_idx, stable=True)
        ordered = Grouped(w.codes[:, order], w.zeros, w.scales, w.g_idx[order], w.bits)
        if not self._int4_kernel_takes(ordered.group_size(), device):
            return w
        self.register_buffer("perm", order.to(device, torch.int32))
        return ordered

    def _grouped(self, q: torch.Tensor) -> torch.Tensor:
        """float32 [N, K] of codes q [N, >= K] and this weight's per-group scales and offsets."""
        q = q[:, : self.in_features].float() - self.offset
        if self.g_idx is not None:
            return q * self.scale.float()[:, self.g_idx] + self.zero.float()[:, self.g_idx]
        n, groups = self.scale.shape
        q = F.pad(q, (0, groups * self.group - self.in_features)).reshape(n, groups, self.group)
        w = q * self.scale.float()[..., None] + self.zero.float()[..., None]
        return w.reshape(n, -1)[:, : self.in_features]

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, [out_features, in_features] in float32."""
        if self.path == "int8-grouped-dequant":
            return self._grouped(self.qweight)
        if self.path.startswith("int8"):
            return dequantize_int8(self.qweight, self.scale)
        if self.path == "int4-dequant":
            return self._grouped(unpack_nibbles(self.qweight))
        eye = torch.eye(self.k_padded, dtype=self.scale.dtype)
        dense = torch._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group, self.scale)
        weight = dense.T[:, : self.in_features].float()
        if self.perm is None:
            return weight
        unsorted = torch.empty_like(weight)
        unsorted[:, self.perm.long()] = weight
        return unsorted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(self.dtype)
        if self.path == "int8-mm":
            y = torch._weight_int8pack_mm(x, self.qweight, self.scale)
        elif self.path == "int4-mm-cpu":
            x = x if self.perm is None else x.index_select(1, self.perm)
            x = F.pad(x, (0, self.k_padded - self.in_features))
            y = torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.qweight, self.group, self.scale)
        else:
            y = F.linear(x, self.dequantized().to(self.dtype))
        return y.reshape(*lead, self.out_features)

    if TYPE_CHECKING:

        def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    for sub in module.modules():
        if isinstance(sub, QuantizedWeight):
            yield from sub.buffers(recurse=False)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter of ``module`` and of its quantized weights' codes, scales and offsets."""
    return sum(t.numel() * t.element_size() for t in tensors(module))


def paths(module: nn.Module) -> dict[str, int]:
    """How many quantized linears of ``module`` run each path."""
    counts: dict[str, int] = {}
    for sub in module.modules():
        if isinstance(sub, QuantizedWeight):
            counts[sub.path] = counts.get(sub.path, 0) + 1
    return counts
