"""The daemon's HTTP gateway: an OpenAI-compatible API under /v1, the node's status as JSON, Prometheus metrics.

``serve_http`` runs a Starlette app on hypercorn's trio worker inside the daemon's own nursery, so a handler
calls the router directly: a request is generated exactly as one entering over ``/hexgen/generate/1``
(``Router.complete``), prefilled and decoded wherever the plan says.

Routes:

- ``GET /v1/models`` (and ``/v1/models/{id}``): the served model, named after the checkpoint directory; an
  empty list on a daemon started with a model name only (it plans, it serves nothing).
- ``POST /v1/completions`` and ``POST /v1/chat/completions``: OpenAI's request and response shapes, with
  ``usage``, and server-sent events with ``stream: true`` (``stream_options.include_usage`` adds a last
  chunk holding the usage). One choice (``n`` 1); a prompt is a string or a list holding one string.
  Sampling: ``max_tokens`` (chat also ``max_completion_tokens``; by default 16 for a completion and the rest
  of the context for a chat), ``temperature`` 0-2 (0 is greedy), ``top_p``, ``top_k`` (an extension),
  ``seed`` and ``stop``. Fields the engine cannot honour (logprobs, echo, penalties, tools, ...) are refused
  unless they hold their neutral value; other unknown fields are ignored, as most OpenAI-compatible servers
  do. ``model`` may be left out; a name other than the served one is a 404 ``model_not_found``.
- ``GET /status``: ``Node.status()`` as JSON (bytes such as certificates as base64, non-finite numbers as
  null).
- ``GET /metrics``: the node's Prometheus metrics (``hexgen.daemon.metrics``).

A chat is rendered by the router's ``chat_tokens`` (as for ``hexgen-client chat``): the model's chat template,
or for a model without one (stories260K, the demo's tiny Llama) ``engine.tokenizer.fallback_chat_prompt``, a
``role: content`` line per message and then ``assistant:``; OpenAI's text content parts are joined first.

With ``--api-key`` the OpenAI API (``/v1/...``) wants ``Authorization: Bearer KEY`` (401 otherwise): the key
guards what costs GPU time and carries prompts and completions. ``/status`` and ``/metrics`` stay open for
local monitoring: ``hexgen-node status``, a Prometheus beside the daemon and curl read them without the
secret, and neither carries a prompt or a completion. They do show the swarm's members, addresses and plan,
so a gateway bound beyond loopback (``--http-host``) should have its port firewalled like the libp2p one.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 malformed JSON or
parameters, 401 a missing or wrong key, 404 an unknown route or model, 405 a wrong method, 413 a body over
1 MiB, 503 when this daemon serves no checkpoint, the swarm has no serving plan yet or no replica could take
the request, 500 for a bug (logged here; a body never holds a traceback). A failure after a stream started
ends the stream with an error event. A stream's headers go out with its first token, so a request that
cannot be served still gets its status code. A client that disconnects cancels its request, which frees the
work on every worker it reached.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import math
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hexgen.daemon.metrics import CLIENT_GONE, CONTENT_TYPE, Metrics
from hexgen.daemon.router import (
    MAX_TOKENS_LIMIT,
    Completion,
    HopFailed,
    RequestError,
    Router,
    chat_tokens,
    parse_request,
    parse_stops,
)

if TYPE_CHECKING:
    from hexgen.daemon.node import Node

log = logging.getLogger("hexgen.http")

MAX_BODY_BYTES = 1 << 20
ENDPOINTS = frozenset({"/status", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"})
GUARDED_PREFIX = "/v1/"  # the API key guards the OpenAI API only (see the module docstring)
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}
# Fields the engine cannot honour: accepted only with one of these neutral values.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
}
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
GRACEFUL_SHUTDOWN_S = 1.0
READ_TIMEOUT_S = 30.0


class ApiError(Exception):
    """A request answered with an OpenAI-shaped error; ``status`` is the HTTP status code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class GatewayError(RuntimeError):
    """The HTTP port cannot be served (the address is taken or unknown); the message says which."""


# ----------------------------------------------------------------------------- serving


