"""Probes of the path a pair's bytes take (``daemon.path_probes``): on a real TCP connection, the prober's
figures and the answering end's count, what the answering end refuses, and the TCP path probe a daemon serves
on ``/hexgen/probe/1`` (its port opened for the prober, dialled, probed; a stranger's connection first does not
spoil it)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from hexgen.daemon.path_probes import (
    DATA,
    PING,
    ProbeError,
    answer_path_probe,
    reply_key,
    run_path_probe,
)
from hexgen.daemon.probe import serve_probe, tcp_probe
from hexgen.daemon.sealed import SealedStream, SealError, new_key
from hexgen.daemon.wire import FrameReader, write_frame
from hexgen.testing.memory_streams import Pipe

pytestmark = pytest.mark.trio
WAIT_S = 20.0
SIZE = 1 << 20


@contextlib.asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        port = listener.socket.getsockname()[1]
        dialled = await trio.open_tcp_stream("127.0.0.1", port)
        accepted = await listener.accept()
    async with dialled, accepted:
        yield dialled, accepted


async def test_a_path_probe_measures_round_trips_and_a_second_burst_and_the_answer_counts_them() -> None:
    key = new_key()
    async with tcp_pair() as (prober, answerer):
        taken: list[int] = []

        async def answer() -> None:
            taken.append(await answer_path_probe(answerer, key))

        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer)
                measured = await run_path_probe(prober, key, "A", "B", "tcp", size=SIZE + 5)
                await prober.send_eof()  # the answering end answers until the prober is done
    assert taken == [2 * (SIZE + 5)]  # a burst out of slow start, then the timed one
    assert (measured.a, measured.b, measured.path) == ("A", "B", "tcp")
    assert measured.gb_s > 0 and measured.rtt_ms > 0


@pytest.mark.parametrize(
    ("records", "why"),
    [
        ([PING + b"x"], "starting b'p'"),
        ([b"?"], "starting b'?'"),
        ([DATA + bytes(64)] * 3, "starting b'd'"),  # over the limit, made 128 bytes here
        ([PING], "left before the end"),
    ],
)
async def test_the_answering_end_refuses_anything_but_a_probe(
    records: list[bytes], why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("hexgen.daemon.path_probes.MAX_PROBE_BYTES", 128)
    key = new_key()
    async with tcp_pair() as (prober, answerer):
        questions = SealedStream(prober, key)
        for record in records:
            await questions.write(record)
        await prober.send_eof()
        with trio.fail_after(WAIT_S), pytest.raises(ProbeError, match=why):
            await answer_path_probe(answerer, key)


async def test_a_probe_under_another_key_does_not_open_and_a_wrong_answer_fails_the_prober() -> None:
    async with tcp_pair() as (prober, answerer):
        await SealedStream(prober, new_key()).write(PING)
        with trio.fail_after(WAIT_S), pytest.raises(SealError):
            await answer_path_probe(answerer, new_key())
    key = new_key()
    async with tcp_pair() as (prober, answerer):

        async def answer_wrong() -> None:
            await SealedStream(answerer, key).read_record()
            await SealedStream(answerer, reply_key(key)).write(b"c")  # a count with no count in it

        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_wrong)
                with pytest.raises(ProbeError, match="instead of b'p'"):
                    await run_path_probe(prober, key, "A", "B", "tcp")


async def test_a_daemon_opens_a_port_for_a_tcp_path_probe_which_the_prober_dials_and_measures() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_probe, Pipe(theirs, "A"))
            measured = await tcp_probe(lambda: _opened(Pipe(ours, "B")), "127.0.0.1", "A", "B")
    assert (measured.a, measured.b, measured.path) == ("A", "B", "tcp") and measured.gb_s > 0


async def test_a_stranger_on_a_path_probe_s_port_first_does_not_spoil_the_probe() -> None:
    """A stranger connects to the port first and sends junk: it is dropped, and the prober's connection
    after it is probed; the daemon's probe stream then ends."""
    ours, theirs = trio.testing.memory_stream_pair()
    pipe = Pipe(ours, "B")
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_probe, Pipe(theirs, "A"))
            await write_frame(pipe, {"op": "path"})
            answer = await FrameReader(pipe).read()
            assert isinstance(answer, dict) and answer["op"] == "listening"
            async with await trio.open_tcp_stream("127.0.0.1", answer["port"]) as stranger:
                await stranger.send_all(b"junk, not a sealed record")
            async with await trio.open_tcp_stream("127.0.0.1", answer["port"]) as conn:
                measured = await run_path_probe(conn, answer["key"], "B", "A", "tcp", size=SIZE)
            assert await FrameReader(pipe).read() is None
    assert measured.path == "tcp" and measured.gb_s > 0


async def _opened(pipe: Pipe) -> Pipe:
    return pipe
