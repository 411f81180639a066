"""The router: a request entering any daemon is prefilled on one replica, decoded on another, streamed back.

``/hexgen/generate/1`` (clients -> entry daemon): one request frame, then one frame per token and a final
``done`` or ``error`` frame. The entry picks a prefill (or colocated) replica in proportion to the plan's
flows from the source, and a decode replica in proportion to the flows out of that prefill replica, and
asks the prefill replica's driver daemon over ``/hexgen/replica/1``. That daemon feeds its worker; on the
hand-off it asks the decode replica's driver daemon to import the sequence (the KV goes worker to worker
over torch.distributed) and relays the decode tokens upstream. If a hop fails, or the plan changes under a
request, the entry re-submits prompt plus the tokens streamed so far, so the client sees every token
exactly once. Per-request buffers hold at most ``max_tokens`` events, so a slow client stalls only itself.

``Router.complete`` turns a validated request into text (stop strings, incremental decoding, metrics) for
every entry: the libp2p one here and the HTTP gateway (``hexgen.daemon.http_api``).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from hexgen.daemon import spot_check
from hexgen.daemon.deployment import Deployment, Replica
from hexgen.daemon.host import Host
from hexgen.daemon.metrics import CLIENT_GONE, Metrics
from hexgen.daemon.rate_limit import RateLimiter
from hexgen.daemon.supervisor import ReplicaUnavailable, Supervisor
from hexgen.daemon.wire import FrameError, FrameReader, write_frame
from hexgen.engine.sequence import SamplingParams
from hexgen.engine.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger("hexgen.router")

GENERATE_PROTOCOL = TProtocol("/hexgen/generate/1")
REPLICA_PROTOCOL = TProtocol("/hexgen/replica/1")
MAX_TOKENS_LIMIT = 4096
READY_TIMEOUT_S = 120.0
REQUEST_DEADLINE_S = 600.0
RESUBMIT_LIMIT = 8
RESUBMIT_BACKOFF_S = 0.5
FIRST_FRAME_TIMEOUT_S = 10.0
SPOT_CHECK_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 30.0
# Text longer than this per context token cannot fit; refused before the tokenizer spends time on it.
MAX_CHARS_PER_TOKEN = 64
MIN_FIT_TOKENS = 16  # a request with ``fit`` is refused when its prompt leaves less than this for the reply
SAMPLING_FIELDS = {"max_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids", "ignore_eos"}
MAX_STOPS = 4
MAX_STOP_CHARS = 64
MAX_MESSAGES = 256
CHAT_ROLES = ("system", "user", "assistant", "tool")

Emit = Callable[[dict[str, Any]], Awaitable[None]]
OnToken = Callable[[int, str], Awaitable[None]]


class RequestError(ValueError):
    """A client request that cannot be served as asked; the message says why, ``code`` what kind (clients
    act on some: a chat drops its oldest messages on ``context_full``)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class HopFailed(Exception):
    """A replica hop failed; the entry may re-submit."""


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


def parse_stops(request: dict[str, Any]) -> list[str]:
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


def chat_tokens(messages: Any, tokenizer: Tokenizer) -> list[int]:
    """The prompt ids of a conversation under the model's chat template (a plain role-prefixed prompt for a
    model without one). Raises RequestError for a malformed conversation. O(conversation length)."""
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES:
        raise RequestError(f"'messages' must be a list of 1 to {MAX_MESSAGES} messages")
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in CHAT_ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise RequestError(f"message {index} needs a role ({', '.join(CHAT_ROLES)}) and string content")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        text.encode("utf-8")  # JSON can carry lone surrogates; the tokenizer takes text only
    except TokenizerError as exc:
        raise RequestError(" ".join(str(exc).split())) from None  # a template's words, on one line
    except UnicodeEncodeError:
        raise RequestError("the messages hold a lone surrogate, which is not text") from None
    # A template that writes the BOS itself must not get a second one from the encoder.
    writes_bos = bool(tokenizer.bos_token) and text.startswith(str(tokenizer.bos_token))
    return tokenizer.encode(text, add_special_tokens=not writes_bos)


