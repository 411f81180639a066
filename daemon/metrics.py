"""A daemon's Prometheus metrics: requests, errors, latency and tokens of its entries, and its place in the swarm.

Every node owns a ``CollectorRegistry`` of its own (no process-global state, so several nodes in one process
never mix their numbers). Requests are counted at both entries, the HTTP gateway and ``/hexgen/generate/1``,
by ``endpoint`` (the route, or the protocol id) and ``status``: the HTTP status code, and for the libp2p entry
the code an HTTP client would have got (200 served, 400 refused, 503 no replica could serve it, 499 the
client went away). Generation timing comes from the one code path both entries share
(:meth:`hexgen.daemon.router.Router.complete`): time to first token and, per request, the mean time per output
token after the first. The swarm gauges (live members, plan epoch, this node's roles) are read from the node
when scraped, so they can never be stale.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from hexgen.daemon.node import Node

CONTENT_TYPE = CONTENT_TYPE_LATEST
CLIENT_GONE = 499  # the status nginx made common for "the client closed the request"
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


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

    node: Node | None = None
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
        if self.node is not None:
            r.register(SwarmCollector(self.node))

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
    """Gauges read from the node at scrape time: live members, the adopted plan and this node's roles in it."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterable[Metric]:
        node = self.node
        info = GaugeMetricFamily("hexgen_node_info", "This node (value 1)", labels=["peer_id", "host", "model"])
        info.add_metric([node.peer_id, node.host_name, node.config.model], 1)
        yield info
        yield GaugeMetricFamily(
            "hexgen_peers", "Live members of the swarm, this node included", value=len(node.table.live_ids())
        )
        yield GaugeMetricFamily(
            "hexgen_plan_epoch", "Epoch of the adopted plan (0: none yet)", value=node.plan.epoch if node.plan else 0
        )
        yield GaugeMetricFamily(
            "hexgen_is_coordinator",
            "1 while this node holds the coordinator lease",
            value=int(node.election.is_coordinator(node.clock())),
        )
        roles = GaugeMetricFamily(
            "hexgen_role", "This node's GPUs in the adopted plan (value 1)", labels=["role", "group", "stage", "gpu"]
        )
        for role in node.roles():
            roles.add_metric([role["role"], str(role["group"]), str(role["stage"]), str(role["gpu"])], 1)
        yield roles
