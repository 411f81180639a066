"""Result spot-checks: re-run a finished request on replicas that share no peer with the one that served it.

The entry daemon picks a fraction of its finished requests (``--verify-fraction``) and asks another route (a
colocated replica, or a prefill replica with one of its decode replicas) for the same tokens with the same
sampling. Agreement ends the check. On disagreement a third route, disjoint from both, breaks the tie: the
route the other two outvote is accused, every peer of it (a replica cannot tell which of its stages lied).
Without a third route, or when all three differ, the check ends undecided and accuses nobody.

Only deterministic requests are checked: greedy, or sampled with a seed; replicas with different layouts may
still round a near-tie differently, so a check that disagrees once is evidence, not proof (see the README).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import trio

from hexgen.daemon.deployment import Deployment
from hexgen.daemon.hop import NO_REPLICA, HopAlive, HopError, HopFailed, HopRequest
from hexgen.daemon.hop_streams import OpenHop
from hexgen.engine.sequence import SamplingParams

log = logging.getLogger("hexgen.spot_check")
SPOT_CHECK_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Route:
    """Where a request runs: an entry replica and, for a prefill replica, the decode replica it hands to."""

    entry: int
    dst: int | None
    peers: frozenset[str]


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "agreed", "accused", "undecided" or "unchecked" (no disjoint route to check on)
    accused: frozenset[str] = frozenset()
    detail: str = ""


@dataclass(frozen=True)
class Answered:
    """A request the entry answered from one route alone: what a spot-check re-runs and compares."""

    deployment: Deployment
    served: frozenset[str]  # the peers of the route that produced every token
    prompt: tuple[int, ...]
    sampling: SamplingParams
    produced: tuple[int, ...]


RunRoute = Callable[[Route], Awaitable[list[int]]]


def checkable(sampling: SamplingParams) -> bool:
    """Whether another replica must give the same tokens: greedy, or seeded sampling."""
    return float(sampling.temperature) == 0.0 or sampling.seed is not None


def routes(deployment: Deployment) -> list[Route]:
    """Every route that takes new requests, in replica order. O(replicas + hand-off edges)."""
    out = []
    for replica in deployment.replicas:
        if replica.role == "colocated":
            out.append(Route(replica.index, None, frozenset(replica.peers())))
        elif replica.role == "prefill":
            for dst, _ in deployment.hand_off_weights.get(replica.index, ()):
                peers = replica.peers() | deployment.replicas[dst].peers()
                out.append(Route(replica.index, dst, frozenset(peers)))
    return out


def disjoint(candidates: list[Route], *avoid: frozenset[str]) -> Route | None:
    """The first route sharing no peer with any of ``avoid``."""
    taken = frozenset().union(*avoid)
    return next((r for r in candidates if not r.peers & taken), None)


async def check(deployment: Deployment, served: frozenset[str], produced: list[int], run: RunRoute) -> Verdict:
    """Re-run on disjoint routes of ``deployment`` and judge the route of ``served`` peers that ``produced``
    these tokens. ``run(route)`` returns the tokens a route gives (it raises if the route fails)."""
    candidates = routes(deployment)
    first = disjoint(candidates, served)
    if first is None:
        return Verdict("unchecked", detail="no route disjoint from the one that served it")
    again = await run(first)
    if again == produced:
        return Verdict("agreed")
    third = disjoint(candidates, served, first.peers)
    if third is None:
        return Verdict("undecided", detail=f"replica {first.entry} disagreed and no third route is disjoint")
    tie = await run(third)
    if tie == again:
        return Verdict("accused", served, f"replicas {first.entry} and {third.entry} agree against it")
    if tie == produced:
        return Verdict("accused", first.peers, f"replica {third.entry} agrees with the first answer")
    return Verdict("undecided", detail="three routes gave three answers")


@dataclass
class SpotChecker:
    """Runs the spot-checks of an entry's answered requests, a ``verify_fraction`` of them, in the background;
    ``checks`` counts the outcomes, ``on_verdict`` hears each verdict."""

    open_hop: OpenHop
    rng: random.Random
    verify_fraction: float = 0.0
    on_verdict: Callable[[Verdict], Awaitable[None]] | None = None
    checks: Counter[str] = field(default_factory=Counter)

    def maybe_check(self, answered: Answered, background: trio.Nursery | None) -> None:
        """Start a check of ``answered`` in ``background`` if it is checkable and drawn."""
        if background is None or not checkable(answered.sampling) or not answered.produced:
            return
        if self.rng.random() < self.verify_fraction:
            background.start_soon(self.check, answered)

    async def check(self, answered: Answered) -> None:
        try:
            with trio.fail_after(SPOT_CHECK_TIMEOUT_S):
                verdict = await check(
                    answered.deployment, answered.served, list(answered.produced), self._runner(answered)
                )
        except (HopFailed, trio.TooSlowError) as exc:
            verdict = Verdict("unchecked", detail=str(exc) or "the check timed out")
        self.checks[verdict.outcome] += 1
        level = logging.WARNING if verdict.outcome == "accused" else logging.INFO
        log.log(level, "spot-check %s: %s %s", verdict.outcome, sorted(verdict.accused), verdict.detail)
        if self.on_verdict is not None:
            await self.on_verdict(verdict)

    def _runner(self, answered: Answered) -> RunRoute:
        deployment = answered.deployment
        sampling = replace(answered.sampling, max_tokens=len(answered.produced))

        async def run(route: Route) -> list[int]:
            request = HopRequest(
                self.rng.getrandbits(31),
                deployment.term,
                deployment.epoch,
                route.entry,
                answered.prompt,
                sampling,
                dst=NO_REPLICA if route.dst is None else route.dst,
            )
            out: list[int] = []
            async with self.open_hop(deployment.replicas[route.entry].driver_peer, request, route.peers) as events:
                async for event in events:
                    if isinstance(event, HopError):
                        raise HopFailed(event.error)
                    if isinstance(event, HopAlive):
                        continue
                    out.append(event.token)
                    if event.finished:
                        return out
            raise HopFailed("the replica stream ended early")

        return run
