"""The supervisor's request plumbing against a worker's end of a real socket pair (no torch needed)."""

from __future__ import annotations

import pytest
import trio

from hexgen.daemon.deployment import Replica
from hexgen.daemon.hop import HopAlive, HopToken
from hexgen.daemon.supervisor import LocalWorker, ReplicaUnavailable, Supervisor
from hexgen.daemon.wire import FrameReader, encode_frame
from hexgen.daemon.worker_frames import AbortFrame, GenerateFrame, StepFrame, TokenFrame, frame_to_worker
from hexgen.daemon.worker_link import SocketChannel
from hexgen.engine.sequence import SamplingParams

pytestmark = pytest.mark.trio


def worker_pair() -> tuple[Supervisor, LocalWorker, trio.SocketStream]:
    ours, theirs = trio.socket.socketpair()
    replica = Replica(0, 0, "colocated", ((0, 5, 1),), 0, (("me", 0),))
    worker = LocalWorker(replica, 0, 1)
    worker.channel = SocketChannel(trio.SocketStream(ours))
    return Supervisor("me", "model"), worker, trio.SocketStream(theirs)


def generate(seq_id: int, tokens: list[int]) -> GenerateFrame:
    return GenerateFrame(seq_id, tuple(tokens), SamplingParams(max_tokens=8))


async def token(fake: trio.SocketStream, seq_id: int, value: int, finished: str | None = None) -> None:
    await fake.send_all(encode_frame(StepFrame((TokenFrame(seq_id, value, finished),)).to_wire()))


async def test_a_consumer_that_falls_behind_is_cut_off_and_its_work_aborted():
    """Backpressure: the worker's token stream is never waited on; a request whose reader does not keep up
    (its buffer of ``capacity`` events is full) is aborted instead of stalling the batch."""
    supervisor, worker, fake = worker_pair()
    reader = FrameReader(SocketChannel(fake))
    events = await supervisor.submit(worker, generate(7, [1]), capacity=2)
    other = await supervisor.submit(worker, generate(8, [1]), capacity=16)
    with trio.fail_after(10):
        assert [frame_to_worker(await reader.read()).id for _ in range(2)] == [7, 8]  # type: ignore[union-attr]
        for value in range(5):
            for seq_id in (7, 8):
                await token(fake, seq_id, value)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor._read_events, worker, worker.reader())
            assert frame_to_worker(await reader.read()) == AbortFrame(7)
            await token(fake, 8, 5, "length")
            got = [await other.receive() for _ in range(6)]
            nursery.cancel_scope.cancel()
    assert [e.token for e in got] == list(range(6)) and got[-1].finished == "length"
    assert [events.receive_nowait().token for _ in range(2)] == [0, 1]
    assert 7 not in supervisor.listeners and 8 not in supervisor.listeners


async def test_a_second_hop_under_an_id_in_flight_is_refused_and_takes_nothing_from_the_first():
    supervisor, worker, fake = worker_pair()
    first = await supervisor.submit(worker, generate(7, [1]), capacity=4)
    with pytest.raises(ReplicaUnavailable, match="already in flight"):
        await supervisor.submit(worker, generate(7, [9]), capacity=4)
    with trio.fail_after(10):
        await token(fake, 7, 3, "length")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor._read_events, worker, worker.reader())
            assert await first.receive() == HopToken(3, "length")
            nursery.cancel_scope.cancel()
    await supervisor.submit(worker, generate(8, [2]), capacity=4)
    reader = FrameReader(SocketChannel(fake))
    with trio.fail_after(10):  # the worker saw the first hop and then the next one, never the refused one
        assert [frame_to_worker(await reader.read()) for _ in range(2)] == [generate(7, [1]), generate(8, [2])]


async def test_a_request_s_wire_map_is_read_as_its_frame():
    """A hop's frame as a map (the router's) is read by the frame's own parser; a bad one is refused."""
    supervisor, worker, fake = worker_pair()
    await supervisor.submit(worker, generate(5, [4, 2]).to_wire(), capacity=4)
    with trio.fail_after(10):
        assert frame_to_worker(await FrameReader(SocketChannel(fake)).read()) == generate(5, [4, 2])
    with pytest.raises(ReplicaUnavailable, match="not a request"):
        await supervisor.submit(worker, AbortFrame(5).to_wire(), capacity=4)


