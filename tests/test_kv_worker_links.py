"""Workers' own KV links: a daemon hands a worker one end of a sealed TCP link (its socket passed with a
``KvLinkGrant``), and that route's messages go worker to worker; a link that breaks falls back to the daemon
or fails what it began, and a link brings its own route's parts only. Real sockets, real threads."""

from __future__ import annotations

import array
import contextlib
import dataclasses
import select
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
import torch

from hexgen.daemon.kv_channel import KvChannel
from hexgen.daemon.kv_frames import PART_BYTES, KvLinkEnded, KvLinkGrant, KvPart, from_daemon, from_worker
from hexgen.daemon.kv_worker_links import LinkWriter
from hexgen.daemon.sealed import Sealer, new_key
from hexgen.daemon.wire import HEADER_BYTES, MalformedFrame
from hexgen.engine.kv_transfer import KVMissing

PREFIX = "hexgen/3/7/exchange/"
ROUTE = (PREFIX, 1, 2)
WAIT = timedelta(seconds=30)


@dataclasses.dataclass
class Worker:
    """A worker's KV channel and the daemon's end of its KV socket pair."""

    channel: KvChannel
    daemon_end: socket.socket

    def grant(self, link_end: socket.socket, key: bytes, sends: bool, route: tuple[str, int, int] = ROUTE) -> None:
        """Hand the worker ``link_end`` as its daemon would, and close the copy here."""
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [link_end.fileno()]))]
        self.daemon_end.sendmsg([KvLinkGrant(route, key, sends).frame()], fds)
        link_end.close()


@contextlib.contextmanager
def workers(count: int) -> Iterator[list[Worker]]:
    pairs = [socket.socketpair() for _ in range(count)]
    try:
        yield [Worker(KvChannel(theirs), ours) for ours, theirs in pairs]
    finally:
        for pair in pairs:
            for end in pair:
                end.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        dialled = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return dialled, accepted


def granted(sender: Worker, receiver: Worker) -> None:
    """A link for ROUTE from ``sender`` to ``receiver``, granted to both, in use by the sender once this returns."""
    key = new_key()
    out, into = tcp_pair()
    receiver.grant(into, key, sends=False)
    sender.grant(out, key, sends=True)
    taken(sender)


def taken(sender: Worker) -> None:
    """Once the sender's channel took its link for ROUTE (its reader thread files the grant)."""
    for _ in range(3000):
        if ROUTE in sender.channel.links:
            return
        select.select([], [], [], 0.01)
    raise AssertionError("the sending worker never took its link")


class DaemonReader:
    """Reads, in a thread, the parts a worker writes to its daemon (a worker's write blocks on a full socket)."""

    def __init__(self, daemon_end: socket.socket) -> None:
        self.daemon_end = daemon_end
        self.parts: list[KvPart] = []
        self.ended: list[tuple[int, KvLinkEnded]] = []  # with how many parts came before it
        self.arrived = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        with contextlib.suppress(OSError):
            while chunk := self.daemon_end.recv(1 << 20):
                buffer += chunk
                while len(buffer) >= HEADER_BYTES + int.from_bytes(buffer[:HEADER_BYTES], "big"):
                    size = HEADER_BYTES + int.from_bytes(buffer[:HEADER_BYTES], "big")
                    sent = from_worker(buffer[:size])
                    with self.arrived:
                        if isinstance(sent, KvLinkEnded):
                            self.ended.append((len(self.parts), sent))
                        else:
                            self.parts.append(dataclasses.replace(sent, data=b""))
                        self.arrived.notify_all()
                    buffer = buffer[size:]

    def wait_for(self, count: int, seconds: float) -> list[tuple[int, int]]:
        """(index, part) of the parts read, once there are ``count`` or ``seconds`` passed."""
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.parts) >= count, seconds)
            return [(p.index, p.part) for p in self.parts]


def test_a_grant_round_trips_and_a_bad_one_is_refused() -> None:
    grant = KvLinkGrant(ROUTE, new_key(), True)
    assert from_daemon(grant.frame()) == grant
    with pytest.raises(MalformedFrame, match="key"):
        from_daemon(KvLinkGrant(ROUTE, b"short", True).frame())
    with pytest.raises(MalformedFrame, match="route"):
        from_daemon(KvLinkGrant((PREFIX, -1, 2), new_key(), True).frame())


