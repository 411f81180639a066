"""Fuzzing support shared by tests/test_fuzz.py and bench/fuzz_atheris.py: input generators and the frame property.

Inputs come from a seeded ``random.Random``: hypothesis draws one 64-bit seed per input (``SEEDS``), which
costs it about 0.6 ms where a tree of drawn values costs 3 ms; a failure still reproduces. The generators
mix confusing constants, random values and valid examples with a few mutations (``mutate``, ``fuzzed``).
The property everywhere: a parser returns a valid result or raises its documented error with a non-empty
one-line message (``outcome``, ``assert_clear``), never another exception.
"""

from __future__ import annotations

import math
import os
import random
import reprlib
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import msgpack
from hypothesis import HealthCheck, currently_in_test_context, note, settings
from hypothesis import strategies as st

from hexgen.daemon.wire import (
    MAX_FRAME,
    READ_CHUNK,
    FrameReader,
    FrameTooLarge,
    MalformedFrame,
    TruncatedFrame,
    decode_payload,
    encode_frame,
)

# Each parser gets this many inputs (HEXGEN_FUZZ_EXAMPLES, 5,000 unless set: the suite's time budget; raise
# it for a longer run, or use bench/fuzz_atheris.py for coverage-guided fuzzing).
FUZZ_EXAMPLES = int(os.environ.get("HEXGEN_FUZZ_EXAMPLES", "5000"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
NOW = 1_700_000_000.0


def assert_clear(error: BaseException) -> None:
    """The error's message is what a peer or a log gets: non-empty and on one line."""
    message = str(error)
    assert message.strip(), f"{type(error).__name__} with an empty message"
    assert "\n" not in message and "\r" not in message, f"{type(error).__name__} over several lines: {message[:300]!r}"


REFUSED = object()


def outcome(parse: Callable[[], Any], error: type[BaseException] | tuple[type[BaseException], ...]) -> Any:
    """What ``parse()`` returns, or REFUSED when it raised ``error`` with a clear message; any other exception
    propagates and fails the test."""
    try:
        return parse()
    except error as raised:
        assert_clear(raised)
        return REFUSED


SHOW = reprlib.Repr()
SHOW.maxstring, SHOW.maxother, SHOW.maxlevel, SHOW.maxlist, SHOW.maxdict = 300, 300, 12, 12, 12


def show(value: Any) -> None:
    """Print the input with a failing example (hypothesis shows only the seed); reprlib copes with deep values."""
    if currently_in_test_context():
        note(f"input: {SHOW.repr(value)}")


def run_now(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """The result of a coroutine that never suspends (in-memory streams and requests), run here and now."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise AssertionError("the coroutine suspended; in-memory input should never make it wait")


def clone(value: Any) -> Any:
    """A deep copy of maps, lists and scalars without recursion (copy.deepcopy fails on values 1,000 deep)."""
    if not isinstance(value, dict | list):
        return value
    root: Any = {} if isinstance(value, dict) else []
    stack = [(value, root)]
    while stack:
        source, target = stack.pop()
        for key, item in source.items() if isinstance(source, dict) else enumerate(source):
            copied = ({} if isinstance(item, dict) else []) if isinstance(item, dict | list) else item
            if isinstance(item, dict | list):
                stack.append((item, copied))
            if isinstance(target, dict):
                target[key] = copied
            else:
                target.append(copied)
    return root


def nested(depth: int, container: str) -> Any:
    """A value nested ``depth`` levels deep, built without recursion."""
    value: Any = 1
    for _ in range(depth):
        value = [value] if container == "list" else {"k": value}
    return value


SEEDS = st.integers(0, 2**64 - 1)
HUGE_INTS = (2**63 - 1, -(2**63), 2**63, 2**64 - 1, 2**64, 10**400, -(10**400))
EDGE_FLOATS = (0.0, -0.0, 0.5, -2.5, 1e-310, 1e308, math.inf, -math.inf, math.nan)
EDGE_TEXT = (
    "",
    " ",
    "\n",
    "a\nb",
    "\x00",
    "é",
    "🙂",
    "<s>",
    "source",
    "sink",
    "prefill",
    "decode",
    "colocated",
    "0",
    "1",
)
# What msgpack can carry, plus integers beyond 64 bits (the in-process parsers must take those too)...
CONFUSERS = (None, True, False, 0, 1, -1, 2, 255, 65536, *HUGE_INTS, *EDGE_FLOATS, *EDGE_TEXT, b"", b"\xff" * 9)
# ...and strings only JSON can carry (lone surrogates): for the parsers behind the HTTP gateway.
JSON_ONLY_TEXT = ("\ud800", "a\udfffb")
KEYS = ("x", "", "id", "type", "text", "role", "content", "gpus", "layers", "plan", "tokens", "\n", "k" * 100)
ALPHABET = "abcxyz 019.:_-/\n\t\x00é🙂<>{}[]\"'\\" + "\u200b\u2028\uffff"


def random_scalar(rng: random.Random, json_text: bool = False) -> Any:
    """One of the confusing constants, or a random int, float, string or bytes."""
    roll = rng.random()
    if roll < 0.45:
        return rng.choice(CONFUSERS + JSON_ONLY_TEXT if json_text else CONFUSERS)
    if roll < 0.6:
        return rng.randint(-(2**64), 2**64) if rng.random() < 0.5 else rng.randint(-300, 300)
    if roll < 0.7:
        return struct.unpack(">d", rng.randbytes(8))[0]  # any bit pattern: NaNs, infinities, subnormals
    if roll < 0.85:
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12)))
    if roll < 0.9:
        return "x" * rng.randint(1000, 70_000)
    return rng.randbytes(rng.randint(0, 12))


def random_value(rng: random.Random, json_text: bool = False, depth: int = 0) -> Any:
    """A random msgpack-like value: scalars, short lists and maps a few levels deep, or one nested 1,024 deep."""
    roll = rng.random()
    if roll < 0.04:
        return nested(rng.randint(30, 1024), rng.choice(["list", "map"]))
    if depth < 3 and roll < 0.2:
        return [random_value(rng, json_text, depth + 1) for _ in range(rng.randint(0, 4))]
    if depth < 3 and roll < 0.35:
        return {rng.choice(KEYS): random_value(rng, json_text, depth + 1) for _ in range(rng.randint(0, 4))}
    return random_scalar(rng, json_text)


def _locations(root: Any) -> list[tuple[Any, ...]]:
    """The path of every place in ``root``: the root itself, each map value and each list item."""
    found: list[tuple[Any, ...]] = [()]
    stack: list[tuple[Any, tuple[Any, ...]]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            found.append((*path, key))
            if len(found) < 400:
                stack.append((child, (*path, key)))
    return found


def _keys(value: Any) -> list[str]:
    """Every map key in ``value`` (so inserted keys often collide with real ones)."""
    keys: set[str] = set(KEYS)
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            keys.update(k for k in node if isinstance(k, str))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return sorted(keys)


def _numeric_variant(value: Any, rng: random.Random) -> Any:
    """A number near ``value`` of another kind or sign, or the value as text."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return random_scalar(rng)
    variants: list[Callable[[], Any]] = [
        lambda: -value,
        lambda: value * 1_000_003,
        lambda: value + 0.5,
        lambda: float(value),
        lambda: str(value),
        lambda: [value],
        lambda: value - 1,
    ]
    try:
        return rng.choice(variants)()
    except OverflowError:  # a huge int has no float
        return -value


def mutate(valid: Any, rng: random.Random, json_text: bool = False) -> Any:
    """``valid`` with one to four mutations at random places: a value replaced (by a confusing constant, a
    random value, a number of another kind, itself wrapped in a list or map), a key or item dropped, one added."""
    value = clone(valid)
    for _ in range(rng.randint(1, 4)):
        path = rng.choice(_locations(value))
        parent: Any = None
        target = value
        for key in path:
            parent, target = target, target[key]
        op = rng.choice(("replace", "confuse", "confuse", "delete", "delete", "insert", "wrap", "number"))
        if op == "insert" and isinstance(target, dict):
            target[rng.choice(_keys(valid))] = random_value(rng, json_text)
        elif op == "insert" and isinstance(target, list):
            target.insert(rng.randint(0, len(target)), random_value(rng, json_text))
        elif op == "delete" and parent is not None:
            del parent[path[-1]]
        else:
            if op == "wrap":
                new = rng.choice([[target], {"value": target}, [target, clone(target)]])
            elif op == "number":
                new = _numeric_variant(target, rng)
            elif op == "replace":
                new = random_value(rng, json_text)
            else:
                new = random_scalar(rng, json_text)
            if parent is None:
                value = new
            else:
                parent[path[-1]] = new
    return value


def fuzzed(*valid: Any, json_text: bool = False) -> st.SearchStrategy[Any]:
    """A quarter random values, three quarters the ``valid`` examples mutated."""

    def build(seed: int) -> Any:
        rng = random.Random(seed)
        if rng.random() < 0.25:
            return random_value(rng, json_text)
        return mutate(rng.choice(valid), rng, json_text)

    return SEEDS.map(build)


@dataclass
class ChunkedStream:
    """An in-memory ``ReadableStream``: ``data`` handed out in the given chunk sizes (cycled), then EOF."""

    data: bytes
    chunk_sizes: list[int]
    eof_raises: bool
    position: int = 0
    reads: int = 0

    async def read(self, n: int | None = None) -> bytes:
        if self.position >= len(self.data):
            if self.eof_raises:
                raise EOFError("stream closed")  # libp2p's StreamEOF is an EOFError
            return b""
        size = min(n or READ_CHUNK, self.chunk_sizes[self.reads % len(self.chunk_sizes)])
        self.reads += 1
        chunk = self.data[self.position : self.position + size]
        self.position += len(chunk)
        return chunk


CRAFTED_PAYLOADS = (
    b"",
    b"\xc0",  # a top-level nil
    b"\xc1",  # the one byte msgpack never uses
    b"\x01\x02",  # two values
    b"\xa2\xff\xfe",  # a string that is not UTF-8
    b"\x81\x01\x02",  # an int map key
    b"\x81\xc4\x01a\x01",  # a bytes map key
    b"\x81\x90\x01",  # an array as a map key
    b"\xd6\xff\x00\x00\x00\x00",  # a timestamp
    b"\x91\xd6\xff\x00\x00\x00\x00",  # a timestamp in a list
    b"\x81\xa1k\xd6\xff\x00\x00\x00\x00",  # a timestamp in a map
    b"\xd4\x05\x00",  # ext type 5
    b"\xdd\xff\xff\xff\xff",  # an array declaring 2^32 - 1 items
    b"\xdf\xff\xff\xff\xff",  # a map declaring 2^32 - 1 pairs
    b"\xdb\xff\xff\xff\xff",  # a string declaring 2^32 - 1 bytes
    b"\xc6\xff\xff\xff\xff",  # bin declaring 2^32 - 1 bytes
    b"\xcb" + struct.pack(">d", math.nan),
    b"\xcf" + b"\xff" * 8,
    b"\xd3\x80" + b"\x00" * 7,
)


def random_payload(rng: random.Random) -> bytes:
    """A msgpack payload: a random value packed, random bytes, a crafted bad one, or nesting up to 1,100 deep."""
    roll = rng.random()
    if roll < 0.5:
        try:
            return msgpack.packb(random_value(rng), use_bin_type=True)
        except (OverflowError, ValueError, TypeError):  # an int beyond 64 bits, nesting beyond msgpack's limit
            return rng.randbytes(8)
    if roll < 0.7:
        return rng.randbytes(rng.randint(0, 64))
    if roll < 0.9:
        return rng.choice(CRAFTED_PAYLOADS)
    return rng.choice([b"\x91", b"\x81\xa1k"]) * rng.randint(1, 1100) + b"\x01"


def random_frames(rng: random.Random) -> bytes:
    """One to three frames, each well-formed or broken: a wrong declared length, cut short, bytes changed."""
    out = b""
    for _ in range(rng.randint(1, 3)):
        payload = random_payload(rng)
        declared = rng.choice([len(payload), len(payload), rng.randint(0, 2**32 - 1), rng.randint(0, len(payload) + 4)])
        frame = declared.to_bytes(4, "big") + payload
        damage = rng.choice(["none", "none", "cut", "flip", "insert"])
        at = rng.randint(0, len(frame))
        if damage == "cut":
            frame = frame[:at]
        elif damage == "flip" and at < len(frame):
            frame = frame[:at] + bytes([frame[at] ^ rng.randint(1, 255)]) + frame[at + 1 :]
        elif damage == "insert":
            frame = frame[:at] + rng.randbytes(rng.randint(1, 4)) + frame[at:]
        out += frame
    return out


@dataclass(frozen=True)
class FrameCase:
    """Bytes on a stream, how the stream hands them out, and the reader's size limit."""

    data: bytes
    chunk_sizes: tuple[int, ...] = (READ_CHUNK,)
    max_size: int = MAX_FRAME
    eof_raises: bool = False


def frame_case(seed: int) -> FrameCase:
    rng = random.Random(seed)
    data = random_frames(rng) if rng.random() < 0.85 else rng.randbytes(rng.randint(0, 200))
    chunks = tuple(rng.choice([1, 2, 3, 5, 4096, 70_000]) for _ in range(rng.randint(1, 4)))
    return FrameCase(data, chunks, MAX_FRAME if rng.random() < 0.7 else rng.randint(1, 64), rng.random() < 0.5)


def check_frames(case: FrameCase) -> None:
    """The reader gives values, None at a clean end, or a FrameError; after a malformed frame it stays in step."""
    show(case)
    data = case.data
    reader = FrameReader(ChunkedStream(data, list(case.chunk_sizes), case.eof_raises))
    consumed = 0
    while True:
        try:
            value = run_now(reader.read(case.max_size))
        except MalformedFrame as error:  # the frame was consumed: the next one can be read
            assert_clear(error)
            consumed += 4 + int.from_bytes(data[consumed : consumed + 4], "big")
            continue
        except (FrameTooLarge, TruncatedFrame) as error:
            assert_clear(error)
            return
        if value is None:
            assert consumed == len(data), "None only at a clean end of stream, between frames"
            return
        length = int.from_bytes(data[consumed : consumed + 4], "big")
        assert length <= case.max_size
        payload = data[consumed + 4 : consumed + 4 + length]
        assert msgpack.packb(decode_payload(payload)) == msgpack.packb(value)  # as decode_payload reads it
        encode_frame(value, max_size=4 * MAX_FRAME)  # whatever a reader accepts can be sent on
        consumed += 4 + length