async def test_a_worker_that_sends_a_bad_frame_fails():
    supervisor, worker, fake = worker_pair()
    await fake.send_all(encode_frame({"op": "step", "ids": [1], "tokens": ["x"], "finished": [None]}))
    with trio.fail_after(10), pytest.raises(RuntimeError, match="sent a bad frame: field 'tokens'"):
        await supervisor._read_events(worker, worker.reader())


async def test_requests_for_epochs_or_replicas_not_served_here_are_refused():
    supervisor, _, _ = worker_pair()
    with pytest.raises(ReplicaUnavailable, match="epoch 3"):
        supervisor.driver_of(0, (1, 3))


async def test_a_stepping_worker_s_word_reaches_only_its_drained_requests():
    """``alive`` from a worker goes to its requests whose listeners have nothing unread (a token queued says
    as much), never to another worker's, and a full or closed listener is skipped, not failed."""
    supervisor = Supervisor("me", "unused")
    busy, other = object(), object()
    channels = {i: trio.open_memory_channel[object](2) for i in range(4)}
    for seq_id, (send, _) in channels.items():
        supervisor.listeners[seq_id] = send
        supervisor.owners[seq_id] = busy if seq_id < 3 else other  # type: ignore[assignment]
    channels[1][0].send_nowait(HopToken(7))
    channels[2][1].close()
    supervisor.requests.alive(busy)  # type: ignore[arg-type]
    assert channels[0][1].receive_nowait() == HopAlive()
    assert channels[1][1].receive_nowait() == HopToken(7)
    for seq_id in (0, 1, 3):
        with pytest.raises(trio.WouldBlock):
            channels[seq_id][1].receive_nowait()
    assert set(supervisor.listeners) == {0, 1, 2, 3}


async def test_a_gpu_worker_is_configured_for_its_gpu_its_world_and_the_exchange_group():
    """What a worker is told (daemon.worker_config): its GPU of the plan, NCCL with its longer connect bound,
    the KV block size every GPU host shares, its replica's world under the epoch it formed in, and the
    epoch's exchange group with every replica in the exchange numbering."""
    from hexgen.daemon.deployment import Deployment, replica_prefix
    from hexgen.daemon.worker_config import GPU_KV_BLOCK_SIZE
    from hexgen.engine.bounds import NCCL_CONNECT_TIMEOUT_S

    prefill = Replica(0, 0, "prefill", ((0, 5, 2),), 0, (("me", 0), ("me", 1)))
    decode = Replica(1, 1, "decode", ((0, 3, 1), (3, 5, 1)), 2, (("me", 2), ("other", 0)))
    rendezvous = (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    deployment = Deployment(3, 9, (prefill, decode), ((0, 1.0),), {0: ((1, 1.0),)}, ("10.0.0.1", 7000), rendezvous)
    supervisor = Supervisor("me", "/models/m", device="cuda", store_address=("10.0.0.1", 7000), prefill_chunk=96)
    secret, exchange_secret = b"s" * 32, b"x" * 32
    frame = supervisor.settings.configure(deployment, decode, 0, 4, secret, exchange_secret)
    assert (frame.rank, frame.world_size, frame.device, frame.backend) == (0, 2, "cuda:2", "nccl")
    assert frame.store == ("10.0.0.2", 7001) and frame.prefix == replica_prefix(3, 4, decode)
    assert frame.secret == secret and frame.advertised == "10.0.0.1" and frame.progress
    assert frame.connect_timeout_s == NCCL_CONNECT_TIMEOUT_S
    assert frame.replica.first_rank == 0 and frame.replica.mode == "decode" and frame.replica.prefill_chunk == 96
    assert frame.replica.cache.block_size == GPU_KV_BLOCK_SIZE
    assert frame.exchange is not None and frame.exchange.secret == exchange_secret
    assert (frame.exchange.first_rank, frame.exchange.size, frame.exchange.store) == (2, 4, ("10.0.0.1", 7000))
    assert [r.first_rank for r in frame.exchange.replicas] == [0, 2]
    assert frame_to_worker(frame.to_wire()) == frame
