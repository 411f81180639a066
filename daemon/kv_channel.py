"""A worker's KV channel: its end of the daemons' KV relay, and the group a relayed ``Exchange`` posts on.

A send cuts the tensor into KV parts (``daemon.kv_frames``) and posts them to a writer thread, which writes
them to the daemon in order, and the send is done once written (the socket's buffer and the daemon's queues
are the flow control), so the next chunk of KV is gathered while one is written. A
reader thread files every part that arrives under (exchange, source rank, destination rank, tag, message
index); a receive waits for its message whole, checks it is the tensor it expects, and copies it in. What no
receive takes (a sequence aborted meanwhile) is dropped after ``keep_s``. The channel's ``fileno`` turns
readable whenever a message is settled, so a step loop waiting for relayed KV selects on it instead of polling.

Where the daemons set up a link for a route of this worker's (``KvLinkGrant``, its socket passed along), its
messages go on that link instead (``daemon.kv_worker_links``); one the link fails to carry is sent again,
whole, through the daemon (filing a part twice changes nothing), told that the link ended (``KvLinkEnded``).
"""

from __future__ import annotations

import array
import collections
import contextlib
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from hexgen.daemon.kv_frames import (
    ITEM_BYTES,
    PART_BYTES,
    Frame,
    Key,
    KvLinkEnded,
    KvLinkGrant,
    KvLost,
    KvPart,
    Route,
    from_daemon,
)
from hexgen.daemon.kv_worker_links import LinkWriter, serve_link
from hexgen.daemon.wire import HEADER_BYTES, MAX_FRAME, FrameError
from hexgen.engine.kv_transfer import KVMissing

log = logging.getLogger("hexgen.worker")

KEEP_S = 300.0
RECEIVE_WAIT_S = 120.0  # a receive posted without a timeout
MAX_FDS = 8  # descriptors one read of the daemon's socket takes: one per grant, and grants are rare
LOST_BETWEEN_DAEMONS = "the connection that carried it between the daemons broke"


@dataclass
class _Message:
    dtype: str
    shape: tuple[int, ...]
    parts: int
    data: torch.Tensor  # its bytes, uninitialised until filed: zeroing 16 MiB costs as much as receiving it
    missing: set[int]
    since: float = field(default_factory=time.monotonic)
    lost: str | None = None  # why it will never be whole
    filling: set[int] = field(default_factory=set)  # missing parts one thread is copying or opening in

    def slot(self, part: int, size: int) -> memoryview:
        start = part * PART_BYTES
        return self.data.numpy().data[start : start + size]

    @staticmethod
    def of(part: KvPart) -> _Message:
        data = torch.empty(part.message_bytes, dtype=torch.uint8)
        return _Message(part.dtype, part.shape, part.parts, data, set(range(part.parts)))

    @staticmethod
    def lost_before(why: str) -> _Message:
        return _Message("", (), 0, torch.empty(0, dtype=torch.uint8), {0}, lost=why)


@dataclass
class _Sending:
    """A send's work: the message's parts, written in order by the channel's writer thread. ``wait`` returns
    once they are written, and raises RuntimeError (as a gloo work does) when they could not be."""

    route: Route
    parts: list[KvPart]
    tensor: torch.Tensor  # what the parts view: kept alive until written
    written: threading.Event = field(default_factory=threading.Event)
    error: str | None = None

    def wait(self, timeout: timedelta | None = None) -> bool:
        seconds = None if timeout is None else timeout.total_seconds()
        if not self.written.wait(seconds):
            raise RuntimeError(f"a KV message to rank {self.route[2]} was not written within {seconds:g} s")
        if self.error is not None:
            raise RuntimeError(f"a KV message to rank {self.route[2]} could not be written: {self.error}")
        return True


@dataclass(frozen=True)
class _Receive:
    channel: KvChannel
    key: Key
    buffer: torch.Tensor
    adopt: bool = False  # the buffer takes the message's memory (``set_``) instead of a copy of it

    def wait(self, timeout: timedelta | None = None) -> bool:
        """Copy the message into the buffer once it is whole; raises KVMissing when it is not within
        ``timeout``, the channel ended, or it is not the tensor the buffer expects."""
        seconds = RECEIVE_WAIT_S if timeout is None else timeout.total_seconds()
        message = self.channel.take(self.key, seconds)
        want = (_dtype_name(self.buffer), tuple(self.buffer.shape))
        if (message.dtype, message.shape) != want:
            _, src, _, tag, index = self.key
            raise KVMissing(
                f"KV message {index} from exchange rank {src} (tag {tag}) is {message.dtype} {list(message.shape)}, "
                f"but this rank expects {want[0]} {list(want[1])}: the replicas' KV formats differ"
            )
        if message.data.numel():
            received = message.data.view(self.buffer.dtype)
            if self.adopt:
                self.buffer.set_(received.untyped_storage(), 0, self.buffer.shape, self.buffer.stride())
            else:
                self.buffer.copy_(received.view(self.buffer.shape))
        return True


