"""The byte arithmetic of weight-only quantization, torch-free: the schemes, their names on a command line and
on the wire, what a quantized linear weight takes (engine.quant stores exactly this; the planner counts it), and
the quantization a pre-quantized checkpoint (GPTQ, AWQ) ships, read from its config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCHEMES = ("int8", "int4")
NONE = "none"  # full precision, as a command line, an advert and a plan name it
QUANTIZATIONS = (NONE, *SCHEMES)
INT4_GROUP = 32


def check_scheme(name: str | None) -> str | None:
    """``name`` when it is None or one of SCHEMES; otherwise a ValueError naming the choices."""
    if name is None or name in SCHEMES:
        return name
    raise ValueError(f"unknown quantization {name!r}; choose one of {', '.join(SCHEMES)} (or None for full precision)")


def scheme_of(name: str) -> str | None:
    """The engine's scheme (None: full precision) for a name of QUANTIZATIONS; a ValueError in one line for
    any other. O(1)."""
    if name == NONE:
        return None
    if name in SCHEMES:
        return name
    raise ValueError(f"unknown quantization {name!r}: choose one of {', '.join(QUANTIZATIONS)}")


def name_of(scheme: str | None) -> str:
    """The name of QUANTIZATIONS for an engine scheme (None: "none"). O(1)."""
    return NONE if scheme is None else scheme


def padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def linear_bytes(out_features: int, in_features: int, scheme: str | None, itemsize: int) -> int:
    """Bytes a [out, in] linear weight takes quantized with ``scheme`` (None: full precision), its scales
    and offsets in an ``itemsize``-byte dtype: what a memory model of a quantized replica counts. O(1)."""
    if scheme is None:
        return out_features * in_features * itemsize
    if scheme == "int8":
        return out_features * (in_features + itemsize)
    groups = padded(in_features, INT4_GROUP) // INT4_GROUP
    return out_features * (groups * INT4_GROUP // 2 + 2 * groups * itemsize)


PREQUANTIZED = ("gptq", "awq")
_GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what the stored zeros lack (GPTQ's "zero - 1")


@dataclass(frozen=True)
class Prequantized:
    """The weight quantization a checkpoint ships: ``method`` "gptq" or "awq", ``bits`` (4 or 8) per weight,
    groups of ``group`` input columns (0: a whole input row), ``zero_offset`` added to each stored zero (1 in
    GPTQ's original format), and ``act_order`` when a per-column group index (GPTQ's g_idx) is not in order."""

    method: str
    bits: int
    group: int
    zero_offset: int = 0
    act_order: bool = False

    @property
    def name(self) -> str:
        groups = f"groups of {self.group}" if self.group else "one group per row"
        return f"{self.method} int{self.bits}, {groups}{', act order' if self.act_order else ''}"


def _field(config: dict[str, Any], *keys: str) -> Any:
    """The value of the first of ``keys`` that ``config`` has (the tools name some fields differently)."""
    return next((config[k] for k in keys if k in config), None)


def prequantized_of(config: dict[str, Any]) -> Prequantized | None:
    """The quantization a Hugging Face ``config.json`` mapping says its checkpoint ships (None: none); a
    ValueError in one line for one the engine cannot load. O(1)."""
    raw = config.get("quantization_config")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("quantization_config must be a JSON object")
    method = str(raw.get("quant_method", "")).lower()
    if method not in PREQUANTIZED:
        raise ValueError(f"pre-quantized checkpoints of quant_method {method!r} are not supported (only gptq, awq)")
    bits = _field(raw, "bits", "w_bit")
    group = _field(raw, "group_size", "q_group_size")
    if bits not in (4, 8) or (method == "awq" and bits != 4):
        raise ValueError(f"{method} checkpoints of {bits!r} bits are not supported (gptq: 4 or 8, awq: 4)")
    if isinstance(group, bool) or not isinstance(group, int) or group == 0 or group < -1:
        raise ValueError(f"{method} group_size must be a positive integer or -1, got {group!r}")
    return _gptq(raw, bits, group) if method == "gptq" else _awq(raw, group)


def _gptq(raw: dict[str, Any], bits: int, group: int) -> Prequantized:
    fmt = str(_field(raw, "checkpoint_format", "format") or "gptq").lower()
    if fmt not in _GPTQ_FORMATS or raw.get("is_marlin_format"):
        raise ValueError(f"gptq checkpoint_format {fmt!r} is not supported (only {', '.join(_GPTQ_FORMATS)})")
    if str(raw.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise ValueError(f"gptq pack_dtype {raw['pack_dtype']!r} is not supported (only int32)")
    if raw.get("lm_head"):
        raise ValueError("gptq checkpoints with a quantized lm_head are not supported")
    act_order = bool(raw.get("desc_act", False))
    return Prequantized("gptq", bits, max(group, 0), _GPTQ_FORMATS[fmt], act_order)


def _awq(raw: dict[str, Any], group: int) -> Prequantized:
    version = str(raw.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"awq version {version!r} is not supported (only gemm)")
    if not raw.get("zero_point", True):
        raise ValueError("awq checkpoints without zero points are not supported")
    return Prequantized("awq", 4, max(group, 0))


def prequantized_bytes(out_features: int, in_features: int, quant: Prequantized, itemsize: int) -> int:
    """Bytes a [out, in] linear weight of a pre-quantized checkpoint takes as engine.quant holds it: its codes,
    a scale and an offset per group and output in an ``itemsize``-byte dtype, and an int32 group index per
    input column when the groups are out of order. O(1)."""
    groups = -(-in_features // quant.group) if quant.group else 1
    codes = out_features * -(-in_features * quant.bits // 8)
    return codes + 2 * out_features * groups * itemsize + (4 * in_features if quant.act_order else 0)
