"""Frames on a stream: round trips through a stream that hands out random small chunks, every refusal, validate."""

from __future__ import annotations

import contextlib
import random

import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from hexgen.daemon.exact_reads import read_frame_exactly
from hexgen.daemon.wire import (
    MAX_FRAME,
    FrameReader,
    FrameTooLarge,
    MalformedFrame,
    TruncatedFrame,
    decode_payload,
    encode_frame,
    list_of,
    optional,
    validate,
    write_frame,
)


class ChunkyStream:
    """A fake libp2p stream: ``read(n)`` returns 1..n bytes of ``data`` (random sizes), then EOF.

    At the end it returns b"" or raises EOFError (as libp2p's StreamEOF does), depending on ``eof_raises``.
    """

    def __init__(self, data: bytes, seed: int = 0, eof_raises: bool = False, max_chunk: int = 7) -> None:
        self.data = data
        self.position = 0
        self.random = random.Random(seed)
        self.eof_raises = eof_raises
        self.max_chunk = max_chunk
        self.reads = 0
        self.written = bytearray()

    async def read(self, n: int | None = None) -> bytes:
        self.reads += 1
        await trio.lowlevel.checkpoint()
        if self.position >= len(self.data):
            if self.eof_raises:
                raise EOFError
            return b""
        size = self.random.randint(1, min(n or self.max_chunk, self.max_chunk))
        chunk = self.data[self.position : self.position + size]
        self.position += len(chunk)
        return chunk

    async def write(self, data: bytes) -> None:
        self.written += data


async def read_all(reader: FrameReader, max_size: int = MAX_FRAME) -> list[object]:
    """Every frame until a clean end of stream."""
    values = []
    while (value := await reader.read(max_size)) is not None:
        values.append(value)
    return values


MESSAGES = [
    {"op": "status", "id": 7},
    [1, 2.5, None, True, "héllo", b"\x00\xff"],
    {},
    "x" * 5000,
    {"nested": {"deeper": [{"k": b"v" * 300}]}},
    0,
]


@pytest.mark.parametrize("eof_raises", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_frames_survive_random_small_chunks(seed: int, eof_raises: bool) -> None:
    data = b"".join(encode_frame(message) for message in MESSAGES)
    stream = ChunkyStream(data, seed=seed, eof_raises=eof_raises)
    assert trio.run(read_all, FrameReader(stream)) == MESSAGES
    assert stream.reads > len(MESSAGES)  # the chunks really were small


def test_write_frame_then_read_back() -> None:
    async def main() -> object:
        sink = ChunkyStream(b"")
        await write_frame(sink, {"a": [1, 2]})
        return await FrameReader(ChunkyStream(bytes(sink.written))).read()

    assert trio.run(main) == {"a": [1, 2]}


def test_frame_layout_is_a_big_endian_length_then_msgpack() -> None:
    frame = encode_frame({"a": 1})
    payload = msgpack.packb({"a": 1})
    assert frame == len(payload).to_bytes(4, "big") + payload


def test_clean_eof_returns_none_every_time() -> None:
    async def main() -> tuple[object, object]:
        reader = FrameReader(ChunkyStream(b""))
        return await reader.read(), await reader.read()

    assert trio.run(main) == (None, None)


def test_oversized_declared_length_is_refused_before_the_payload_arrives() -> None:
    stream = ChunkyStream((2_000_000).to_bytes(4, "big") + b"\x00" * 10, max_chunk=4)

    with pytest.raises(FrameTooLarge, match="2000000 bytes"):
        trio.run(FrameReader(stream).read)
    assert stream.position <= 8  # read the prefix (and at most one small chunk more), not the payload


def test_per_call_limit() -> None:
    frame = encode_frame("x" * 100)
    with pytest.raises(FrameTooLarge):
        trio.run(FrameReader(ChunkyStream(frame)).read, 50)
    assert trio.run(FrameReader(ChunkyStream(frame)).read, 200) == "x" * 100


def test_encode_refuses_a_payload_over_the_limit() -> None:
    with pytest.raises(FrameTooLarge, match="exceeds the limit of 10"):
        encode_frame("x" * 20, max_size=10)
    with pytest.raises(FrameTooLarge):
        encode_frame(b"\x00" * MAX_FRAME)


@pytest.mark.parametrize("bad", [0, -1, 1 << 32, 1.5])
def test_nonsense_limits_are_programming_errors(bad: object) -> None:
    with pytest.raises(ValueError):
        encode_frame(1, max_size=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x00\x00", "after 2 of 4 length-prefix bytes"),
        (b"\x00\x00\x00\x10abc", "after 3 of 16 frame payload bytes"),
        (encode_frame([1, 2, 3]) + b"\x00", "after 1 of 4"),
    ],
)
def test_truncated_frames(data: bytes, fragment: str) -> None:
    async def main() -> None:
        reader = FrameReader(ChunkyStream(data, eof_raises=True))
        while await reader.read() is not None:
            pass

    with pytest.raises(TruncatedFrame, match=fragment):
        trio.run(main)


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"", "bad msgpack"),
        (b"\xc1", "bad msgpack"),  # a byte msgpack never uses
        (b"\x01\x02", "more than one msgpack value"),
        (b"\xa2\xff\xfe", "UTF-8"),
        (msgpack.packb({1: "int key"}), "not allowed for map key"),
        (msgpack.packb(msgpack.ExtType(5, b"x")), "ext type 5"),
        (msgpack.packb(msgpack.Timestamp(1, 0)), "timestamp"),
        (msgpack.packb([1, {"t": msgpack.Timestamp(1, 0)}]), "timestamp"),
        (b"\x91" * 2000 + b"\xc0", "nested too deeply"),
        (b"\xdd\xff\xff\xff\xff", "exceeds max_array_len"),  # declares 4 billion items in 5 bytes
        (b"\xc6\xff\xff\xff\xff", "bad msgpack"),
        (b"\xc0", "top-level nil"),
    ],
)
def test_malformed_payloads_keep_the_stream_in_step(payload: bytes, fragment: str) -> None:
    async def main() -> list[object]:
        reader = FrameReader(ChunkyStream(_frame(payload) + encode_frame("next")))
        with pytest.raises(MalformedFrame, match=fragment):
            await reader.read()
        return await read_all(reader)

    assert trio.run(main) == ["next"]


