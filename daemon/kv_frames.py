"""KV parts: one piece of one KV message of a relayed exchange, as it goes worker -> daemon -> daemon -> worker.

A KV message is what one gloo send would carry (one chunk of one slice of one sequence's KV, between two
exchange ranks, under a tag); it travels as ``parts`` frames of at most ``PART_BYTES`` bytes each, numbered
``index`` among the messages the sender posted to that rank under that tag (both sides post in the same order,
so the receiver's n-th receive takes the n-th message).

A part's frame is a 4-byte big-endian length, the part's header (a msgpack map: every field but ``data``), then
its data, raw: every hop reads the header and passes the frame on as it came, and the bytes are never packed
or unpacked. One parser, ``KvPart.from_frame`` (the header's checks in ``KvPart.from_wire``), for every hop; where a worker
holds a link of its own (``KvLinkGrant``), a part goes worker -> worker as two sealed records, its frame's
head and its data (``daemon.kv_worker_links``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from hexgen.daemon.wire import HEADER_BYTES, MalformedFrame, decode_head
from hexgen.daemon.worker_setup import as_map, need

PART_BYTES = 512 * 1024  # well below a frame's limit (daemon.wire.MAX_FRAME)
MAX_MESSAGE_BYTES = 1 << 32  # a chunk of a sequence's KV; larger would not fit a worker's staging anyway
MAX_DIMS = 8
MAX_PREFIX = 256
MAX_HEADER_BYTES = 1024  # a part's header: the prefix and a few numbers
MAX_LOST = 32  # messages one lost notice names: its header stays within MAX_HEADER_BYTES
Key = tuple[str, int, int, int, int]  # one message: prefix, src, dst, tag, index
Route = tuple[str, int, int]  # the messages from one rank to another: prefix, src, dst
Frame = bytes | bytearray | memoryview  # a whole frame, length prefix included, as read off a socket
ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "uint8": 1, "int8": 1, "int64": 8}


@dataclass(frozen=True)
class KvPart:
    """Part ``part`` of ``parts`` of message ``index`` from exchange rank ``src`` to ``dst`` under ``tag``, in
    the exchange keyed ``prefix``: ``data`` is its slice of the message's bytes, a ``dtype`` tensor of
    ``shape``."""

    prefix: str
    src: int
    dst: int
    tag: int
    index: int
    part: int
    parts: int
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    @property
    def message_bytes(self) -> int:
        return math.prod(self.shape) * ITEM_BYTES[self.dtype]

    def header(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "src": self.src,
            "dst": self.dst,
            "tag": self.tag,
            "index": self.index,
            "part": self.part,
            "parts": self.parts,
            "dtype": self.dtype,
            "shape": list(self.shape),
        }

    def to_wire(self) -> dict[str, Any]:
        """The part as one map, ``data`` included: what ``from_wire`` checks."""
        return self.header() | {"data": bytes(self.data)}

    def frame_head(self) -> bytes:
        """The frame up to the data: length prefix and header; the data follows as it is."""
        head: bytes = msgpack.packb(self.header(), use_bin_type=True)
        return (len(head) + len(self.data)).to_bytes(HEADER_BYTES, "big") + head

    @staticmethod
    def from_wire(raw: Any) -> KvPart:
        """Raises MalformedFrame (``daemon.wire``) unless ``raw`` is a whole, consistent part. O(dims)."""
        return _parse(raw)

    @staticmethod
    def from_frame(frame: Frame) -> KvPart:
        """The part a whole frame (length prefix included) carries, its data a view of ``frame``; raises
        MalformedFrame unless the prefix gives the frame's length and the header and data make a whole,
        consistent part. O(header)."""
        header, data = _split(frame)
        need("lost" not in header, "a KV part's header names no lost messages")
        return _parse(header | {"data": data})

    @staticmethod
    def from_head(head: Frame, data: memoryview) -> KvPart:
        """The part whose frame is ``head`` (length prefix and header: ``frame_head``) followed by ``data``,
        which need hold only the right number of bytes (a worker's link checks a part before it opens the
        data into place); raises MalformedFrame like ``from_frame``. O(header)."""
        header, rest = _split(head, len(data))
        need(not rest and "lost" not in header and "grant" not in header, "a KV part's head is its header alone")
        return _parse(header | {"data": data})

    @property
    def key(self) -> Key:
        return (self.prefix, self.src, self.dst, self.tag, self.index)

    @property
    def route(self) -> Route:
        return (self.prefix, self.src, self.dst)


@dataclass(frozen=True)
class KvLost:
    """Daemon -> worker, or daemon -> daemon: the messages ``(src, dst, tag, index)`` of exchange ``prefix``
    will not be whole: the carrier that brought some of their parts broke before their last, or some of their
    parts were still queued at the sender when it broke (at most MAX_LOST a frame)."""

    prefix: str
    messages: tuple[tuple[int, int, int, int], ...]

    def frame(self) -> bytes:
        head: bytes = msgpack.packb({"lost": self.prefix, "messages": [list(m) for m in self.messages]})
        return len(head).to_bytes(HEADER_BYTES, "big") + head

    @property
    def keys(self) -> list[Key]:
        return [(self.prefix, *m) for m in self.messages]


@dataclass(frozen=True)
class KvLinkGrant:
    """Daemon -> worker, a TCP socket's descriptor attached (``SCM_RIGHTS``): the worker's own end of a sealed
    KV link (``daemon.kv_link``) for the messages of ``route``, which it ``sends`` on it (else receives), sealed
    under ``key``, with no daemon in their way."""

    route: Route
    key: bytes
    sends: bool

    def frame(self) -> bytes:
        head: bytes = msgpack.packb({"grant": list(self.route), "key": self.key, "sends": self.sends})
        return len(head).to_bytes(HEADER_BYTES, "big") + head


@dataclass(frozen=True)
class KvLinkEnded:
    """Worker -> daemon: the link of the worker's own that it sent ``route``'s messages on ended; they go
    through the daemon again, which may set up another."""

    route: Route

    def frame(self) -> bytes:
        head: bytes = msgpack.packb({"ended": list(self.route)})
        return len(head).to_bytes(HEADER_BYTES, "big") + head


def lost_frames(keys: list[Key]) -> list[KvLost]:
    """``keys`` as notices of at most MAX_LOST messages, one exchange each. O(len(keys))."""
    by_prefix: dict[str, list[tuple[int, int, int, int]]] = {}
    for prefix, *message in keys:
        by_prefix.setdefault(prefix, []).append((message[0], message[1], message[2], message[3]))
    return [
        KvLost(prefix, tuple(messages[at : at + MAX_LOST]))
        for prefix, messages in by_prefix.items()
        for at in range(0, len(messages), MAX_LOST)
    ]


def from_daemon(frame: Frame) -> KvPart | KvLost | KvLinkGrant:
    """What a worker reads from its daemon, and a daemon from another: a part, a notice of lost messages, or
    (from a worker's own daemon alone) a link granted; raises MalformedFrame."""
    header, data = _split(frame)
    if "grant" in header:
        return _grant(header, data)
    if "lost" not in header:
        return _parse(header | {"data": data})
    prefix, messages = header.get("lost"), header.get("messages")
    need(isinstance(prefix, str) and 0 < len(prefix) <= MAX_PREFIX and not data, "a lost notice names an exchange")
    if not (isinstance(messages, list) and len(messages) <= MAX_LOST):
        raise MalformedFrame(f"a lost notice names at most {MAX_LOST} messages")
    found = [m for m in messages if isinstance(m, list) and len(m) == 4 and all(type(n) is int and n >= 0 for n in m)]
    need(len(found) == len(messages), "a lost message is [src, dst, tag, index]")
    return KvLost(str(prefix), tuple((m[0], m[1], m[2], m[3]) for m in found))


def from_worker(frame: Frame) -> KvPart | KvLinkEnded:
    """What a daemon reads from its worker: a part, or the end of a link of the worker's own; raises
    MalformedFrame."""
    header, data = _split(frame)
    if "ended" in header:
        need(set(header) == {"ended"} and not data, "a link's end names its route alone")
        return KvLinkEnded(route_of(header["ended"]))
    need("lost" not in header and "grant" not in header, "a worker sends its daemon parts and link ends only")
    return _parse(header | {"data": data})


def _grant(header: dict[str, Any], data: memoryview) -> KvLinkGrant:
    from hexgen.daemon.sealed import KEY_BYTES  # cryptography and trio: not for an engine that never holds a link

    key, sends = header.get("key"), header.get("sends")
    if data or not isinstance(sends, bool):
        raise MalformedFrame("a link grant says which way, and holds no data")
    if not (isinstance(key, bytes) and len(key) == KEY_BYTES):
        raise MalformedFrame(f"a link grant's key is {KEY_BYTES} bytes")
    return KvLinkGrant(route_of(header.get("grant")), key, sends)


def route_of(raw: Any) -> Route:
    """``[prefix, src, dst]`` as a route; raises MalformedFrame for anything else."""
    ok = isinstance(raw, list) and len(raw) == 3 and isinstance(raw[0], str) and 0 < len(raw[0]) <= MAX_PREFIX
    if not (ok and all(type(n) is int and 0 <= n < 1 << 31 for n in raw[1:])):
        raise MalformedFrame("a route is [prefix, source rank, destination rank], ranks integers >= 0")
    return (raw[0], raw[1], raw[2])


def _split(frame: Frame, data_apart: int = 0) -> tuple[dict[str, Any], memoryview]:
    """A frame's header map and the data after it; MalformedFrame unless the length prefix fits (counting
    ``data_apart`` bytes of data that follow apart from ``frame``)."""
    size = len(frame) + data_apart
    if len(frame) < HEADER_BYTES or int.from_bytes(frame[:HEADER_BYTES], "big") != size - HEADER_BYTES:
        raise MalformedFrame(f"a KV frame of {size} bytes whose length prefix says otherwise")
    payload = memoryview(frame)[HEADER_BYTES:]
    header, used = decode_head(payload, MAX_HEADER_BYTES)
    if not isinstance(header, dict) or "data" in header:
        raise MalformedFrame("a KV frame starts with a header map of every field but the data")
    return header, payload[used:]


def _parse(raw: Any) -> KvPart:
    body = as_map(raw, "KV part")
    prefix, dtype, shape, data = body.get("prefix"), body.get("dtype"), body.get("shape"), body.get("data")
    if not (isinstance(prefix, str) and 0 < len(prefix) <= MAX_PREFIX):
        raise MalformedFrame("prefix must be a non-empty string")
    need(isinstance(dtype, str) and dtype in ITEM_BYTES, f"dtype must be one of {sorted(ITEM_BYTES)}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS):
        raise MalformedFrame(f"shape must be a list of at most {MAX_DIMS} sizes")
    need(all(type(n) is int and 0 <= n < 1 << 32 for n in shape), "shape must hold sizes >= 0")
    if not isinstance(data, bytes | memoryview):
        raise MalformedFrame("data must be bytes")
    numbers = [body.get(key) for key in ("src", "dst", "tag", "index", "part", "parts")]
    counts = [n for n in numbers if type(n) is int and 0 <= n < 1 << 31]
    need(len(counts) == len(numbers), "ranks, tag and counts must be integers >= 0")
    src, dst, tag, index, number, parts = counts
    part = KvPart(prefix, src, dst, tag, index, number, parts, str(dtype), tuple(shape), data)
    size = part.message_bytes
    need(size <= MAX_MESSAGE_BYTES, f"a message of {size} bytes is over {MAX_MESSAGE_BYTES}")
    need(part.parts == max(1, -(-size // PART_BYTES)) and part.part < part.parts, "part numbering does not fit")
    expected = min(PART_BYTES, size - part.part * PART_BYTES)
    need(len(data) == expected, f"part {part.part} holds {len(data)} bytes, not {expected}")
    return part
