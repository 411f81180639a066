"""``/hexgen/generate/1``, clients to an entry daemon: one request frame in, then a frame per token and a last
``done`` or ``error`` frame out. Here are the reply frames, the entry's handler and the client's side.

The request frame is a client's generate request (``client_requests.parse_request``); the replies are
``GenerateToken``, ``GenerateDone`` and ``GenerateError``, each written by its ``to_wire`` and read back by
``reply_from_wire`` (which raises ``MalformedReply``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from hexgen.daemon.client_requests import parse_request
from hexgen.daemon.completion import Completion, Flush, OnToken, parse_stops
from hexgen.daemon.hop import FIRST_FRAME_TIMEOUT_S, HopFailed
from hexgen.daemon.host import Host, ProtocolId, Stream, stream_peer
from hexgen.daemon.metrics import CLIENT_GONE, Metrics
from hexgen.daemon.rate_limit import RateLimiter
from hexgen.daemon.request_limits import RequestError
from hexgen.daemon.wire import FrameError, FrameReader, encode_frame, write_frame
from hexgen.engine.tokenizer import Tokenizer

log = logging.getLogger("hexgen.router")

GENERATE_PROTOCOL = ProtocolId("/hexgen/generate/1")


class MalformedReply(ValueError):
    """A generate reply frame that cannot be read; the message says why."""


@dataclass(frozen=True)
class GenerateToken:
    """A token and the new text it completes ("" while text is held back)."""

    token: int
    text: str

    def to_wire(self) -> dict[str, Any]:
        return {"token": self.token, "text": self.text}


@dataclass(frozen=True)
class GenerateDone:
    """The last frame of a served request: why it ended, the text held back until then, the token counts,
    the max_tokens it ran under, the model's context and the replicas that served it."""

    finish_reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    max_tokens: int
    context: int
    served_by: tuple[Mapping[str, Any], ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "done": True,
            "finish_reason": self.finish_reason,
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "max_tokens": self.max_tokens,
            "context": self.context,
            "served_by": [dict(s) for s in self.served_by],
        }


@dataclass(frozen=True)
class GenerateError:
    """The request was refused or failed: why, what kind (``code``, e.g. ``context_full``), and for a rate
    limited one when to retry."""

    error: str
    code: str | None = None
    retry_after_s: float | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"error": self.error}
        if self.code:
            wire["code"] = self.code
        if self.retry_after_s is not None:
            wire["retry_after_s"] = self.retry_after_s
        return wire


GenerateReply = GenerateToken | GenerateDone | GenerateError
DONE_INTS = ("prompt_tokens", "completion_tokens", "max_tokens", "context")


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def _served_by(raw: object) -> tuple[dict[str, Any], ...]:
    """The replicas a done frame names: epoch, replica and role of each."""
    if not isinstance(raw, list):
        raise MalformedReply("'served_by' is a list of replicas")
    out = []
    for hop in raw:
        if not isinstance(hop, Mapping) or not (_count(hop.get("epoch")) and _count(hop.get("replica"))):
            raise MalformedReply("each of 'served_by' has an epoch, a replica and a role")
        if not isinstance(hop.get("role"), str):
            raise MalformedReply("each of 'served_by' has an epoch, a replica and a role")
        out.append({"epoch": hop["epoch"], "replica": hop["replica"], "role": hop["role"]})
    return tuple(out)


def _seconds(value: object) -> float | None:
    """A non-negative number of seconds (None when absent)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedReply("'retry_after_s' is a number of seconds")
    try:
        seconds = float(value)
    except OverflowError:
        raise MalformedReply("'retry_after_s' is a number of seconds") from None
    if not seconds >= 0:
        raise MalformedReply("'retry_after_s' is a number of seconds")
    return seconds


def _done_from_wire(raw: Mapping[str, Any]) -> GenerateDone:
    reason, text, served_by = raw.get("finish_reason"), raw.get("text", ""), raw.get("served_by", [])
    counts = [c for c in (raw.get(key) for key in DONE_INTS) if isinstance(c, int) and _count(c)]
    if not isinstance(reason, str) or not isinstance(text, str):
        raise MalformedReply("a done frame has a string 'finish_reason' and 'text'")
    if len(counts) != len(DONE_INTS):
        raise MalformedReply(f"a done frame has counts {', '.join(DONE_INTS)}")
    prompt_tokens, completion_tokens, max_tokens, context = counts
    return GenerateDone(reason, text, prompt_tokens, completion_tokens, max_tokens, context, _served_by(served_by))


def reply_from_wire(raw: object) -> GenerateReply:
    """The reply frame in ``raw`` (an error, a done or a token frame, checked in that order). Raises MalformedReply."""
    if not isinstance(raw, Mapping):
        raise MalformedReply("a generate reply is a map")
    if "error" in raw:
        error, code = raw["error"], raw.get("code")
        if not isinstance(error, str) or not (code is None or isinstance(code, str)):
            raise MalformedReply("an error frame has a string 'error' and 'code'")
        return GenerateError(error, code or None, _seconds(raw.get("retry_after_s")))
    if raw.get("done") is True:
        return _done_from_wire(raw)
    token, text = raw.get("token"), raw.get("text")
    if not isinstance(token, int) or not _count(token) or not isinstance(text, str):
        raise MalformedReply("a token frame has a token id and its text")
    return GenerateToken(token, text)


class Entry(Protocol):
    """What the handler needs of the entry daemon's router."""

    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def max_context(self) -> int: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def limiter(self) -> RateLimiter: ...
    def may_ask(self, peer: str, cert: Any) -> bool: ...
    async def complete(
        self,
        tokens: list[int],
        sampling: dict[str, Any],
        stops: list[str],
        on_token: OnToken,
        flush: Flush | None = None,
    ) -> Completion: ...


