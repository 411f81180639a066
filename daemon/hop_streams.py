"""One hop's events as its sender sees them: from this daemon's own replica server, or over
``/hexgen/replica/1`` from another daemon's, ended with a refusal as soon as a plan drops a peer the hop
involves (a hung peer keeps its streams open, so only the plan tells that its part of the work will never come).

Hops to another daemon share one session stream with it (``hop_sessions``) once the daemon gives a nursery
for the sessions' readers; without one (a router outside a daemon) each hop opens a stream of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import trio

from hexgen.daemon.hop import REPLICA_PROTOCOL, HopError, HopEvent, HopRequest, MalformedHop, event_from_wire, is_last
from hexgen.daemon.hop_sessions import Session
from hexgen.daemon.host import Host
from hexgen.daemon.supervisor import Supervisor
from hexgen.daemon.wire import FrameReader, write_frame

Emit = Callable[[HopEvent], Awaitable[None]]
HandleLocal = Callable[[HopRequest, Emit], Awaitable[None]]
Events = trio.MemoryReceiveChannel[HopEvent]
Send = trio.MemorySendChannel[HopEvent]
# Opens a hop: (driver peer, request, involved peers) -> its events, as ``HopStreams.open`` does.
OpenHop = Callable[[str, HopRequest, Collection[str]], AbstractAsyncContextManager[Events]]
EVENT_SLACK = 4  # room beyond one event per token: alive words and the last event


def _peers_in(supervisor: Supervisor) -> set[str] | None:
    """Every peer of the deployed plan's replicas; None before any plan."""
    deployment = supervisor.deployment
    return None if deployment is None else set().union(*(r.peers() for r in deployment.replicas))


@dataclass(frozen=True)
class HopStreams:
    """Opens hops from this daemon (``peer_id``): ``handle_local`` runs one on this daemon's replicas;
    ``nursery()`` is where sessions with other daemons run (None: a stream per hop)."""

    host: Host
    peer_id: str
    supervisor: Supervisor
    handle_local: HandleLocal
    nursery: Callable[[], trio.Nursery | None] = lambda: None
    sessions: dict[str, Session] = field(default_factory=dict)
    opening: dict[str, trio.Lock] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def open(self, peer: str, request: HopRequest, involved: Collection[str] = ()) -> AsyncIterator[Events]:
        """The events of ``request`` on the replica whose driver lives on ``peer`` (this daemon or another);
        ends with a refusal as soon as a plan drops one of the ``involved`` peers."""
        send, receive = trio.open_memory_channel[HopEvent](request.sampling.max_tokens + EVENT_SLACK)
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            if involved:
                nursery.start_soon(self._watch_plan, involved, send.clone())
            if peer == self.peer_id:
                nursery.start_soon(self._local, request, send)
            else:
                nursery.start_soon(self._remote, peer, request, send)
            try:
                yield receive
            except Exception as exc:  # noqa: BLE001 - re-raised below, not wrapped in the nursery's exception group
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _watch_plan(self, involved: Collection[str], send: Send) -> None:
        async with send:
            while True:
                await self.supervisor.changed.wait()
                peers = _peers_in(self.supervisor)
                gone = set() if peers is None else set(involved) - peers
                if gone:
                    error = HopError(f"{', '.join(sorted(gone))} left the plan", refused=True)
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await send.send(error)
                    return

    async def _local(self, request: HopRequest, send: Send) -> None:
        async with send:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.handle_local(request, send.send)

    async def _remote(self, peer: str, request: HopRequest, send: Send) -> None:
        nursery = self.nursery()
        if nursery is None:
            await self._own_stream(peer, request, send)
            return
        async with send:
            try:
                session = await self._session(peer, nursery)
            except Exception as exc:  # noqa: BLE001 - any dial failure (libp2p raises many kinds) refuses the hop
                await send.send(HopError(f"cannot reach {peer}: {exc}", refused=True))
                return
            try:
                await session.submit(request, send.clone())
                await trio.sleep_forever()  # the session delivers; the hop's end or its reader leaving cancels this
            except Exception as exc:  # noqa: BLE001 - the session's stream broke (whatever libp2p raises) under the request
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await send.send(HopError(f"cannot reach {peer}: {exc}", refused=True))
            finally:
                if session.pending(request.id):
                    with trio.CancelScope(shield=True):
                        await session.abort(request.id)

    async def _session(self, peer: str, nursery: trio.Nursery) -> Session:
        """The open session with ``peer``, opened (its reader started in ``nursery``) if there is none."""
        if peer not in self.opening:
            self.opening[peer] = trio.Lock()
        async with self.opening[peer]:
            session = self.sessions.get(peer)
            if session is None:
                stream = await self.host.open_stream(peer, REPLICA_PROTOCOL)
                session = Session(peer, stream, self._closed)
                try:
                    await session.open()
                except BaseException:
                    with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                        await stream.reset()
                    raise
                self.sessions[peer] = session
                nursery.start_soon(session.run)
            return session

    def _closed(self, session: Session) -> None:
        if self.sessions.get(session.peer) is session:
            del self.sessions[session.peer]

    async def _own_stream(self, peer: str, request: HopRequest, send: Send) -> None:
        async with send:
            try:
                stream = await self.host.open_stream(peer, REPLICA_PROTOCOL)
            except Exception as exc:  # noqa: BLE001 - any dial failure (libp2p raises many kinds) refuses the hop
                await send.send(HopError(f"cannot reach {peer}: {exc}", refused=True))
                return
            try:
                await write_frame(stream, request.to_wire())
                await _relay(peer, FrameReader(stream), send)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception as exc:  # noqa: BLE001 - a broken stream (whatever libp2p raises) fails the hop
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await send.send(HopError(f"the stream to {peer} failed: {exc}"))
            finally:
                with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await stream.reset()


def queued(events: Events) -> list[HopEvent]:
    """The events already waiting on ``events``, taken without waiting (a closed channel ends them).
    O(events taken)."""
    taken: list[HopEvent] = []
    while True:
        try:
            taken.append(events.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return taken


async def _relay(peer: str, reader: FrameReader, send: Send) -> None:
    """Pass ``peer``'s events to ``send`` up to the last one; a closed stream or a malformed event fails the hop."""
    while True:
        raw = await reader.read()
        if raw is None:
            await send.send(HopError(f"{peer} closed the stream"))
            return
        try:
            event = event_from_wire(raw)
        except MalformedHop:
            await send.send(HopError(f"{peer} sent a malformed event"))
            return
        await send.send(event)
        if is_last(event):
            return
