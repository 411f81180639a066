"""How a replica's ranks reach each other across its stages: over the torch.distributed world they share
(``WorldComm``), or, where stages share no world (a pipeline across a relayed or hole-punched link, each
stage in a world of its own), as messages the daemons carry between them (``BridgedComm``).

Both offer what a replica step needs beyond its stages' tensor parallelism: the driver's broadcasts, small
all-reduces that keep every rank's scheduler in step, and hidden states passed down the pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist

from hexgen.engine.device import wait_for_ranks

Reduce = Literal["min", "max"]
_WORLD_OPS = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
_REDUCE = {"min": torch.minimum, "max": torch.maximum}
# Stage messages travel between two ranks of one replica, KV messages between ranks of two replicas, so their
# (source, destination, tag) never meet whatever the tag; two tags keep control and hidden states apart.
CONTROL_TAG = 0x7FFFFFF0
HIDDEN_TAG = 0x7FFFFFF1
BARRIER_TAG = 0x7FFFFFF2
HELLO_S = 1.0  # how often a loaded rank says so until the driver answers


class StageLinkError(RuntimeError):
    """A message between two stages of a replica did not arrive: the link or the rank at its other end is gone."""


class ReplicaComm(Protocol):
    """Collectives over all of a replica's ranks (global ranks) and sends down its pipeline."""

    def broadcast(self, tensor: torch.Tensor, src: int) -> None: ...

    def all_reduce(self, tensor: torch.Tensor, op: Reduce) -> None: ...

    def send(self, tensor: torch.Tensor, dsts: list[int]) -> None: ...

    def recv(self, tensor: torch.Tensor, src: int) -> None: ...

    def barrier(self, load_timeout: timedelta, op_timeout: timedelta) -> None: ...


class PointToPoint(Protocol):
    """Anything with a gloo group's ``send``/``recv`` whose works ``wait(timeout)``, and ``recv_any`` (whether
    any message from ``peer`` under ``tag`` came within ``timeout``; all are taken): ``daemon.kv_channel.RelayGroup``."""

    def send(self, tensors: list[torch.Tensor], peer: int, tag: int) -> Any: ...

    def recv(self, tensors: list[torch.Tensor], peer: int, tag: int) -> Any: ...

    def recv_any(self, peer: int, tag: int, timeout: timedelta) -> bool: ...


@dataclass(frozen=True)
class WorldComm:
    """The replica's ranks in one world: ``group`` is the replica's group in it (None: the whole world)."""

    group: Any

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        dist.broadcast(tensor, src=src, group=self.group)

    def all_reduce(self, tensor: torch.Tensor, op: Reduce) -> None:
        dist.all_reduce(tensor, op=_WORLD_OPS[op], group=self.group)

    def send(self, tensor: torch.Tensor, dsts: list[int]) -> None:
        works = [dist.isend(tensor, dst=r) for r in dsts]
        for work in works:
            assert work is not None  # every rank is in the default world
            work.wait()

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        dist.recv(tensor, src=src)

    def barrier(self, load_timeout: timedelta, op_timeout: timedelta) -> None:
        wait_for_ranks(self.group, load_timeout, op_timeout)


@dataclass(frozen=True)
class BridgedComm:
    """This rank's (``rank``) view of a replica of ``ranks`` whose stages share no world: every message goes
    over ``link``, which numbers replica rank ``r`` as ``r + offset``. All-reduces gather at ``root`` (the
    driver) and come back from it, so a rank sends and receives two messages per all-reduce; a broadcast is
    one message to each other rank. Tensors must be on the CPU. A message not here within ``timeout`` raises
    StageLinkError."""

    link: PointToPoint
    rank: int
    ranks: tuple[int, ...]
    root: int
    offset: int = 0
    timeout: timedelta = timedelta(seconds=120)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        if self.rank == src:
            self.send(tensor, [r for r in self.ranks if r != src], CONTROL_TAG)
        else:
            self.recv(tensor, src, CONTROL_TAG)

    def all_reduce(self, tensor: torch.Tensor, op: Reduce) -> None:
        others = [r for r in self.ranks if r != self.root]
        if self.rank != self.root:
            self.send(tensor, [self.root], CONTROL_TAG)
            self.recv(tensor, self.root, CONTROL_TAG)
            return
        part = torch.empty_like(tensor)
        for peer in others:
            self.recv(part, peer, CONTROL_TAG)
            tensor.copy_(_REDUCE[op](tensor, part))
        self.send(tensor, others, CONTROL_TAG)

    def send(self, tensor: torch.Tensor, dsts: list[int], tag: int = HIDDEN_TAG) -> None:
        for dst in dsts:
            try:
                self.link.send([tensor], dst + self.offset, tag).wait(self.timeout)
            except (RuntimeError, OSError) as exc:
                raise StageLinkError(f"replica rank {self.rank} could not send to rank {dst}: {exc}") from exc

    def recv(self, tensor: torch.Tensor, src: int, tag: int = HIDDEN_TAG, timeout: timedelta | None = None) -> None:
        try:
            self.link.recv([tensor], src + self.offset, tag).wait(timeout or self.timeout)
        except Exception as exc:  # the link's own kinds: KVMissing from the relay, gloo's RuntimeError
            raise StageLinkError(f"replica rank {self.rank} heard nothing from rank {src}: {exc}") from exc

    def barrier(self, load_timeout: timedelta, op_timeout: timedelta) -> None:
        """Every rank has loaded, waiting up to ``load_timeout`` for the slowest. A daemon drops what it cannot
        deliver yet (it has not adopted the plan, or not started the rank's worker), so each rank says it has
        loaded every HELLO_S until the root, which has heard from all, answers; by then every daemon on the
        way knows the replica."""
        flag = torch.zeros(1, dtype=torch.long)
        deadline = time.monotonic() + load_timeout.total_seconds()
        if self.rank != self.root:
            while True:
                self.send(flag, [self.root], BARRIER_TAG)
                if self._heard(self.root, min(HELLO_S, max(0.0, deadline - time.monotonic()))):
                    return
                if time.monotonic() >= deadline:
                    raise StageLinkError(
                        f"replica rank {self.rank} heard nothing from rank {self.root} in {_seconds(load_timeout)}"
                    )
        others = [r for r in self.ranks if r != self.root]
        for peer in others:
            if not self._heard(peer, max(0.0, deadline - time.monotonic())):
                raise StageLinkError(
                    f"replica rank {self.rank} heard nothing from rank {peer} in {_seconds(load_timeout)}"
                )
        self.send(flag, others, BARRIER_TAG)

    def _heard(self, peer: int, seconds: float) -> bool:
        try:
            return self.link.recv_any(peer + self.offset, BARRIER_TAG, timedelta(seconds=seconds))
        except Exception as exc:  # the link's own kinds, as in ``recv``
            raise StageLinkError(f"replica rank {self.rank} heard nothing from rank {peer}: {exc}") from exc


def _seconds(span: timedelta) -> str:
    return f"{span.total_seconds():g} s"
