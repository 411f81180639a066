"""Wire framing for control streams: 4-byte big-endian length prefix, then one msgpack value, size-limited.

A frame is ``len(payload).to_bytes(4, "big") + payload`` where ``payload`` is msgpack with the bin type
for bytes. Readers enforce a size limit (``MAX_FRAME`` by default, per call) on the declared length before
reading the payload, and decode strictly: strings must be UTF-8, map keys str or bytes, no ext types
(the timestamp extension included), at most 1024 levels of nesting (msgpack's own limit), and no
container or string longer than the frame could hold.

Errors, all ``FrameError``:
- ``FrameTooLarge``: the declared length exceeds the limit. The stream is now out of step: close it.
- ``TruncatedFrame``: the stream ended inside a frame. Nothing more can be read.
- ``MalformedFrame``: a whole frame arrived but its payload is not acceptable (bad msgpack, a forbidden
  type, or a ``validate`` failure). The frame was consumed, so the stream is still in step: a handler
  can answer with an error reply and read the next frame.

A clean end of stream between frames is not an error: ``FrameReader.read`` returns None. So that None
means only that, a frame never carries nil as its top-level value (``encode_frame`` refuses it, readers
answer ``MalformedFrame``); nil inside a list or map is fine. Whether an end of stream is acceptable is
the caller's call: on py-libp2p's yamux a dead peer and a remote reset both read as a plain end of
stream, so a caller waiting for a reply must treat None (or ``TruncatedFrame``) as a failure. Other
transport errors (``StreamReset``, ``StreamError``) pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import msgpack

MAX_FRAME = 1 << 20
HEADER_BYTES = 4
MAX_DECLARABLE = (1 << 32) - 1
# How much to ask the stream for at a time; yamux hands over at most its 64 KiB message size anyway.
READ_CHUNK = 64 * 1024


class FrameError(Exception):
    """A frame that cannot be accepted; the message says why in one line."""


class FrameTooLarge(FrameError):
    """The frame's declared (or, when writing, actual) payload length exceeds the limit."""


class TruncatedFrame(FrameError):
    """The stream ended part-way through a frame."""


class MalformedFrame(FrameError):
    """A complete frame whose payload is not an acceptable msgpack value or message."""


class ReadableStream(Protocol):
    """What ``FrameReader`` needs: libp2p's ``INetStream.read`` (may return fewer bytes than asked)."""

    async def read(self, n: int | None = None) -> bytes: ...


class WritableStream(Protocol):
    """What ``write_frame`` needs: libp2p's ``INetStream.write``."""

    async def write(self, data: bytes) -> None: ...


def _check_limit(max_size: int) -> None:
    """Reject a size limit that a 4-byte prefix cannot express or that admits nothing."""
    if not isinstance(max_size, int) or not 0 < max_size <= MAX_DECLARABLE:
        raise ValueError(f"max_size must be an int in 1..{MAX_DECLARABLE}, not {max_size!r}")


def encode_frame(obj: Any, max_size: int = MAX_FRAME) -> bytes:
    """The frame carrying ``obj``: length prefix plus msgpack payload.

    Raises ``FrameTooLarge`` if the payload exceeds ``max_size`` bytes; ``ValueError`` for a top-level
    None (it would read as end of stream); msgpack's ``TypeError`` / ``ValueError`` / ``OverflowError``
    for a value msgpack cannot encode. Those are programming errors, not input: encode only what
    ``decode_payload`` accepts (str or bytes map keys, no ext types).
    """
    _check_limit(max_size)
    if obj is None:
        raise ValueError("a frame cannot carry a top-level nil: readers return None only at end of stream")
    payload: bytes = msgpack.packb(obj, use_bin_type=True)
    if len(payload) > max_size:
        raise FrameTooLarge(f"frame payload of {len(payload)} bytes exceeds the limit of {max_size}")
    return len(payload).to_bytes(HEADER_BYTES, "big") + payload


async def write_frame(stream: WritableStream, obj: Any, max_size: int = MAX_FRAME) -> None:
    """Encode ``obj`` (see ``encode_frame``) and write it to ``stream`` in one write."""
    await stream.write(encode_frame(obj, max_size))


def _reject_timestamps(values: Iterable[Any]) -> None:
    """Raise if a decoded container holds a msgpack Timestamp (the one ext type msgpack decodes itself)."""
    if any(type(value) is msgpack.Timestamp for value in values):
        raise ValueError("msgpack ext type -1 (timestamp) is not allowed")


def _checked_list(values: list[Any]) -> list[Any]:
    """msgpack ``list_hook``: every decoded array passes through here."""
    _reject_timestamps(values)
    return values


def _checked_map(mapping: dict[Any, Any]) -> dict[Any, Any]:
    """msgpack ``object_hook``: every decoded map passes through here (keys are already str or bytes)."""
    _reject_timestamps(mapping.values())
    return mapping


