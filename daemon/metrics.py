"""A daemon's Prometheus metrics: requests, errors, latency and tokens of its entries, and its place in the swarm.

Every node owns a ``CollectorRegistry`` of its own (no process-global state, so several nodes in one process
never mix their numbers). Requests are counted at both entries, the HTTP gateway and ``/hexgen/generate/1``,
by ``endpoint`` (the route, or the protocol id) and ``status``: the HTTP status code, and for the libp2p entry
the code an HTTP client would have got (200 served, 400 refused, 503 no replica could serve it, 499 the
client went away). Generation timing comes from the one code path both entries share
(``hexgen.daemon.completion.complete``): time to first token and, per request, the mean time per output
token after the first. The swarm gauges (live members, plan epoch, this node's roles) are read from the swarm's
state when scraped (``SwarmSource``), so they can never be stale. ``RateMeter`` gives the tokens per second of
the replicas this daemon drives, for its status.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
CLIENT_GONE = 499  # the status nginx made common for "the client closed the request"
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ModelConfig(Protocol):
    @property
    def model(self) -> str: ...


class LiveMembers(Protocol):
    def live_ids(self) -> list[str]: ...


class PlanEpoch(Protocol):
    @property
    def epoch(self) -> int: ...


class Lease(Protocol):
    def is_coordinator(self, now: float) -> bool: ...


class SwarmSource(Protocol):
    """What the swarm gauges read at scrape time (a node satisfies it)."""

    @property
    def peer_id(self) -> str: ...
    @property
    def host_name(self) -> str: ...
    @property
    def config(self) -> ModelConfig: ...
    @property
    def table(self) -> LiveMembers: ...
    @property
    def plan(self) -> PlanEpoch | None: ...
    @property
    def election(self) -> Lease: ...
    def clock(self) -> float: ...
    def roles(self) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class SwarmSnapshot:
    """The swarm gauges at one moment: this node, the live members, the adopted plan's epoch (0: none yet),
    whether this node coordinates, and its GPUs' roles in the plan."""

    peer_id: str
    host: str
    model: str
    peers: int
    plan_epoch: int
    is_coordinator: bool
    roles: tuple[tuple[str, str, str, str], ...]  # (role, group, stage, gpu)


def snapshot(swarm: SwarmSource) -> SwarmSnapshot:
    """The gauges of ``swarm`` now."""
    roles = tuple((str(r["role"]), str(r["group"]), str(r["stage"]), str(r["gpu"])) for r in swarm.roles())
    return SwarmSnapshot(
        swarm.peer_id,
        swarm.host_name,
        swarm.config.model,
        len(swarm.table.live_ids()),
        swarm.plan.epoch if swarm.plan else 0,
        swarm.election.is_coordinator(swarm.clock()),
        roles,
    )


@dataclass
class GenerationTimer:
    """The timing of one generation in flight: call ``token`` for every token it produces."""

    metrics: Metrics
    clock: Callable[[], float]
    started: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0

    def token(self) -> None:
        now = self.clock()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.started)
        self.last = now
        self.tokens += 1
        self.metrics.completion_tokens.inc()

    def finish(self) -> None:
        if self.first is not None and self.last is not None and self.tokens > 1:
            self.metrics.tpot.observe((self.last - self.first) / (self.tokens - 1))


@dataclass
class Metrics:
    """The instruments of one node, on its own registry; ``render`` gives the Prometheus text format."""

    swarm: SwarmSource | None = None  # the swarm gauges' source; none without it
    clock: Callable[[], float] = time.monotonic
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "hexgen_requests",
            "Requests answered, by entry endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "hexgen_request_errors",
            "Requests that failed, by endpoint and error type",
            ["endpoint", "type"],
            registry=r,
        )
        self.disconnects = Counter(
            "hexgen_client_disconnects",
            "Requests whose client went away before the end (their work is cancelled)",
            ["endpoint"],
            registry=r,
        )
        self.in_flight = Gauge("hexgen_requests_in_flight", "Generations this node is the entry of, now", registry=r)
        self.ttft = Histogram(
            "hexgen_time_to_first_token_seconds",
            "From a request's start to its first token",
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self.tpot = Histogram(
            "hexgen_time_per_output_token_seconds",
            "Mean time between a request's tokens after the first",
            buckets=TPOT_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter("hexgen_prompt_tokens", "Prompt tokens of the requests entering here", registry=r)
        self.completion_tokens = Counter(
            "hexgen_completion_tokens", "Tokens generated for the requests entering here", registry=r
        )
        if self.swarm is not None:
            r.register(SwarmCollector(partial(snapshot, self.swarm)))

    def count_request(self, endpoint: str, status: int, error_type: str | None = None) -> None:
        """One answered request; status 499 (the client went away) also counts as a disconnect."""
        self.requests.labels(endpoint, str(status)).inc()
        if error_type is not None:
            self.count_error(endpoint, error_type)
        if status == CLIENT_GONE:
            self.count_disconnect(endpoint)

    def count_disconnect(self, endpoint: str) -> None:
        self.disconnects.labels(endpoint).inc()

    def count_error(self, endpoint: str, error_type: str) -> None:
        self.errors.labels(endpoint, error_type).inc()

    @contextlib.contextmanager
    def generation(self, prompt_tokens: int) -> Iterator[GenerationTimer]:
        """Track one generation while the block runs (in flight, tokens, TTFT and TPOT), however it ends."""
        self.prompt_tokens.inc(prompt_tokens)
        self.in_flight.inc()
        timer = GenerationTimer(self, self.clock, self.clock())
        try:
            yield timer
        finally:
            self.in_flight.dec()
            timer.finish()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SwarmCollector(Collector):
    """Gauges read at scrape time: live members, the adopted plan and this node's roles in it."""

    def __init__(self, read: Callable[[], SwarmSnapshot]) -> None:
        self.read = read

    def collect(self) -> Iterable[Metric]:
        now = self.read()
        info = GaugeMetricFamily("hexgen_node_info", "This node (value 1)", labels=["peer_id", "host", "model"])
        info.add_metric([now.peer_id, now.host, now.model], 1)
        yield info
        yield GaugeMetricFamily("hexgen_peers", "Live members of the swarm, this node included", value=now.peers)
        yield GaugeMetricFamily("hexgen_plan_epoch", "Epoch of the adopted plan (0: none yet)", value=now.plan_epoch)
        yield GaugeMetricFamily(
            "hexgen_is_coordinator", "1 while this node holds the coordinator lease", value=int(now.is_coordinator)
        )
        roles = GaugeMetricFamily(
            "hexgen_role", "This node's GPUs in the adopted plan (value 1)", labels=["role", "group", "stage", "gpu"]
        )
        for role in now.roles:
            roles.add_metric(list(role), 1)
        yield roles


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
