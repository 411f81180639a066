"""The replica side of a hop: a daemon runs a ``HopRequest`` on the replica whose driver worker it holds and
relays its events; on a prefill replica's hand-off it asks the decode replica's daemon to import the
sequence and relays the decode tokens instead. A stream from another daemon carries one hop, or a session
of many whose events go back in batches (``hop_sessions``)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from hexgen.daemon.deployment import Deployment, Replica
from hexgen.daemon.hop import (
    FIRST_FRAME_TIMEOUT_S,
    NO_REPLICA,
    HopAbort,
    HopError,
    HopEvent,
    HopRequest,
    HopToken,
    MalformedHop,
    hop_id,
    is_last,
    opens_session,
    session_frame_from_wire,
)
from hexgen.daemon.hop_sessions import Outbox, flush
from hexgen.daemon.hop_streams import EVENT_SLACK, Emit, OpenHop
from hexgen.daemon.host import Stream, stream_peer
from hexgen.daemon.metrics import RateMeter
from hexgen.daemon.request_limits import RequestError
from hexgen.daemon.supervisor import ReplicaUnavailable, Supervisor
from hexgen.daemon.wire import FrameError, FrameReader, write_frame
from hexgen.daemon.worker_frames import HandoffFrame

log = logging.getLogger("hexgen.router")

READY_TIMEOUT_S = 120.0


def check_route(replica: Replica, request: HopRequest, deployment: Deployment | None) -> HopRequest:
    """``request`` as ``replica`` may run it: a new request goes to a prefill replica (naming a decode replica)
    or a colocated one (its ``dst`` dropped); an import goes to a decode replica from a prefill one. Anything
    else would wedge or crash the workers: raises RequestError."""
    roles = {r.index: r.role for r in deployment.replicas} if deployment is not None else {}
    if request.is_import:
        if replica.role != "decode" or roles.get(request.src) != "prefill":
            raise RequestError("an import goes to a decode replica from a prefill replica of the plan")
        return request
    if replica.role == "prefill":
        if roles.get(request.dst) != "decode":
            raise RequestError("a request for a prefill replica must name a decode replica of the plan")
        return request
    if replica.role == "colocated":
        return dataclasses.replace(request, dst=NO_REPLICA)
    raise RequestError("a decode replica takes only imports")


@dataclass
class ReplicaServer:
    """Serves ``/hexgen/replica/1`` for the replicas this daemon (``peer_id``) drives. ``open_hop`` opens
    the hand-off's hop to the decode replica; ``may_ask(peer, cert)`` says who is a member."""

    peer_id: str
    supervisor: Supervisor
    vocab_size: int
    may_ask: Callable[[str, Any], bool]
    open_hop: OpenHop
    meter: RateMeter
    tamper_tokens: bool = False  # tests only: a lying peer, whose replica hops return every token plus one

    async def serve(self, stream: Stream) -> None:
        """One stream from another daemon: a single hop (its request frame, then its events until the last
        one) or a session of many (``hop_sessions``)."""
        peer = stream_peer(stream)
        reader = FrameReader(stream)
        try:
            with trio.fail_after(FIRST_FRAME_TIMEOUT_S):
                raw = await reader.read()
            if not self.may_ask(peer, None) or peer == self.peer_id:
                raise RequestError("replica requests are for members only")
            request = None if opens_session(raw) else HopRequest.from_wire(raw, self.vocab_size)
        except (RequestError, FrameError, trio.TooSlowError) as exc:
            with contextlib.suppress(Exception):
                await write_frame(stream, HopError(str(exc) or "no request within the time limit").to_wire())
                await stream.close()
            return
        except Exception:  # noqa: BLE001 - the stream broke before a request arrived (libp2p raises many kinds)
            return
        try:
            if request is None:
                await self._session(stream, reader)
            else:
                await self.handle(request, self._emitter(lambda event: write_frame(stream, event.to_wire())))
        except Exception as exc:  # noqa: BLE001 - the asking daemon went away: its stream fails in any of libp2p's ways
            log.debug("replica stream from %s ended: %s", peer, exc)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    def _emitter(self, write: Callable[[HopEvent], Awaitable[None]]) -> Emit:
        async def emit(event: HopEvent) -> None:
            if self.tamper_tokens and isinstance(event, HopToken):
                event = dataclasses.replace(event, token=(event.token + 1) % self.vocab_size)
            await write(event)

        return emit

    async def _session(self, stream: Stream, reader: FrameReader) -> None:
        """Run the hops a session's frames ask for, each in its own task, and write their events in batches,
        until the stream ends or breaks (then every hop still running is cancelled, which frees its work)."""
        outbox = Outbox()
        hops: dict[int, trio.CancelScope] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flush, stream, outbox)
            while (raw := await reader.read()) is not None:
                try:
                    frame = session_frame_from_wire(raw, self.vocab_size)
                except MalformedHop as exc:
                    seq_id = hop_id(raw)
                    if seq_id is None:
                        raise
                    outbox.put(seq_id, HopError(str(exc)))
                    continue
                if isinstance(frame, HopAbort):
                    if frame.id in hops:
                        hops.pop(frame.id).cancel()
                else:
                    nursery.start_soon(self._session_hop, frame, outbox, hops)
            nursery.cancel_scope.cancel()

    async def _session_hop(self, request: HopRequest, outbox: Outbox, hops: dict[int, trio.CancelScope]) -> None:
        async def put(event: HopEvent) -> None:
            outbox.put(request.id, event)

        if request.id in hops:
            outbox.put(request.id, HopError(f"hop {request.id} is already open on this stream", refused=True))
            return
        with trio.CancelScope() as scope:
            hops[request.id] = scope
            try:
                await self.handle(request, self._emitter(put))
            finally:
                if hops.get(request.id) is scope:
                    del hops[request.id]

    async def handle(self, request: HopRequest, emit: Emit) -> None:
        """Run ``request`` on the local replica driver; relay its tokens (and, after a hand-off, the decode
        replica's) to ``emit``. Errors become an error event; the work is aborted if ``emit`` fails."""
        try:
            worker = await self.supervisor.wait_ready(request.replica, request.version, READY_TIMEOUT_S)
            request = check_route(worker.replica, request, self.supervisor.deployment)
            events = await self.supervisor.submit(
                worker, request.worker_frame(), request.sampling.max_tokens + EVENT_SLACK
            )
        except (ReplicaUnavailable, RequestError, trio.TooSlowError) as exc:
            await emit(HopError(str(exc) or "the replica did not become ready in time", refused=True))
            return
        done = False
        try:
            async for event in events:
                if isinstance(event, HandoffFrame):
                    done = True  # the prefill side is finished with it; the decode side continues
                    await self._hand_off(request, list(event.tokens), emit)
                    return
                if isinstance(event, HopToken):
                    self.meter.add(trio.current_time())
                await emit(event)
                if is_last(event):
                    done = True
                    return
        finally:
            if not done:
                with trio.CancelScope(shield=True):
                    await self.supervisor.abort(request.id)

    async def _hand_off(self, request: HopRequest, tokens: list[int], emit: Emit) -> None:
        deployment = self.supervisor.deployment
        if deployment is None or deployment.version != request.version:
            await emit(HopError("the plan changed during the hand-off", refused=True))
            return
        decode = deployment.replicas[request.dst]
        follow = dataclasses.replace(
            request, replica=decode.index, src=request.replica, dst=NO_REPLICA, tokens=tuple(tokens)
        )
        async with self.open_hop(decode.driver_peer, follow, ()) as events:
            async for event in events:
                await emit(event)
                if is_last(event):
                    return