async def _refuse(stream: Stream, reply: GenerateError) -> None:
    with contextlib.suppress(Exception):
        await write_frame(stream, reply.to_wire())
        await stream.close()


async def _admitted(stream: Stream, entry: Entry) -> tuple[list[int], dict[str, Any], list[str]] | None:
    """The stream's request (prompt ids, sampling, stops) once read, allowed and valid; None when it was refused."""
    peer = stream_peer(stream)
    try:
        with trio.fail_after(FIRST_FRAME_TIMEOUT_S):
            request = await FrameReader(stream).read()
        if isinstance(request, dict) and not entry.may_ask(peer, request.get("cert")):
            raise RequestError("not a member of this swarm")
        if wait := entry.limiter.admit(peer):
            entry.metrics.count_request(GENERATE_PROTOCOL, 429, "rate_limit_error")
            message = f"rate limited: over {entry.limiter.rate:g} requests/s from this peer; retry in {wait:.2f} s"
            await _refuse(stream, GenerateError(message, retry_after_s=round(wait, 3)))
            return None
        tokens, sampling = parse_request(request, entry.tokenizer, entry.max_context)
        return tokens, sampling, parse_stops(request)
    except (RequestError, FrameError, trio.TooSlowError) as exc:
        entry.metrics.count_request(GENERATE_PROTOCOL, 400, "invalid_request_error")
        code = exc.code if isinstance(exc, RequestError) else None
        await _refuse(stream, GenerateError(str(exc) or "no request within the time limit", code or None))
        return None
    except Exception as exc:  # noqa: BLE001 - the stream broke before a request arrived (libp2p raises many kinds)
        log.debug("generate stream from %s ended: %s", peer, exc)
        return None


async def serve_generate(stream: Stream, entry: Entry) -> None:
    """Answer one client's stream: its request, then its tokens and a done frame (or an error frame)."""
    admitted = await _admitted(stream, entry)
    if admitted is None:
        return
    tokens, sampling, stops = admitted
    held: list[bytes] = []  # token frames not written yet: the tokens that arrived together go in one write

    async def on_token(token: int, text: str) -> None:
        held.append(encode_frame(GenerateToken(token, text).to_wire()))

    async def flush(last: dict[str, Any] | None = None) -> None:
        if last is not None:
            held.append(encode_frame(last))
        if held:
            data = b"".join(held)
            held.clear()
            await stream.write(data)

    status, error_type = CLIENT_GONE, None  # unless it ends otherwise
    try:
        done = await entry.complete(tokens, sampling, stops, on_token, flush)
        reply = GenerateDone(
            done.finish_reason,
            done.tail,
            done.prompt_tokens,
            done.completion_tokens,
            sampling["max_tokens"],
            entry.max_context,
            tuple(done.served_by),
        )
        await flush(reply.to_wire())
        status = 200
    except HopFailed as exc:
        status, error_type = 503, "service_unavailable_error"
        with contextlib.suppress(Exception):
            await flush(GenerateError(str(exc)).to_wire())
    except Exception as exc:  # noqa: BLE001 - the client went away (any stream failure): the cancelled hops free the work
        log.debug("generate stream from %s ended: %s", stream_peer(stream), exc)
    finally:
        entry.metrics.count_request(GENERATE_PROTOCOL, status, error_type)
        with contextlib.suppress(Exception):
            await stream.close()


async def generate(host: Host, peer_id: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """A client's side of ``/hexgen/generate/1``: yields every frame the entry daemon sends back, as sent
    (``reply_from_wire`` reads one)."""
    stream = await host.open_stream(peer_id, GENERATE_PROTOCOL)
    try:
        await write_frame(stream, request)
        reader = FrameReader(stream)
        while True:
            frame = await reader.read()
            if frame is None:
                return
            yield frame
            if not isinstance(frame, dict) or "error" in frame or frame.get("done"):
                return
    finally:
        with contextlib.suppress(Exception):
            await stream.close()


async def replies(host: Host, peer_id: str, request: dict[str, Any]) -> AsyncIterator[GenerateReply]:
    """``generate``'s frames, read by ``reply_from_wire`` (a frame that is not a reply raises MalformedReply)."""
    async for frame in generate(host, peer_id, request):
        yield reply_from_wire(frame)