async def serve_http(
    node: Node, metrics: Metrics, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the gateway of ``node`` on its configured host and port until cancelled; ``task_status`` gets the
    gateway's URL with the port actually bound (port 0 picks a free one). Raises GatewayError if it cannot bind."""
    sock, url = _bind(node.config.http_host, node.config.http_port or 0)
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn adopts the bound socket, so the port is known here
    config.accesslog = None  # stdout carries the daemon's ready line only
    config.errorlog = log
    config.graceful_timeout = GRACEFUL_SHUTDOWN_S
    config.read_timeout = READ_TIMEOUT_S  # a client that stops sending its request loses the connection
    app = Gatekeeper(build_app(Gateway(node, metrics)), node.config.api_key, metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(hypercorn_serve, app, config, mode="asgi"))  # it logs the URL
        task_status.started(url)


def _bind(host: str, port: int) -> tuple[socket.socket, str]:
    """A TCP socket bound to (host, port) and its URL; GatewayError when the address is unusable."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise GatewayError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from None
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return sock, f"http://{shown}:{bound_port}"


def build_app(gateway: Gateway) -> Starlette:
    routes = [
        Route("/status", gateway.status, methods=["GET"]),
        Route("/metrics", gateway.metrics_text, methods=["GET"]),
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.model, methods=["GET"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
    ]
    handlers = {HTTPException: _http_error, ApiError: _api_error, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        error = ApiError(404, f"no route {request.method} {request.url.path}", code="unknown_url")
    elif exc.status_code == 405:
        error = ApiError(405, f"{request.url.path} does not take {request.method}", code="method_not_allowed")
    else:
        error = ApiError(exc.status_code, str(exc.detail))
    response = error.response()
    response.headers.update(exc.headers or {})
    return response


async def _api_error(request: Request, exc: ApiError) -> Response:
    return exc.response()


async def _server_error(request: Request, exc: Exception) -> Response:
    return _server_error_response()


@dataclass
class Gatekeeper:
    """ASGI middleware: the API key on guarded routes, a count of every answer by route and status, and a
    last line of defence that turns any exception escaping the app into a logged 500."""

    app: ASGIApp
    api_key: str | None
    metrics: Metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = 500
        started = False

        async def counted(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
            await send(message)

        try:
            if self.api_key is not None and path.startswith(GUARDED_PREFIX) and not self._authorized(scope):
                error = ApiError(401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key")
                await error.response()(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        except Exception:
            log.exception("HTTP %s %s failed", scope.get("method"), path)
            if not started:
                await _server_error_response()(scope, receive, counted)
        finally:
            endpoint = path if path in ENDPOINTS else "other"
            self.metrics.count_request(endpoint, status, ERROR_TYPES.get(status))

    def _authorized(self, scope: Scope) -> bool:
        assert self.api_key is not None
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


def _server_error_response() -> JSONResponse:
    return ApiError(500, "the daemon failed to answer this request; its log says why", code="internal_error").response()


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Job:
    """A validated generation request and how to answer it."""

    endpoint: str
    chat: bool
    tokens: list[int]
    sampling: dict[str, Any]
    stops: list[str]
    stream: bool
    include_usage: bool


def _check_neutral(body: dict[str, Any]) -> None:
    for name, neutral in NEUTRAL_VALUES.items():
        if name in body and body[name] not in neutral:
            raise ApiError(400, f"{name!r} is not supported by this server", param=name, code="unsupported_parameter")


def _number(
    body: dict[str, Any], name: str, low: float, high: float, *, integer: bool = False, open_low: bool = False
) -> Any:
    """``body[name]`` checked to be a number (an integer if asked) in [low, high] (or (low, high]); None if absent."""
    value = body.get(name)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    allowed = (int,) if integer else (int, float)
    in_range = (
        isinstance(value, allowed)
        and not isinstance(value, bool)
        and (low < value if open_low else low <= value)
        and value <= high
    )
    if not in_range:
        bounds = f"{'(' if open_low else '['}{low}, {high}]"
        raise ApiError(400, f"{name!r} must be {kind} in {bounds}, got {value!r}", param=name)
    return value


def _sampling_fields(body: dict[str, Any], max_tokens_field: str) -> dict[str, Any]:
    """The request's sampling fields in the router's terms (absent ones left out)."""
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise ApiError(400, f"only one choice per request is supported ('n' 1), got {body['n']!r}", param="n")
    fields = {
        "max_tokens": _number(body, max_tokens_field, 1, MAX_TOKENS_LIMIT, integer=True),
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, open_low=True),
        "top_k": _number(body, "top_k", -1, 1 << 30, integer=True),
        "seed": _number(body, "seed", *SEED_RANGE, integer=True),
        "stop": body.get("stop"),
    }
    if fields["top_k"] == -1:  # vLLM's spelling of "off"
        fields["top_k"] = 0
    return {k: v for k, v in fields.items() if v is not None}


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage) from ``stream`` and ``stream_options``."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    if options is None:
        return bool(stream), False
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    usage = options.get("include_usage") if isinstance(options, dict) else None
    if not isinstance(options, dict) or (usage is not None and not isinstance(usage, bool)):
        raise ApiError(400, "'stream_options' is an object with a boolean 'include_usage'", param="stream_options")
    return True, bool(usage)


def _prompt_text(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(
            400,
            "'prompt' must be a string (or a list holding one string): batches and token-id prompts are not supported",
            param="prompt",
        )
    return prompt


def _plain_messages(body: dict[str, Any]) -> Any:
    """``messages`` with OpenAI's content parts (``[{"type": "text", "text": ...}]``) joined into strings."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return messages
    plain = []
    for message in messages:
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            texts = [part.get("text", "") for part in message["content"] if isinstance(part, dict)]
            if not all(isinstance(text, str) for text in texts):
                raise ApiError(400, "the 'text' of a content part must be a string", param="messages")
            message = message | {"content": "".join(texts)}
        plain.append(message)
    return plain


# ----------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class Shape:
    """OpenAI's response objects for one request: the id, time and model name all of its chunks share."""

    chat: bool
    model: str
    include_usage: bool = False  # then every chunk has a "usage" field, null but in the last one
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def whole(self, text: str, done: Completion) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        return self._object([choice], chunk=False) | {"usage": usage(done)}

    def chunk(self, text: str, finish_reason: str | None = None, *, first: bool = False) -> dict[str, Any]:
        """One streamed piece; a chat's first chunk also names the role, its last one carries only the reason."""
        if not self.chat:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        else:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            if finish_reason is not None and not text and not first:
                delta = {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._object([choice], chunk=True) | ({"usage": None} if self.include_usage else {})

    def usage_chunk(self, done: Completion) -> dict[str, Any]:
        return self._object([], chunk=True) | {"usage": usage(done)}

    def _object(self, choices: list[dict[str, Any]], *, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {
            "id": ("chatcmpl-" if self.chat else "cmpl-") + self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }


def usage(done: Completion) -> dict[str, int]:
    total = done.prompt_tokens + done.completion_tokens
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens, "total_tokens": total}


@dataclass
class EventSink:
    """Server-sent events on an ASGI ``send``; the headers (status 200) go out with the first event."""

    send: Send
    started: bool = False

    async def event(self, data: dict[str, Any] | str) -> None:
        if not self.started:
            await self.send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            self.started = True
        payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        await self.send({"type": "http.response.body", "body": f"data: {payload}\n\n".encode(), "more_body": True})

    async def close(self) -> None:
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})


