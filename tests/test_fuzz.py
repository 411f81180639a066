"""Fuzzing every network-facing parser: frames, envelopes, adverts, plans, generate requests and HTTP bodies.

Hypothesis feeds each parser 10,000 inputs (``HEXGEN_FUZZ_EXAMPLES`` overrides the count): random values and
bytes, and near-valid ones, a valid example with a few mutations (keys dropped, added or replaced, values of
the wrong type, huge integers, NaN and infinities, long strings, deep nesting), so the fuzzer reaches the deep
code paths. The property everywhere: the parser returns a valid result or raises its documented error with a
non-empty one-line message, never another exception. A live daemon then takes a few hundred malformed frames
on every protocol, answers each with an error frame or a closed stream, and still generates reference tokens.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import reprlib
import struct
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import msgpack
import pytest
import trio
from hypothesis import HealthCheck, currently_in_test_context, example, given, note, settings
from hypothesis import strategies as st
from starlette.requests import Request
from test_daemon_deployment import GPU_INDEX, GPUS, PINNED, RENDEZVOUS

from hexgen.coordinator.pinned import PinnedGroup, PinnedPlanError, parse_pinned, pinned_plan
from hexgen.coordinator.plan import Plan, PlanFormatError
from hexgen.coordinator.specs import resolve_model
from hexgen.daemon.cluster_view import LinkMeasurement
from hexgen.daemon.config import NodeConfig
from hexgen.daemon.deployment import Deployment, DeploymentError, deployment_from_plan, replica_prefix
from hexgen.daemon.envelope import (
    EnvelopeRejected,
    MalformedEnvelope,
    ReplayGuard,
    from_wire,
    seal,
    to_wire,
    verify,
)
from hexgen.daemon.hardware import HardwareError, HardwareProfile, simulated_profile
from hexgen.daemon.host import new_identity
from hexgen.daemon.http_api import MAX_BODY_BYTES, ApiError, Gatekeeper, Gateway, build_app
from hexgen.daemon.identity import peer_id_of
from hexgen.daemon.membership import PeerTable
from hexgen.daemon.messages import Advert, MessageError, PlanBody
from hexgen.daemon.metrics import Metrics
from hexgen.daemon.node import Node
from hexgen.daemon.router import (
    MAX_TOKENS_LIMIT,
    SAMPLING_FIELDS,
    Completion,
    RequestError,
    _check_replica_request,
    chat_tokens,
    parse_request,
    parse_stops,
)
from hexgen.daemon.swarm_view import assignments, wire_assignments
from hexgen.daemon.wire import (
    MAX_FRAME,
    READ_CHUNK,
    FrameError,
    FrameReader,
    FrameTooLarge,
    MalformedFrame,
    TruncatedFrame,
    decode_payload,
    encode_frame,
)
from hexgen.engine.sampler import _mix_seed
from hexgen.engine.sequence import SamplingParams
from hexgen.engine.tokenizer import Tokenizer

FUZZ_EXAMPLES = int(os.environ.get("HEXGEN_FUZZ_EXAMPLES", "10000"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
NOW = 1_700_000_000.0
STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
MAX_CONTEXT = 512  # stories260K's context; the live test checks the daemon agrees
VOCAB_SIZE = 512  # and its vocabulary (the tokenizer fixture checks)

# ------------------------------------------------------------------------------------------------ helpers


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


# ----------------------------------------------------------------------------------------------- strategies
#
# Hypothesis draws one 64-bit seed per input and a seeded random.Random builds the input from it: one draw
# costs hypothesis about 0.6 ms where a tree of drawn values costs 3 ms, which is what lets every parser see
# 10,000 inputs in seconds. A failure still reproduces (hypothesis replays and prints the seed's input).

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


# ------------------------------------------------------------------------------------------------- frames


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


@FUZZ
@given(SEEDS.map(frame_case))
@example(FrameCase(b"\x00\x00\x00\x03\x91\x91", (1,)))
def test_frames(case: FrameCase) -> None:
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


# ---------------------------------------------------------------------------------------------- envelopes

ALICE = new_identity()
BOB = new_identity()
ALICE_ID = peer_id_of(ALICE)
BOB_ID = peer_id_of(BOB)
GPU_PROFILE = simulated_profile("A100x2").to_dict()
MEASURED_PROFILE = {
    "gpus": [
        {
            "type": "NVIDIA GeForce RTX 4090",
            "name": "NVIDIA GeForce RTX 4090",
            "memory_gb": 24.0,
            "tflops": 160.0,
            "hbm_gb_s": 1000.0,
            "simulated": False,
            "measured_tflops": 150.0,
            "measured_hbm_gb_s": 900.0,
        }
    ],
    "cpu_count": 16,
    "memory_gb": 64.0,
    "intra_host_gb_s": None,
}
LINK = {"a": ALICE_ID, "b": BOB_ID, "gb_s": 1.25, "rtt_ms": 0.4}
ADVERT = {
    "addrs": ["/ip4/127.0.0.1/tcp/4001"],
    "hardware": GPU_PROFILE,
    "host": "alice",
    "model": "llama-2-7b",
    "load": {"in_flight": 0, "tokens_per_s": 0.0, "requests": 3},
    "links": [LINK],
    "rendezvous": ["127.0.0.1", 29500],
}
ENVELOPE_KINDS = {"advert", "lease", "plan", "leave", "failure"}
REJECTION_REASONS = {
    "malformed",
    "wrong-kind",
    "signer-mismatch",
    "bad-signer",
    "not-yet-valid",
    "expired",
    "bad-signature",
    "replayed",
    "stale",
}


SEALED_ADVERT = to_wire(seal("advert", ADVERT, ALICE, 30.0, now=NOW))


def envelope_input(seed: int) -> Any:
    """Random values and bytes, or a sealed envelope's wire map: its body mutated before sealing, its fields
    (signature included) after."""
    rng = random.Random(seed)
    roll = rng.random()
    if roll < 0.2:
        return random_value(rng)
    if roll < 0.3:
        return rng.randbytes(rng.randint(0, 300))
    body = rng.choice([ADVERT, mutate(ADVERT, rng), random_value(rng)])
    kind, key = rng.choice(sorted(ENVELOPE_KINDS)), rng.choice([ALICE, BOB])
    try:
        wire = to_wire(seal(kind, body, key, 30.0, now=NOW + rng.choice([0, -100, 50])))
    except ValueError:  # seal refuses a body with no canonical form: send it anyway
        wire = SEALED_ADVERT | {"body": body}
    return wire if rng.random() < 0.5 else mutate(wire, rng)


@FUZZ
@given(SEEDS.map(envelope_input))
def test_envelopes(obj: Any) -> None:
    """from_wire gives an Envelope or MalformedEnvelope; verify accepts it once or says why it will not."""
    show(obj)
    if isinstance(obj, bytes):
        try:
            obj = decode_payload(obj)
        except FrameError:
            return
    envelope = outcome(lambda: from_wire(obj), MalformedEnvelope)  # its reason is "malformed" by construction
    if envelope is REFUSED:
        return
    assert isinstance(envelope.issued, float) and isinstance(envelope.expires, float)
    guard = ReplayGuard(window_s=60.0)
    try:
        verify(envelope, kind=ENVELOPE_KINDS, now=NOW, replay=guard)
    except EnvelopeRejected as error:
        assert error.reason in REJECTION_REASONS, error.reason
        assert_clear(error)
        return
    with pytest.raises(EnvelopeRejected, match=r"^replayed: "):
        verify(envelope, kind=ENVELOPE_KINDS, now=NOW, replay=guard)


# ------------------------------------------------------------------------------------------------ adverts


def check_hardware(data: Any) -> None:
    show(data)
    profile = outcome(lambda: HardwareProfile.from_dict(data), HardwareError)
    assert profile is REFUSED or HardwareProfile.from_dict(profile.to_dict()) == profile


def check_link(data: Any) -> None:
    show(data)
    link = outcome(lambda: LinkMeasurement.from_dict(data), HardwareError)
    assert link is REFUSED or LinkMeasurement.from_dict(link.to_dict()) == link


def check_peer_table(body: Any) -> None:
    """An advert either parses (``Advert.from_wire``, its one parser) into fields the node can use and enters
    the peer table, or is refused with a MessageError."""
    show(body)
    advert = outcome(lambda: Advert.from_wire(body), MessageError)
    if advert is REFUSED:
        return
    assert Advert.from_wire(advert.to_wire()) == advert
    table = PeerTable("self")
    table.apply_advert(ALICE_ID, advert, issued=NOW, now=NOW)
    record = table.peers[ALICE_ID]
    assert all(isinstance(a, str) for a in record.addrs) and len(record.addrs) <= 16
    assert isinstance(record.host_name, str) and isinstance(advert.model, str)
    assert isinstance(advert.load, dict) and len(advert.links) <= 64
    if advert.rendezvous is not None:  # what the node's deploy loop reads
        assert isinstance(advert.rendezvous[0], str) and 0 < advert.rendezvous[1] < 65536


@FUZZ
@given(fuzzed(ADVERT, ADVERT | {"hardware": MEASURED_PROFILE}))
@example(ADVERT | {"hardware": GPU_PROFILE | {"cpu_count": 10**400}})
@example(ADVERT | {"hardware": GPU_PROFILE | {"memory_gb": 10**400}})
@example(ADVERT | {"links": [LINK | {"gb_s": 10**400}]})
@example(ADVERT | {"rendezvous": ["127.0.0.1", "port"]})
@example(ADVERT | {"host": 7})
def test_adverts(body: Any) -> None:
    """What an advert carries, each part through its parser: the hardware profile, the link measurements
    and the whole advert into the peer table (``Adverts.apply``'s steps)."""
    check_hardware(body.get("hardware") if isinstance(body, dict) else body)
    links = body.get("links") if isinstance(body, dict) else body
    for link in (links if isinstance(links, list) else [links])[:4]:
        check_link(link)
    check_peer_table(body)


# -------------------------------------------------------------------------------------------------- plans

# A prefill group (TP 2), a decode group of two stages and one of a single stage, on GPUs of peers pa..pd.
PLAN = pinned_plan(parse_pinned(PINNED, num_layers=5), GPU_INDEX).to_dict() | {"meta": {"planner": "pinned"}}
PLAN_BODY = {"plan": PLAN, "gpus": GPUS, "term": 2, "epoch": 7, "members": ["pa", "pb"], "restart": False}


def check_deployment(body: PlanBody) -> None:
    deployment = outcome(lambda: deployment_from_plan(body, RENDEZVOUS), DeploymentError)
    if deployment is REFUSED:
        return
    assert isinstance(deployment, Deployment) and deployment.replicas
    assert all(r.placement and r.layout for r in deployment.replicas)
    assert isinstance(deployment.term, int) and isinstance(deployment.epoch, int)


WORLD = deployment_from_plan(PlanBody.from_wire(PLAN_BODY), RENDEZVOUS)
WORLD_PREFIXES = [WORLD.exchange_prefix, *(replica_prefix(WORLD.term, WORLD.epoch, r) for r in WORLD.replicas)]


def edited(text: str, at: int, new: str, cut: int) -> str:
    return text[:at] + new + text[at + cut :]


@FUZZ
@given(
    st.one_of(
        st.text(max_size=300),
        st.builds(edited, st.sampled_from(WORLD_PREFIXES), st.integers(0, 40), st.text(max_size=3), st.integers(0, 3)),
    )
)
@example("hexgen/2/7/exchange/")
@example("hexgen/2/٣/exchange/")
@example("hexgen/2/99999999999999999999999/x/")
def test_rendezvous_prefixes(prefix: str) -> None:
    """A world prefix as ``/hexgen/rendezvous/1`` takes it: the world it names (its head and members, from
    the plan), or None; never an error. Only the prefixes the plan's worlds use name one."""
    show(prefix)
    world = WORLD.world(prefix)
    peers = {peer for r in WORLD.replicas for peer in r.peers()}
    assert world is None or (world[0] in peers and world[1] and world[1] <= peers)
    if prefix in WORLD_PREFIXES:
        assert world is not None
    assert world is None or prefix.isascii()  # "٣" is a decimal digit to Python, not to a prefix


def check_plan(data: Any) -> None:
    show(data)
    plan = outcome(lambda: Plan.from_dict(data), PlanFormatError)
    if plan is REFUSED:
        return
    again = Plan.from_dict(plan.to_dict())
    assert json.dumps(again.to_dict(), default=repr) == json.dumps(plan.to_dict(), default=repr)  # NaN != NaN
    assert all(g.role in ("prefill", "decode", "colocated") for g in plan.groups)
    assert all(isinstance(gpu, int) for gpu in plan.gpus)


def check_assignments(body: PlanBody) -> None:
    out = assignments(body)  # must never raise
    assert isinstance(out, dict)
    assert all(isinstance(peer, str) and isinstance(gpus, list) for peer, gpus in out.items())


BAD_STAGE = {"gpus": [0], "layers": [math.inf, 5]}


@FUZZ
@given(fuzzed(PLAN_BODY))
@example(PLAN_BODY | {"term": "x"})
@example(PLAN_BODY | {"plan": PLAN | {"groups": [PLAN["groups"][0] | {"stages": [BAD_STAGE]}]}})
@example(PLAN_BODY | {"plan": PLAN | {"groups": [PLAN["groups"][0] | {"id": math.inf}]}})
@example(PLAN_BODY | {"gpus": GPUS | {"0": ["pa", math.inf]}})
@example(PLAN_BODY | {"gpus": GPUS | {"0": ["p\na", 0]}})
@example({"plan": None, "error": "line one\nline two"})
def test_plans(body: Any) -> None:
    """A plan body through its one parser (``PlanBody.from_wire``), then what the node does with it: its world
    (``deployment_from_plan``) and each peer's roles (``assignments``); the planner's Plan on its own
    (``Plan.from_dict``, to re-plan from it)."""
    show(body)
    check_plan(body.get("plan") if isinstance(body, dict) else body)
    parsed = outcome(lambda: PlanBody.from_wire(body), MessageError)
    assert wire_assignments(body) == ({} if parsed is REFUSED else assignments(parsed))  # the TUI's path
    if parsed is REFUSED:
        return
    assert PlanBody.from_wire(parsed.to_wire()) == parsed
    check_deployment(parsed)
    check_assignments(parsed)


def toml_text(value: Any) -> str:
    """``value`` (a map) as TOML inline values, to reach parse_pinned's checks with a document that parses."""

    def inline(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, float):
            return "nan" if math.isnan(item) else ("inf" if item > 0 else "-inf") if math.isinf(item) else repr(item)
        if isinstance(item, int):
            return str(item)
        if isinstance(item, dict):
            return "{ " + ", ".join(f"{json.dumps(str(k))} = {inline(v)}" for k, v in item.items()) + " }"
        if isinstance(item, list):
            return "[" + ", ".join(inline(v) for v in item) + "]"
        return json.dumps(item if isinstance(item, str) else repr(item))

    if not isinstance(value, dict):
        value = {"groups": value}
    try:
        return "\n".join(f"{json.dumps(str(k))} = {inline(v)}" for k, v in value.items())
    except RecursionError:  # too deep to write out this way: a deep document all the same
        return "groups = " + "[" * 2000 + "]" * 2000


PINNED_DICT = {
    "groups": [
        {"role": "prefill", "stages": [{"gpus": ["a", "b"], "layers": [0, 5]}]},
        {"role": "decode", "stages": [{"gpus": ["c:0"], "layers": [0, 3]}, {"gpus": ["d:1"], "layers": [3, 5]}]},
        {"role": "colocated", "stages": [{"gpus": ["d"], "layers": [0, 5]}]},
    ]
}


ODD_GPU_NAMES = ("a:²", "a:" + "9" * 5000, "a:-1", ":1", "a:", "a:1:2", "a:007", " a", "a:١")
TOML_ALPHABET = "abgroupsleyin[]{}=\"'.,:0159 \n\t#-_+\\é"


def pinned_input(seed: int) -> tuple[str, int | None]:
    """(TOML text, the model's layer count or None): random text, the valid plan as a document with mutations
    (odd GPU names among them), or the valid text with characters changed."""
    rng = random.Random(seed)
    num_layers = rng.choice([None, None, 5, rng.randint(1, 8)])
    roll = rng.random()
    if roll < 0.2:
        return "".join(rng.choice(TOML_ALPHABET) for _ in range(rng.randint(0, 200))), num_layers
    if roll < 0.75:
        document = clone(PINNED_DICT)
        if rng.random() < 0.3:
            document["groups"][rng.randint(0, 2)]["stages"][0]["gpus"] = [rng.choice(ODD_GPU_NAMES)]
        return toml_text(mutate(document, rng)), num_layers
    text = PINNED
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(text))
        text = (
            text[:at]
            + "".join(rng.choice(TOML_ALPHABET) for _ in range(rng.randint(0, 3)))
            + text[at + rng.randint(0, 3) :]
        )
    return text, num_layers


