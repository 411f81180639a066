"""``/hexgen/probe/1``: a bounded RTT and throughput probe between two daemons, both ends.

A probe is three ping frames (the median round trip is the RTT) and one bulk frame of ``PROBE_BYTES``
acknowledged by the receiver; throughput comes from the bulk frame's time less one round trip. Over a
Noise + yamux stream this measures what the control plane can move, a lower bound on the link itself.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from hexgen.daemon.cluster_view import LinkMeasurement
from hexgen.daemon.host import ProtocolId, Stream
from hexgen.daemon.wire import FrameError, FrameReader, write_frame

PROBE_PROTOCOL = ProtocolId("/hexgen/probe/1")
PROBE_BYTES = 256 << 10
MAX_REQUESTS_PER_STREAM = 8
TIMEOUT_S = 10.0


async def serve_probe(stream: Stream) -> None:
    """Answer pings and acknowledge bulk frames; anything else gets an error frame and the stream ends."""
    reader = FrameReader(stream)
    try:
        with trio.fail_after(TIMEOUT_S):
            for _ in range(MAX_REQUESTS_PER_STREAM):
                request = await reader.read(max_size=PROBE_BYTES + 1024)
                if request is None:
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
