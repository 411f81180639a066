"""The byte arithmetic of weight-only quantization, torch-free: the schemes, their names on a command line and
on the wire, and what a quantized linear weight takes (engine.quant stores exactly this; the planner counts it).
"""

from __future__ import annotations

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