@FUZZ
@given(SEEDS.map(pinned_input))
@example(('[[groups]]\nrole = "colocated"\nstages = [{ gpus = ["a:²"], layers = [0, 5] }]', None))
@example(('[[groups]]\nrole = "colocated"\nstages = [{ gpus = ["a:' + "9" * 5000 + '"], layers = [0, 5] }]', None))
@example(("groups = " + "[" * 600 + "]" * 600, None))
def test_pinned_plans(document: tuple[str, int | None]) -> None:
    """An operator's pinned plan (``--pinned``): groups, or PinnedPlanError naming the problem."""
    show(document)
    text, num_layers = document
    groups = outcome(lambda: parse_pinned(text, num_layers), PinnedPlanError)
    if groups is REFUSED:
        return
    assert groups and all(isinstance(g, PinnedGroup) for g in groups)
    assert all(isinstance(index, int) and index >= 0 for g in groups for s in g.stages for _, index in s.gpus)


# ------------------------------------------------------------------------------------------------- gossip

# BOB's advert and lease, so a node that takes them has BOB as a member and as the coordinator of term 3.
BOB_JOINS = msgpack.packb(
    [
        to_wire(seal("advert", ADVERT | {"host": "bob"}, BOB, 30.0, now=NOW)),
        to_wire(seal("lease", {"holder": BOB_ID, "term": 3, "epoch": 1}, BOB, 30.0, now=NOW)),
    ],
    use_bin_type=True,
)


