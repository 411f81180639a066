"""Reads the linear weights a GPTQ or AWQ checkpoint ships quantized into engine.quant's ``Grouped`` form,
only the slice a TP shard keeps.

GPTQ (AutoGPTQ, GPTQModel, optimum) stores per linear ``qweight`` [K * b / 32, N] int32, b-bit codes packed
along the input, lowest bits first; ``qzeros`` [G, N * b / 32] int32 packed along the output the same way,
each one less than the zero it stands for in the original format (``checkpoint_format`` "gptq"; "gptq_v2"
stores it as it is); ``scales`` [G, N]; ``g_idx`` [K], each input column's group. AWQ (GEMM version) stores
``qweight`` [K, N / 8] and ``qzeros`` [G, N / 8] packed along the output in the interleaved order
0 2 4 6 1 3 5 7 (the i-th nibble of each int32 holds output AWQ_ORDER[i] of its eight), and ``scales`` [G, N];
its groups are consecutive. Either way w[n, k] = (code - zero) * scale of column k's group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hexgen.engine.layers import Piece
from hexgen.engine.quant import Grouped
from hexgen.engine.quant_bytes import Prequantized

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_UNDO = tuple(AWQ_ORDER.index(i) for i in range(8))  # output i of eight sits in nibble _AWQ_UNDO[i]
_PACKED_DTYPES = {"I32"}
_SCALE_DTYPES = {"F16", "BF16", "F32"}

Fetch = Callable[[str], Any]  # a tensor's name -> its safetensors slice view (get_shape, get_dtype, [...])


class PackedError(ValueError):
    """A pre-quantized linear whose tensors are missing, of the wrong type or of shapes that do not fit."""


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The ``bits``-bit codes of int32 ``packed`` [R, C], lowest bits first, spread along ``dim``: [R * 32 / bits,
    C] for dim 0, [R, C * 32 / bits] for dim 1, as uint8. O(R C 32 / bits)."""
    mask = (1 << bits) - 1
    parts = [((packed >> (bits * i)) & mask).to(torch.uint8) for i in range(32 // bits)]
    return torch.stack(parts, dim=dim + 1).flatten(dim, dim + 1)


def from_awq_order(codes: torch.Tensor) -> torch.Tensor:
    """Columns of codes unpacked from AWQ's interleaved packing [R, 8 M], put in output order. O(R M)."""
    rows, cols = codes.shape
    return codes.reshape(rows, cols // 8, 8)[:, :, list(_AWQ_UNDO)].reshape(rows, cols)


def read_grouped(fetch: Fetch, piece: Piece, quant: Prequantized) -> Grouped:
    """The slice of a linear ``piece`` names (``X.weight`` rows [start, end) are outputs, columns are inputs)
    from the checkpoint's ``X.qweight``, ``X.qzeros``, ``X.scales`` (and GPTQ's ``X.g_idx``), the groups it uses
    renumbered from 0. Raises PackedError. O(size of the slice + the layer's scales and zeros)."""
    base = _base(piece)
    qweight, scales, qzeros = (_view(fetch, f"{base}.{part}") for part in ("qweight", "scales", "qzeros"))
    _check_dtypes(base, qweight, scales, qzeros)
    if quant.method == "awq":
        return _awq(base, piece, quant, qweight, scales, qzeros)
    return _gptq(fetch, base, piece, quant, qweight, scales, qzeros)


def packed_name(piece: Piece) -> str:
    """The name of the packed codes standing for ``piece``'s ``X.weight``: ``X.qweight``."""
    return _base(piece) + ".qweight"


def _base(piece: Piece) -> str:
    return piece.name.removesuffix(".weight")


def _view(fetch: Fetch, name: str) -> Any:
    try:
        return fetch(name)
    except (KeyError, ValueError) as exc:
        raise PackedError(f"pre-quantized checkpoint lacks tensor {name!r} ({exc})") from None


def _shape(view: Any) -> list[int]:
    return [int(n) for n in view.get_shape()]


def _check_dtypes(base: str, qweight: Any, scales: Any, qzeros: Any) -> None:
    for part, view, allowed in (("qweight", qweight, _PACKED_DTYPES), ("qzeros", qzeros, _PACKED_DTYPES)):
        if view.get_dtype() not in allowed:
            raise PackedError(f"{base}.{part} is {view.get_dtype()}, not int32")
    if scales.get_dtype() not in _SCALE_DTYPES:
        raise PackedError(f"{base}.scales is {scales.get_dtype()}, not a float type")
    if len(_shape(qweight)) != 2 or len(_shape(scales)) != 2 or len(_shape(qzeros)) != 2:
        raise PackedError(f"{base}: qweight, qzeros and scales must be matrices")


def _expect(base: str, what: str, shape: list[int], wanted: list[int]) -> None:
    if shape != wanted:
        raise PackedError(f"{base}.{what} has shape {shape} where the others imply {wanted}")


def _groups(base: str, k: int, quant: Prequantized, scales_shape: list[int]) -> int:
    groups = -(-k // quant.group) if quant.group else 1
    if scales_shape[0] != groups:
        raise PackedError(
            f"{base}.scales has {scales_shape[0]} groups where {k} inputs in groups of {quant.group or k} make {groups}"
        )
    return groups


def _span(piece: Piece, dim: int, size: int) -> tuple[int, int]:
    """[start, end) of dimension ``dim`` (0: outputs, 1: inputs) of size ``size`` the piece keeps."""
    if piece.dim != dim:
        return 0, size
    if piece.end > size:
        raise PackedError(f"{_base(piece)} has {size} along dim {dim}; this shard needs [{piece.start}:{piece.end}]")
    return piece.start, piece.end


def _packed_rows(view: Any, span: tuple[int, int], per: int) -> tuple[torch.Tensor, int]:
    """Rows of ``view`` holding packed entries [start, end) of ``per`` per row, and where ``start`` falls in them."""
    first = span[0] // per
    return view[first : -(-span[1] // per)], span[0] - first * per


def _packed_cols(view: Any, span: tuple[int, int], per: int) -> tuple[torch.Tensor, int]:
    first = span[0] // per
    return view[:, first : -(-span[1] // per)], span[0] - first * per


def _gptq(
    fetch: Fetch, base: str, piece: Piece, quant: Prequantized, qweight: Any, scales: Any, qzeros: Any
) -> Grouped:
    per = 32 // quant.bits
    rows, n = _shape(qweight)
    k = rows * per
    groups = _groups(base, k, quant, _shape(scales))
    _expect(base, "scales", _shape(scales), [groups, n])
    _expect(base, "qzeros", _shape(qzeros), [groups, -(-n // per)])
    outs, ins = _span(piece, 0, n), _span(piece, 1, k)
    packed, skip = _packed_rows(qweight, ins, per)
    codes = unpack(packed[:, outs[0] : outs[1]], quant.bits, 0)[skip : skip + ins[1] - ins[0]].T
    zeros = unpack(qzeros[:], quant.bits, 1)[:, outs[0] : outs[1]].to(torch.int16) + quant.zero_offset
    g_idx = _gptq_g_idx(fetch, base, k, quant)
    return _grouped(codes, zeros, scales[:, outs[0] : outs[1]], g_idx[ins[0] : ins[1]], quant.bits, base)


def _gptq_g_idx(fetch: Fetch, base: str, k: int, quant: Prequantized) -> torch.Tensor:
    """Column k's group: the checkpoint's ``g_idx`` where it ships one, else consecutive groups."""
    try:
        view = fetch(f"{base}.g_idx")
    except (KeyError, ValueError):
        if quant.act_order:
            raise PackedError(f"{base}: desc_act is set but the checkpoint lacks {base}.g_idx") from None
        return torch.arange(k) // (quant.group or k)
    _expect(base, "g_idx", _shape(view), [k])
    if view.get_dtype() not in ("I32", "I64"):
        raise PackedError(f"{base}.g_idx is {view.get_dtype()}, not an integer type")
    g_idx: torch.Tensor = view[:]
    return g_idx.long()


def _awq(base: str, piece: Piece, quant: Prequantized, qweight: Any, scales: Any, qzeros: Any) -> Grouped:
    k, cols = _shape(qweight)
    n = cols * 8
    groups = _groups(base, k, quant, _shape(scales))
    _expect(base, "scales", _shape(scales), [groups, n])
    _expect(base, "qzeros", _shape(qzeros), [groups, cols])
    outs, ins = _span(piece, 0, n), _span(piece, 1, k)
    packed, skip = _packed_cols(qweight, outs, 8)
    codes = from_awq_order(unpack(packed[ins[0] : ins[1]], 4, 1))[:, skip : skip + outs[1] - outs[0]].T
    zeros = from_awq_order(unpack(qzeros[:], 4, 1))[:, outs[0] : outs[1]].to(torch.int16)
    g_idx = torch.arange(k)[ins[0] : ins[1]] // (quant.group or k)
    return _grouped(codes, zeros, scales[:, outs[0] : outs[1]], g_idx, quant.bits, base)


def _grouped(
    codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int, base: str
) -> Grouped:
    """A Grouped of codes [n, k] and zeros, scales [G, n] of every group, keeping only the groups ``g_idx``
    uses, renumbered in order. O(n k)."""
    groups = scales.shape[0]
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise PackedError(f"{base}.g_idx names groups outside [0, {groups})")
    used, local = torch.unique(g_idx, sorted=True, return_inverse=True)
    return Grouped(codes.contiguous(), zeros[used].T.contiguous(), scales[used].T.contiguous(), local, bits)


def concat(parts: list[Grouped]) -> Grouped | None:
    """Grouped pieces stacked along the outputs (q, k and v; gate and up), or None where their inputs are
    grouped differently (each GPTQ linear may order its own act-order groups). O(size)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if any(not torch.equal(p.g_idx, first.g_idx) or p.bits != first.bits for p in parts[1:]):
        return None
    return Grouped(
        torch.cat([p.codes for p in parts]),
        torch.cat([p.zeros for p in parts]),
        torch.cat([p.scales for p in parts]),
        first.g_idx,
        first.bits,
    )
