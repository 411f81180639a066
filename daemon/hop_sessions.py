"""Hop sessions: one ``/hexgen/replica/1`` stream between two daemons carrying every hop between them.

The entry's side is a ``Session`` per driver daemon: it writes requests and aborts, and one reader hands
each event of an arriving ``HopBatch`` to its hop's channel. The replica's side collects the events its hops
emit in an ``Outbox`` and writes whatever became due together as one batch frame (``flush``): a step of n
sequences is one frame on the stream, not n, so the stream's per-token cost (a yamux frame, its encryption,
a system call and a window update each way) does not grow with the number of requests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from hexgen.daemon.hop import (
    MAX_BATCH,
    SESSION_OPEN,
    HopAbort,
    HopAlive,
    HopBatch,
    HopError,
    HopEvent,
    HopRequest,
    is_last,
)
from hexgen.daemon.host import Stream
from hexgen.daemon.wire import FrameReader, write_frame

Send = trio.MemorySendChannel[HopEvent]
_GONE = (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass
class Outbox:
    """Events a replica's hops emitted that the session has not written yet, in order."""

    events: list[tuple[int, HopEvent]] = field(default_factory=list)
    due: trio.Event = field(default_factory=trio.Event)

    def put(self, seq_id: int, event: HopEvent) -> None:
        self.events.append((seq_id, event))
        self.due.set()

    def take(self) -> list[tuple[int, HopEvent]]:
        taken, self.events = self.events, []
        self.due = trio.Event()
        return taken


async def flush(stream: Stream, outbox: Outbox) -> None:
    """Write the outbox's events as batch frames until cancelled: once one is due, every hop woken by the
    same step gets one scheduling round to add its event first, so a step goes out as one frame (split every
    MAX_BATCH events). Raises what the stream raises."""
    while True:
        await outbox.due.wait()
        await trio.lowlevel.checkpoint()
        events = outbox.take()
        for start in range(0, len(events), MAX_BATCH):
            await write_frame(stream, HopBatch(tuple(events[start : start + MAX_BATCH])).to_wire())


class Session:
    """The entry's end of a session with the daemon ``peer``: ``submit`` a hop with the channel its events go
    to, ``abort`` one it no longer wants; ``run`` reads the batches until the stream ends, then fails the
    hops still open (``failed`` tells the owner to open a new session for later hops)."""

    def __init__(self, peer: str, stream: Stream, closed: Callable[[Session], None]) -> None:
        self.peer, self.stream, self.closed = peer, stream, closed
        self.hops: dict[int, Send] = {}
        self.lock = trio.Lock()
        self.failed: str | None = None

    async def open(self) -> None:
        await write_frame(self.stream, SESSION_OPEN)

    async def submit(self, request: HopRequest, send: Send) -> None:
        """Send ``request``; its events go to ``send`` (closed after the last one). Raises what the stream raises
        (the session then ends: the next hop opens a new one)."""
        if self.failed is not None or request.id in self.hops:
            send.send_nowait(HopError(self.failed or f"hop {request.id} is already open to {self.peer}", True))
            send.close()
            return
        self.hops[request.id] = send
        async with self.lock:
            try:
                await write_frame(self.stream, request.to_wire())
            except (
                BaseException
            ) as exc:  # a frame cut short puts the stream out of step: end it (later hops: a new one)
                self.hops.pop(request.id, None)
                send.close()
                self.end(f"the stream to {self.peer} failed: {str(exc) or type(exc).__name__}")
                with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self.stream.reset()
                raise

    def pending(self, seq_id: int) -> bool:
        return seq_id in self.hops

    async def abort(self, seq_id: int) -> None:
        """Free hop ``seq_id`` on the replica (its channel is dropped unread)."""
        send = self.hops.pop(seq_id, None)
        if send is not None:
            send.close()
            with contextlib.suppress(Exception):
                async with self.lock:
                    await write_frame(self.stream, HopAbort(seq_id).to_wire())

    async def run(self) -> None:
        """Hand each event to its hop until the stream ends or breaks; then fail the hops still open."""
        reason = f"{self.peer} closed the stream"
        try:
            reader = FrameReader(self.stream)
            while (raw := await reader.read()) is not None:
                behind = [
                    seq_id for seq_id, event in HopBatch.from_wire(raw).events if not self._deliver(seq_id, event)
                ]
                for seq_id in behind:
                    await self.abort(seq_id)
        except Exception as exc:  # noqa: BLE001 - a broken stream (whatever libp2p raises) or a malformed batch
            reason = f"the stream to {self.peer} failed: {str(exc) or type(exc).__name__}"
        finally:
            self.end(reason)
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.stream.reset()

    def _deliver(self, seq_id: int, event: HopEvent) -> bool:
        """Pass ``event`` to its hop; False when the hop's reader is gone or hopelessly behind (abort it)."""
        send = self.hops.get(seq_id)
        if send is None:
            return True  # aborted here meanwhile
        if isinstance(event, HopAlive) and send.statistics().current_buffer_used:
            return True  # events unread say as much
        try:
            send.send_nowait(event)
        except _GONE:
            return False
        if is_last(event):
            self.hops.pop(seq_id, None)
            send.close()
        return True

    def end(self, reason: str) -> None:
        """Fail every hop still open (its entry re-submits it) and take no more."""
        if self.failed is None:
            self.failed = reason
            self.closed(self)
        for send in self.hops.values():
            with contextlib.suppress(*_GONE):
                send.send_nowait(HopError(reason))
            send.close()
        self.hops.clear()
