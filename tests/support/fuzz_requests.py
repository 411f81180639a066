"""Fuzz targets for requests: generate requests, hops between daemons and the HTTP gateway's bodies.

Each ``check_*`` takes one input and asserts the property: the parser returns what a worker can run, or
raises ``RequestError`` / ``ApiError`` with a clear message. The HTTP checks run the gateway over a stand-in
router (``stub_gateway``); the examples here seed the mutations.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request

from hexgen.daemon.client_requests import chat_tokens
from hexgen.daemon.completion import Completion
from hexgen.daemon.http_errors import ApiError
from hexgen.daemon.metrics import Metrics
from hexgen.daemon.openai_requests import MAX_BODY_BYTES
from hexgen.daemon.openai_routes import Gateway
from hexgen.daemon.request_limits import RequestError
from hexgen.engine.sampler import _mix_seed
from hexgen.engine.sequence import SamplingParams
from hexgen.engine.tokenizer import Tokenizer
from hexgen.testing.fuzz import REFUSED, assert_clear, mutate, outcome, random_value, run_now, show

STORIES = Path(__file__).resolve().parents[3] / "shared" / "models" / "stories260K"
MAX_CONTEXT = 512  # stories260K's context; the live test checks the daemon agrees
VOCAB_SIZE = 512  # and its vocabulary (the tokenizer fixture checks)


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


def check_chat(messages: Any, tokenizer: Tokenizer) -> None:
    show(messages)
    tokens = outcome(lambda: chat_tokens(messages, tokenizer), RequestError)
    if tokens is REFUSED:
        return
    assert tokens and all(type(t) is int and 0 <= t < tokenizer.vocab_size for t in tokens)


CHAT = GENERATE_REQUESTS[2]["messages"]


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