def test_bytes_map_keys_are_allowed() -> None:
    assert decode_payload(msgpack.packb({b"k": 1})) == {b"k": 1}


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)
# Streams that are mostly well framed, with junk spliced in: random bytes alone nearly always fail at the
# length prefix and would leave the payload paths untested.
frames_and_junk = st.lists(
    st.one_of(
        msgpack_values.map(lambda value: _frame(msgpack.packb(value))),
        st.binary(min_size=1, max_size=12),
        st.binary(max_size=40).map(_frame),
    ),
    max_size=4,
).map(b"".join)


@settings(max_examples=150, deadline=None)
@given(frames_and_junk, st.integers(0, 2**16))
def test_random_streams_raise_only_frame_errors(data: bytes, seed: int) -> None:
    async def main() -> None:
        reader = FrameReader(ChunkyStream(data, seed=seed))
        while True:
            try:
                if await reader.read(max_size=1 << 12) is None:
                    return
            except MalformedFrame:
                continue  # the frame was consumed: the next one can still be read

    with contextlib.suppress(FrameTooLarge, TruncatedFrame):
        trio.run(main)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_payloads_decode_or_raise_malformed(payload: bytes) -> None:
    with contextlib.suppress(MalformedFrame):
        decode_payload(payload)


def test_top_level_nil_cannot_be_sent() -> None:
    with pytest.raises(ValueError, match="top-level nil"):
        encode_frame(None)
    assert trio.run(FrameReader(ChunkyStream(encode_frame([None]))).read) == [None]


@settings(max_examples=100, deadline=None)
@given(msgpack_values.filter(lambda value: value is not None), st.integers(0, 2**16))
def test_any_msgpack_value_round_trips(value: object, seed: int) -> None:
    stream = ChunkyStream(encode_frame(value) * 2, seed=seed)
    assert trio.run(read_all, FrameReader(stream)) == [value, value]


# --- validate -------------------------------------------------------------------------------------------

SCHEMA = {
    "id": int,
    "prompt": str,
    "temperature": float,
    "stop": optional(list_of(str, max_len=4)),
    "gpu": {"type": str, "memory": int},
    "tags": list_of({"name": str}),
    "cursor": (bytes, type(None)),
}
GOOD = {
    "id": 1,
    "prompt": "hi",
    "temperature": 1,
    "gpu": {"type": "H100", "memory": 80},
    "tags": [{"name": "a"}],
    "cursor": None,
    "extra": "ignored",
}


def test_validate_accepts_and_returns_a_good_message() -> None:
    assert validate(GOOD, SCHEMA) is GOOD
    assert validate({**GOOD, "stop": None}, SCHEMA) is not None
    assert validate({**GOOD, "stop": ["\n"]}, SCHEMA) is not None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"id": "1"}, "field 'id' must be int"),
        ({"id": True}, "field 'id' must be int"),
        ({"temperature": "hot"}, "field 'temperature' must be number"),
        ({"gpu": {"type": "H100"}}, "field 'gpu.memory' is missing"),
        ({"gpu": []}, "field 'gpu' must be a map"),
        ({"tags": [{"name": "a"}, {"name": 3}]}, r"field 'tags\[1\].name' must be str"),
        ({"stop": ["a"] * 5}, "field 'stop' has 5 items; at most 4"),
        ({"stop": "a"}, "field 'stop' must be a list"),
        ({"cursor": 5}, "field 'cursor' must be bytes or nil"),
    ],
)
def test_validate_names_the_bad_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(MalformedFrame, match=message):
        validate({**GOOD, **change}, SCHEMA)


def test_validate_missing_field_and_non_map() -> None:
    with pytest.raises(MalformedFrame, match="field 'prompt' is missing"):
        validate({key: value for key, value in GOOD.items() if key != "prompt"}, SCHEMA)
    with pytest.raises(MalformedFrame, match="message must be a map"):
        validate([1], SCHEMA)


async def _exact_frames(chunks: list[bytes], max_size: int = MAX_FRAME) -> list[bytes]:
    """What ``read_frame_exactly`` reads from a socket pair whose writer sends ``chunks`` and then closes."""
    left, right = trio.socket.socketpair()
    reader = trio.SocketStream(right)
    async with trio.SocketStream(left) as writer, reader:
        for chunk in chunks:
            await writer.send_all(chunk)
        await writer.send_eof()
        frames = []
        while (frame := await read_frame_exactly(reader, max_size)) is not None:
            frames.append(bytes(frame))
        return frames


@pytest.mark.trio
async def test_a_socket_s_frames_are_read_exactly_however_they_were_cut() -> None:
    frames = [encode_frame({"n": i, "pad": b"x" * (i * 1000)}) for i in range(5)]
    whole = b"".join(frames)
    cuts = [whole[at : at + 333] for at in range(0, len(whole), 333)]
    assert await _exact_frames(cuts) == frames
    with pytest.raises(TruncatedFrame, match="2 of 4 length-prefix"):
        await _exact_frames([whole[:2]])
    with pytest.raises(TruncatedFrame, match="frame payload bytes"):
        await _exact_frames([frames[1][:-1]])
    with pytest.raises(FrameTooLarge):
        await _exact_frames([frames[4]], max_size=10)
