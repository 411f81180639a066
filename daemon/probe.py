"""``/hexgen/probe/1``: a bounded RTT and throughput probe between two daemons, both ends.

A probe is three ping frames (the median round trip is the RTT) and one bulk frame of ``PROBE_BYTES``
acknowledged by the receiver; throughput comes from the bulk frame's time less one round trip. Over a
Noise + yamux stream this measures what the control plane can move, a lower bound on the link itself.

A ``path`` request instead has the receiver open a TCP port for one connection, which the prober dials at the
address its libp2p connection reaches the receiver at and probes (``daemon.path_probes``): the path a direct
pair's gloo connections take (``tcp_probe``).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from hexgen.daemon.cluster_view import LinkMeasurement
from hexgen.daemon.host import ProtocolId, Stream
from hexgen.daemon.path_probes import TIMEOUT_S as PATH_TIMEOUT_S
from hexgen.daemon.path_probes import ProbeError, answer_path_probe, run_path_probe
from hexgen.daemon.sealed import KEY_BYTES, SealError, new_key
from hexgen.daemon.wire import FrameError, FrameReader, write_frame

log = logging.getLogger("hexgen.daemon")

PROBE_PROTOCOL = ProtocolId("/hexgen/probe/1")
PROBE_BYTES = 256 << 10
MAX_REQUESTS_PER_STREAM = 8
TIMEOUT_S = 10.0
PATH_ACCEPTS = 4  # connections a path probe's port takes before it gives up on the prober
DIAL_S = 3.0


async def serve_probe(stream: Stream) -> None:
    """Answer pings and acknowledge bulk frames, or serve one path probe; anything else gets an error frame
    and the stream ends."""
    reader = FrameReader(stream)
    try:
        with trio.fail_after(TIMEOUT_S + PATH_TIMEOUT_S):
            for _ in range(MAX_REQUESTS_PER_STREAM):
                request = await reader.read(max_size=PROBE_BYTES + 1024)
                if request is None:
                    return
                if request == {"op": "path"}:
                    await _serve_path(stream)
                    return
                reply = _reply(request)
                await write_frame(stream, reply)
                if "error" in reply:
                    return
    except (FrameError, trio.TooSlowError) as exc:
        with contextlib.suppress(Exception):
            await write_frame(stream, {"error": str(exc) or "probe timed out"})
    except Exception:  # noqa: BLE001 - a broken peer stream only ends this probe, never the host
        pass
    finally:
        with contextlib.suppress(Exception):
            await stream.close()


async def _serve_path(stream: Stream) -> None:
    """Listen on a TCP port for the prober, say which (with the probe's key) on ``stream``, and answer the
    first connection that probes under that key (a stranger's does not open, and the next one is taken)."""
    key = new_key()
    (listener,) = await trio.open_tcp_listeners(0, host="0.0.0.0")
    async with listener:
        await write_frame(stream, {"op": "listening", "port": listener.socket.getsockname()[1], "key": key})
        for _ in range(PATH_ACCEPTS):
            async with await listener.accept() as conn:
                try:
                    await answer_path_probe(conn, key)
                    return
                except (ProbeError, SealError, trio.BrokenResourceError, OSError) as exc:
                    log.info("a TCP path probe ended: %s", str(exc) or type(exc).__name__)


async def tcp_probe(open_stream: Callable[[], Awaitable[Stream]], ip: str, a: str, b: str) -> LinkMeasurement:
    """Measure the TCP path from this peer ``a`` to ``b``, which ``open_stream()`` opens a probe stream to:
    ``b`` opens a port, dialled here at ``ip``. Raises ProbeError (or the connection's errors)."""
    stream = await open_stream()
    try:
        with trio.fail_after(TIMEOUT_S):
            await write_frame(stream, {"op": "path"})
            port, key = _listening(await FrameReader(stream).read())
        with trio.fail_after(DIAL_S):  # a peer behind a NAT it dialled out of: nothing answers, nothing refuses
            conn = await trio.open_tcp_stream(ip, port)
        async with conn:
            return await run_path_probe(conn, key, a, b, "tcp")
    finally:
        with contextlib.suppress(Exception):
            await stream.close()


def _listening(reply: Any) -> tuple[int, bytes]:
    if not isinstance(reply, dict) or reply.get("op") != "listening":
        raise ProbeError(f"the peer answered {str(reply)[:200]} instead of a port to probe")
    port, key = reply.get("port"), reply.get("key")
    if type(port) is not int or not 0 < port < 65536:
        raise ProbeError(f"the peer answered {str(reply)[:200]} instead of a port to probe")
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ProbeError(f"the peer's probe key is not {KEY_BYTES} bytes")
    return port, key


def _reply(request: Any) -> dict[str, Any]:
    if not isinstance(request, dict):
        return {"error": "a probe request is a map"}
    op = request.get("op")
    if op == "ping":
        return {"op": "pong"}
    if op == "bulk" and isinstance(request.get("data"), bytes):
        return {"op": "ack", "n": len(request["data"])}
    return {"error": "probe op must be ping, or bulk with binary data"}


async def probe(open_stream: Callable[[], Awaitable[Stream]], a: str, b: str) -> LinkMeasurement:
    """Measure the link from this peer ``a`` to ``b``; ``open_stream()`` opens a probe stream to b."""
    stream = await open_stream()
    reader = FrameReader(stream)
    try:
        with trio.fail_after(TIMEOUT_S):
            rtts: list[float] = []
            for _ in range(3):
                start = time.perf_counter()
                await write_frame(stream, {"op": "ping"})
                _expect(await reader.read(), "pong")
                rtts.append((time.perf_counter() - start) * 1e3)
            payload = bytes(PROBE_BYTES)
            start = time.perf_counter()
            await write_frame(stream, {"op": "bulk", "data": payload}, max_size=PROBE_BYTES + 1024)
            _expect(await reader.read(), "ack")
            elapsed = time.perf_counter() - start
    finally:
        with contextlib.suppress(Exception):
            await stream.close()
    return LinkMeasurement.from_probe(a, b, len(payload), elapsed, statistics.median(rtts))


def _expect(reply: Any, op: str) -> None:
    if not isinstance(reply, dict) or reply.get("op") != op:
        raise FrameError(f"probe peer answered {reply!r} instead of {op}")
