"""Fuzzing the request parsers: generate requests, the hop messages between daemons (``/hexgen/replica/1``:
the request and its events), the generate protocol's replies, and the HTTP gateway's bodies.

The property of tests/test_fuzz.py (whose inputs, from ``hexgen.testing.fuzz``, these tests share): each
parser returns a valid result or raises its one documented error with a non-empty one-line message, never
another exception; what it accepts works where it goes next (a worker, the wire), and
``from_wire(to_wire(x)) == x`` for the typed messages.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings

from hexgen.daemon.client_requests import parse_request
from hexgen.daemon.completion import parse_stops
from hexgen.daemon.generate_protocol import GenerateDone, GenerateError, GenerateToken, MalformedReply, reply_from_wire
from hexgen.daemon.hop import HopAlive, HopError, HopRequest, HopToken, MalformedHop, event_from_wire
from hexgen.daemon.http_api import Gatekeeper, build_app
from hexgen.daemon.metrics import Metrics
from hexgen.daemon.openai_routes import Gateway
from hexgen.daemon.request_limits import MAX_TOKENS_LIMIT, SAMPLING_FIELDS, RequestError
from hexgen.daemon.wire import decode_payload, encode_frame
from hexgen.engine.tokenizer import Tokenizer
from hexgen.testing.fuzz import FUZZ, REFUSED, SEEDS, fuzzed, nested, outcome, show
from hexgen.testing.fuzz_requests import (
    CHAT,
    GENERATE_REQUESTS,
    MAX_CONTEXT,
    RAW_BODIES,
    REPLICA_REQUESTS,
    VOCAB_SIZE,
    HttpCase,
    check_chat,
    check_http_body,
    check_sampling_reaches_a_worker,
    http_input,
    stub_gateway,
)


@pytest.fixture(scope="module")
def tokenizer(stories_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_dir(stories_dir)
    assert tokenizer.vocab_size == VOCAB_SIZE
    return tokenizer


def over_the_wire(message: dict[str, Any]) -> Any:
    """``message`` as the peer reads it: packed into a frame and decoded again."""
    return decode_payload(encode_frame(message)[4:])


# ---------------------------------------------------------------------------------------- generate requests


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
    parsed_hop = HopRequest.from_wire(hop)  # the entry's own hop passes the replica's checks
    assert HopRequest.from_wire(over_the_wire(parsed_hop.to_wire())) == parsed_hop


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


# ---------------------------------------------------------------------------------------------------- hops


def check_replica_request(request: Any) -> None:
    show(request)
    hop = outcome(lambda: HopRequest.from_wire(request, VOCAB_SIZE), MalformedHop)
    if hop is REFUSED:
        return
    assert all(t < VOCAB_SIZE for t in request["tokens"])  # an id beyond the vocabulary kills the worker
    check_sampling_reaches_a_worker(request["tokens"], request["sampling"])
    assert request["sampling"]["max_tokens"] <= MAX_TOKENS_LIMIT
    assert all(type(request.get(key, 0)) is int for key in ("id", "term", "epoch", "replica", "dst", "src"))
    # what the replica passes on: the worker's frame, and the hop again (a hand-off) as the next daemon reads it
    frame = hop.worker_frame()
    check_sampling_reaches_a_worker(frame["tokens"], frame["sampling"])
    assert frame["op"] == ("import" if request.get("src", -1) >= 0 else "generate")
    assert HopRequest.from_wire(over_the_wire(hop.to_wire()), VOCAB_SIZE) == hop


@FUZZ
@given(fuzzed(*REPLICA_REQUESTS))
@example(REPLICA_REQUESTS[0] | {"sampling": {"max_tokens": 2, "stop_token_ids": [math.inf]}})
@example(REPLICA_REQUESTS[0] | {"sampling": {"max_tokens": 2, "seed": "x", "temperature": 1.0}})
@example(REPLICA_REQUESTS[0] | {"sampling": {}})
@example(REPLICA_REQUESTS[0] | {"tokens": [-1, True]})
def test_replica_requests(request: Any) -> None:
    """A hop between daemons (``/hexgen/replica/1``): what ``HopRequest.from_wire`` accepts works on a worker,
    and goes over the wire unchanged."""
    check_replica_request(request)


HOP_EVENTS = [
    {"token": 5, "finished": None},
    {"token": 7, "finished": "length"},
    {"alive": True},
    {"error": "epoch 3 is not served here", "refused": True},
    {"error": "worker of rank 0 exited", "retry": True},
]


@FUZZ
@given(fuzzed(*HOP_EVENTS))
@example({"token": True})
@example({"token": 2**64})
@example({"error": 5})
@example({"alive": 1, "token": 3})
def test_hop_events(raw: Any) -> None:
    """An event a replica's daemon sends back: parsed by ``event_from_wire`` alone, written back unchanged."""
    show(raw)
    event = outcome(lambda: event_from_wire(raw), MalformedHop)
    if event is REFUSED:
        return
    assert isinstance(event, HopToken | HopAlive | HopError)
    if isinstance(event, HopToken):
        assert type(event.token) is int and event.token >= 0
    assert event_from_wire(over_the_wire(event.to_wire())) == event


GENERATE_REPLIES = [
    {"token": 403, "text": " the"},
    {
        "done": True,
        "finish_reason": "length",
        "text": "",
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "max_tokens": 4,
        "context": 512,
        "served_by": [{"epoch": 1, "replica": 0, "role": "colocated"}],
    },
    {"error": "rate limited", "retry_after_s": 0.25},
    {"error": "too long", "code": "context_full"},
]


@FUZZ
@given(fuzzed(*GENERATE_REPLIES))
@example({"error": "x", "retry_after_s": math.nan})
@example({"error": "x", "code": ""})
@example({"error": "x", "retry_after_s": 10**400})
@example(GENERATE_REPLIES[1] | {"context": True})
@example(GENERATE_REPLIES[1] | {"prompt_tokens": 2**64})
def test_generate_replies(raw: Any) -> None:
    """A frame an entry daemon sends a client: parsed by ``reply_from_wire`` alone, written back unchanged."""
    show(raw)
    reply = outcome(lambda: reply_from_wire(raw), MalformedReply)
    if reply is REFUSED:
        return
    assert isinstance(reply, GenerateToken | GenerateDone | GenerateError)
    assert reply_from_wire(over_the_wire(reply.to_wire())) == reply


# ------------------------------------------------------------------------------------------------- HTTP


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


def test_request_values_nested_1000_deep(tokenizer: Tokenizer, validating_gateway: Gateway) -> None:
    """Regressions too deep for hypothesis to print as examples: repr of them recursed in error messages."""
    deep_list = nested(1000, "list")
    check_generate_request({"tokens": [1], "max_tokens": deep_list}, tokenizer)
    check_replica_request(REPLICA_REQUESTS[0] | {"sampling": {"max_tokens": deep_list}})
    with pytest.raises(MalformedHop):
        event_from_wire({"token": deep_list})
    with pytest.raises(MalformedReply):
        reply_from_wire({"error": deep_list})
    body = b'{"prompt": "a", "n": ' + b"[" * 900 + b"]" * 900 + b"}"
    check_http_body(validating_gateway, False, body, None)
