"""One-frame request/reply exchanges between daemons, and the control plane's protocol names."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from hexgen.daemon.host import Host, ProtocolId, Stream, stream_peer
from hexgen.daemon.wire import FrameError, FrameReader, write_frame

log = logging.getLogger("hexgen.daemon")

STATUS_PROTOCOL = ProtocolId("/hexgen/status/1")
PLAN_PROTOCOL = ProtocolId("/hexgen/plan/1")
SYNC_PROTOCOL = ProtocolId("/hexgen/sync/1")
RENDEZVOUS_PROTOCOL = ProtocolId("/hexgen/rendezvous/1")
HEARTBEAT_PROTOCOL = ProtocolId("/hexgen/heartbeat/1")
RPC_TIMEOUT_S = 5.0

Answer = Callable[[dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]
MayAsk = Callable[[str, Any], bool]
Reject = Callable[[str, str], None]


async def serve_rpc(stream: Stream, name: str, answer: Answer, may_ask: MayAsk, reject: Reject) -> None:
    """One request frame in, one reply frame out; only askers ``may_ask`` admits get answers; bad frames are
    answered with an error and counted through ``reject``."""
    peer = stream_peer(stream)
    reader = FrameReader(stream)
    try:
        with trio.fail_after(RPC_TIMEOUT_S):
            request = await reader.read()
            if not isinstance(request, dict):
                await write_frame(stream, {"error": f"a {name} request is a map"})
            elif not may_ask(peer, request.get("cert")):
                reject("not-member", f"{name} request from non-member {peer}")
                await write_frame(stream, {"error": "not a member of this swarm"})
            else:
                reply = answer(request)
                await write_frame(stream, await reply if inspect.isawaitable(reply) else reply)
    except FrameError as exc:
        reject("malformed", f"{name} request from {peer}: {exc}")
        with contextlib.suppress(Exception):
            await write_frame(stream, {"error": str(exc)})
    except Exception as exc:  # noqa: BLE001 - one asker's broken stream never reaches the daemon
        log.debug("%s stream from %s ended: %s", name, peer, exc)
    finally:
        with contextlib.suppress(Exception):
            await stream.close()


async def call(host: Host, peer_id: str, protocol: ProtocolId, request: dict[str, Any]) -> dict[str, Any]:
    """One request/reply exchange with a daemon (already connected or dialable) over ``protocol``."""
    stream = await host.open_stream(peer_id, protocol)
    try:
        await write_frame(stream, request)
        reply = await FrameReader(stream).read()
    finally:
        with contextlib.suppress(Exception):
            await stream.close()
    if not isinstance(reply, dict):
        raise FrameError("the reply is not a map")
    return reply


async def query_status(host: Host, peer_id: str, request: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ask a daemon (already connected or dialable) for its status."""
    return await call(host, peer_id, STATUS_PROTOCOL, request or {})


async def read_within(stream: Stream, seconds: float) -> bytes | None:
    """One byte from ``stream`` (b"" at its end), or None when none came within ``seconds``. A deadline seen
    late, by a process that was itself stopped or starved of CPU, gets a grace read twice as long as it was
    late (at least 0.1 s): the byte may be waiting already, behind the frames that piled up meanwhile."""
    started = trio.current_time()
    with trio.move_on_after(seconds) as scope:
        data = bytes(await stream.read(1))
    if not scope.cancelled_caught:
        return data
    late = trio.current_time() - started - seconds
    with trio.move_on_after(min(seconds, max(0.1, 2 * late))) as scope:
        data = bytes(await stream.read(1))
    return None if scope.cancelled_caught else data