def parse_request(request: Any, tokenizer: Tokenizer, max_context: int) -> tuple[list[int], dict[str, Any]]:
    """Validate a generate request (exactly one of ``prompt`` text, ``tokens`` ids or chat ``messages``);
    returns (prompt token ids, sampling fields). Raises RequestError."""
    if not isinstance(request, dict):
        raise RequestError("a generate request is a map")
    prompt, tokens, messages = request.get("prompt"), request.get("tokens"), request.get("messages")
    if sum(x is not None for x in (prompt, tokens, messages)) != 1:
        raise RequestError("give exactly one of 'prompt' (text), 'tokens' (ids) and 'messages' (a chat)")
    if messages is not None:
        listed = messages if isinstance(messages, list) else []
        chars = sum(len(m["content"]) for m in listed if isinstance(m, dict) and isinstance(m.get("content"), str))
        if chars > max_context * MAX_CHARS_PER_TOKEN:
            raise RequestError(
                f"the messages hold {chars} characters, more than a context of {max_context} tokens can hold",
                code="context_full",
            )
        tokens = chat_tokens(messages, tokenizer)
    elif prompt is not None:
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string")
        try:
            prompt.encode("utf-8")  # JSON can carry lone surrogates; the tokenizer takes text only
        except UnicodeEncodeError:
            raise RequestError("'prompt' holds a lone surrogate, which is not text") from None
        if len(prompt) > max_context * MAX_CHARS_PER_TOKEN:
            raise RequestError(
                f"'prompt' has {len(prompt)} characters, more than a context of {max_context} tokens can hold"
            )
        tokens = tokenizer.encode(prompt)
    if (
        not isinstance(tokens, list)
        or not tokens
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)
    ):
        raise RequestError("'tokens' must be a non-empty list of token ids")
    if any(t < 0 or t >= tokenizer.vocab_size for t in tokens):
        raise RequestError(f"token ids must lie in [0, {tokenizer.vocab_size})")
    sampling = {k: v for k, v in request.items() if k in SAMPLING_FIELDS}
    unknown = set(request) - SAMPLING_FIELDS - {"prompt", "tokens", "messages", "cert", "stop", "fit"}
    if unknown:
        names = sorted(k[:40] if isinstance(k, str) and k.isprintable() else repr(k)[:40] for k in unknown)
        raise RequestError(f"unknown fields: {', '.join(names)}")
    fit = request.get("fit", False)
    if not isinstance(fit, bool):
        raise RequestError("'fit' must be true or false")
    if fit:
        sampling["max_tokens"] = _fitted_max_tokens(len(tokens), sampling.get("max_tokens"), max_context)
    sampling.setdefault("max_tokens", 16)
    sampling["stop_token_ids"] = sampling.get("stop_token_ids") or []  # nil (or empty) means none
    # the checks every replica makes (types a worker can use, max_tokens within the limit)
    _check_replica_request({"id": 0, "term": 0, "epoch": 0, "replica": 0, "tokens": tokens, "sampling": sampling})
    if len(tokens) + sampling["max_tokens"] > max_context:
        raise RequestError(
            f"prompt ({len(tokens)} tokens) plus max_tokens ({sampling['max_tokens']}) exceeds the model's "
            f"context of {max_context}",
            code="context_full",
        )
    sampling["stop_token_ids"] = list(sampling["stop_token_ids"])
    return tokens, sampling


def _fitted_max_tokens(prompt_tokens: int, asked: Any, max_context: int) -> Any:
    """With ``fit``: the asked max_tokens (all that fits when absent) capped by the context the prompt leaves,
    refused (``context_full``) when fewer than MIN_FIT_TOKENS (or the asked count) remain."""
    if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 1):
        return asked  # refused by the usual checks, with their message
    wanted = MAX_TOKENS_LIMIT if asked is None else asked
    left = max_context - prompt_tokens
    if left < min(MIN_FIT_TOKENS, wanted):
        raise RequestError(
            f"the prompt ({prompt_tokens} tokens) leaves {max(left, 0)} of the model's context of {max_context} "
            "tokens for a reply",
            code="context_full",
        )
    return min(wanted, left)


