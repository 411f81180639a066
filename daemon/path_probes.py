"""Probes of the path a pair's bytes take, for the planner's link figures: round trips and bulk bytes on a
sealed TCP connection, either one a daemon dials to a port its peer opened for the probe (a direct pair: the
path its workers' gloo connections take) or a KV link (a worldless pair: hole-punched, or spliced by a relay,
the path its workers' own links take).

The prober's records are sealed under the probe's key, the answers under a key derived from it (``reply_key``:
one key per direction, as AES-GCM's record-index nonces need). The prober sends PINGS one-byte pings, each
answered, then ``size`` bytes in data records and an end record, answered with the count taken, twice: the
first burst, untimed, takes the fresh connection out of TCP's slow start, which would otherwise bound a
burst of a few MiB on a fast link. The answering end takes at most MAX_PROBE_BYTES in all and gives up after
TIMEOUT_S.
"""

from __future__ import annotations

import hashlib
import statistics
import time

import trio

from hexgen.daemon.cluster_view import LinkMeasurement
from hexgen.daemon.sealed import SealedStream

PROBE_BYTES = 4 << 20  # past TCP's slow start on a LAN, yet a fraction of a second at 100 Mbit/s
MAX_PROBE_BYTES = 64 << 20
RECORD_BYTES = 256 << 10
PINGS = 3
TIMEOUT_S = 10.0
PING, DATA, END, COUNT = b"p", b"d", b"e", b"c"
COUNT_BYTES = 8


class ProbeError(Exception):
    """A path probe that could not be made or answered; the message says why."""


def reply_key(key: bytes) -> bytes:
    """The key of a probe's answers, from the key of its questions."""
    return hashlib.sha256(b"hexgen path probe answers" + key).digest()


async def run_path_probe(
    stream: trio.abc.Stream, key: bytes, a: str, b: str, path: str, size: int = PROBE_BYTES
) -> LinkMeasurement:
    """Measure the path ``stream`` takes from peer ``a`` to ``b`` (its kind: ``path``): the median of PINGS
    round trips, and ``size`` bytes' time less one round trip. Raises ProbeError, or SealError / trio's errors
    when the other end breaks off. O(size)."""
    questions, answers = SealedStream(stream, key), SealedStream(stream, reply_key(key))
    with trio.move_on_after(TIMEOUT_S) as scope:
        rtts = []
        for _ in range(PINGS):
            start = time.perf_counter()
            await questions.write(PING)
            _expect(await answers.read_record(), PING, 0)
            rtts.append((time.perf_counter() - start) * 1e3)
        await _burst(questions, answers, size)
        start = time.perf_counter()
        await _burst(questions, answers, size)
        elapsed = time.perf_counter() - start
    if scope.cancelled_caught:
        raise ProbeError(f"no answer within {TIMEOUT_S:g} s")
    return LinkMeasurement.from_probe(a, b, size, elapsed, statistics.median(rtts), path=path)


async def _burst(questions: SealedStream, answers: SealedStream, size: int) -> None:
    record = DATA + bytes(RECORD_BYTES)
    for sent in range(0, size, RECORD_BYTES):
        await questions.write(record[: 1 + min(RECORD_BYTES, size - sent)])
    await questions.write(END)
    count = int.from_bytes(_expect(await answers.read_record(), COUNT, COUNT_BYTES), "big")
    if count != size:
        raise ProbeError(f"the peer took {count} bytes of {size}")


async def answer_path_probe(stream: trio.abc.Stream, key: bytes) -> int:
    """Answer the probe arriving on ``stream`` until the prober closes it; the bytes it sent. Raises ProbeError
    for anything but a probe (or one over MAX_PROBE_BYTES, one that sent no burst whole, or one not done within
    TIMEOUT_S), SealError for a record that does not open."""
    questions, answers = SealedStream(stream, key), SealedStream(stream, reply_key(key))
    taken = burst = bursts = 0
    with trio.move_on_after(TIMEOUT_S):
        while (record := await questions.read_record()) is not None:
            op = bytes(record[:1])
            if op == PING and len(record) == 1:
                await answers.write(PING)
            elif op == DATA and taken + len(record) - 1 <= MAX_PROBE_BYTES:
                taken, burst = taken + len(record) - 1, burst + len(record) - 1
            elif op == END and len(record) == 1:
                await answers.write(COUNT + burst.to_bytes(COUNT_BYTES, "big"))
                burst, bursts = 0, bursts + 1
            else:
                raise ProbeError(f"a path probe sent a record of {len(record)} bytes starting {op!r}")
        if not bursts:
            raise ProbeError("the prober left before the end of its probe")
        return taken
    raise ProbeError(f"a path probe not done within {TIMEOUT_S:g} s")


def _expect(record: memoryview | None, op: bytes, size: int) -> bytes:
    if record is None or bytes(record[:1]) != op or len(record) != 1 + size:
        got = "nothing" if record is None else f"{bytes(record[:8])!r}"
        raise ProbeError(f"the peer answered {got} instead of {op!r}")
    return bytes(record[1:])
