"""Hop sessions (daemon/hop_sessions.py) between an entry's ``Session`` and a real ``ReplicaServer`` whose
supervisor drives a scripted worker over a real socket pair: one batch frame per engine step however many
hops it advanced, each hop's events exactly as sent, aborts and a broken stream freeing the work."""

from __future__ import annotations

import re
from typing import Any

import pytest
import trio
import trio.testing

from hexgen.daemon.deployment import Deployment, Replica
from hexgen.daemon.hop import SESSION_OPEN, HopBatch, HopError, HopEvent, HopRequest, HopToken, MalformedHop
from hexgen.daemon.hop_sessions import Session
from hexgen.daemon.metrics import RateMeter
from hexgen.daemon.replica_server import ReplicaServer
from hexgen.daemon.supervisor import LocalWorker, Supervisor
from hexgen.daemon.wire import FrameReader, encode_frame
from hexgen.daemon.worker_frames import AbortFrame, GenerateFrame, StepFrame, TokenFrame, frame_to_worker
from hexgen.daemon.worker_link import SocketChannel
from hexgen.engine.sequence import SamplingParams
from hexgen.testing.memory_streams import Pipe

WAIT_S = 10


def served() -> tuple[ReplicaServer, trio.SocketStream]:
    """A replica server of a one-replica plan whose driver is a scripted worker (the returned socket)."""
    ours, theirs = trio.socket.socketpair()
    replica = Replica(0, 0, "colocated", ((0, 5, 1),), 0, (("me", 0),))
    supervisor = Supervisor("me", "model")
    supervisor.deployment = Deployment(1, 1, (replica,), ((0, 1.0),), {}, ("127.0.0.1", 1), (("127.0.0.1", 1),))
    worker = LocalWorker(replica, 0, 1)
    worker.channel = SocketChannel(trio.SocketStream(ours))
    worker.ready.set()
    supervisor.workers[worker.slot] = worker
    server = ReplicaServer("me", supervisor, 512, lambda peer, cert: True, None, RateMeter())  # type: ignore[arg-type]
    return server, trio.SocketStream(theirs)


def hop(seq_id: int, max_tokens: int = 4) -> HopRequest:
    return HopRequest(seq_id, 1, 1, 0, (1, 2, 3), SamplingParams(max_tokens=max_tokens))


async def worker_frames(fake: trio.SocketStream, count: int) -> list[Any]:
    reader = FrameReader(SocketChannel(fake))
    return [frame_to_worker(await reader.read()) for _ in range(count)]


async def step(fake: trio.SocketStream, *tokens: TokenFrame) -> None:
    await fake.send_all(encode_frame(StepFrame(tokens).to_wire()))


async def received(channel: trio.MemoryReceiveChannel[HopEvent], count: int) -> list[HopEvent]:
    return [await channel.receive() for _ in range(count)]


@pytest.mark.trio
async def test_a_step_of_many_hops_is_one_frame_and_each_hop_gets_its_own_events():
    server, fake = served()
    client_end, server_end = (Pipe(s) for s in trio.testing.memory_stream_pair())
    session = Session("them", client_end, lambda _: None)
    channels = {i: trio.open_memory_channel[HopEvent](8) for i in (1, 2, 3)}
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            worker = next(iter(server.supervisor.workers.values()))
            nursery.start_soon(server.supervisor._read_events, worker, worker.reader())
            await session.open()
            reader = FrameReader(server_end)
            assert await reader.read() == SESSION_OPEN
            nursery.start_soon(server._session, server_end, reader)
            nursery.start_soon(session.run)
            for seq_id, (send, _) in channels.items():
                await session.submit(hop(seq_id), send)
            asked = await worker_frames(fake, 3)
            assert all(isinstance(f, GenerateFrame) for f in asked) and [f.id for f in asked] == [1, 2, 3]

            await step(fake, TokenFrame(1, 7), TokenFrame(2, 8), TokenFrame(3, 9))
            assert [await received(channels[i][1], 1) for i in (1, 2, 3)] == [[HopToken(t)] for t in (7, 8, 9)]
            assert server_end.writes == 1  # the step's three tokens: one batch frame
            await session.abort(3)  # the entry no longer wants hop 3: the worker hears of it
            assert await worker_frames(fake, 1) == [AbortFrame(3)]
            await step(fake, TokenFrame(1, 10, "length"), TokenFrame(2, 11))
            assert await received(channels[1][1], 1) == [HopToken(10, "length")]
            assert await received(channels[2][1], 1) == [HopToken(11)]
            assert server_end.writes == 2
            with pytest.raises(trio.EndOfChannel):  # hop 1's last event closed its channel
                await channels[1][1].receive()

            await client_end.close()  # the entry went away: hop 2, still running, is freed on the worker
            assert await worker_frames(fake, 1) == [AbortFrame(2)]
            assert await received(channels[2][1], 1) == [HopError("the stream to them failed: ClosedResourceError")]
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_malformed_frame_on_a_session_refuses_its_hop_or_ends_the_session():
    server, _ = served()
    client_end, server_end = (Pipe(s) for s in trio.testing.memory_stream_pair())
    ended: list[BaseExceptionGroup[Any]] = []

    async def run() -> None:
        try:
            await server._session(server_end, FrameReader(server_end))
        except BaseExceptionGroup as group:
            ended.append(group)

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await client_end.write(encode_frame({"id": 4, "term": 1}))
            batch = HopBatch.from_wire(await FrameReader(client_end).read())
            assert [seq_id for seq_id, _ in batch.events] == [4]
            refusal = batch.events[0][1]
            assert isinstance(refusal, HopError) and "integer 'epoch'" in refusal.error
            await client_end.write(encode_frame([1, 2]))  # no hop to answer under: the session ends
    assert len(ended) == 1 and ended[0].subgroup(MalformedHop) is not None


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"batch": []}, "a batch is a list of 1 to"),
        ({"batch": [[1, {"token": -1}]]}, "a token event has a token id"),
        ({"batch": [[True, {"alive": True}]]}, "[hop id, event] pairs"),
        ({"batch": [[1]]}, "[hop id, event] pairs"),
        ([1], "a batch is a list"),
    ],
)
def test_a_malformed_batch_is_refused_in_one_line(raw, error):
    with pytest.raises(MalformedHop, match=re.escape(error)):
        HopBatch.from_wire(raw)


def test_batches_read_back_from_their_wire_form():
    batch = HopBatch(((1, HopToken(5)), (2, HopToken(6, "stop")), (1, HopError("gone", refused=True))))
    assert HopBatch.from_wire(batch.to_wire()) == batch