def gossip_input(seed: int) -> tuple[str, Any]:
    """(kind, body) of an envelope BOB signs: a valid body of the kind mutated, or a random one."""
    rng = random.Random(seed)
    kind = rng.choice(["advert", "advert", "lease", "plan", "plan", "leave", "failure"])
    valid = {
        "advert": ADVERT | {"host": "bob"},
        "lease": {"holder": BOB_ID, "term": 3, "epoch": 2},
        "plan": {"plan": PLAN, "gpus": GPUS, "term": 3, "epoch": 2, "members": [ALICE_ID, BOB_ID], "error": None},
        "leave": {},
        "failure": {"term": 3, "epoch": 2, "rank": 0, "error": "boom"}
        | (
            {"peers": [ALICE_ID, BOB_ID], "cause": {"world": "replica world", "stage": "connect", "remote": "10.0.0.2"}}
            if rng.random() < 0.5
            else {}
        ),
    }[kind]
    return kind, random_value(rng) if rng.random() < 0.25 else mutate(valid, rng)


@settings(FUZZ, max_examples=max(1, FUZZ_EXAMPLES // 5))  # each parser on the way has its own 10,000
@given(SEEDS.map(gossip_input))
def test_gossip_through_a_node(envelope: tuple[str, Any]) -> None:
    """Signed gossip of any body never breaks the node: it applies or rejects it, and its status still works."""
    show(envelope)
    kind, body = envelope
    node = Node(NodeConfig(), ALICE, HardwareProfile.from_dict(GPU_PROFILE), clock=lambda: NOW)
    node.handle_gossip(BOB_ID, BOB_JOINS)
    assert node.election.coordinator == BOB_ID, dict(node.state.rejections)
    try:
        sealed = seal(kind, body, BOB, 30.0, now=NOW)
    except ValueError:
        return  # no canonical form: from_wire refuses it (test_envelopes)
    node.handle_gossip(BOB_ID, msgpack.packb([to_wire(sealed)], use_bin_type=True))
    encode_frame(node.status())  # the status protocol can still send it
    for peer, (_, advert) in node.state.adverts.items():
        if advert.rendezvous is not None:  # what the node's deploy loop reads
            assert isinstance(advert.rendezvous[0], str) and 0 < advert.rendezvous[1] < 65536, peer
    if node.plan is not None:
        check_deployment(node.plan.body)


# ---------------------------------------------------------------------------------------- generate requests


@pytest.fixture(scope="module")
def tokenizer(stories_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_dir(stories_dir)
    assert tokenizer.vocab_size == VOCAB_SIZE
    return tokenizer


GENERATE_REQUESTS = [
    {"prompt": "Once upon a time", "max_tokens": 8},
    {
        "tokens": [1, 403, 407],
        "max_tokens": 4,
        "temperature": 0.7,
        "top_k": 5,
        "top_p": 0.9,
        "seed": 3,
        "stop": ["\n", "The"],
        "stop_token_ids": [2],
        "ignore_eos": False,
    },
    {"messages": [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "A dog"}], "cert": b"c"},
]


def check_sampling_reaches_a_worker(tokens: list[int], sampling: dict[str, Any]) -> None:
    """What a worker does with an accepted request's fields must not fail (daemon/worker_process.py's frame handling)."""
    fields = dict(sampling)
    fields["stop_token_ids"] = tuple(fields.get("stop_token_ids", ()))
    params = SamplingParams(**fields)
    [int(t) for t in tokens]
    if params.seed is not None:
        _mix_seed(params.seed, len(tokens))
    assert isinstance(params.ignore_eos, bool)


def check_generate_request(request: Any, tokenizer: Tokenizer) -> None:
    show(request)
    parsed = outcome(lambda: (*parse_request(request, tokenizer, MAX_CONTEXT), parse_stops(request)), RequestError)
    if parsed is REFUSED:
        return
    tokens, sampling, stops = parsed
    assert tokens and all(type(t) is int and 0 <= t < tokenizer.vocab_size for t in tokens)
    assert set(sampling) <= SAMPLING_FIELDS
    assert 1 <= sampling["max_tokens"] <= MAX_TOKENS_LIMIT and len(tokens) + sampling["max_tokens"] <= MAX_CONTEXT
    assert all(isinstance(s, str) and s for s in stops)
    check_sampling_reaches_a_worker(tokens, sampling)
    hop = {"id": 1, "term": 1, "epoch": 1, "replica": 0, "dst": -1, "tokens": tokens, "sampling": sampling}
    _check_replica_request(hop)  # the entry's own hop passes the replica's checks
    encode_frame(hop)


def check_chat(messages: Any, tokenizer: Tokenizer) -> None:
    show(messages)
    tokens = outcome(lambda: chat_tokens(messages, tokenizer), RequestError)
    if tokens is REFUSED:
        return
    assert tokens and all(type(t) is int and 0 <= t < tokenizer.vocab_size for t in tokens)


CHAT = GENERATE_REQUESTS[2]["messages"]


@FUZZ
@given(fuzzed(*GENERATE_REQUESTS, json_text=True))
@example({"tokens": [1], "stop_token_ids": 5})
@example({"tokens": [1], "stop_token_ids": [math.inf]})
@example({"tokens": [1], "seed": "x", "temperature": 1.0})
@example({"tokens": [1], "temperature": 10**400})
@example({"prompt": "\ud800"})
@example({"tokens": [1], "a\nb": 1})
@example({"messages": [{"role": "user", "content": "a\udfffb"}]})
def test_generate_requests(tokenizer: Tokenizer, request: Any) -> None:
    """A generate request (as ``/hexgen/generate/1`` and the HTTP gateway take it): ``parse_request``,
    ``parse_stops``, and ``chat_tokens`` on its messages; what they accept must work on a worker."""
    check_generate_request(request, tokenizer)
    check_chat(request.get("messages", CHAT) if isinstance(request, dict) else request, tokenizer)


REPLICA_REQUESTS = [
    {"id": 5, "term": 1, "epoch": 3, "replica": 0, "dst": -1, "tokens": [1, 2], "sampling": {"max_tokens": 2}},
    {
        "id": 6,
        "term": 1,
        "epoch": 3,
        "replica": 1,
        "src": 0,
        "tokens": [1, 403, 407],
        "sampling": {"max_tokens": 4, "temperature": 0.5, "seed": 9, "stop_token_ids": [2], "ignore_eos": True},
    },
]


def check_replica_request(request: Any) -> None:
    show(request)
    if outcome(lambda: _check_replica_request(request, VOCAB_SIZE), RequestError) is REFUSED:
        return
    assert all(t < VOCAB_SIZE for t in request["tokens"])  # an id beyond the vocabulary kills the worker
    check_sampling_reaches_a_worker(request["tokens"], request["sampling"])
    assert request["sampling"]["max_tokens"] <= MAX_TOKENS_LIMIT
    assert all(type(request.get(key, 0)) is int for key in ("id", "term", "epoch", "replica", "dst", "src"))


@FUZZ
@given(fuzzed(*REPLICA_REQUESTS))
@example(REPLICA_REQUESTS[0] | {"sampling": {"max_tokens": 2, "stop_token_ids": [math.inf]}})
@example(REPLICA_REQUESTS[0] | {"sampling": {"max_tokens": 2, "seed": "x", "temperature": 1.0}})
@example(REPLICA_REQUESTS[0] | {"sampling": {}})
@example(REPLICA_REQUESTS[0] | {"tokens": [-1, True]})
def test_replica_requests(request: Any) -> None:
    """A hop between daemons (``/hexgen/replica/1``): what passes ``_check_replica_request`` works on a worker."""
    check_replica_request(request)


# ------------------------------------------------------------------------------------------------- HTTP


class StubRouter:
    """What the gateway needs of a router: the tokenizer, the context, and ``complete`` (two tokens)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.max_context = MAX_CONTEXT

    async def complete(
        self, tokens: list[int], sampling: dict[str, Any], stops: list[str], on_token: Any
    ) -> Completion:
        for token in (403, 407):
            await on_token(token, self.tokenizer.decode([token]))
        return Completion("length", "", len(tokens), 2, [])


def stub_gateway(tokenizer: Tokenizer, *, serving: bool) -> Gateway:
    """A gateway over a stand-in node; without ``serving`` a valid request ends in 503 ``no_plan``."""
    supervisor = SimpleNamespace(deployment=object()) if serving else None
    node = SimpleNamespace(
        config=SimpleNamespace(model=str(STORIES), api_key=None),
        router=StubRouter(tokenizer),
        supervisor=supervisor,
        status=lambda: {"peer_id": "stub"},
    )
    return Gateway(node, Metrics())  # type: ignore[arg-type]


COMPLETION_BODY = {
    "model": "stories260K",
    "prompt": "Once upon a time",
    "max_tokens": 8,
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 4,
    "seed": 1,
    "stop": ["."],
    "stream": True,
    "stream_options": {"include_usage": True},
    "n": 1,
    "logprobs": None,
    "echo": False,
}
CHAT_BODY = {
    "model": "stories260K",
    "messages": [
        {"role": "system", "content": "Tell a story."},
        {"role": "user", "content": [{"type": "text", "text": "A "}, {"type": "text", "text": "dog"}]},
    ],
    "max_completion_tokens": 8,
    "temperature": 0,
    "tools": [],
    "response_format": {"type": "text"},
}
RAW_BODIES = [
    b"",
    b"{",
    b"null",
    b"[]",
    b'"text"',
    b"\xff\xfe",
    b"[" * 5000 + b"]" * 5000,
    b'{"prompt": "a", "max_tokens": 1e999}',
    b'{"prompt": "a", "temperature": NaN}',
    b'{"prompt": "a", "seed": 1' + b"0" * 4400 + b"}",
    b'{"prompt": "\\ud800"}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
    b"x" * (MAX_BODY_BYTES + 1),
]


def json_body(value: Any) -> bytes:
    """``value`` as JSON text (bytes as latin-1 strings; too deep for json.dumps: a deep body written out)."""
    try:
        text = json.dumps(value, default=lambda item: item.decode("latin-1"))
    except RecursionError:
        return b'{"prompt": "a", "stop": ' + b"[" * 900 + b"]" * 900 + b"}"
    return text.encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class HttpCase:
    """A POST of ``body`` to the chat or the completions endpoint, with a Content-Length of ``declared`` (the
    body's own when None)."""

    chat: bool
    body: bytes
    declared: int | None = None


def http_input(seed: int) -> HttpCase:
    """A crafted body, random bytes, or a valid completion or chat body mutated, to either endpoint."""
    rng = random.Random(seed)
    roll = rng.random()
    if roll < 0.1:
        body = rng.choice(RAW_BODIES)
    elif roll < 0.2:
        body = rng.randbytes(rng.randint(0, 100))
    elif roll < 0.3:
        body = json_body(random_value(rng, json_text=True))
    else:
        body = json_body(mutate(rng.choice([COMPLETION_BODY, CHAT_BODY]), rng, json_text=True))
    declared = rng.choice([None, None, None, rng.randint(0, 2 * MAX_BODY_BYTES)])
    return HttpCase(rng.random() < 0.5, body, declared)


def starlette_request(path: str, body: bytes, declared: int | None) -> Request:
    """A POST to ``path`` carrying ``body``, its Content-Length ``declared`` (the body's own when None)."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    length = str(len(body) if declared is None else declared).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", length)],
    }
    return Request(scope, receive)


@pytest.fixture(scope="module")
def validating_gateway(tokenizer: Tokenizer) -> Gateway:
    return stub_gateway(tokenizer, serving=False)


@FUZZ
@given(SEEDS.map(http_input))
@example(HttpCase(False, b'{"prompt": "\\ud800"}'))
@example(HttpCase(True, b'{"messages": [{"role": "user", "content": "\\udfff"}]}'))
@example(HttpCase(True, RAW_BODIES[11]))
def test_http_bodies(validating_gateway: Gateway, case: HttpCase) -> None:
    """Every body ends in an OpenAI error: 400/404/413 for a bad one, 503 no_plan once it validated."""
    check_http_body(validating_gateway, case.chat, case.body, case.declared)


def check_http_body(gateway: Gateway, chat: bool, body: bytes, declared: int | None) -> None:
    show((chat, body, declared))
    handler = gateway.chat_completions if chat else gateway.completions
    request = starlette_request("/v1/chat/completions" if chat else "/v1/completions", body, declared)
    with pytest.raises(ApiError) as raised:
        run_now(handler(request))
    error = raised.value
    assert error.status in (400, 404, 413, 503), error.status
    assert error.status != 503 or error.code == "no_plan"
    assert_clear(error)
    response = error.response()  # renders: no text JSON cannot carry
    assert json.loads(response.body)["error"]["message"] == error.message


async def _post_all(app: Any, requests: list[tuple[str, bytes]]) -> list[tuple[int, bytes, str]]:
    transport = httpx.ASGITransport(app=app)
    answers = []
    async with httpx.AsyncClient(transport=transport, base_url="http://hexgen.test") as client:
        for path, body in requests:
            with trio.fail_after(10):
                response = await client.post(path, content=body, headers={"content-type": "application/json"})
            answers.append((response.status_code, response.content, response.headers.get("content-type", "")))
    return answers


def test_http_bodies_end_to_end(tokenizer: Tokenizer) -> None:
    """500 raw bodies through the whole ASGI app (middleware, routing, streaming): never a 500."""
    samples: list[tuple[str, bytes]] = []

    @settings(max_examples=500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(SEEDS.map(http_input))
    def collect(case: HttpCase) -> None:
        samples.append(("/v1/chat/completions" if case.chat else "/v1/completions", case.body))

    collect()
    metrics = Metrics()
    app = Gatekeeper(build_app(stub_gateway(tokenizer, serving=True)), None, metrics)
    started = time.monotonic()
    answers = trio.run(_post_all, app, samples)
    counts = Counter(status for status, _, _ in answers)
    streamed = sum(content_type.startswith("text/event-stream") for _, _, content_type in answers)
    print(
        f"\nHTTP end to end: {len(answers)} bodies in {time.monotonic() - started:.1f} s: {dict(counts)}, {streamed} streamed"
    )
    assert len(answers) >= 500
    assert set(counts) <= {200, 400, 404, 413}, counts
    assert counts[200] and counts[400]
    for status, content, content_type in answers:
        if status != 200:
            message = json.loads(content)["error"]["message"]
            assert message and "\n" not in message
        elif content_type.startswith("text/event-stream"):
            assert content.endswith(b"data: [DONE]\n\n"), content[-200:]
        else:
            assert json.loads(content)["usage"]["completion_tokens"] == 2


def test_values_nested_1000_deep(tokenizer: Tokenizer, validating_gateway: Gateway) -> None:
    """Regressions too deep for hypothesis to print as examples: repr of them recursed in error messages."""
    deep_list = nested(1000, "list")
    check_link({"a": deep_list, "b": "b", "gb_s": 1.0, "rtt_ms": 1.0})
    check_generate_request({"tokens": [1], "max_tokens": deep_list}, tokenizer)
    check_replica_request(REPLICA_REQUESTS[0] | {"sampling": {"max_tokens": deep_list}})
    check_deployment(PLAN_BODY | {"gpus": {"0": [deep_list, 0]}})
    check_assignments(PLAN_BODY | {"gpus": {"0": [deep_list, 0]}})
    body = b'{"prompt": "a", "n": ' + b"[" * 900 + b"]" * 900 + b"}"
    check_http_body(validating_gateway, False, body, None)


# ------------------------------------------------------------------------------------------------- live


LIVE_CONCURRENCY = 16  # streams open at once, all from one client peer
LIVE_PROTOCOLS = (
    "/hexgen/generate/1",
    "/hexgen/replica/1",
    "/hexgen/status/1",
    "/hexgen/plan/1",
    "/hexgen/sync/1",
    "/hexgen/rendezvous/1",
)


LIVE_REQUESTS = {
    "/hexgen/generate/1": GENERATE_REQUESTS[:2],
    "/hexgen/replica/1": REPLICA_REQUESTS,
    "/hexgen/status/1": [{}, {"cert": b"\x00" * 8}],
    "/hexgen/plan/1": [{"push": [SEALED_ADVERT, SEALED_ADVERT]}, {}],
    "/hexgen/sync/1": [{}, {"cert": None}],
    "/hexgen/rendezvous/1": [{"prefix": "hexgen/1/1/exchange/"}, {"prefix": WORLD_PREFIXES[1], "cert": None}],
}


def live_input(seed: int) -> tuple[str, bytes, Any]:
    """(protocol, bytes to send, the request when they are one well-formed frame): broken frames and random
    bytes, or a valid request of the protocol mutated."""
    rng = random.Random(seed)
    protocol = rng.choice(LIVE_PROTOCOLS)
    if rng.random() < 0.5:
        return protocol, rng.choice([random_frames(rng), rng.randbytes(64), struct.pack(">I", 1 << 30)]), None
    request = mutate(rng.choice(LIVE_REQUESTS[protocol]), rng)
    try:
        return protocol, encode_frame(request), request
    except (TypeError, ValueError, OverflowError, FrameError):  # not msgpack (an int beyond 64 bits): bytes
        return protocol, random_frames(rng), None


def live_payloads(count: int) -> list[tuple[str, bytes, Any]]:
    """``count`` inputs for the live daemon, drawn by hypothesis."""
    samples: list[tuple[str, bytes, Any]] = []

    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(SEEDS.map(live_input))
    def collect(sample: tuple[str, bytes, Any]) -> None:
        samples.append(sample)

    collect()
    return samples


async def _exchange(client: Any, peer_id: str, protocol: str, payload: bytes) -> list[Any]:
    """Send ``payload`` on a new stream, close our side, and read every frame the daemon sends back."""
    stream = await client.open_stream(peer_id, protocol)
    frames: list[Any] = []
    try:
        if payload:
            await stream.write(payload)
        await stream.close()
        reader = FrameReader(stream)
        while len(frames) < 40:
            try:
                frame = await reader.read()
            except Exception:  # a FrameError, or the daemon reset the stream
                break
            if frame is None:
                break
            frames.append(frame)
            if not isinstance(frame, dict) or "error" in frame or frame.get("done") or frame.get("finished"):
                break
    finally:
        with contextlib.suppress(Exception):
            await stream.reset()
    return frames


@pytest.fixture
def live_daemon(tmp_path: Path, stories_dir: Path) -> Iterator[Any]:
    from hexgen.testing.daemon_harness import Swarm

    swarm = Swarm(tmp_path, model=str(stories_dir))
    try:
        yield swarm.start("n0", gpu="A100")
    finally:
        swarm.close()


def _expected_answer(protocol: str, request: Any, tokenizer: Tokenizer) -> str:
    """``error`` where the daemon must refuse the request, ``any`` where it may answer or refuse."""
    if protocol != "/hexgen/generate/1":
        return "any"
    try:
        parse_request(request, tokenizer, MAX_CONTEXT)
        parse_stops(request)
    except RequestError:
        return "error"
    return "any"


@pytest.mark.timeout(240)
def test_live_daemon_survives_malformed_frames(live_daemon: Any, stories_dir: Path, tokenizer: Tokenizer) -> None:
    """400 hypothesis-drawn streams of broken frames and near-valid requests on every protocol of a daemon
    serving stories260K: each ends in an error frame, an answer or a closed stream, the daemon's workers never
    fail (the plan's epoch stays), and afterwards it answers status and generates the reference tokens."""
    from hexgen.daemon.router import generate
    from hexgen.daemon.rpc import query_status
    from hexgen.testing.checkpoints import reference_greedy
    from hexgen.testing.daemon_harness import open_client, serving, wait_until

    assert resolve_model(str(stories_dir)).max_context == MAX_CONTEXT
    daemon = live_daemon
    samples = live_payloads(400)
    prompt = [1, 403, 407, 261, 378]
    (reference,) = reference_greedy(stories_dir, [prompt], 12)
    outcomes: dict[str, dict[str, int]] = {p: {"error": 0, "answered": 0, "closed": 0} for p in LIVE_PROTOCOLS}

    async def attack() -> float:
        async with open_client() as client:
            view, _ = await wait_until(client, [daemon], serving({daemon.peer_id}), timeout=120, what="serving")
            epoch = view[daemon.peer_id]["plan"]["epoch"]
            started = time.monotonic()
            limiter = trio.CapacityLimiter(LIVE_CONCURRENCY)

            async def one(protocol: str, payload: bytes, request: Any) -> None:
                async with limiter:
                    with trio.fail_after(30):  # a hop naming a future epoch waits up to 15 s for it
                        frames = await _exchange(client, daemon.peer_id, protocol, payload)
                last = frames[-1] if frames else None
                if last is None:
                    outcomes[protocol]["closed"] += 1
                elif isinstance(last, dict) and "error" in last:
                    assert isinstance(last["error"], str) and last["error"] and "\n" not in last["error"], last
                    outcomes[protocol]["error"] += 1
                else:
                    outcomes[protocol]["answered"] += 1
                if request is not None and _expected_answer(protocol, request, tokenizer) == "error":
                    assert isinstance(last, dict) and "error" in last, (request, frames)

            async with trio.open_nursery() as nursery:
                for sample in samples:
                    nursery.start_soon(one, *sample)
            elapsed = time.monotonic() - started
            assert daemon.alive(), daemon.log()[-3000:]
            with trio.fail_after(10):
                status = await query_status(client, daemon.peer_id)
            assert status["plan"]["epoch"] == epoch, "a worker failed (a new epoch was planned)"
            tokens: list[int] = []
            with trio.fail_after(60):
                async for frame in generate(client, daemon.peer_id, {"tokens": prompt, "max_tokens": 12}):
                    assert "error" not in frame, frame
                    if "token" in frame:
                        tokens.append(frame["token"])
            assert tokens == reference
            return elapsed

    elapsed = trio.run(attack)
    assert daemon.alive()
    total = {kind: sum(o[kind] for o in outcomes.values()) for kind in ("error", "answered", "closed")}
    print(f"\nlive fuzz: {len(samples)} streams in {elapsed:.1f} s, {total}; by protocol {outcomes}")
    assert sum(total.values()) == len(samples) >= 300
    assert total["error"] > len(samples) // 2, outcomes


@pytest.mark.timeout(180)
def test_live_daemon_limits_streams_per_peer_and_prompt_length(live_daemon: Any) -> None:
    """One peer holding MAX_REQUESTS_PER_PEER generate streams gets every further one reset at once, while
    another peer is served meanwhile; a prompt longer than the context could hold is refused before tokenizing."""
    from hexgen.daemon.node import MAX_REQUESTS_PER_PEER
    from hexgen.daemon.router import MAX_CHARS_PER_TOKEN, generate
    from hexgen.daemon.wire import encode_frame
    from hexgen.testing.daemon_harness import open_client, serving, wait_until

    daemon, extra = live_daemon, 6

    async def attack() -> None:
        async with open_client() as flooder, open_client() as other:
            await wait_until(other, [daemon], serving({daemon.peer_id}), timeout=120, what="serving")
            await flooder.connect(daemon.addr)
            held = [
                await flooder.open_stream(daemon.peer_id, "/hexgen/generate/1") for _ in range(MAX_REQUESTS_PER_PEER)
            ]
            refused = 0
            for _ in range(extra):
                with trio.fail_after(10), contextlib.suppress(Exception):
                    stream = await flooder.open_stream(daemon.peer_id, "/hexgen/generate/1")
                    await stream.write(encode_frame({"tokens": [1, 2], "max_tokens": 2}))
                    refused += await FrameReader(stream).read() is None
                    continue
                refused += 1  # opening, writing or reading raised: the daemon reset the stream
            assert refused == extra
            tokens = []
            with trio.fail_after(60):
                async for frame in generate(other, daemon.peer_id, {"tokens": [1, 403, 407], "max_tokens": 4}):
                    assert "error" not in frame, frame
                    tokens += [frame["token"]] if "token" in frame else []
            assert len(tokens) == 4
            for stream in held:
                with contextlib.suppress(Exception):
                    await stream.reset()
            prompt = "once upon a time " * (MAX_CONTEXT * MAX_CHARS_PER_TOKEN // 17 + 1)
            started = time.monotonic()
            with trio.fail_after(30):
                frames = [f async for f in generate(other, daemon.peer_id, {"prompt": prompt, "max_tokens": 4})]
            assert "characters" in frames[-1].get("error", ""), frames[-1]
            print(f"\n{len(prompt)} characters refused in {time.monotonic() - started:.3f} s")

    trio.run(attack)
    assert daemon.alive()
