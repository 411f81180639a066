"""The router: a request entering any daemon is prefilled on one replica, decoded on another, streamed back.

The entry picks a prefill (or colocated) replica in proportion to the plan's flows from the source, and a
decode replica in proportion to the flows out of that prefill replica, and asks the prefill replica's driver
daemon for a hop (``hop.HopRequest`` over ``/hexgen/replica/1``). That daemon feeds its worker; on the
hand-off it asks the decode replica's driver daemon to import the sequence (the KV goes worker to worker
over torch.distributed) and relays the decode tokens upstream (``replica_server``). If a hop fails, or the
plan changes under a request, the entry re-submits prompt plus the tokens streamed so far, so the client
sees every token exactly once. Per-request buffers hold at most ``max_tokens`` events, so a slow client
stalls only itself.

``Router.complete`` turns a validated request into text (``completion``) for every entry: the libp2p one
(``generate_protocol``) and the HTTP gateway (``hexgen.daemon.http_api``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import trio

from hexgen.daemon import spot_check
from hexgen.daemon.completion import Completion, Flush, OnToken, complete
from hexgen.daemon.deployment import Deployment
from hexgen.daemon.generate_protocol import serve_generate
from hexgen.daemon.hop import HopAlive, HopError, HopEvent, HopFailed, HopRequest
from hexgen.daemon.hop_streams import Emit, Events, HopStreams, queued
from hexgen.daemon.host import Host, Stream
from hexgen.daemon.metrics import Metrics, RateMeter
from hexgen.daemon.patience import Patience
from hexgen.daemon.rate_limit import RateLimiter
from hexgen.daemon.replica_server import READY_TIMEOUT_S, ReplicaServer
from hexgen.daemon.request_limits import sampling_params
from hexgen.daemon.supervisor import Supervisor
from hexgen.engine.sequence import SamplingParams
from hexgen.engine.tokenizer import Tokenizer

log = logging.getLogger("hexgen.router")

REQUEST_DEADLINE_S = 600.0
RESUBMIT_LIMIT = 8
RESUBMIT_BACKOFF_S = 0.5
REQUEST_TIMEOUT_S = 30.0

Version = tuple[int, int]


class HopRefused(HopFailed):
    """A hop that never started its work: it says nothing against the request (see ``Tracked.failures``)."""


@dataclass
class Tracked:
    """One request at its entry: what it asks, the tokens streamed so far, and the attempts that failed it.

    A refused hop (a daemon not on this epoch yet or past it, a replica still starting, withdrawn by a new
    plan, a peer gone) says nothing against the request: under churn a request meets many, so only failed
    work counts toward RESUBMIT_LIMIT (REQUEST_DEADLINE_S bounds the rest)."""

    tokens: list[int]
    sampling: SamplingParams
    patience: Patience
    waiting: trio.CancelScope  # its deadline moves with the patience
    tried: list[str]  # why each attempt ended, refusals included
    produced: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # attempts whose work failed
    failed: set[tuple[Version, int]] = field(default_factory=set)  # (plan version, replica) that failed it
    # sends what ``emit`` was given so far, after each group of tokens that arrived together (None: emit sends)
    flush: Flush | None = None

    def progress(self, now: float) -> None:
        self.patience.progress(now)
        self.waiting.deadline = self.patience.deadline

    def attempt_failed(self, version: Version, route: spot_check.Route, exc: HopFailed) -> None:
        """Count a failed attempt on ``route`` of plan ``version``; raises HopFailed past RESUBMIT_LIMIT."""
        self.tried.append(str(exc))
        if not isinstance(exc, HopRefused):
            self.failures.append(str(exc))
        log.info("request re-submitted after %d tokens: %s", len(self.produced), exc)
        if len(self.failures) > RESUBMIT_LIMIT:
            raise HopFailed(f"gave up after {len(self.failures)} failed attempts; last: {exc}") from None
        self.failed.add((version, route.entry))
        if route.dst is not None:
            self.failed.add((version, route.dst))


def pick_route(
    deployment: Deployment, rng: random.Random, failed: Collection[tuple[Version, int]]
) -> spot_check.Route | None:
    """A route for a new attempt among the replicas that have not failed the request on this plan: an entry
    replica by the plan's flows and, for a prefill one, its decode replica. None when there is none."""
    usable = [r.index for r in deployment.replicas if (deployment.version, r.index) not in failed]
    entry = deployment.pick_entry(rng, usable)
    if entry is None:
        return None
    replica = deployment.replicas[entry]
    dst = deployment.pick_decode(entry, rng, usable) if replica.role == "prefill" else None
    if replica.role == "prefill" and dst is None:
        return None
    peers = replica.peers() | (set() if dst is None else deployment.replicas[dst].peers())
    return spot_check.Route(entry, dst, frozenset(peers))


