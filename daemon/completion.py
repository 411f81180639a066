"""A generation as text: the request's stop strings, incremental decoding, and how the generation ended.

``complete`` is what every entry (``/hexgen/generate/1`` and the HTTP gateway) runs around the router's token
stream, so both cut at stop strings and count metrics the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hexgen.daemon.metrics import Metrics
from hexgen.daemon.request_limits import RequestError
from hexgen.engine.tokenizer import Tokenizer

MAX_STOPS = 4
MAX_STOP_CHARS = 64

OnToken = Callable[[int, str], Awaitable[None]]
# Sends what an ``OnToken`` that holds tokens back was given so far (``Router.generate`` says when).
Flush = Callable[[], Awaitable[None]]
# Runs the request to its end, calling ``emit`` with each token; returns the finish reason.
GenerateTokens = Callable[[Callable[[int], Awaitable[None]], list[dict[str, Any]]], Awaitable[str]]


class StopReached(Exception):
    """The text reached one of the request's stop strings; raised through the hops to cancel them."""


class StopFilter:
    """Cuts streamed text at the first stop string, holding back just enough text to see one straddle pieces."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """The text that may go out now, and whether a stop string was reached (nothing after it goes out)."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def parse_stops(request: Mapping[str, Any]) -> list[str]:
    """The request's stop strings (``stop``: a string or a list of at most 4); raises RequestError."""
    stops = request.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise RequestError(f"'stop' is a string or a list of at most {MAX_STOPS} non-empty strings of {MAX_STOP_CHARS}")
    return stops


@dataclass(frozen=True)
class Completion:
    """How a generation ended: why, the text held back until the end, token counts and the replicas used."""

    finish_reason: str
    tail: str
    prompt_tokens: int
    completion_tokens: int
    served_by: list[dict[str, Any]]


async def complete(
    tokenizer: Tokenizer, metrics: Metrics, prompt_tokens: int, stops: list[str], run: GenerateTokens, on_token: OnToken
) -> Completion:
    """Turn the tokens ``run`` produces into text: ``on_token`` gets every token with the new text it
    completes ("" while a multi-byte character or a possible stop string is held back); the result holds
    the text still held back at the end. Stops at the first stop string (cancelling ``run``'s work)."""
    stop_filter = StopFilter(stops)
    decoder = tokenizer.incremental_decoder()
    served_by: list[dict[str, Any]] = []
    with metrics.generation(prompt_tokens) as timer:

        async def emit(token: int) -> None:
            timer.token()
            text, stopped = stop_filter.push(decoder.push(token))
            await on_token(token, text)
            if stopped:
                raise StopReached

        try:
            reason = await run(emit, served_by)
            tail, stopped = stop_filter.push(decoder.flush())
            reason, tail = ("stop", tail) if stopped else (reason, tail + stop_filter.flush())
        except StopReached:
            reason, tail = "stop", ""
    return Completion(reason, tail, prompt_tokens, timer.tokens, served_by)
