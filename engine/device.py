"""Where a worker's ranks run, and the start-up rule of their worlds.

Each worker process pins its own GPU before any CUDA work or NCCL group exists, so no rank lands on
cuda:0 by default; and a world's first collective after loading waits as long as the slowest rank takes
to load, while later collectives keep their short timeout (a dead peer must still be noticed quickly).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

log = logging.getLogger("hexgen.engine.device")


def pin_device(device: str | torch.device) -> torch.device:
    """Make ``device`` this process's current CUDA device (``cuda`` alone means ``cuda:0``); a no-op on
    CPU. Call before the process group exists: NCCL binds each rank to the current device."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    dev = torch.device("cuda", dev.index or 0)
    torch.cuda.set_device(dev)
    return dev


def nccl_device_id(device: str | torch.device, backend: str) -> torch.device | None:
    """The ``device_id`` for init_process_group: the pinned GPU for NCCL (it then creates its
    communicator for that device eagerly), None otherwise."""
    dev = torch.device(device)
    if backend != "nccl" or dev.type != "cuda":
        return None
    return torch.device("cuda", dev.index or 0)


def wait_for_ranks(group: Any, load_timeout: timedelta, op_timeout: timedelta | None = None) -> None:
    """A barrier every rank of ``group`` reaches once it has loaded: it waits up to ``load_timeout`` (a
    slow disk may take many minutes), then collectives get ``op_timeout`` again. gloo's monitored barrier
    takes its own timeout; for other backends the group's timeout is lifted for the barrier alone."""
    backend = dist.get_backend(group)
    if backend == "gloo":
        dist.monitored_barrier(group=group, timeout=load_timeout, wait_all_ranks=True)
        return
    lifted = _set_timeout(load_timeout, group)
    try:
        dist.barrier(group=group)
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            torch.cuda.synchronize()  # an NCCL barrier returns at once; the wait is on the stream
    finally:
        if lifted and op_timeout is not None:
            _set_timeout(op_timeout, group)


def _set_timeout(timeout: timedelta, group: Any) -> bool:
    """Set ``group``'s collective timeout where torch allows it (a private call in torch 2.x); False when
    it does not, and the barrier then keeps the group's own timeout."""
    set_timeout = getattr(distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is None:
        log.warning("this torch cannot change a group's timeout: the first collective keeps the group's own")
        return False
    try:
        set_timeout(timeout, group)
    except (RuntimeError, ValueError, TypeError) as exc:
        log.warning("cannot change the group's timeout (%s): the first collective keeps the group's own", exc)
        return False
    return True