@dataclass(frozen=True)
class RelayGroup:
    """One exchange rank's view of the relay for one epoch: ``send`` and ``recv`` as a gloo group has them."""

    channel: KvChannel
    prefix: str
    rank: int

    def send(self, tensors: list[torch.Tensor], peer: int, tag: int) -> _Sending:
        """Post ``tensors[0]`` to ``peer`` under ``tag``; it must not change until the work's ``wait``."""
        return self.channel.send(self.prefix, self.rank, peer, tag, tensors[0])

    def recv(self, tensors: list[torch.Tensor], peer: int, tag: int, adopt: bool = False) -> _Receive:
        """The next message from ``peer`` under ``tag``, copied into ``tensors[0]``; with ``adopt`` the tensor
        is made to share the message's memory instead, for a fresh buffer that no other tensor views."""
        return self.channel.receive(self.prefix, peer, self.rank, tag, tensors[0], adopt)

    def arrived(self, peer: int, tag: int, count: int) -> bool:
        """Whether the next ``count`` messages ``recv`` would take from ``peer`` under ``tag`` are here whole."""
        return self.channel.arrived(self.prefix, peer, self.rank, tag, count)

    def recv_any(self, peer: int, tag: int, timeout: timedelta) -> bool:
        """Whether some message from ``peer`` under ``tag`` came within ``timeout`` (all such are dropped): for
        a tag whose messages are sent again until answered, so that any one of them will do."""
        return self.channel.take_any(self.prefix, peer, self.rank, tag, timeout.total_seconds())