@dataclass(frozen=True)
class Completion:
    """How a generation ended: why, the text held back until the end, token counts and the replicas used."""

    finish_reason: str
    tail: str
    prompt_tokens: int
    completion_tokens: int
    served_by: list[dict[str, Any]]


@dataclass
class Patience:
    """How long a request waits for the swarm: ``timeout_s`` with neither a token nor word that a replica
    holding it still steps (``alive``, once a second from a busy driver; none while a step blocks) ends it
    with an error; an attempt silent for half of that is given up and re-submitted, so a hop stuck on work
    that will never come (a KV transfer whose sender failed) is failed over in time, while a request that
    merely waits in a busy replica's queue keeps its place."""

    timeout_s: float
    since: float

    @property
    def deadline(self) -> float:
        return self.since + self.timeout_s

    @property
    def hop_silence_s(self) -> float:
        return self.timeout_s / 2

    def progress(self, now: float) -> None:
        self.since = now

    def message(self, last_failure: str | None, plan_error: str | None) -> str:
        """What the client hears when the request ran out of patience: why, as far as this entry knows."""
        text = f"no replica took the request within {self.timeout_s:g} s"
        if last_failure:
            text += f" (last attempt: {last_failure})"
        if plan_error:
            text += f"; the coordinator says: {plan_error}"
        return text


@dataclass
class RateMeter:
    """Events per second over a sliding window (tokens produced by the replicas this daemon drives)."""

    window_s: float = 10.0
    marks: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def add(self, now: float, count: int = 1) -> None:
        self.total += count
        if self.marks and self.marks[-1][0] == now:
            self.marks[-1] = (now, self.marks[-1][1] + count)
        else:
            self.marks.append((now, count))
        self._trim(now)

    def rate(self, now: float) -> float:
        self._trim(now)
        return sum(n for _, n in self.marks) / self.window_s

    def _trim(self, now: float) -> None:
        while self.marks and self.marks[0][0] <= now - self.window_s:
            self.marks.popleft()


