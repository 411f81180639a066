"""Calibration: short timed runs that measure what a CPU or a CUDA device really does.

``calibrate_cpu`` times numpy matmuls and copies; the ``cuda_*`` functions time bf16 matmuls, device copies
and a device-to-device copy with CUDA events. numpy and torch are imported by the callers' paths only, never
when this module is imported; every measurement keeps within the seconds it is given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from hexgen.daemon.hardware_profile import HardwareError

_MATMUL_N = 4096
_COPY_BYTES = 1 << 30


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
        return float(start.elapsed_time(end)) / 1e3

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


def cuda_calibrate(torch: Any, index: int, seconds: float) -> tuple[float | None, float | None]:  # pragma: no cover
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


def cuda_peer_gb_s(torch: Any, seconds: float) -> float | None:  # pragma: no cover
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
