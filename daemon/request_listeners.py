"""The requests in flight on this daemon's workers: each one's event channel and the worker that runs it.

A worker's frames for a request become events on its channel, as the hop sends them on (``daemon.hop``):
``HopToken``, ``HopAlive``, the worker's ``HandoffFrame``, and at most one ``HopError`` (``refused`` when the
plan, not the work, ended it: the entry does not count that against the request's re-submission limit). A
channel is never waited on: a consumer that falls behind its buffer is cut off instead of stalling the batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import trio

from hexgen.daemon.hop import HopAlive, HopError, HopEvent, HopToken
from hexgen.daemon.worker_frames import ErrorFrame, HandoffFrame, TokenFrame
from hexgen.daemon.worker_link import LocalWorker, ReplicaUnavailable

MAX_ERROR_CHARS = 500
Event = HopEvent | HandoffFrame
ALIVE = HopAlive()
_GONE = (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass
class RequestListeners:
    channels: dict[int, trio.MemorySendChannel[Event]] = field(default_factory=dict)
    owners: dict[int, LocalWorker] = field(default_factory=dict)

    def open(self, seq_id: int, owner: LocalWorker, capacity: int) -> trio.MemoryReceiveChannel[Event]:
        """A channel of ``capacity`` events for request ``seq_id`` on ``owner``. An id already in flight here
        is refused: the entry picks ids, and a second hop under one would take over the first one's events."""
        if seq_id in self.channels:
            raise ReplicaUnavailable(f"request id {seq_id} is already in flight here")
        send, receive = trio.open_memory_channel[Event](capacity)
        self.channels[seq_id] = send
        self.owners[seq_id] = owner
        return receive

    def forget(self, seq_id: int) -> LocalWorker | None:
        """Drop request ``seq_id``; returns the worker that ran it."""
        self.channels.pop(seq_id, None)
        return self.owners.pop(seq_id, None)

    def on(self, worker: LocalWorker) -> list[int]:
        return [seq_id for seq_id, owner in self.owners.items() if owner is worker]

    def fail(self, seq_id: int, reason: str, refused: bool = False) -> None:
        """End a request with an error event; ``refused``: withdrawn for the plan's sake, not because the
        work failed."""
        channel = self.channels.get(seq_id)
        self.forget(seq_id)
        if channel is not None:
            with contextlib.suppress(*_GONE):
                channel.send_nowait(HopError(reason, refused))

    def fail_on(self, worker: LocalWorker, reason: str, refused: bool = False) -> None:
        for seq_id in self.on(worker):
            self.fail(seq_id, reason, refused)

    def fail_all(self, reason: str) -> None:
        for seq_id in list(self.channels):
            self.fail(seq_id, reason, refused=True)

    def alive(self, worker: LocalWorker) -> None:
        """Tell each request on ``worker`` that it still steps; a listener with events unread needs no word."""
        for seq_id in self.on(worker):
            channel = self.channels.get(seq_id)
            if channel is not None and channel.statistics().current_buffer_used == 0:
                with contextlib.suppress(*_GONE):
                    channel.send_nowait(ALIVE)

    def deliver(self, frame: TokenFrame | HandoffFrame | ErrorFrame) -> bool:
        """Pass a worker's frame on as its request's event; False when the request's consumer is gone or
        hopelessly behind (it is dropped: the caller aborts the work)."""
        channel = self.channels.get(frame.id)
        if channel is None:
            return True
        if isinstance(frame, ErrorFrame):  # the worker refused the request (a KV format mismatch)
            self.fail(frame.id, frame.error[:MAX_ERROR_CHARS])
            return True
        event = HopToken(frame.token, frame.finished) if isinstance(frame, TokenFrame) else frame
        try:
            channel.send_nowait(event)
        except _GONE:
            self.forget(frame.id)
            return False
        if isinstance(event, HandoffFrame) or event.finished is not None:
            self.forget(frame.id)
        return True
