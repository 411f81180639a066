"""The OpenAI API's routes and the status and metrics pages: one ``Gateway`` per daemon, over narrow views of
it (``GatewayNode``): its config, its router (``Completer``), whether a plan is deployed, and its status."""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hexgen.daemon.client_requests import chat_tokens, parse_request
from hexgen.daemon.completion import Completion, OnToken, parse_stops
from hexgen.daemon.hop import HopFailed
from hexgen.daemon.http_errors import ApiError
from hexgen.daemon.metrics import CLIENT_GONE, CONTENT_TYPE, Metrics
from hexgen.daemon.openai_requests import (
    Job,
    check_neutral,
    plain_messages,
    prompt_text,
    read_json,
    sampling_fields,
    stream_flags,
)
from hexgen.daemon.openai_responses import Shape
from hexgen.daemon.request_limits import MAX_TOKENS_LIMIT, RequestError
from hexgen.daemon.sse import EventStream, until_disconnected
from hexgen.engine.hub import model_name
from hexgen.engine.tokenizer import Tokenizer


class GatewayConfig(Protocol):
    """The daemon's settings the gateway reads."""

    @property
    def model(self) -> str: ...
    @property
    def api_key(self) -> str | None: ...
    @property
    def http_host(self) -> str: ...
    @property
    def http_port(self) -> int | None: ...


class Completer(Protocol):
    """The router as the gateway uses it: the model's tokenizer and context, and ``complete``."""

    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def max_context(self) -> int: ...
    async def complete(
        self, tokens: list[int], sampling: dict[str, Any], stops: list[str], on_token: OnToken
    ) -> Completion: ...


class Deployed(Protocol):
    """Whether a serving plan is deployed here (a supervisor's ``deployment``, None before one)."""

    @property
    def deployment(self) -> object | None: ...


class GatewayNode(Protocol):
    """The daemon as its gateway sees it: ``router`` and ``supervisor`` are None on a daemon that serves no
    checkpoint; ``status`` is what ``GET /status`` shows."""

    @property
    def config(self) -> GatewayConfig: ...
    @property
    def router(self) -> Completer | None: ...
    @property
    def supervisor(self) -> Deployed | None: ...
    def status(self, brief: bool = False) -> dict[str, Any]: ...


@dataclass
class Gateway:
    """The route handlers of one node's gateway."""

    node: GatewayNode
    metrics: Metrics
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_id(self) -> str:
        return model_name(self.node.config.model)

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
        request_fields = sampling_fields(body, "max_tokens") | {"prompt": prompt_text(body)}
        return await self._answer(request, self._job("/v1/completions", body, router, request_fields, chat=False))

    async def chat_completions(self, request: Request) -> Response:
        body = await read_json(request)
        router = self._router(body)
        max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        request_fields = sampling_fields(body, max_field)
        try:
            tokens = chat_tokens(plain_messages(body), router.tokenizer)
        except RequestError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        request_fields.setdefault("max_tokens", max(1, min(MAX_TOKENS_LIMIT, router.max_context - len(tokens))))
        request_fields["tokens"] = tokens
        return await self._answer(request, self._job("/v1/chat/completions", body, router, request_fields, chat=True))

    def _job(
        self, endpoint: str, body: dict[str, Any], router: Completer, fields: dict[str, Any], *, chat: bool
    ) -> Job:
        check_neutral(body)
        stream, include_usage = stream_flags(body)
        try:
            tokens, sampling = parse_request(fields, router.tokenizer, router.max_context)
            stops = parse_stops(fields)
        except RequestError as exc:
            raise ApiError(400, str(exc)) from None
        return Job(endpoint, chat, tokens, sampling, stops, stream, include_usage)

    def _router(self, body: dict[str, Any]) -> Completer:
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
