"""What a node brings to the swarm: its GPUs (detected, calibrated or simulated), CPUs and memory.

A daemon advertises a ``HardwareProfile`` (``hardware_profile``); the coordinator turns the profiles of all
members into the planner's cluster (see ``cluster_view``). GPUs are found with torch when it sees CUDA, and
a short calibration (``calibration``) measures bf16 matmul TFLOPS and device memory bandwidth;
``--simulate-gpu TYPE[xN]`` advertises a profile from the planner's spec table on machines without GPUs.

torch is imported only inside ``detect`` (and the helpers it calls), never when this module is
imported: the daemon's trio process stays light, and the caller runs ``detect`` in a thread or a
subprocess because it blocks for a few seconds.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from hexgen.coordinator.specs import GPU_TYPES, SpecError, gpu_type
from hexgen.daemon.calibration import cuda_calibrate, cuda_peer_gb_s
from hexgen.daemon.hardware_profile import (
    MAX_CPUS,
    MAX_GB_S,
    MAX_GPU_MEMORY_GB,
    MAX_GPUS,
    MAX_HOST_MEMORY_GB,
    MAX_NAME,
    MAX_TFLOPS,
    GPUInfo,
    HardwareError,
    HardwareProfile,
    known_gpu_type,
)


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
        measured = cuda_calibrate(torch, index, seconds) if calibrate else (None, None)
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
    intra = cuda_peer_gb_s(torch, seconds / 2) if calibrate and len(gpus) >= 2 else None
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