def test_a_route_with_a_link_of_its_own_goes_worker_to_worker_and_nothing_through_the_daemon() -> None:
    """Rank 1 sends rank 2 a message of three parts and one of none: both arrive whole on the link, the
    receiver's channel wakes, and the sender's daemon reads not one byte."""
    with workers(2) as (sender, receiver):
        granted(sender, receiver)
        big = torch.arange(3 * PART_BYTES // 4 - 5, dtype=torch.float32)
        empty = torch.zeros(0, 4)
        sender.channel.send(PREFIX, 1, 2, 9, big)
        sender.channel.send(PREFIX, 1, 2, 9, empty)
        got, nothing = torch.empty_like(big), torch.empty_like(empty)
        assert receiver.channel.receive(PREFIX, 1, 2, 9, got).wait(WAIT)
        assert receiver.channel.receive(PREFIX, 1, 2, 9, nothing).wait(WAIT)
        assert torch.equal(got, big)
        assert select.select([receiver.channel.fileno()], [], [], 0)[0]
        sender.daemon_end.setblocking(False)
        with pytest.raises(BlockingIOError):
            sender.daemon_end.recv(1)


def test_a_link_that_breaks_sends_the_message_again_whole_through_the_daemon() -> None:
    """The receiving end closes; the sender's next writes fail, the daemon is told the link ended, and the
    message they were carrying goes to the daemon from its first part on, with every message after it."""
    with workers(1) as (sender,):
        out, into = tcp_pair()
        sender.grant(out, new_key(), sends=True)
        taken(sender)
        into.close()  # the link dies before a byte is sent: nothing reads it
        message = torch.arange(PART_BYTES // 2, dtype=torch.float32)  # two parts
        daemon = DaemonReader(sender.daemon_end)
        index = 0
        while ROUTE in sender.channel.links:  # a write after the reset fails
            assert index < 50, "no write on the dead link ever failed"
            assert sender.channel.send(PREFIX, 1, 2, 9, message).wait(WAIT)
            index += 1
        index -= 1
        assert daemon.wait_for(2, 30) == [(index, 0), (index, 1)]
        assert daemon.ended == [(0, KvLinkEnded(ROUTE))]  # told first, so that it may set up another
        sender.channel.send(PREFIX, 1, 2, 9, message)
        assert daemon.wait_for(4, 30)[2:] == [(index + 1, 0), (index + 1, 1)]


def test_a_link_that_ends_inside_a_message_fails_it_at_once_and_a_stray_route_ends_the_link() -> None:
    """Part 0 of a two-part message arrives on the link, then the link ends: the receive fails at once,
    naming the link. On a second link, a part of another route is not filed, and ends that link."""
    with workers(1) as (receiver,):
        key = new_key()
        out, into = tcp_pair()
        receiver.grant(into, key, sends=False)
        data = bytes(PART_BYTES)
        first = KvPart(PREFIX, 1, 2, 9, 0, 0, 2, "float32", (PART_BYTES // 2,), data)
        LinkWriter(out, key, ROUTE).write(first.frame_head(), memoryview(data))
        out.close()
        with pytest.raises(KVMissing, match="the link it came on"):
            receiver.channel.receive(PREFIX, 1, 2, 9, torch.empty(PART_BYTES // 2)).wait(WAIT)

        out, into = tcp_pair()
        receiver.grant(into, key, sends=False)
        stray = KvPart(PREFIX, 0, 2, 9, 0, 0, 1, "float32", (1,), bytes(4))  # rank 0's, on rank 1's link
        LinkWriter(out, key, ROUTE).write(stray.frame_head(), memoryview(bytes(4)))
        assert out.recv(1) == b""  # the worker closed the link
        out.close()
        with pytest.raises(KVMissing, match="not whole within"):
            receiver.channel.receive(PREFIX, 0, 2, 9, torch.empty(1)).wait(timedelta(seconds=0.3))


def test_a_send_is_written_by_the_channel_s_writer_and_its_wait_says_when_it_could_not_be() -> None:
    """A send returns before its message is written (the writer thread writes it, so the next chunk can be
    gathered meanwhile); its wait returns once written, and raises as a gloo work would once the daemon's
    socket is gone."""
    with workers(1) as (sender,):
        daemon = DaemonReader(sender.daemon_end)
        message = torch.arange(PART_BYTES // 2, dtype=torch.float32)
        assert sender.channel.send(PREFIX, 1, 2, 9, message).wait(WAIT)
        assert daemon.wait_for(2, 30) == [(0, 0), (0, 1)]
        sender.daemon_end.shutdown(socket.SHUT_RDWR)
        failed = [sender.channel.send(PREFIX, 1, 2, 9, message) for _ in range(8)]
        with pytest.raises(RuntimeError, match="could not be written"):
            for work in failed:
                work.wait(WAIT)


def test_a_part_lands_once_and_one_altered_on_its_link_ends_the_link_and_fails_its_message() -> None:
    """The channel gives a part's place once: a second copy while the first is being copied in (a link's and
    the daemon's, say) is not wanted, nor one after it is in. On a link, a part is a head record and a data
    record opened in place; a data record altered on the way does not open, which ends the link and fails its
    message at once."""
    with workers(1) as (receiver,):
        values = torch.arange(4, dtype=torch.float32)
        part = KvPart(PREFIX, 1, 2, 9, 0, 0, 1, "float32", (4,), values.numpy().tobytes())
        slot = receiver.channel.place(part)
        assert slot is not None and receiver.channel.place(part) is None
        slot[:] = part.data
        receiver.channel.placed(part)
        assert receiver.channel.place(part) is None
        got = torch.empty(4)
        assert receiver.channel.receive(PREFIX, 1, 2, 9, got).wait(WAIT)
        assert torch.equal(got, values)

        key = new_key()
        out, into = tcp_pair()
        receiver.grant(into, key, sends=False)
        sealer = Sealer(key)
        second = dataclasses.replace(part, index=1)
        out.sendall(sealer.seal(second.frame_head()))
        altered = bytearray(sealer.seal(second.data))
        altered[-20] ^= 1
        out.sendall(altered)
        assert out.recv(1) == b""  # the worker closed the link
        out.close()
        with pytest.raises(KVMissing, match="does not open"):
            receiver.channel.receive(PREFIX, 1, 2, 9, torch.empty(4)).wait(WAIT)