async def until_disconnected(receive: Receive, work: Callable[[], Awaitable[Completion]]) -> Completion | None:
    """``work``'s result, or None when the client disconnected first: ``work`` is cancelled then (and with it
    the request's hops, which frees its work on the workers). ApiError from ``work`` passes through."""
    result: Completion | None = None
    failure: ApiError | None = None

    async def watch(cancel_scope: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        try:
            result = await work()
        except ApiError as exc:  # raised after the nursery, not wrapped in its exception group
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return result


class EventStream(Response):
    """The streamed answer to a job: chunks as tokens arrive, then ``[DONE]``; cancelled if the client leaves."""

    def __init__(self, gateway: Gateway, job: Job) -> None:
        super().__init__(media_type="text/event-stream")
        self.gateway, self.job = gateway, job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sink = EventSink(send)
        shape = self.gateway.shape(self.job)
        first = True
        answered = trio.Event()  # [DONE] went out: the client has the whole answer

        async def on_token(token: int, text: str) -> None:
            nonlocal first
            if text:
                await sink.event(shape.chunk(text, first=first and shape.chat))
                first = False

        async def work() -> Completion:
            done = await self.gateway.generate(self.job, on_token)
            if first and shape.chat:
                await sink.event(shape.chunk("", first=True))
            await sink.event(shape.chunk(done.tail, done.finish_reason))
            if self.job.include_usage:
                await sink.event(shape.usage_chunk(done))
            await sink.event("[DONE]")
            answered.set()
            await sink.close()
            return done

        try:
            # A client may close the connection as soon as it reads [DONE], and the server reports a finished
            # response as a disconnect too: either may cancel ``work`` in its last send. Neither hung up.
            if await until_disconnected(receive, work) is None and not answered.is_set():
                self.gateway.metrics.count_disconnect(self.job.endpoint)
        except ApiError as exc:
            if not sink.started:
                await exc.response()(scope, receive, send)
                return
            self.gateway.metrics.count_error(self.job.endpoint, exc.type)
            await sink.event(exc.body())
            await sink.close()


# ----------------------------------------------------------------------------- the gateway


@dataclass
class Gateway:
    """The route handlers of one node's gateway."""

    node: Node
    metrics: Metrics
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_id(self) -> str:
        return Path(self.node.config.model).name or self.node.config.model

    async def status(self, request: Request) -> Response:
        return JSONResponse(json_safe(self.node.status()))

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    def _card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.started, "owned_by": "hexgen"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._card()] if self.node.router is not None else []})

    async def model(self, request: Request) -> Response:
        if self.node.router is None:
            raise self._unknown_model(request.path_params["model"])
        self._check_model(request.path_params["model"])
        return JSONResponse(self._card())

    async def completions(self, request: Request) -> Response:
        body = await read_json(request)
        router = self._router(body)
        request_fields = _sampling_fields(body, "max_tokens") | {"prompt": _prompt_text(body)}
        return await self._answer(request, self._job("/v1/completions", body, router, request_fields, chat=False))

    async def chat_completions(self, request: Request) -> Response:
        body = await read_json(request)
        router = self._router(body)
        max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        request_fields = _sampling_fields(body, max_field)
        try:
            tokens = chat_tokens(_plain_messages(body), router.tokenizer)
        except RequestError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        request_fields.setdefault("max_tokens", max(1, min(MAX_TOKENS_LIMIT, router.max_context - len(tokens))))
        request_fields["tokens"] = tokens
        return await self._answer(request, self._job("/v1/chat/completions", body, router, request_fields, chat=True))

    def _job(self, endpoint: str, body: dict[str, Any], router: Router, fields: dict[str, Any], *, chat: bool) -> Job:
        _check_neutral(body)
        stream, include_usage = _stream_flags(body)
        try:
            tokens, sampling = parse_request(fields, router.tokenizer, router.max_context)
            stops = parse_stops(fields)
        except RequestError as exc:
            raise ApiError(400, str(exc)) from None
        return Job(endpoint, chat, tokens, sampling, stops, stream, include_usage)

    def _router(self, body: dict[str, Any]) -> Router:
        """The router, once the daemon can serve at all and the request names the served model (or none)."""
        if self.node.router is None:
            raise self._no_checkpoint()
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", param="model")
        if model is not None:
            self._check_model(model)
        return self.node.router

    def _check_model(self, model: str) -> None:
        if model not in {self.model_id, self.node.config.model}:
            raise self._unknown_model(model)

    def _unknown_model(self, model: str) -> ApiError:
        served = f"this swarm serves {self.model_id!r}" if self.node.router is not None else "this daemon serves none"
        return ApiError(
            404, f"the model {model!r} is not served here ({served})", param="model", code="model_not_found"
        )

    def _no_checkpoint(self) -> ApiError:
        return ApiError(
            503,
            f"this daemon serves no checkpoint: it was started with --model {self.node.config.model}, a model to plan "
            "for only; ask a daemon started with a checkpoint directory",
            code="no_checkpoint",
        )

    def shape(self, job: Job) -> Shape:
        return Shape(job.chat, self.model_id, job.include_usage)

    async def _answer(self, request: Request, job: Job) -> Response:
        supervisor = self.node.supervisor
        if supervisor is None or supervisor.deployment is None:
            raise ApiError(503, "the swarm has no serving plan yet; try again shortly", code="no_plan")
        if job.stream:
            return EventStream(self, job)
        pieces: list[str] = []

        async def on_token(token: int, text: str) -> None:
            pieces.append(text)

        done = await until_disconnected(request.receive, lambda: self.generate(job, on_token))
        if done is None:
            return Response(status_code=CLIENT_GONE)  # never reaches the client: for the metrics
        return JSONResponse(self.shape(job).whole("".join(pieces) + done.tail, done))

    async def generate(self, job: Job, on_token: Callable[[int, str], Awaitable[None]]) -> Completion:
        assert self.node.router is not None
        try:
            return await self.node.router.complete(job.tokens, job.sampling, job.stops, on_token)
        except HopFailed as exc:
            raise ApiError(503, f"no replica could serve the request: {exc}", code="unavailable") from None


async def read_json(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object, read up to MAX_BODY_BYTES (413 beyond, 400 if not a JSON object)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(CLIENT_GONE, "the client went away while sending the body") from None
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


def json_safe(value: Any) -> Any:
    """``value`` with bytes as base64 text, tuples as lists, non-finite floats as None and keys as strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float):
        return value
    return str(value)
