"""The hardware profile a node advertises: its GPUs, CPUs and memory, as frozen dataclasses parsed strictly.

A ``HardwareProfile`` travels in adverts; ``from_dict`` parses one from an untrusted peer and raises
``HardwareError``, and nothing else, on anything but ``to_dict`` output within generous ceilings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hexgen.coordinator.specs import GPU_TYPES, GPUType

MAX_GPUS = 64
MAX_NAME = 128
MAX_TFLOPS = 1e5
MAX_GB_S = 1e5
MAX_GPU_MEMORY_GB = 4096.0
MAX_HOST_MEMORY_GB = 1e6
MAX_CPUS = 65536


class HardwareError(ValueError):
    """A hardware description or ``--simulate-gpu`` value that cannot be used; the message says why."""


def _text(value: Any, what: str, limit: int = MAX_NAME) -> str:
    if not isinstance(value, str):
        raise HardwareError(f"{what} must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= limit or not value.isprintable():
        raise HardwareError(f"{what} must be 1..{limit} printable characters, got {value[:40]!r}")
    return value


def _number(value: Any, what: str, high: float, *, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HardwareError(f"{what} must be a number, got {type(value).__name__}")
    number = float(value) if abs(value) < 1e308 else math.inf  # float() overflows on huge ints
    low_ok = number >= 0 if zero_ok else number > 0
    if not math.isfinite(number) or not low_ok or number > high:
        bound = "[0" if zero_ok else "(0"
        raise HardwareError(f"{what} must be a finite number in {bound}, {high:g}], got {value!r}")
    return number


def _optional_number(value: Any, what: str, high: float) -> float | None:
    return None if value is None else _number(value, what, high)


def _integer(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HardwareError(f"{what} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise HardwareError(f"{what} must be in {low}..{high}, got {value}")
    return value


def _mapping(value: Any, what: str, required: set[str], optional: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise HardwareError(f"{what} must be a mapping, got {type(value).__name__}")
    keys = set(value)
    missing = required - keys
    if missing:
        raise HardwareError(f"{what} lacks {', '.join(sorted(missing))}")
    unknown = keys - required - optional
    if unknown:
        shown = ", ".join(sorted(repr(k)[:40] for k in unknown)[:5])
        raise HardwareError(f"{what} has unknown key(s) {shown}")
    return value


def known_gpu_type(name: str) -> GPUType | None:
    """The spec-table type a device name or type name denotes, or None when it denotes none.

    A type name matches case-insensitively ("h100" -> H100); a device name matches when one of its
    alphanumeric words is a type name: "NVIDIA H100 80GB HBM3" and "NVIDIA H100 PCIe" -> H100,
    "NVIDIA A100-SXM4-80GB" -> A100, "NVIDIA L40" -> L40, "NVIDIA RTX A6000" -> A6000; "NVIDIA L40S"
    and "NVIDIA H200" are other devices and match nothing. O(len(name) + number of types).
    """
    by_upper = {key.upper(): spec for key, spec in GPU_TYPES.items()}
    for word in re.split(r"[^A-Z0-9]+", name.upper()):
        if word in by_upper:
            return by_upper[word]
    return None


@dataclass(frozen=True)
class GPUInfo:
    """One GPU as advertised.

    ``type`` is a key of the spec table when the device is recognised, else the device name.
    ``tflops`` and ``hbm_gb_s`` are rated (peak) figures: the spec table's for a recognised or simulated
    type; for an unrecognised device the measured figures, or the slowest known type's when it was not
    calibrated. ``measured_tflops`` (dense bf16 matmul) and ``measured_hbm_gb_s`` (device-to-device copy,
    bytes read plus written) are what calibration observed, None when it did not run. ``memory_gb`` is
    the device's total memory in units of 1e9 bytes.
    """

    type: str
    memory_gb: float
    tflops: float
    hbm_gb_s: float
    simulated: bool
    name: str
    measured_tflops: float | None = None
    measured_hbm_gb_s: float | None = None

    def __post_init__(self) -> None:
        _text(self.type, "gpu type")
        _text(self.name, "gpu name")
        _number(self.memory_gb, "gpu memory_gb", MAX_GPU_MEMORY_GB)
        _number(self.tflops, "gpu tflops", MAX_TFLOPS)
        _number(self.hbm_gb_s, "gpu hbm_gb_s", MAX_GB_S)
        _optional_number(self.measured_tflops, "gpu measured_tflops", MAX_TFLOPS)
        _optional_number(self.measured_hbm_gb_s, "gpu measured_hbm_gb_s", MAX_GB_S)
        if not isinstance(self.simulated, bool):
            raise HardwareError(f"gpu simulated must be a boolean, got {type(self.simulated).__name__}")
        if self.simulated and self.type not in GPU_TYPES:
            raise HardwareError(f"a simulated GPU must have a known type ({', '.join(GPU_TYPES)}), got {self.type!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (str, float, bool, None), ready for msgpack. O(1)."""
        return {
            "type": self.type,
            "name": self.name,
            "memory_gb": self.memory_gb,
            "tflops": self.tflops,
            "hbm_gb_s": self.hbm_gb_s,
            "simulated": self.simulated,
            "measured_tflops": self.measured_tflops,
            "measured_hbm_gb_s": self.measured_hbm_gb_s,
        }

    @staticmethod
    def from_dict(data: Any, what: str = "gpu") -> GPUInfo:
        """Parse ``to_dict`` output from an untrusted peer; raises HardwareError on anything else. O(1)."""
        d = _mapping(
            data,
            what,
            {"type", "name", "memory_gb", "tflops", "hbm_gb_s", "simulated"},
            {"measured_tflops", "measured_hbm_gb_s"},
        )
        simulated = d["simulated"]
        if not isinstance(simulated, bool):
            raise HardwareError(f"{what} simulated must be a boolean, got {type(simulated).__name__}")
        return GPUInfo(
            type=_text(d["type"], f"{what} type"),
            memory_gb=_number(d["memory_gb"], f"{what} memory_gb", MAX_GPU_MEMORY_GB),
            tflops=_number(d["tflops"], f"{what} tflops", MAX_TFLOPS),
            hbm_gb_s=_number(d["hbm_gb_s"], f"{what} hbm_gb_s", MAX_GB_S),
            simulated=simulated,
            name=_text(d["name"], f"{what} name"),
            measured_tflops=_optional_number(d.get("measured_tflops"), f"{what} measured_tflops", MAX_TFLOPS),
            measured_hbm_gb_s=_optional_number(d.get("measured_hbm_gb_s"), f"{what} measured_hbm_gb_s", MAX_GB_S),
        )