class KvChannel:
    """The worker's end of its KV socket pair with the daemon; ``bind`` it to an epoch's exchange rank."""

    def __init__(self, sock: socket.socket, keep_s: float = KEEP_S) -> None:
        self.sock = sock
        self.keep_s = keep_s
        self.post_lock = threading.Lock()
        self.filed = threading.Condition()
        self.messages: dict[Key, _Message] = {}
        self.sent: collections.Counter[tuple[str, int, int, int]] = collections.Counter()  # under post_lock
        self._writes: queue.SimpleQueue[_Sending] = queue.SimpleQueue()  # put under post_lock: in index order
        self.posted: collections.Counter[tuple[str, int, int, int]] = collections.Counter()  # under filed
        self.bound: list[str] = []
        self.ended: str | None = None
        self.links: dict[Route, LinkWriter] = {}  # under links_lock
        self.links_lock = threading.Lock()
        self._fds: collections.deque[int] = collections.deque()  # passed by the daemon, for grants to come
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        threading.Thread(target=self._read, name="kv-channel", daemon=True).start()
        threading.Thread(target=self._write, name="kv-writes", daemon=True).start()

    def fileno(self) -> int:
        """A descriptor that is readable once a message became whole or lost, or the channel ended, since
        the last ``drain``."""
        return self._wake_r.fileno()

    def drain(self) -> None:
        """Clear ``fileno``'s readiness: what settles after this makes it readable again."""
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: already readable, which is all a byte says
            self._wake_w.send(b"\0")

    def bind(self, prefix: str, rank: int) -> RelayGroup:
        """The group of exchange rank ``rank`` in the exchange keyed ``prefix``; counters of epochs two binds
        old are forgotten."""
        with self.filed, self.post_lock:
            if prefix not in self.bound:
                self.bound = [*self.bound[-1:], prefix]
            for counter in (self.sent, self.posted):
                for key in [k for k in counter if k[0] not in self.bound]:
                    del counter[key]
        with self.links_lock:
            for route in [r for r in self.links if r[0] not in self.bound]:
                self.links.pop(route).close()
        return RelayGroup(self, prefix, rank)

    def send(self, prefix: str, src: int, dst: int, tag: int, tensor: torch.Tensor) -> _Sending:
        """Post ``tensor`` as the next message from ``src`` to ``dst`` under ``tag``; the writer thread sends it
        on the route's own link where this worker holds one, else (or when the link fails it) through the
        daemon, while the caller goes on (gathering the next chunk of KV, say)."""
        dtype = _dtype_name(tensor)
        held = tensor.detach().contiguous()
        raw = held.reshape(-1).view(torch.uint8).numpy().data
        count = max(1, -(-raw.nbytes // PART_BYTES))
        with self.post_lock:
            index = self.sent[prefix, src, dst, tag]
            self.sent[prefix, src, dst, tag] += 1
            parts = [
                KvPart(prefix, src, dst, tag, index, part, count, dtype, tuple(tensor.shape), data)
                for part in range(count)
                for data in [raw[part * PART_BYTES : (part + 1) * PART_BYTES]]
            ]
            sending = _Sending((prefix, src, dst), parts, held)
            self._writes.put(sending)
        return sending

    def _write(self) -> None:
        """Write every posted message, in order, until the daemon's socket breaks (then fail the rest)."""
        broken: str | None = None
        while True:
            sending = self._writes.get()
            if broken is None:
                try:
                    self._write_one(sending)
                except OSError as exc:
                    broken = f"the KV socket to the daemon broke: {exc}"
            sending.error = broken
            sending.written.set()

    def _write_one(self, sending: _Sending) -> None:
        with self.links_lock:
            link = self.links.get(sending.route)
        if link is not None and self._sent_on(link, sending.parts):
            return
        for part in sending.parts:
            self.sock.sendall(part.frame_head())
            self.sock.sendall(part.data)

    def _sent_on(self, link: LinkWriter, frames: list[KvPart]) -> bool:
        """Whether ``link`` carried every part of a message; when it breaks, it is closed and dropped (the
        route goes through the daemon from then on)."""
        try:
            for frame in frames:
                link.write(frame.frame_head(), memoryview(frame.data))
        except OSError as exc:
            log.warning("the KV link of %s broke (%s): its messages go through the daemon", link.route, exc)
            with self.links_lock:
                if self.links.get(link.route) is link:
                    del self.links[link.route]
            link.close()
            self.sock.sendall(KvLinkEnded(link.route).frame())  # so the daemon may set up another
            return False
        return True

    def receive(self, prefix: str, src: int, dst: int, tag: int, buffer: torch.Tensor, adopt: bool = False) -> _Receive:
        """The work of the next message from ``src`` to ``dst`` under ``tag``, to land in ``buffer``."""
        with self.filed:
            index = self.posted[prefix, src, dst, tag]
            self.posted[prefix, src, dst, tag] += 1
        return _Receive(self, (prefix, src, dst, tag, index), buffer, adopt)

    def arrived(self, prefix: str, src: int, dst: int, tag: int, count: int) -> bool:
        with self.filed:
            first = self.posted[prefix, src, dst, tag]
            return all(self._settled((prefix, src, dst, tag, first + i)) for i in range(count))

    def take(self, key: Key, seconds: float) -> _Message:
        """The message under ``key`` once whole, removed; raises KVMissing after ``seconds`` without it."""
        with self.filed:
            self.filed.wait_for(lambda: self._settled(key) or self.ended is not None, seconds)
            message = self.messages.pop(key, None)
            if message is not None and not message.missing and message.lost is None:
                return message
            _, src, _, tag, index = key
            why = (message and message.lost) or self.ended or f"not whole within {seconds:g} s"
            raise KVMissing(f"KV message {index} from exchange rank {src} (tag {tag}) did not arrive: {why}")

    def take_any(self, prefix: str, src: int, dst: int, tag: int, seconds: float) -> bool:
        """Whether some whole message from ``src`` to ``dst`` under ``tag`` is here within ``seconds``; every
        one of them is removed. Raises KVMissing once the channel ended."""

        def whole() -> list[Key]:
            return [k for k, m in self.messages.items() if k[:4] == (prefix, src, dst, tag) and not m.missing]

        with self.filed:
            self.filed.wait_for(lambda: bool(whole()) or self.ended is not None, seconds)
            found = whole()
            for key in found:
                del self.messages[key]
            if not found and self.ended is not None:
                raise KVMissing(f"no message from exchange rank {src} (tag {tag}): {self.ended}")
            return bool(found)

    def _settled(self, key: Key) -> bool:
        """Whether the message is whole, or will never be."""
        message = self.messages.get(key)
        return message is not None and (not message.missing or message.lost is not None)

    def _read(self) -> None:
        """File every frame the daemon writes until the socket ends; each frame is read whole into one buffer
        kept for the next (filing copies a part's data into its message), so a 512 KiB part is copied once
        off the socket and costs no fresh pages."""
        buffer = bytearray()
        try:
            while True:
                head = bytearray(HEADER_BYTES)
                got = self._read_into(memoryview(head))
                if got < HEADER_BYTES:
                    raise EOFError("the daemon closed the KV channel")
                size = int.from_bytes(head, "big")
                if size > MAX_FRAME:
                    raise EOFError(f"the daemon sent a KV frame of {size} bytes")
                if len(buffer) < HEADER_BYTES + size:
                    buffer = bytearray(HEADER_BYTES + size)
                frame = memoryview(buffer)[: HEADER_BYTES + size]
                frame[:HEADER_BYTES] = head
                if self._read_into(frame[HEADER_BYTES:]) < size:
                    raise EOFError("the daemon closed the KV channel inside a frame")
                self._file(frame)
        except (OSError, EOFError) as exc:
            with self.filed:
                self.ended = str(exc) or type(exc).__name__
                self.filed.notify_all()
            self._wake()

    def _read_into(self, view: memoryview) -> int:
        """Fill ``view`` from the socket, keeping the descriptors that come with it for the grants they go
        with; the bytes read, fewer only when it ended first."""
        got = 0
        while got < len(view):
            count, ancillary, _, _ = self.sock.recvmsg_into([view[got:]], socket.CMSG_SPACE(MAX_FDS * 4))
            for level, kind, data in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds = array.array("i")
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                    self._fds.extend(fds)
            if count == 0:
                break
            got += count
        return got

    def _file(self, frame: Frame) -> None:
        try:
            part = from_daemon(frame)
        except FrameError as exc:
            log.warning("dropped a KV part from the daemon: %s", exc)
            return
        if isinstance(part, KvLost):
            self.lose(part.keys, LOST_BETWEEN_DAEMONS)
        elif isinstance(part, KvLinkGrant):
            self._take_link(part)
        else:
            self.file_part(part)

    def _take_link(self, grant: KvLinkGrant) -> None:
        """Send the grant's route on its link from the next message on, or file what arrives on it."""
        if not self._fds:
            log.warning("the daemon granted a KV link for %s without its socket", grant.route)
            return
        sock = socket.socket(fileno=self._fds.popleft())
        if grant.sends:
            with self.links_lock:
                old = self.links.pop(grant.route, None)
                self.links[grant.route] = LinkWriter(sock, grant.key, grant.route)
            if old is not None:
                old.close()
            return
        args = (sock, grant.key, grant.route, self)
        threading.Thread(target=serve_link, args=args, name="kv-link", daemon=True).start()

    def file_part(self, part: KvPart) -> None:
        """File one part of a message; a message whole wakes its receive."""
        slot = self.place(part)
        if slot is not None:
            slot[:] = part.data
            self.placed(part)

    def place(self, part: KvPart) -> memoryview | None:
        """Where ``part``'s data goes in its message (begun here if new), claimed until ``placed`` so that no
        other copy of the part (a link's, the daemon's) lands on it meanwhile; None where the part is not wanted:
        its message is lost or of another shape, or the part is in or on its way. Copied unlocked: only this
        part's bytes, and the message is not whole."""
        key = part.key
        with self.filed:
            message = self.messages.get(key)
            if message is None:
                self._forget_old()
                message = self.messages[key] = _Message.of(part)
            if message.lost is not None:  # told lost before (or while) its parts came: it stays lost
                return None
            if (part.dtype, part.shape, part.parts) != (message.dtype, message.shape, message.parts):
                log.warning("dropped a KV part that does not match its message %s", key)
                return None
            if part.part not in message.missing or part.part in message.filling:
                return None
            message.filling.add(part.part)
            return message.slot(part.part, len(part.data))

    def placed(self, part: KvPart) -> None:
        """``part``'s data is in the slot ``place`` gave; a message whole wakes its receive."""
        with self.filed:
            message = self.messages.get(part.key)
            if message is None or part.part not in message.filling:
                return
            message.filling.discard(part.part)
            message.missing.discard(part.part)
            whole = not message.missing
            if whole:
                self.filed.notify_all()
        if whole:
            self._wake()

    def lose(self, keys: list[Key], why: str) -> None:
        """Mark these messages lost: those on their way, and those not begun (their parts were lost before
        leaving the sending daemon), so a receive of either fails at once."""
        with self.filed:
            for key in keys:
                message = self.messages.get(key)
                if message is None:
                    self._forget_old()
                    self.messages[key] = _Message.lost_before(why)
                elif message.missing:
                    message.lost = why
            self.filed.notify_all()
        self._wake()

    def _forget_old(self) -> None:
        now = time.monotonic()
        for key in [k for k, m in self.messages.items() if now - m.since > self.keep_s]:
            del self.messages[key]


def _dtype_name(tensor: torch.Tensor) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in ITEM_BYTES:
        raise ValueError(f"a KV message cannot carry {tensor.dtype} tensors")
    return name
