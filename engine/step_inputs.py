"""Moving a step's host-built integer inputs to the device: pinned, non-blocking copies on CUDA, nothing on CPU."""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a CPU tensor built for this step) on ``device``. On CUDA it is pinned first, so the copy is
    queued on the stream without a host sync (the caching host allocator keeps the pinned page alive until
    the copy ran); on CPU it is returned as is. O(numel)."""
    if device.type != "cuda":
        return host
    return staged(host, device).to(device, non_blocking=True)


def staged(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` ready for a ``copy_(..., non_blocking=True)`` into a tensor on ``device``: pinned on CUDA
    (the copy then runs on the stream without a host sync), as is on CPU. O(numel) on CUDA, O(1) else."""
    return host.pin_memory() if device.type == "cuda" else host


def ints(values: list[int], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A 1-D integer tensor of ``values`` on ``device`` through ``to_device``. O(len(values))."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def padded_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """Block tables as one [B, longest] int32 tensor, short rows padded with block 0. O(B * longest)."""
    width = max(len(table) for table in tables)
    return ints([b for table in tables for b in table + [0] * (width - len(table))], device, torch.int32).view(
        len(tables), width
    )
