"""The daemon's HTTP gateway: an OpenAI-compatible API under /v1, the node's status as JSON, Prometheus metrics.

This module binds the port and wraps the app (the API key, counts, a last-resort 500: ``Gatekeeper``); the
route handlers are ``openai_routes``, the bodies ``openai_requests`` and ``openai_responses``, streaming
``sse``, the error shape ``http_errors``.

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
- ``GET /status``: the daemon's status as JSON (bytes such as certificates as base64, non-finite numbers as
  null).
- ``GET /metrics``: the node's Prometheus metrics (``hexgen.daemon.metrics``).

A chat is rendered by ``client_requests.chat_tokens`` (as for ``hexgen-client chat``): the model's chat template,
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

import hmac
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hexgen.daemon.http_errors import ERROR_TYPES, ApiError, server_error_response
from hexgen.daemon.metrics import Metrics
from hexgen.daemon.openai_routes import Gateway, GatewayNode

log = logging.getLogger("hexgen.http")

ENDPOINTS = frozenset({"/status", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"})
GUARDED_PREFIX = "/v1/"  # the API key guards the OpenAI API only (see the module docstring)
GRACEFUL_SHUTDOWN_S = 1.0
READ_TIMEOUT_S = 30


class GatewayError(RuntimeError):
    """The HTTP port cannot be served (the address is taken or unknown); the message says which."""


# ----------------------------------------------------------------------------- serving


async def serve_http(
    node: GatewayNode, metrics: Metrics, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
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
        # hypercorn types the ASGI messages as its own TypedDicts, starlette as plain dicts: the same protocol
        serve = partial(hypercorn_serve, app, config, mode="asgi")  # type: ignore[arg-type]
        await nursery.start(serve)  # it logs the URL
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
    handlers: dict[type[Exception], Callable[..., Awaitable[Response]]] = {
        HTTPException: _http_error,
        ApiError: _api_error,
        Exception: _server_error,
    }
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
    return server_error_response()


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
                await server_error_response()(scope, receive, counted)
        finally:
            endpoint = path if path in ENDPOINTS else "other"
            self.metrics.count_request(endpoint, status, ERROR_TYPES.get(status))

    def _authorized(self, scope: Scope) -> bool:
        assert self.api_key is not None
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())