@dataclass(frozen=True)
class HardwareProfile:
    """A node's hardware: GPUs in device order, CPU count, host memory (1e9 bytes; 0 when unknown) and the
    GPU-to-GPU bandwidth inside the host in GB/s (None: not measured, the planner uses the spec table)."""

    gpus: tuple[GPUInfo, ...]
    cpu_count: int
    memory_gb: float
    intra_host_gb_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.gpus, tuple) or not all(isinstance(g, GPUInfo) for g in self.gpus):
            raise HardwareError("gpus must be a tuple of GPUInfo")
        if len(self.gpus) > MAX_GPUS:
            raise HardwareError(f"at most {MAX_GPUS} GPUs per node, got {len(self.gpus)}")
        _integer(self.cpu_count, "cpu_count", 1, MAX_CPUS)
        _number(self.memory_gb, "memory_gb", MAX_HOST_MEMORY_GB, zero_ok=True)
        _optional_number(self.intra_host_gb_s, "intra_host_gb_s", MAX_GB_S)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (dict, list, str, int, float, bool, None), ready for msgpack. O(GPUs)."""
        return {
            "gpus": [g.to_dict() for g in self.gpus],
            "cpu_count": self.cpu_count,
            "memory_gb": self.memory_gb,
            "intra_host_gb_s": self.intra_host_gb_s,
        }

    @staticmethod
    def from_dict(data: Any) -> HardwareProfile:
        """Parse ``to_dict`` output from an untrusted peer.

        Strict: exact keys, at most 64 GPUs, finite positive figures under generous ceilings, short
        printable strings. Raises HardwareError, and nothing else, on any other input. O(GPUs).
        """
        d = _mapping(data, "hardware", {"gpus", "cpu_count", "memory_gb"}, {"intra_host_gb_s"})
        raw = d["gpus"]
        if not isinstance(raw, list | tuple):
            raise HardwareError(f"hardware gpus must be a list, got {type(raw).__name__}")
        if len(raw) > MAX_GPUS:
            raise HardwareError(f"at most {MAX_GPUS} GPUs per node, got {len(raw)}")
        return HardwareProfile(
            gpus=tuple(GPUInfo.from_dict(g, f"gpus[{i}]") for i, g in enumerate(raw)),
            cpu_count=_integer(d["cpu_count"], "cpu_count", 1, MAX_CPUS),
            memory_gb=_number(d["memory_gb"], "memory_gb", MAX_HOST_MEMORY_GB, zero_ok=True),
            intra_host_gb_s=_optional_number(d.get("intra_host_gb_s"), "intra_host_gb_s", MAX_GB_S),
        )

    def describe(self) -> str:
        """One line for logs: "2 x H100 (simulated), 16 CPUs, 128 GB". O(GPUs)."""
        counts: dict[str, int] = {}
        for g in self.gpus:
            label = f"{g.type} (simulated)" if g.simulated else g.type
            counts[label] = counts.get(label, 0) + 1
        gpus = ", ".join(f"{n} x {t}" for t, n in counts.items()) or "no GPU"
        return f"{gpus}, {self.cpu_count} CPUs, {self.memory_gb:.0f} GB"
