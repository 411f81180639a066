"""Server-sent events: a streamed answer's chunks as tokens arrive, then ``[DONE]``; the work is cancelled
when the client disconnects, which frees it on every worker it reached."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from hexgen.daemon.completion import Completion, OnToken
from hexgen.daemon.http_errors import ApiError
from hexgen.daemon.metrics import Metrics
from hexgen.daemon.openai_requests import Job
from hexgen.daemon.openai_responses import Shape

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class Answerer(Protocol):
    """What a stream needs of the gateway: the response shape of a job, its generation, the metrics."""

    @property
    def metrics(self) -> Metrics: ...
    def shape(self, job: Job) -> Shape: ...
    async def generate(self, job: Job, on_token: OnToken) -> Completion: ...


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

    def __init__(self, gateway: Answerer, job: Job) -> None:
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
