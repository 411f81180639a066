"""How many KV blocks a worker gets: what is left of a fraction of the device's memory after the weights
and the activations of the largest batch (measured by a profiling forward pass, like vLLM's
gpu_memory_utilization)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryProfile:
    """Figures of one device, in bytes, taken after the weights are loaded, the process groups exist and a
    max-batch forward pass has run. ``peak_allocated``: torch's peak during that pass (weights included);
    ``non_torch``: memory in use on the device that torch's allocator does not own (CUDA context, NCCL
    buffers, other processes)."""

    total: int
    peak_allocated: int
    non_torch: int


def kv_cache_blocks(profile: MemoryProfile, utilization: float, block_bytes: int) -> int:
    """The blocks that fit in ``utilization`` of the device once the profiled peak and the memory outside
    torch are taken out; 0 when nothing is left. Raises ValueError for figures that make no sense."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    if block_bytes <= 0:
        raise ValueError(f"a KV block must take some bytes, got {block_bytes}")
    if min(profile.total, profile.peak_allocated, profile.non_torch) < 0:
        raise ValueError(f"memory figures must not be negative: {profile}")
    budget = int(profile.total * utilization) - profile.peak_allocated - profile.non_torch
    return max(budget, 0) // block_bytes


def fixed_budget_blocks(memory_bytes: int, block_bytes: int) -> int:
    """CPU: a fixed byte budget for the cache (host memory is not profiled)."""
    if block_bytes <= 0:
        raise ValueError(f"a KV block must take some bytes, got {block_bytes}")
    return max(memory_bytes, 0) // block_bytes
