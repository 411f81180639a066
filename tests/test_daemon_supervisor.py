"""The supervisor's request plumbing against a worker's end of a real socket pair (no torch needed)."""

from __future__ import annotations

import pytest
import trio

from hexgen.daemon.deployment import Replica
from hexgen.daemon.supervisor import LocalWorker, ReplicaUnavailable, Supervisor, _SocketStream
from hexgen.daemon.wire import FrameReader, encode_frame

pytestmark = pytest.mark.trio


def worker_pair() -> tuple[Supervisor, LocalWorker, trio.SocketStream]:
    ours, theirs = trio.socket.socketpair()
    replica = Replica(0, 0, "colocated", ((0, 5, 1),), 0, (("me", 0),))
    worker = LocalWorker(replica, 0, 1)
    worker.channel = _SocketStream(trio.SocketStream(ours))
    return Supervisor("me", "model"), worker, trio.SocketStream(theirs)


async def test_a_consumer_that_falls_behind_is_cut_off_and_its_work_aborted():
    """Backpressure: the worker's token stream is never waited on; a request whose reader does not keep up
    (its buffer of ``capacity`` events is full) is aborted instead of stalling the batch."""
    supervisor, worker, fake = worker_pair()
    reader = FrameReader(_SocketStream(fake))
    events = await supervisor.submit(worker, {"op": "generate", "id": 7, "tokens": [1]}, capacity=2)
    other = await supervisor.submit(worker, {"op": "generate", "id": 8, "tokens": [1]}, capacity=16)
    with trio.fail_after(10):
        assert (await reader.read())["id"] == 7 and (await reader.read())["id"] == 8
        for token in range(5):
            for seq_id in (7, 8):
                await fake.send_all(encode_frame({"op": "token", "id": seq_id, "token": token, "finished": None}))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor._read_events, worker, FrameReader(worker.channel))
            assert await reader.read() == {"op": "abort", "id": 7}
            await fake.send_all(encode_frame({"op": "token", "id": 8, "token": 5, "finished": "length"}))
            got = [await other.receive() for _ in range(6)]
            nursery.cancel_scope.cancel()
    assert [e["token"] for e in got] == list(range(6)) and got[-1]["finished"] == "length"
    assert [events.receive_nowait()["token"] for _ in range(2)] == [0, 1]
    assert 7 not in supervisor.listeners and 8 not in supervisor.listeners


async def test_a_second_hop_under_an_id_in_flight_is_refused_and_takes_nothing_from_the_first():
    supervisor, worker, fake = worker_pair()
    first = await supervisor.submit(worker, {"op": "generate", "id": 7, "tokens": [1]}, capacity=4)
    with pytest.raises(ReplicaUnavailable, match="already in flight"):
        await supervisor.submit(worker, {"op": "generate", "id": 7, "tokens": [9]}, capacity=4)
    with trio.fail_after(10):
        await fake.send_all(encode_frame({"op": "token", "id": 7, "token": 3, "finished": "length"}))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor._read_events, worker, FrameReader(worker.channel))
            assert await first.receive() == {"token": 3, "finished": "length"}
            nursery.cancel_scope.cancel()
    await supervisor.submit(worker, {"op": "generate", "id": 8, "tokens": [2]}, capacity=4)
    reader = FrameReader(_SocketStream(fake))
    with trio.fail_after(10):  # the worker saw the first hop and then the next one, never the refused one
        assert [(await reader.read())["tokens"] for _ in range(2)] == [[1], [2]]


async def test_requests_for_epochs_or_replicas_not_served_here_are_refused():
    supervisor, _, _ = worker_pair()
    with pytest.raises(ReplicaUnavailable, match="epoch 3"):
        supervisor.driver_of(0, (1, 3))


async def test_a_stepping_worker_s_word_reaches_only_its_drained_requests():
    """``alive`` from a worker goes to its requests whose listeners have nothing unread (a token queued says
    as much), never to another worker's, and a full or closed listener is skipped, not failed."""
    supervisor = Supervisor("me", "unused")
    busy, other = object(), object()
    channels = {i: trio.open_memory_channel[dict](2) for i in range(4)}
    for seq_id, (send, _) in channels.items():
        supervisor.listeners[seq_id] = send
        supervisor.owners[seq_id] = busy if seq_id < 3 else other  # type: ignore[assignment]
    channels[1][0].send_nowait({"token": 7, "finished": None})
    channels[2][1].close()
    supervisor._alive(busy)  # type: ignore[arg-type]
    assert channels[0][1].receive_nowait() == {"alive": True}
    assert channels[1][1].receive_nowait() == {"token": 7, "finished": None}
    for seq_id in (0, 1, 3):
        with pytest.raises(trio.WouldBlock):
            channels[seq_id][1].receive_nowait()
    assert set(supervisor.listeners) == {0, 1, 2, 3}
