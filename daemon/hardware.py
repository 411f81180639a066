"""What a node brings to the swarm: its GPUs (detected, calibrated or simulated), CPUs and memory.

A daemon advertises a ``HardwareProfile``; the coordinator turns the profiles of all members into the
planner's cluster (see ``cluster_view``). GPUs are found with torch when it sees CUDA, and a short
calibration measures bf16 matmul TFLOPS and device memory bandwidth; ``--simulate-gpu TYPE[xN]``
advertises a profile from the planner's spec table on machines without GPUs.

torch is imported only inside ``detect`` (and the helpers it calls), never when this module is
imported: the daemon's trio process stays light, and the caller runs ``detect`` in a thread or a
subprocess because it blocks for a few seconds.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hexgen.coordinator.specs import GPU_TYPES, GPUType, SpecError, gpu_type

__all__ = [
    "MAX_GPUS",
    "GPUInfo",
    "HardwareError",
    "HardwareProfile",
    "calibrate_cpu",
    "detect",
    "detect_isolated",
    "known_gpu_type",
    "parse_simulate_gpu",
    "simulated_profile",
]

MAX_GPUS = 64
MAX_NAME = 128
MAX_TFLOPS = 1e5
MAX_GB_S = 1e5
MAX_GPU_MEMORY_GB = 4096.0
MAX_HOST_MEMORY_GB = 1e6
MAX_CPUS = 65536

_MATMUL_N = 4096
_COPY_BYTES = 1 << 30


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


def parse_simulate_gpu(spec: str) -> tuple[str, int]:
    """``--simulate-gpu TYPE[xN]``: "H100" -> ("H100", 1), "a100X4" -> ("A100", 4).

    The type matches the spec table case-insensitively and comes back in its canonical spelling; N is
    1..64. Raises HardwareError naming the problem. O(len(spec)).
    """
    text = spec.strip() if isinstance(spec, str) else ""
    match = re.fullmatch(r"([A-Za-z0-9]+?)(?:[xX]([0-9]+))?", text)
    if match is None:
        raise HardwareError(f"--simulate-gpu: expected TYPE or TYPExN (for example H100x2), got {spec!r}")
    name, count_text = match.group(1), match.group(2)
    try:
        kind = gpu_type(name)
    except SpecError:
        raise HardwareError(f"--simulate-gpu: unknown GPU type {name!r}; known: {', '.join(GPU_TYPES)}") from None
    count = 1 if count_text is None else (int(count_text) if len(count_text) <= 3 else MAX_GPUS + 1)
    if not 1 <= count <= MAX_GPUS:
        raise HardwareError(f"--simulate-gpu: GPU count must be 1..{MAX_GPUS}, got {count_text}")
    return kind.name, count


def _host_figures() -> tuple[int, float]:
    """This machine's usable CPU count and physical memory in 1e9 bytes (0.0 when unknown). O(1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - platforms without sched_getaffinity
        cpus = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (AttributeError, ValueError, OSError):  # pragma: no cover - platforms without sysconf
        memory = 0.0
    return max(1, min(cpus, MAX_CPUS)), min(max(memory, 0.0), MAX_HOST_MEMORY_GB)


def simulated_profile(spec: str) -> HardwareProfile:
    """The profile ``--simulate-gpu spec`` advertises: N GPUs of the type with the spec table's memory,
    TFLOPS, HBM and intra-host bandwidth, beside this machine's real CPU count and memory. O(N)."""
    name, count = parse_simulate_gpu(spec)
    kind = GPU_TYPES[name]
    gpu = GPUInfo(
        type=kind.name,
        memory_gb=kind.memory_gb,
        tflops=kind.tflops,
        hbm_gb_s=kind.hbm_gbps,
        simulated=True,
        name=f"simulated {kind.name}",
    )
    cpus, memory = _host_figures()
    return HardwareProfile(gpus=(gpu,) * count, cpu_count=cpus, memory_gb=memory, intra_host_gb_s=kind.intra_host_gbps)


def _best_rate(run: Callable[[int], float], work_per_call: float, deadline: float, max_calls: int = 1 << 16) -> float:
    """The best rate (work per second) of repeated timed batches that end by ``deadline`` (perf_counter).

    ``run(calls)`` performs ``calls`` operations and returns the seconds they took. The first batch is
    one call; each next batch grows toward half of the time left and is skipped when fewer than two
    calls' worth of time is left, so only the first call can run past the deadline. O(log) batches.
    """
    best, calls = 0.0, 1
    while True:
        elapsed = run(calls)
        if elapsed > 0:
            best = max(best, work_per_call * calls / elapsed)
        per_call = max(elapsed / calls, 1e-9)
        left = deadline - time.perf_counter()
        if left < 2 * per_call:
            return best
        calls = max(1, min(calls * 4, max_calls, int(left / 2 / per_call)))


