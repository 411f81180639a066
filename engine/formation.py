"""Forming a torch.distributed world fast or failing fast, with the cause.

A world forms in two steps with two clocks. First every rank marks its arrival in the store and waits for
the others (``arrival_s``, long: ranks start seconds apart, importing torch and loading weights). Only
then do the ranks connect to each other, under ``connect_s`` (short: peers that are all present connect
in milliseconds, and an address that cannot be reached would otherwise hold the world for gloo's whole
timeout; gloo even retries a connection that gets no answer, a firewall dropping its packets, for several
times the timeout it was given, so the connect step runs in a thread that this one stops waiting for). A one-element all-reduce proves every pair carries data before the world is called formed; the
long per-operation timeout is set afterwards. A failure becomes a WorldFormationError naming the address
gloo could not reach (its ``remote=[ADDR]:PORT``), so the daemon can say which peer it was.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import PrefixStore, ProcessGroup, Store

from hexgen.engine.bounds import CONNECT_TIMEOUT_S

T = TypeVar("T")

CONNECT_GRACE_S = 1.0  # beyond the connect timeout, before the connecting thread is given up on
ARRIVAL_TIMEOUT_S = 120.0
# gloo writes the peer it could not reach as remote=[ADDR]:PORT (the port is not always printed sanely),
# and one that dropped the connection as "Read error [ADDR]:PORT"
_REMOTE = re.compile(r"(?:remote=|error )\[([^\]\s]{1,64})\]")


@dataclass(frozen=True)
class Timeouts:
    """The clocks of a world: ranks arriving, ranks connecting once all arrived, and each later operation."""

    arrival_s: float = ARRIVAL_TIMEOUT_S
    connect_s: float = CONNECT_TIMEOUT_S
    operation_s: float = 120.0


class WorldFormationError(RuntimeError):
    """A world's ranks could not connect (``stage`` "connect") or did not all arrive ("arrive")."""

    def __init__(self, world: str, stage: str, detail: str) -> None:
        self.world, self.stage, self.detail = world, stage, " ".join(detail.split())[:400]
        self.remote = remote_address(detail)
        where = f" (cannot reach {self.remote})" if self.remote else ""
        super().__init__(f"the {world} could not {stage}{where}: {self.detail}")


def remote_address(text: str) -> str | None:
    """The IP address in gloo's ``remote=[ADDR]:PORT`` (or ``error [ADDR]:PORT``), or None. O(len(text))."""
    for found in _REMOTE.finditer(text):
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(found.group(1)))
    return None


def reach_store(host: str, port: int, seconds: float, world: str) -> None:
    """Raise WorldFormationError unless the world's store at ``host:port`` takes a TCP connection within
    ``seconds``. A store lives as long as its daemon, so silence there is a link that cannot carry this world
    (a firewall, a wrong address), not a rank still starting: waiting out the arrival timeout would hide it.
    """
    try:
        with socket.create_connection((host, port), timeout=seconds):
            pass
    except OSError as exc:
        raise WorldFormationError(world, "connect", f"its store did not answer: error [{host}]:{port}: {exc}") from None


def arrive(store: Store, prefix: str, rank: int, size: int, timeout_s: float, world: str) -> None:
    """Mark this rank present under ``prefix`` and wait (at most ``timeout_s``) for every rank of the world."""
    keys = [f"{prefix}arrived/{r}" for r in range(size)]
    store.set(keys[rank], b"1")  # type: ignore[arg-type]  # torch's stub says str; stores take bytes
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except RuntimeError as exc:  # torch's DistStoreError (a timeout) and DistNetworkError are RuntimeErrors
        missing = []
        with contextlib.suppress(Exception):
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
        raise WorldFormationError(world, "arrive", f"ranks {missing} never arrived: {exc}") from None


@contextlib.contextmanager
def connecting(world: str) -> Iterator[None]:
    """Turns any failure to connect inside into a WorldFormationError of ``world``."""
    try:
        yield
    except WorldFormationError:
        raise
    except Exception as exc:  # noqa: BLE001 - the contract: whatever stops a world forming is reported as this
        raise WorldFormationError(world, "connect", str(exc) or type(exc).__name__) from None


def bounded(make: Callable[[], T], seconds: float, world: str) -> T:
    """``make()`` (forming a group), given at most ``seconds``: past them a WorldFormationError, and the
    thread, blocked in gloo, is left behind (a worker whose world failed exits). gloo releases the GIL."""
    made: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            made.append(make())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, which raises it
            failed.append(exc)

    thread = threading.Thread(target=run, name=f"forming the {world}", daemon=True)
    thread.start()
    thread.join(seconds)
    if not made and not failed:
        raise WorldFormationError(world, "connect", f"no connection within {seconds:g} s")
    if failed:
        raise failed[0]
    return made[0]


def prove(group: ProcessGroup | dist.ProcessGroupGloo | None, connect_s: float) -> None:
    """One all-reduce over ``group`` (a bare backend or a registered group; None: the default world) within
    ``connect_s``: gloo can call a group formed on one side of a pair whose other side failed to connect."""
    value = torch.zeros(1)
    if isinstance(group, dist.ProcessGroupGloo):
        work = group.allreduce([value])  # type: ignore[attr-defined]  # torch's stub of a backend omits its collectives
    else:
        work = dist.all_reduce(value, group=group, async_op=True)
    work.wait(timedelta(seconds=connect_s))


def form_gloo(store: Store, prefix: str, rank: int, size: int, timeouts: Timeouts, world: str) -> dist.ProcessGroupGloo:
    """A gloo group of its own under ``prefix`` (no default world needed), formed as the module says."""
    arrive(store, prefix, rank, size, timeouts.arrival_s, world)
    connect = timedelta(seconds=timeouts.connect_s)
    with connecting(world):
        group = bounded(
            lambda: dist.ProcessGroupGloo(PrefixStore(prefix, store), rank, size, connect),
            timeouts.connect_s + CONNECT_GRACE_S,
            world,
        )
        prove(group, timeouts.connect_s)
    group._set_default_timeout(timedelta(seconds=timeouts.operation_s))
    return group