def _refuse_ext(code: int, data: bytes) -> Any:
    """msgpack ``ext_hook``: no ext type is part of the protocol."""
    raise ValueError(f"msgpack ext type {code} is not allowed")


def _unpack_options(limit: int) -> dict[str, Any]:
    """msgpack's decoding options for a payload of ``limit`` bytes: strict, as the module docstring says."""
    return {
        "raw": False,
        "strict_map_key": True,
        "ext_hook": _refuse_ext,
        "list_hook": _checked_list,
        "object_hook": _checked_map,
        "max_str_len": limit,
        "max_bin_len": limit,
        "max_array_len": limit,
        "max_map_len": limit,
        "max_ext_len": limit,
    }


def _unpack_error(exc: Exception) -> Exception:
    """``MalformedFrame`` naming why msgpack refused a payload; any other exception as it is (a bug here)."""
    if isinstance(exc, msgpack.StackError):
        return MalformedFrame("msgpack value nested too deeply")
    if isinstance(exc, UnicodeDecodeError):
        return MalformedFrame("msgpack string is not valid UTF-8")
    if isinstance(exc, ValueError | TypeError | msgpack.UnpackException):  # truncation, bad bytes, limit breaches
        return MalformedFrame(f"bad msgpack: {str(exc) or type(exc).__name__}")
    return exc


def _checked_value(value: Any) -> Any:
    if type(value) is msgpack.Timestamp:
        raise MalformedFrame("bad msgpack: msgpack ext type -1 (timestamp) is not allowed")
    if value is None:
        raise MalformedFrame("a frame must not carry a top-level nil")
    return value


def decode_payload(payload: bytes | memoryview) -> Any:
    """The msgpack value in ``payload``, decoded strictly (see the module docstring).

    Raises ``MalformedFrame`` naming the problem; never anything else.
    """
    try:
        value = msgpack.unpackb(payload, **_unpack_options(max(len(payload), 1)))
    except msgpack.ExtraData:
        raise MalformedFrame("frame holds more than one msgpack value") from None
    except Exception as exc:  # noqa: BLE001 - every other failure of msgpack's is named by _unpack_error
        raise _unpack_error(exc) from None
    return _checked_value(value)


def decode_head(payload: bytes | memoryview, limit: int) -> tuple[Any, int]:
    """The first msgpack value in ``payload``, decoded as strictly as ``decode_payload``, which must end within
    its first ``limit`` bytes, and the number of bytes it took (what follows is the caller's). Raises
    ``MalformedFrame``."""
    head = bytes(payload[:limit])
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(head), 1), **_unpack_options(max(len(head), 1)))
    unpacker.feed(head)
    try:
        value = unpacker.unpack()
    except msgpack.OutOfData:
        raise MalformedFrame(f"no whole msgpack value in the first {limit} bytes") from None
    except Exception as exc:  # noqa: BLE001 - every other failure of msgpack's is named by _unpack_error
        raise _unpack_error(exc) from None
    return _checked_value(value), unpacker.tell()


class FrameReader:
    """Reads frames from one stream, keeping bytes that arrived early for the next frame.

    The reader owns the read side of its stream: anything read through another path is lost to it.
    ``read`` is cancel-safe: if cancelled part-way through a frame, the bytes already received stay in
    the buffer and the next ``read`` continues where it left off.
    """

    def __init__(self, stream: ReadableStream, chunk: int = READ_CHUNK) -> None:
        self._stream = stream
        self._chunk = chunk
        self._buffer = bytearray()
        self._eof = False

    async def _fill(self, needed: int) -> bool:
        """Read until the buffer holds ``needed`` bytes; False if the stream ends first."""
        while len(self._buffer) < needed and not self._eof:
            try:
                chunk = await self._stream.read(self._chunk)
            except EOFError:  # libp2p's StreamEOF; a bare b"" means the same
                chunk = b""
            if chunk:
                self._buffer += chunk
            else:
                self._eof = True
        return len(self._buffer) >= needed

    async def read(self, max_size: int = MAX_FRAME) -> Any:
        """The next frame's msgpack value, or None at a clean end of stream (between frames).

        Raises ``FrameTooLarge`` as soon as the prefix declares more than ``max_size`` payload bytes (the
        payload is not waited for), ``TruncatedFrame`` if the stream ends inside a frame, and
        ``MalformedFrame`` for a complete frame whose payload ``decode_payload`` refuses.
        """
        frame = await self.read_frame(max_size)
        return None if frame is None else decode_payload(memoryview(frame)[HEADER_BYTES:])

    async def read_frame(self, max_size: int = MAX_FRAME) -> bytes | None:
        """The next whole frame, length prefix and payload undecoded (None at a clean end of stream); raises as
        ``read`` does, but for ``MalformedFrame``."""
        _check_limit(max_size)
        if not await self._fill(HEADER_BYTES):
            if not self._buffer:
                return None
            raise TruncatedFrame(f"stream ended after {len(self._buffer)} of {HEADER_BYTES} length-prefix bytes")
        length = int.from_bytes(self._buffer[:HEADER_BYTES], "big")
        if length > max_size:
            raise FrameTooLarge(f"peer declared a frame of {length} bytes; the limit is {max_size}")
        if not await self._fill(HEADER_BYTES + length):
            received = len(self._buffer) - HEADER_BYTES
            raise TruncatedFrame(f"stream ended after {received} of {length} frame payload bytes")
        frame = bytes(self._buffer[: HEADER_BYTES + length])
        del self._buffer[: HEADER_BYTES + length]
        return frame


