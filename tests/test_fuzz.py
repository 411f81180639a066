"""Fuzzing every network-facing parser: frames, envelopes, adverts, plans, generate requests and HTTP bodies.

Hypothesis feeds each parser 5,000 inputs (``HEXGEN_FUZZ_EXAMPLES`` overrides the count): random values and
bytes, and near-valid ones, a valid example with a few mutations (keys dropped, added or replaced, values of
the wrong type, huge integers, NaN and infinities, long strings, deep nesting), so the fuzzer reaches the deep
code paths. The property everywhere: the parser returns a valid result or raises its documented error with a
non-empty one-line message, never another exception. A live daemon then takes a few hundred malformed frames
on every protocol, answers each with an error frame or a closed stream, and still generates reference tokens.
"""

from __future__ import annotations

import contextlib
import math
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hexgen.coordinator.specs import resolve_model
from hexgen.daemon.client_requests import parse_request
from hexgen.daemon.completion import parse_stops
from hexgen.daemon.deployment import deployment_from_plan, replica_prefix
from hexgen.daemon.messages import PlanBody
from hexgen.daemon.request_limits import RequestError
from hexgen.daemon.wire import (
    FrameError,
    FrameReader,
    encode_frame,
)
from hexgen.engine.tokenizer import Tokenizer
from hexgen.testing.fuzz import (
    FUZZ,
    FUZZ_EXAMPLES,
    SEEDS,
    FrameCase,
    check_frames,
    frame_case,
    fuzzed,
    mutate,
    nested,
    random_frames,
    show,
)
from hexgen.testing.fuzz_messages import (
    ADVERT,
    BAD_STAGE,
    GPU_PROFILE,
    GPUS,
    LINK,
    MEASURED_PROFILE,
    PLAN,
    PLAN_BODY,
    RENDEZVOUS,
    SEALED_ADVERT,
    check_advert,
    check_envelope,
    check_gossip,
    check_link,
    check_pinned,
    check_plan_body,
    envelope_input,
    gossip_input,
    pinned_input,
)
from hexgen.testing.fuzz_requests import (
    GENERATE_REQUESTS,
    MAX_CONTEXT,
    REPLICA_REQUESTS,
    VOCAB_SIZE,
)

# ------------------------------------------------------------------------------------------------ helpers


# ------------------------------------------------------------------------------------------------- frames


@FUZZ
@given(SEEDS.map(frame_case))
@example(FrameCase(b"\x00\x00\x00\x03\x91\x91", (1,)))
def test_frames(case: FrameCase) -> None:
    """The reader gives values, None at a clean end, or a FrameError; after a malformed frame it stays in step."""
    check_frames(case)


# ---------------------------------------------------------------------------------------------- envelopes


@FUZZ
@given(SEEDS.map(envelope_input))
def test_envelopes(obj: Any) -> None:
    """from_wire gives an Envelope or MalformedEnvelope; verify accepts it once or says why it will not."""
    check_envelope(obj)


# ------------------------------------------------------------------------------------------------ adverts


@FUZZ
@given(fuzzed(ADVERT, ADVERT | {"hardware": MEASURED_PROFILE}))
@example(ADVERT | {"hardware": GPU_PROFILE | {"cpu_count": 10**400}})
@example(ADVERT | {"hardware": GPU_PROFILE | {"memory_gb": 10**400}})
@example(ADVERT | {"links": [LINK | {"gb_s": 10**400}]})
@example(ADVERT | {"rendezvous": ["127.0.0.1", "port"]})
@example(ADVERT | {"host": 7})
def test_adverts(body: Any) -> None:
    """What an advert carries, each part through its parser: the hardware profile, the link measurements
    and the peer table entry (``Node._apply_advert``'s steps)."""
    check_advert(body)


# -------------------------------------------------------------------------------------------------- plans

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


@FUZZ
@given(fuzzed(PLAN_BODY))
@example(PLAN_BODY | {"term": "x"})
@example(PLAN_BODY | {"plan": PLAN | {"groups": [PLAN["groups"][0] | {"stages": [BAD_STAGE]}]}})
@example(PLAN_BODY | {"plan": PLAN | {"groups": [PLAN["groups"][0] | {"id": math.inf}]}})
@example(PLAN_BODY | {"gpus": GPUS | {"0": ["pa", math.inf]}})
@example(PLAN_BODY | {"gpus": GPUS | {"0": ["p\na", 0]}})
@example({"plan": None, "error": "line one\nline two"})
def test_plans(body: Any) -> None:
    """An adopted plan body through what the node does with it: its world (``deployment_from_plan``), the
    planner's Plan (``Plan.from_dict``, to re-plan from it) and each peer's roles (``assignments``)."""
    check_plan_body(body)


@FUZZ
@given(SEEDS.map(pinned_input))
@example(('[[groups]]\nrole = "colocated"\nstages = [{ gpus = ["a:²"], layers = [0, 5] }]', None))
@example(('[[groups]]\nrole = "colocated"\nstages = [{ gpus = ["a:' + "9" * 5000 + '"], layers = [0, 5] }]', None))
@example(("groups = " + "[" * 600 + "]" * 600, None))
def test_pinned_plans(document: tuple[str, int | None]) -> None:
    """An operator's pinned plan (``--pinned``): groups, or PinnedPlanError naming the problem."""
    check_pinned(document)


# ------------------------------------------------------------------------------------------------- gossip


@settings(FUZZ, max_examples=max(1, FUZZ_EXAMPLES // 5))  # each parser on the way has its own FUZZ_EXAMPLES
@given(SEEDS.map(gossip_input))
def test_gossip_through_a_node(envelope: tuple[str, Any]) -> None:
    """Signed gossip of any body never breaks the node: it applies or rejects it, and its status still works."""
    check_gossip(envelope)


# ------------------------------------------------------------------ generate requests (tests/test_fuzz_requests.py)


@pytest.fixture(scope="module")
def tokenizer(stories_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_dir(stories_dir)
    assert tokenizer.vocab_size == VOCAB_SIZE
    return tokenizer


def test_values_nested_1000_deep() -> None:
    """Regressions too deep for hypothesis to print as examples: repr of them recursed in error messages."""
    deep_list = nested(1000, "list")
    check_link({"a": deep_list, "b": "b", "gb_s": 1.0, "rtt_ms": 1.0})
    check_plan_body(PLAN_BODY | {"gpus": {"0": [deep_list, 0]}})
    check_plan_body(PLAN_BODY | {"members": [deep_list]})


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
    from hexgen.daemon.generate_protocol import generate
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
    from hexgen.daemon.client_requests import MAX_CHARS_PER_TOKEN
    from hexgen.daemon.generate_protocol import generate
    from hexgen.daemon.node import MAX_REQUESTS_PER_PEER
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