async def next_event(events: Events, silence_s: float, replica: int) -> HopEvent:
    """The hop's next event; HopFailed when the hop ends without its last event or is silent for ``silence_s``."""
    with trio.move_on_after(silence_s):
        try:
            return await events.receive()
        except trio.EndOfChannel:
            raise HopFailed("the replica stream ended early") from None
    raise HopFailed(f"no word from replica {replica} for {silence_s:g} s")


@dataclass
class Router:
    """A daemon's requests: as their entry (``complete``/``generate``: pick routes, fail over, spot-check) and
    the handlers of both protocols; the replica side is its ``replica_server``, the hops its ``hops``."""

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

    @cached_property
    def hops(self) -> HopStreams:
        return HopStreams(self.host, self.peer_id, self.supervisor, self.handle_replica, lambda: self.background)

    @cached_property
    def replica_server(self) -> ReplicaServer:
        vocab_size = self.tokenizer.vocab_size
        return ReplicaServer(
            self.peer_id, self.supervisor, vocab_size, self.may_ask, self.open_replica, self.meter, self.tamper_tokens
        )

    @cached_property
    def spot_checker(self) -> spot_check.SpotChecker:
        return spot_check.SpotChecker(self.open_replica, self.rng, self.verify_fraction, self.on_verdict, self.checks)

    # ------------------------------------------------------------------ the two protocols

    async def serve_generate(self, stream: Stream) -> None:
        await serve_generate(stream, self)

    async def serve_replica(self, stream: Stream) -> None:
        await self.replica_server.serve(stream)

    async def handle_replica(self, request: HopRequest, emit: Emit) -> None:
        await self.replica_server.handle(request, emit)

    def open_replica(
        self, peer: str, request: HopRequest, involved: Collection[str] = ()
    ) -> AbstractAsyncContextManager[Events]:
        """The events of ``request`` on the replica driven from ``peer`` (see ``HopStreams.open``)."""
        return self.hops.open(peer, request, involved)

    # ------------------------------------------------------------------ entry

    async def complete(
        self,
        tokens: list[int],
        sampling: dict[str, Any],
        stops: list[str],
        on_token: OnToken,
        flush: Flush | None = None,
    ) -> Completion:
        """Generate a validated request (see ``parse_request``) as text, for any entry (``completion.complete``).
        Cancelling the caller cancels the hops, which frees the work on the workers. Raises HopFailed as
        ``generate`` does. ``flush``: see ``generate``."""

        async def run(emit: Callable[[int], Awaitable[None]], served_by: list[dict[str, Any]]) -> str:
            reason, _ = await self.generate(tokens, sampling, emit, served_by, flush)
            return reason

        return await complete(self.tokenizer, self.metrics, len(tokens), stops, run, on_token)

    async def generate(
        self,
        tokens: list[int],
        sampling: dict[str, Any],
        emit: Callable[[int], Awaitable[None]],
        served_by: list[dict[str, Any]] | None = None,
        flush: Flush | None = None,
    ) -> tuple[str, int]:
        """Run one request to its end, re-submitting after failed hops; returns (finish reason, tokens made).
        With ``flush``, ``emit`` may hold tokens back: ``flush`` is awaited after each group of tokens that
        arrived together (the caller sends what is held after the last one), so a client that fell behind
        gets them in one write.

        Raises HopFailed when it cannot finish: too many failed attempts, no replica took it for
        ``request_timeout_s`` (``Patience``), or past the request deadline."""
        patience = Patience(self.request_timeout_s, trio.current_time())
        tried: list[str] = []
        with trio.CancelScope() as waiting:
            waiting.deadline = patience.deadline
            request = Tracked(tokens, sampling_params(sampling), patience, waiting, tried, flush=flush)
            try:
                return await self._generate(request, emit, served_by if served_by is not None else [])
            except trio.TooSlowError:
                raise HopFailed("no serving plan took the request in time") from None
        raise HopFailed(patience.message(tried[-1] if tried else None, self.plan_error()))

    async def _generate(
        self, request: Tracked, emit: Callable[[int], Awaitable[None]], served_by: list[dict[str, Any]]
    ) -> tuple[str, int]:
        with trio.fail_after(REQUEST_DEADLINE_S):
            while True:
                deployment = await self._deployment()
                route = pick_route(deployment, self.rng, request.failed)
                if route is None:
                    if not request.failed:
                        raise HopFailed("the plan has no replica that takes new requests")
                    await self._next_plan(deployment.version)  # every usable path failed: wait for a new world
                    continue
                try:
                    reason = await self._attempt(request, deployment, route, emit, served_by)
                    return reason, len(request.produced)
                except HopFailed as exc:
                    request.attempt_failed(deployment.version, route, exc)
                    await trio.sleep(RESUBMIT_BACKOFF_S)

    async def _attempt(
        self,
        request: Tracked,
        deployment: Deployment,
        route: spot_check.Route,
        emit: Callable[[int], Awaitable[None]],
        served_by: list[dict[str, Any]],
    ) -> str:
        """One hop of ``request`` on ``route``: streams its tokens to ``emit``; returns the finish reason or
        raises HopFailed (HopRefused when the hop never started its work)."""
        whole = not request.produced  # this attempt makes every token: a spot-check can judge its route alone
        left = request.sampling.max_tokens - len(request.produced)
        hop = HopRequest(
            self.rng.getrandbits(31),
            deployment.term,
            deployment.epoch,
            route.entry,
            tuple(request.tokens + request.produced),
            dataclasses.replace(request.sampling, max_tokens=left),
            dst=-1 if route.dst is None else route.dst,
        )
        entry = deployment.replicas[route.entry]
        served_by.append({"epoch": deployment.epoch, "replica": route.entry, "role": entry.role})
        if route.dst is not None:
            served_by.append({"epoch": deployment.epoch, "replica": route.dst, "role": "decode"})
        async with self.open_replica(entry.driver_peer, hop, route.peers) as events:
            while True:
                ready = [await next_event(events, request.patience.hop_silence_s, route.entry), *queued(events)]
                if not isinstance(ready[0], HopError):  # a refusal is no progress
                    request.progress(trio.current_time())
                for event in ready:
                    if isinstance(event, HopError):
                        raise (HopRefused if event.refused else HopFailed)(event.error)
                    if isinstance(event, HopAlive):  # taken and stepping: queued work is not a stuck hop
                        continue
                    request.produced.append(event.token)
                    await emit(event.token)
                    if event.finished:
                        self.served += 1
                        if whole:
                            self._answered(request, deployment, route)
                        return event.finished
                if request.flush is not None:
                    await request.flush()

    def _answered(self, request: Tracked, deployment: Deployment, route: spot_check.Route) -> None:
        answered = spot_check.Answered(
            deployment, route.peers, tuple(request.tokens), request.sampling, tuple(request.produced)
        )
        self.spot_checker.maybe_check(answered, self.background)

    async def _next_plan(self, version: Version) -> None:
        with trio.fail_after(READY_TIMEOUT_S):
            while self.supervisor.deployment is None or self.supervisor.deployment.version == version:
                await self.supervisor.changed.wait()

    async def _deployment(self) -> Deployment:
        with trio.fail_after(READY_TIMEOUT_S):
            while self.supervisor.deployment is None:
                await self.supervisor.changed.wait()
        return self.supervisor.deployment