# ---------------------------------------------------------------------------------------------------------
# Message shapes


@dataclass(frozen=True)
class OptionalField:
    """A schema entry for a field that may be absent or nil; otherwise it must match ``spec``."""

    spec: Any


@dataclass(frozen=True)
class ListOf:
    """A schema entry for a list whose every item matches ``spec``, with at most ``max_len`` items."""

    spec: Any
    max_len: int | None = None


TYPE_NAMES = {
    int: "int",
    float: "number",
    str: "str",
    bytes: "bytes",
    bool: "bool",
    list: "list",
    dict: "map",
    type(None): "nil",
}


def optional(spec: Any) -> OptionalField:
    """Mark a schema field as optional: it may be absent or nil, and must match ``spec`` otherwise."""
    return OptionalField(spec)


def list_of(spec: Any, max_len: int | None = None) -> ListOf:
    """A schema entry for a list of at most ``max_len`` items (no limit if None) that each match ``spec``."""
    return ListOf(spec, max_len)


def _matches_type(value: Any, expected: type) -> bool:
    """isinstance with the wire's meaning: bool is not an int, and an int is an acceptable float."""
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_words(spec: type | tuple[type, ...]) -> str:
    """How a type spec reads in an error message: ``int``, ``str or nil``."""
    types = spec if isinstance(spec, tuple) else (spec,)
    return " or ".join(TYPE_NAMES.get(t, t.__name__) for t in types)


def _described(path: str) -> str:
    """``message`` for the root, ``field 'gpus[2].memory'`` for anything inside it."""
    return f"field '{path}'" if path else "message"


def _check(value: Any, spec: Any, path: str) -> None:
    """Raise ``MalformedFrame`` unless ``value`` matches ``spec``; ``path`` locates it in the message."""
    if isinstance(spec, OptionalField):
        if value is not None:
            _check(value, spec.spec, path)
    elif isinstance(spec, Mapping):
        _check_map(value, spec, path)
    elif isinstance(spec, ListOf):
        _check_list(value, spec, path)
    elif not any(_matches_type(value, t) for t in (spec if isinstance(spec, tuple) else (spec,))):
        raise MalformedFrame(f"{_described(path)} must be {_type_words(spec)}")


def _check_map(value: Any, spec: Mapping[str, Any], path: str) -> None:
    """``_check`` for a nested schema: a map whose every named field matches (optional ones may be absent)."""
    if not isinstance(value, dict):
        raise MalformedFrame(f"{_described(path)} must be a map")
    for name, field_spec in spec.items():
        field_path = f"{path}.{name}" if path else name
        if name in value:
            _check(value[name], field_spec, field_path)
        elif not isinstance(field_spec, OptionalField):
            raise MalformedFrame(f"{_described(field_path)} is missing")


def _check_list(value: Any, spec: ListOf, path: str) -> None:
    """``_check`` for ``list_of``: a list of at most ``spec.max_len`` items, each matching ``spec.spec``."""
    if not isinstance(value, list):
        raise MalformedFrame(f"{_described(path)} must be a list")
    if spec.max_len is not None and len(value) > spec.max_len:
        raise MalformedFrame(f"{_described(path)} has {len(value)} items; at most {spec.max_len} are allowed")
    for index, item in enumerate(value):
        _check(item, spec.spec, f"{path}[{index}]")


def validate(obj: Any, schema: Mapping[str, Any]) -> dict[str, Any]:
    """Check that a decoded message has the shape ``schema`` describes, and return it.

    ``schema`` maps field names to specs. A spec is a type (``int``, ``float``, ``str``, ``bytes``,
    ``bool``, ``list``, ``dict``, ``type(None)``) or a tuple of types; a nested schema (a mapping) for a
    map field; ``list_of(spec, max_len)``; or ``optional(spec)`` for a field that may be absent or nil.
    ``bool`` never passes as ``int``; an ``int`` passes as ``float``. Fields the schema does not name are
    allowed (newer peers may send more). Raises ``MalformedFrame`` with messages such as
    ``field 'x' must be int``, ``field 'gpus[2].memory' is missing``, ``message must be a map``.
    """
    _check(obj, schema, "")
    return cast("dict[str, Any]", obj)  # _check_map proved it a map