def calibrate_cpu(seconds: float = 0.5) -> tuple[float, float]:
    """A tiny CPU measurement: (float32 matmul GFLOPS, memory copy GB/s counting bytes read plus written).

    The first half of ``seconds`` (counted from the call, setup included) goes to 256x256 matmuls, the
    rest to copies of a 16 MB buffer; the call returns within ``seconds`` unless a single matmul or copy
    (a few milliseconds each) is longer than what is left. Uses numpy, imported here. O(seconds).
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds <= 0:
        raise HardwareError(f"calibration time must be a positive number of seconds, got {seconds!r}")
    started = time.perf_counter()
    import numpy as np

    n = 256
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    c = np.empty_like(a)
    size = 16 << 20
    src = np.ones(size, dtype=np.uint8)
    dst = np.ones(size, dtype=np.uint8)  # written once so that the timed copies do not page-fault

    def matmuls(calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            np.matmul(a, b, out=c)
        return time.perf_counter() - start

    gflops = _best_rate(matmuls, 2.0 * n**3, started + seconds / 2) / 1e9

    def copies(calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            np.copyto(dst, src)
        return time.perf_counter() - start

    gb_s = _best_rate(copies, 2.0 * size, started + seconds) / 1e9
    return max(gflops, 1e-9), max(gb_s, 1e-9)


def _cuda_events_timer(torch: Any, op: Callable[[], Any]) -> Callable[[int], float]:  # pragma: no cover
    """A ``run(calls)`` for ``_best_rate``: seconds that ``calls`` launches of op take on the current
    CUDA stream, timed with CUDA events."""

    def run(calls: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            op()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return run


def _cuda_matmul_tflops(torch: Any, device: Any, seconds: float) -> float:  # pragma: no cover
    """Dense bf16 TFLOPS of 4096^3 matmuls on ``device`` (the current device), within ``seconds``."""
    n = _MATMUL_N
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)

    def op() -> None:
        torch.matmul(a, b, out=c)

    op()
    torch.cuda.synchronize(device)
    return _best_rate(_cuda_events_timer(torch, op), 2.0 * n**3, time.perf_counter() + seconds) / 1e12


def _cuda_copy_gb_s(torch: Any, device: Any, seconds: float) -> float:  # pragma: no cover
    """Device memory GB/s (bytes read plus written) of a copy of up to 1 GiB on ``device``, within seconds."""
    free, _ = torch.cuda.mem_get_info(device)
    size = max(1 << 20, min(_COPY_BYTES, free // 4))
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty(size, dtype=torch.uint8, device=device)

    def op() -> None:
        dst.copy_(src)

    op()
    torch.cuda.synchronize(device)
    return _best_rate(_cuda_events_timer(torch, op), 2.0 * size, time.perf_counter() + seconds) / 1e9


def _cuda_calibrate(torch: Any, index: int, seconds: float) -> tuple[float | None, float | None]:  # pragma: no cover
    """(bf16 matmul TFLOPS, device copy GB/s) of CUDA device ``index``, each measured within seconds / 2
    after one warm-up call; None for a measurement that fails (for example out of memory)."""
    device = torch.device("cuda", index)
    results: list[float | None] = []
    with torch.cuda.device(device):
        for measure in (_cuda_matmul_tflops, _cuda_copy_gb_s):
            try:
                results.append(measure(torch, device, seconds / 2) or None)
            except RuntimeError:  # out of memory, or the device is busy or faulty: advertise no figure
                results.append(None)
            torch.cuda.empty_cache()
    return results[0], results[1]


def _cuda_peer_gb_s(torch: Any, seconds: float) -> float | None:  # pragma: no cover
    """GB/s of a copy from CUDA device 0 to device 1 (NVLink or PCIe, one direction) within seconds;
    None when it fails."""
    size = 256 << 20

    def measure() -> float:
        src = torch.empty(size, dtype=torch.uint8, device="cuda:0")
        dst = torch.empty(size, dtype=torch.uint8, device="cuda:1")

        def run(calls: int) -> float:
            start = time.perf_counter()
            for _ in range(calls):
                dst.copy_(src)
            torch.cuda.synchronize("cuda:0")
            torch.cuda.synchronize("cuda:1")
            return time.perf_counter() - start

        run(1)
        return _best_rate(run, float(size), time.perf_counter() + seconds) / 1e9

    try:
        rate = measure()
    except RuntimeError:
        return None
    torch.cuda.empty_cache()
    return rate or None


def _cuda_gpus(
    torch: Any, calibrate: bool, seconds: float
) -> tuple[tuple[GPUInfo, ...], float | None]:  # pragma: no cover
    """Every visible CUDA device as a GPUInfo, plus the measured intra-host bandwidth (None if not)."""
    slowest = min(GPU_TYPES.values(), key=lambda t: t.tflops)
    gpus = []
    for index in range(min(torch.cuda.device_count(), MAX_GPUS)):
        props = torch.cuda.get_device_properties(index)
        printable = "".join(ch for ch in str(props.name) if ch.isprintable()).strip()
        name = (printable or f"cuda:{index}")[:MAX_NAME]
        known = known_gpu_type(name)
        measured = _cuda_calibrate(torch, index, seconds) if calibrate else (None, None)
        if known is not None:
            tflops, hbm = known.tflops, known.hbm_gbps
        else:
            tflops = measured[0] or slowest.tflops
            hbm = measured[1] or slowest.hbm_gbps
        gpus.append(
            GPUInfo(
                type=known.name if known is not None else name,
                memory_gb=min(props.total_memory / 1e9, MAX_GPU_MEMORY_GB),
                tflops=min(tflops, MAX_TFLOPS),
                hbm_gb_s=min(hbm, MAX_GB_S),
                simulated=False,
                name=name,
                measured_tflops=None if measured[0] is None else min(measured[0], MAX_TFLOPS),
                measured_hbm_gb_s=None if measured[1] is None else min(measured[1], MAX_GB_S),
            )
        )
    intra = _cuda_peer_gb_s(torch, seconds / 2) if calibrate and len(gpus) >= 2 else None
    return tuple(gpus), None if intra is None else min(intra, MAX_GB_S)


def detect(calibrate: bool = True, seconds: float = 2.0) -> HardwareProfile:
    """This machine's hardware.

    With CUDA visible to torch: every device (name, total memory; recognised names map to spec types,
    others keep their name). With ``calibrate``, each GPU runs bf16 4096^3 matmuls and a large device
    copy, each for at most ``seconds / 2`` after one warm-up call (timed with CUDA events), and with two
    or more GPUs a device 0 -> 1 copy measures the intra-host bandwidth in ``seconds / 2``: about
    ``seconds`` per GPU in all. Without torch or CUDA: a CPU-only profile with zero GPUs, at once.
    Blocks; call it from a thread or a subprocess, never from the event loop.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds <= 0:
        raise HardwareError(f"calibration time must be a positive number of seconds, got {seconds!r}")
    cpus, memory = _host_figures()
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency, but a bare daemon may lack it
        return HardwareProfile(gpus=(), cpu_count=cpus, memory_gb=memory)
    if not torch.cuda.is_available():
        return HardwareProfile(gpus=(), cpu_count=cpus, memory_gb=memory)
    gpus, intra = _cuda_gpus(torch, calibrate, seconds)  # pragma: no cover
    return HardwareProfile(gpus=gpus, cpu_count=cpus, memory_gb=memory, intra_host_gb_s=intra)  # pragma: no cover


DETECT_TIMEOUT_S = 300.0


def detect_isolated(
    calibrate: bool = True, seconds: float = 2.0, timeout_s: float = DETECT_TIMEOUT_S
) -> HardwareProfile:
    """``detect`` in a child process: querying device properties and calibrating create a CUDA context, and
    the daemon must hold none (it would take memory on every GPU and tie the daemon to the driver). The
    child prints the profile as JSON; raises HardwareError when it fails or prints something else."""
    import json
    import subprocess
    import sys

    code = (
        "import json; from hexgen.daemon.hardware import detect; "
        f"print(json.dumps(detect(calibrate={bool(calibrate)!r}, seconds={float(seconds)!r}).to_dict()))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise HardwareError(f"hardware detection took over {timeout_s:.0f} s") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise HardwareError(f"hardware detection failed (exit {done.returncode}): {tail}")
    try:
        return HardwareProfile.from_dict(json.loads(done.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        raise HardwareError("hardware detection printed no profile") from None