@dataclass
class Router:
    host: Host
    peer_id: str
    supervisor: Supervisor
    tokenizer: Tokenizer
    max_context: int
    may_ask: Callable[[str, Any], bool]
    rng: random.Random = field(default_factory=random.Random)
    served: int = 0
    meter: RateMeter = field(default_factory=RateMeter)
    metrics: Metrics = field(default_factory=Metrics)
    verify_fraction: float = 0.0  # of finished requests, re-run elsewhere and compared (see spot_check)
    tamper_tokens: bool = False  # tests only: a lying peer, whose replica hops return every token plus one
    on_verdict: Callable[[spot_check.Verdict], Awaitable[None]] | None = None
    background: trio.Nursery | None = None  # where spot-checks run, after their request has been answered
    checks: Counter[str] = field(default_factory=Counter)
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0.0, 0.0))  # generate requests per peer
    request_timeout_s: float = REQUEST_TIMEOUT_S  # see Patience
    plan_error: Callable[[], str | None] = lambda: None  # the adopted plan's error, for the client's message

    # ------------------------------------------------------------------ entry

    async def serve_generate(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        try:
            with trio.fail_after(FIRST_FRAME_TIMEOUT_S):
                request = await FrameReader(stream).read()
            if isinstance(request, dict) and not self.may_ask(peer, request.get("cert")):
                raise RequestError("not a member of this swarm")
            if wait := self.limiter.admit(peer):
                self.metrics.count_request(GENERATE_PROTOCOL, 429, "rate_limit_error")
                with contextlib.suppress(Exception):
                    message = (
                        f"rate limited: over {self.limiter.rate:g} requests/s from this peer; retry in {wait:.2f} s"
                    )
                    await write_frame(stream, {"error": message, "retry_after_s": round(wait, 3)})
                    await stream.close()
                return
            tokens, sampling = parse_request(request, self.tokenizer, self.max_context)
            stops = parse_stops(request)
        except (RequestError, FrameError, trio.TooSlowError) as exc:
            self.metrics.count_request(GENERATE_PROTOCOL, 400, "invalid_request_error")
            refusal = {"error": str(exc) or "no request within the time limit"}
            if getattr(exc, "code", None):
                refusal["code"] = exc.code  # type: ignore[union-attr]
            with contextlib.suppress(Exception):
                await write_frame(stream, refusal)
                await stream.close()
            return
        except Exception as exc:  # the stream broke before a request arrived
            log.debug("generate stream from %s ended: %s", peer, exc)
            return

        async def on_token(token: int, text: str) -> None:
            await write_frame(stream, {"token": token, "text": text})

        status, error_type = CLIENT_GONE, None  # unless it ends otherwise
        try:
            done = await self.complete(tokens, sampling, stops, on_token)
            await write_frame(
                stream,
                {
                    "done": True,
                    "finish_reason": done.finish_reason,
                    "text": done.tail,
                    "prompt_tokens": done.prompt_tokens,
                    "completion_tokens": done.completion_tokens,
                    "max_tokens": sampling["max_tokens"],
                    "context": self.max_context,
                    "served_by": done.served_by,
                },
            )
            status = 200
        except HopFailed as exc:
            status, error_type = 503, "service_unavailable_error"
            with contextlib.suppress(Exception):
                await write_frame(stream, {"error": str(exc)})
        except Exception as exc:  # the client went away: the cancelled hops free the work
            log.debug("generate stream from %s ended: %s", peer, exc)
        finally:
            self.metrics.count_request(GENERATE_PROTOCOL, status, error_type)
            with contextlib.suppress(Exception):
                await stream.close()

    async def complete(
        self, tokens: list[int], sampling: dict[str, Any], stops: list[str], on_token: OnToken
    ) -> Completion:
        """Generate a validated request (see ``parse_request``) as text, for any entry: ``on_token`` gets
        every token with the new text it completes ("" while a multi-byte character or a possible stop string
        is held back); the result holds the text still held back at the end. Stops at the first stop string
        (its work is cancelled). Cancelling the caller cancels the hops, which frees the work on the workers.
        Raises HopFailed as ``generate`` does."""
        stop_filter = StopFilter(stops)
        decoder = self.tokenizer.incremental_decoder()
        served_by: list[dict[str, Any]] = []
        with self.metrics.generation(len(tokens)) as timer:

            async def emit(token: int) -> None:
                timer.token()
                text, stopped = stop_filter.push(decoder.push(token))
                await on_token(token, text)
                if stopped:
                    raise StopReached

            try:
                reason, _ = await self.generate(tokens, sampling, emit, served_by)
                tail, stopped = stop_filter.push(decoder.flush())
                reason, tail = ("stop", tail) if stopped else (reason, tail + stop_filter.flush())
            except StopReached:
                reason, tail = "stop", ""
        return Completion(reason, tail, len(tokens), timer.tokens, served_by)

    async def generate(
        self,
        tokens: list[int],
        sampling: dict[str, Any],
        emit: Callable[[int], Awaitable[None]],
        served_by: list[dict[str, Any]] | None = None,
    ) -> tuple[str, int]:
        """Run one request to its end, re-submitting after failed hops; returns (finish reason, tokens made).

        Raises HopFailed when it cannot finish: too many failed attempts, no replica took it for
        ``request_timeout_s`` (``Patience``), or past the request deadline."""
        patience = Patience(self.request_timeout_s, trio.current_time())
        failures: list[str] = []
        with trio.CancelScope() as waiting:
            waiting.deadline = patience.deadline
            try:
                return await self._generate(
                    tokens, sampling, emit, served_by if served_by is not None else [], patience, waiting, failures
                )
            except trio.TooSlowError:
                raise HopFailed("no serving plan took the request in time") from None
        raise HopFailed(patience.message(failures[-1] if failures else None, self.plan_error()))

    async def _generate(
        self,
        tokens: list[int],
        sampling: dict[str, Any],
        emit: Callable[[int], Awaitable[None]],
        served_by: list[dict[str, Any]],
        patience: Patience,
        waiting: trio.CancelScope,
        tried: list[str],
    ) -> tuple[str, int]:
        produced: list[int] = []
        failures: list[str] = []  # hops whose work failed; refusals (see below) are not counted
        failed: set[tuple[tuple[int, int], int]] = set()  # (plan version, replica) that failed this request
        with trio.fail_after(REQUEST_DEADLINE_S):
            while True:
                deployment = await self._deployment()
                usable = [r.index for r in deployment.replicas if (deployment.version, r.index) not in failed]
                entry = deployment.pick_entry(self.rng, usable)
                replica = None if entry is None else deployment.replicas[entry]
                dst = None
                if replica is not None and replica.role == "prefill":
                    dst = deployment.pick_decode(replica.index, self.rng, usable)
                if replica is None or (replica.role == "prefill" and dst is None):
                    if not failed:
                        raise HopFailed("the plan has no replica that takes new requests")
                    await self._next_plan(deployment.version)  # every usable path failed: wait for a new world
                    continue
                left = sampling["max_tokens"] - len(produced)
                whole = not produced  # this attempt makes every token: a spot-check can judge its route alone
                request = {
                    "id": self.rng.getrandbits(31),
                    "term": deployment.term,
                    "epoch": deployment.epoch,
                    "replica": entry,
                    "dst": -1 if dst is None else dst,
                    "tokens": tokens + produced,
                    "sampling": sampling | {"max_tokens": left},
                }
                served_by.append({"epoch": deployment.epoch, "replica": entry, "role": replica.role})
                if dst is not None:
                    served_by.append({"epoch": deployment.epoch, "replica": dst, "role": "decode"})
                # A refused hop (a daemon not on this epoch yet or past it, a replica still starting, withdrawn
                # by a new plan, a peer gone) says nothing against the request: under churn a request meets
                # many, so only failed work counts toward RESUBMIT_LIMIT (REQUEST_DEADLINE_S bounds the rest).
                refused = False
                involved = replica.peers() | (set() if dst is None else deployment.replicas[dst].peers())
                try:
                    async with self.open_replica(replica.driver_peer, request, involved) as events:
                        while True:
                            with trio.move_on_after(patience.hop_silence_s) as silent:
                                try:
                                    event = await events.receive()
                                except trio.EndOfChannel:
                                    raise HopFailed("the replica stream ended early") from None
                            if silent.cancelled_caught:
                                raise HopFailed(f"no word from replica {entry} for {patience.hop_silence_s:g} s")
                            if "error" in event:
                                refused = bool(event.get("refused"))
                                raise HopFailed(str(event["error"]))
                            if event.get("alive"):  # taken and stepping: queued work is not a stuck hop
                                patience.progress(trio.current_time())
                                waiting.deadline = patience.deadline
                                continue
                            produced.append(int(event["token"]))
                            patience.progress(trio.current_time())
                            waiting.deadline = patience.deadline
                            await emit(int(event["token"]))
                            if event.get("finished"):
                                self.served += 1
                                if whole:
                                    answer = (tuple(tokens), dict(sampling), tuple(produced))
                                    self._maybe_check(spot_check.Answered(deployment, frozenset(involved), *answer))
                                return str(event["finished"]), len(produced)
                except HopFailed as exc:
                    tried.append(str(exc))
                    if not refused:
                        failures.append(str(exc))
                    log.info("request re-submitted after %d tokens: %s", len(produced), exc)
                    if len(failures) > RESUBMIT_LIMIT:
                        raise HopFailed(f"gave up after {len(failures)} failed attempts; last: {exc}") from None
                    failed.add((deployment.version, entry))
                    if dst is not None:
                        failed.add((deployment.version, dst))
                    await trio.sleep(RESUBMIT_BACKOFF_S)

    def _maybe_check(self, answered: spot_check.Answered) -> None:
        if self.background is None or not spot_check.checkable(answered.sampling) or not answered.produced:
            return
        if self.rng.random() < self.verify_fraction:
            self.background.start_soon(self._spot_check, answered)

    async def _spot_check(self, answered: spot_check.Answered) -> None:
        deployment, sampling = answered.deployment, answered.sampling
        prompt, produced = list(answered.prompt), list(answered.produced)

        async def run(route: spot_check.Route) -> list[int]:
            request = {
                "id": self.rng.getrandbits(31),
                "term": deployment.term,
                "epoch": deployment.epoch,
                "replica": route.entry,
                "dst": -1 if route.dst is None else route.dst,
                "tokens": prompt,
                "sampling": sampling | {"max_tokens": len(produced)},
            }
            out: list[int] = []
            async with self.open_replica(deployment.replicas[route.entry].driver_peer, request, route.peers) as events:
                async for event in events:
                    if "error" in event:
                        raise HopFailed(str(event["error"]))
                    if event.get("alive"):
                        continue
                    out.append(int(event["token"]))
                    if event.get("finished"):
                        return out
            raise HopFailed("the replica stream ended early")

        try:
            with trio.fail_after(SPOT_CHECK_TIMEOUT_S):
                verdict = await spot_check.check(deployment, answered.served, produced, run)
        except (HopFailed, trio.TooSlowError) as exc:
            verdict = spot_check.Verdict("unchecked", detail=str(exc) or "the check timed out")
        self.checks[verdict.outcome] += 1
        level = logging.WARNING if verdict.outcome == "accused" else logging.INFO
        log.log(level, "spot-check %s: %s %s", verdict.outcome, sorted(verdict.accused), verdict.detail)
        if self.on_verdict is not None:
            await self.on_verdict(verdict)

    async def _next_plan(self, version: tuple[int, int]) -> None:
        with trio.fail_after(READY_TIMEOUT_S):
            while self.supervisor.deployment is None or self.supervisor.deployment.version == version:
                await self.supervisor.changed.wait()

    async def _deployment(self) -> Deployment:
        with trio.fail_after(READY_TIMEOUT_S):
            while self.supervisor.deployment is None:
                await self.supervisor.changed.wait()
        assert self.supervisor.deployment is not None
        return self.supervisor.deployment

    @contextlib.asynccontextmanager
    async def open_replica(
        self, peer: str, request: dict[str, Any], involved: Collection[str] = ()
    ) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """The events of ``request`` on the replica whose driver lives on ``peer`` (this daemon or another);
        ends with a refusal as soon as a plan drops one of the ``involved`` peers (a hung peer keeps its
        streams open, so only the plan tells that its part of the work will never come)."""
        send, receive = trio.open_memory_channel[dict[str, Any]](request["sampling"]["max_tokens"] + 4)
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            if involved:
                nursery.start_soon(self._watch_plan, involved, send.clone())
            if peer == self.peer_id:
                nursery.start_soon(self._local, request, send)
            else:
                nursery.start_soon(self._remote, peer, request, send)
            try:
                yield receive
            except Exception as exc:  # re-raised below, not wrapped in the nursery's exception group
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _watch_plan(self, involved: Collection[str], send: trio.MemorySendChannel[dict[str, Any]]) -> None:
        async with send:
            while True:
                await self.supervisor.changed.wait()
                deployment = self.supervisor.deployment
                if deployment is None:
                    continue
                gone = set(involved) - set().union(*(r.peers() for r in deployment.replicas))
                if gone:
                    error = {"error": f"{', '.join(sorted(gone))} left the plan", "refused": True}
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await send.send(error)
                    return

    async def _local(self, request: dict[str, Any], send: trio.MemorySendChannel[dict[str, Any]]) -> None:
        async with send:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.handle_replica(request, send.send)

    async def _remote(self, peer: str, request: dict[str, Any], send: trio.MemorySendChannel[dict[str, Any]]) -> None:
        async with send:
            try:
                stream = await self.host.open_stream(peer, REPLICA_PROTOCOL)
            except Exception as exc:
                await send.send({"error": f"cannot reach {peer}: {exc}", "refused": True})
                return
            try:
                await write_frame(stream, request)
                reader = FrameReader(stream)
                while True:
                    event = await reader.read()
                    if event is None:
                        await send.send({"error": f"{peer} closed the stream"})
                        return
                    if not isinstance(event, dict):
                        await send.send({"error": f"{peer} sent a malformed event"})
                        return
                    await send.send(event)
                    if "error" in event or event.get("finished"):
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception as exc:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await send.send({"error": f"the stream to {peer} failed: {exc}"})
            finally:
                with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await stream.reset()

    # ------------------------------------------------------------------ replicas

    async def serve_replica(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        try:
            with trio.fail_after(FIRST_FRAME_TIMEOUT_S):
                request = await FrameReader(stream).read()
            if not self.may_ask(peer, None) or peer == self.peer_id:
                raise RequestError("replica requests are for members only")
            _check_replica_request(request, self.tokenizer.vocab_size)
        except (RequestError, FrameError, trio.TooSlowError) as exc:
            with contextlib.suppress(Exception):
                await write_frame(stream, {"error": str(exc) or "no request within the time limit"})
                await stream.close()
            return
        except Exception:
            return

        async def emit(event: dict[str, Any]) -> None:
            if self.tamper_tokens and "token" in event:
                event = event | {"token": (int(event["token"]) + 1) % self.tokenizer.vocab_size}
            await write_frame(stream, event)

        try:
            await self.handle_replica(request, emit)
        except Exception as exc:
            log.debug("replica stream from %s ended: %s", peer, exc)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    async def handle_replica(self, request: dict[str, Any], emit: Emit) -> None:
        """Run ``request`` on the local replica driver; relay its tokens (and, after a hand-off, the decode
        replica's) to ``emit``. Errors become an ``error`` event; the work is aborted if ``emit`` fails."""
        seq_id = request["id"]
        frame = {"id": seq_id, "tokens": request["tokens"], "sampling": request["sampling"]}
        if request.get("src", -1) >= 0:
            frame |= {"op": "import", "src": request["src"]}
        else:
            frame |= {"op": "generate", "dst": request.get("dst", -1)}
        try:
            version = (request["term"], request["epoch"])
            worker = await self.supervisor.wait_ready(request["replica"], version, READY_TIMEOUT_S)
            _check_route(worker.replica, frame, self.supervisor.deployment)
            events = await self.supervisor.submit(worker, frame, request["sampling"]["max_tokens"] + 4)
        except (ReplicaUnavailable, RequestError, trio.TooSlowError) as exc:
            await emit({"error": str(exc) or "the replica did not become ready in time", "refused": True})
            return
        done = False
        try:
            async for event in events:
                if "handoff" in event:
                    done = True  # the prefill side is finished with it; the decode side continues
                    await self._hand_off(request, event["handoff"], emit)
                    return
                if "token" in event:
                    self.meter.add(trio.current_time())
                await emit(event)
                if "error" in event or event.get("finished"):
                    done = True
                    return
        finally:
            if not done:
                with trio.CancelScope(shield=True):
                    await self.supervisor.abort(seq_id)

    async def _hand_off(self, request: dict[str, Any], tokens: list[int], emit: Emit) -> None:
        deployment = self.supervisor.deployment
        if deployment is None or deployment.version != (request["term"], request["epoch"]):
            await emit({"error": "the plan changed during the hand-off", "refused": True})
            return
        decode = deployment.replicas[request["dst"]]
        follow = {
            "id": request["id"],
            "term": request["term"],
            "epoch": request["epoch"],
            "replica": decode.index,
            "src": request["replica"],
            "tokens": tokens,
            "sampling": request["sampling"],
        }
        async with self.open_replica(decode.driver_peer, follow) as events:
            async for event in events:
                await emit(event)
                if "error" in event or event.get("finished"):
                    return


def _check_route(replica: Replica, frame: dict[str, Any], deployment: Deployment | None) -> None:
    """A new request goes to a prefill replica (naming a decode replica) or a colocated one; an import goes
    to a decode replica from a prefill one. Anything else would wedge or crash the workers."""
    roles = {r.index: r.role for r in deployment.replicas} if deployment is not None else {}
    if frame["op"] == "import":
        if replica.role != "decode" or roles.get(frame["src"]) != "prefill":
            raise RequestError("an import goes to a decode replica from a prefill replica of the plan")
    elif replica.role == "prefill":
        if roles.get(frame["dst"]) != "decode":
            raise RequestError("a request for a prefill replica must name a decode replica of the plan")
    elif replica.role == "colocated":
        frame["dst"] = -1
    else:
        raise RequestError("a decode replica takes only imports")


def _check_replica_request(request: Any, vocab_size: int = 1 << 63) -> None:
    """Raise RequestError unless ``request`` is a hop a worker can run: an id, term, epoch and replica, token ids in
    [0, vocab_size) (an id beyond the model's vocabulary kills the worker: pass the tokenizer's), and sampling
    fields of the types the worker takes, max_tokens within MAX_TOKENS_LIMIT."""
    if not isinstance(request, dict):
        raise RequestError("a replica request is a map")
    for key in ("id", "term", "epoch", "replica"):
        if not isinstance(request.get(key), int) or isinstance(request.get(key), bool):
            raise RequestError(f"replica request needs an integer {key!r}")
    tokens, sampling = request.get("tokens"), request.get("sampling")
    if not isinstance(tokens, list) or not tokens or not all(type(t) is int and 0 <= t < vocab_size for t in tokens):
        raise RequestError(f"replica request needs a non-empty list of token ids in [0, {vocab_size})")
    if not isinstance(sampling, dict) or set(sampling) - SAMPLING_FIELDS:
        raise RequestError("replica request needs a sampling map")
    # Types first: the worker takes these fields as they are (a str seed would kill it when it samples).
    kinds = {"max_tokens": int, "top_k": int, "seed": int, "temperature": float, "top_p": float, "ignore_eos": bool}
    for name, kind in kinds.items():
        value = sampling.get(name)
        if name not in sampling or (name == "seed" and value is None):
            continue
        if kind is bool and not isinstance(value, bool):
            raise RequestError(f"{name!r} must be true or false")
        in_range = type(value) is int and -(1 << 63) <= value < 1 << 64  # the integers msgpack carries
        if kind is int and not in_range:
            raise RequestError(f"{name!r} must be a 64-bit integer")
        if kind is float and not (in_range or type(value) is float):
            raise RequestError(f"{name!r} must be a number")
    stop_ids = sampling.get("stop_token_ids", [])  # the worker takes no nil here
    if not isinstance(stop_ids, list | tuple) or not all(type(t) is int and 0 <= t < 1 << 63 for t in stop_ids):
        raise RequestError("'stop_token_ids' must be a list of token ids")
    if "max_tokens" not in sampling:
        raise RequestError("a replica request needs 'max_tokens'")
    if sampling["max_tokens"] > MAX_TOKENS_LIMIT:
        raise RequestError(f"max_tokens is limited to {MAX_TOKENS_LIMIT}")
    try:
        SamplingParams(**(sampling | {"stop_token_ids": tuple(stop_ids)}))
    except (ValueError, OverflowError) as exc:  # OverflowError: an int too large for a float
        raise RequestError(str(exc)) from None
    for key in ("src", "dst"):
        if key in request and (not isinstance(request[key], int) or isinstance(request[key], bool)):
            raise RequestError(f"{key!r} must be an integer")


async def generate(host: Host, peer_id: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """A client's side of ``/hexgen/generate/1``: yields every frame the entry daemon sends back."""
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
