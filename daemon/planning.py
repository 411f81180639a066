"""What the coordinator plans from its view of the swarm: a pure function over the members' hardware and links.

The operator's pinned layout when every GPU it names is present; else an incremental re-plan from the previous
plan (this coordinator's, or the one it inherited); else the better of HexGen-2 alone and HexGen-2 with colocated
groups (``planner.plan_live``). Each host's NIC is what its link probes showed (``measured_nics``). A plan that
needs a blocked pair of peers (a world failed there), or a membership whose worlds kept failing, gets the
colocated fallback instead: the swarm never stays on a plan that cannot serve. Pairs linked only through a relay
or a hole punch (``pair_links``) are *worldless*: no stage (a tensor-parallel world) may span them, but a KV
hand-off between a prefill and a decode group, and a stage boundary of a bridged group (each stage a world of
its own), may cross them at what their probes measured (``pair_links.UNMEASURED_GB_S`` until then); a relayed
pair's traffic also loads its relay's NIC, where the adverts tell which relay it is. Each probed pair's one-way
latency is half the RTT its probes measured (``measured_latencies``; a relayed pair's through its relay), which
the cost model charges at the stage boundaries, all-reduces and KV hand-offs that cross it. A pinned plan is
refused only where a stage spans a worldless pair, or anything spans a blocked one.
Every replica loads the weights quantized as the coordinator's model spec says; members whose adverts do not offer
that quantization are left out, and the plan says so.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hexgen.coordinator import planner
from hexgen.coordinator.cluster import Cluster, Nic
from hexgen.coordinator.evaluate import PlanError
from hexgen.coordinator.fallback import colocated_plan, needs_pair
from hexgen.coordinator.pinned import PinnedGroup, PinnedPlanError, pinned_plan
from hexgen.coordinator.plan import Plan
from hexgen.coordinator.specs import ModelSpec
from hexgen.coordinator.workload import synthetic
from hexgen.daemon.cluster_view import LinkMeasurement, PeerHardware, build_cluster_from_peers
from hexgen.daemon.failure import BlockedLink
from hexgen.daemon.hardware_profile import HardwareError
from hexgen.daemon.messages import BlockedPair, PlanBody
from hexgen.daemon.pair_links import UNMEASURED_GB_S, Pair, worldless_pairs
from hexgen.engine.quant_bytes import NONE, name_of

log = logging.getLogger("hexgen.daemon")

# Worker failures a membership gets re-plans for; after them the swarm serves the colocated fallback plan.
MAX_FAILURE_REPLANS = 3
BLOCKED_LINK_GB_S = 1e-6  # what the planner is told a link that cannot carry a world moves


@dataclass(frozen=True)
class PlanningInput:
    """Everything a plan depends on. ``previous`` is the plan (and cluster) this coordinator made last;
    ``inherited`` the adopted body of an earlier coordinator, reused when there is no ``previous``;
    ``link_kinds`` each pair's kind of link (``pair_links.pair_kinds``); ``relays`` the relay of each relayed
    pair known (``pair_links.pair_relays``); ``quantizations`` what each peer's advert offers (a peer missing
    from it offers full precision only)."""

    model: ModelSpec
    peers: Sequence[PeerHardware]
    links: Sequence[LinkMeasurement]
    blocked: Sequence[BlockedLink] = ()
    failures: int = 0  # failure re-plans already made for this membership
    pinned: tuple[PinnedGroup, ...] | None = None
    previous: tuple[Plan, Any] | None = None
    inherited: PlanBody | None = None
    link_kinds: Mapping[Pair, str] = field(default_factory=dict)
    relays: Mapping[Pair, str] = field(default_factory=dict)
    quantizations: Mapping[str, Sequence[str]] = field(default_factory=dict)

    @property
    def quantize(self) -> str:
        """The plan's quantization, one of ``QUANTIZATIONS``: the coordinator's model spec's."""
        return name_of(self.model.quantize)

    def able(self) -> tuple[list[PeerHardware], list[str]]:
        """The peers that can load the plan's quantization, and a reason for each one left out. O(peers)."""
        wanted = self.quantize
        able, left_out = [], []
        for peer in self.peers:
            if wanted in self.quantizations.get(peer.peer_id, (NONE,)):
                able.append(peer)
            else:
                left_out.append(f"{peer.host_name} ({peer.peer_id}) cannot load {wanted} weights")
        return able, left_out

    def worldless(self) -> dict[Pair, str]:
        """The pairs among the peers whose kind of link carries no world, each with why; a blocked pair is
        blocked instead. O(pairs)."""
        known = {link.pair for link in self.blocked}
        found = worldless_pairs(self.link_kinds, (p.peer_id for p in self.peers))
        return {pair: why for pair, why in found if pair not in known}

    def planner_links(self) -> list[LinkMeasurement]:
        """The links the planner is told of: the probes', a blocked pair's as (almost) nothing, and a worldless
        pair no probe measured at its kind's ``UNMEASURED_GB_S`` (later entries of a pair win). O(links)."""
        measured = {frozenset((link.a, link.b)) for link in self.links}
        unmeasured = [
            LinkMeasurement(*pair, UNMEASURED_GB_S[self.link_kinds[pair]], 0.0)
            for pair in self.worldless()
            if frozenset(pair) not in measured
        ]
        blocked = [LinkMeasurement(*link.pair, BLOCKED_LINK_GB_S, 0.0) for link in self.blocked]
        return [*unmeasured, *self.links, *blocked]


@dataclass(frozen=True)
class PlanOutcome:
    """A plan (None when none fits, ``error`` saying why), the GPU index -> (peer, local GPU) map, and what a
    later re-plan may start from (None after a fallback or a failure)."""

    plan: Plan | None
    error: str | None
    gpus: dict[int, tuple[str, int]]
    blocked: tuple[BlockedPair, ...]
    reusable: tuple[Plan, Any] | None = None

    @property
    def throughput(self) -> float:
        return self.plan.throughput if self.plan is not None and math.isfinite(self.plan.throughput) else 0.0


def compute_plan(given: PlanningInput) -> PlanOutcome:
    """Plan for ``given.peers`` that can load the plan's quantization; slow (the HexGen-2 search), so the daemon
    runs it in a worker thread."""
    peers, left_out = given.able()
    if left_out:
        log.info("left out of the plan: %s", "; ".join(left_out))
        given = dataclasses.replace(given, peers=peers)
    outcome = _plan_for(given)
    if not left_out:
        return outcome
    said = f"left out: {'; '.join(left_out)}"
    return dataclasses.replace(outcome, error=f"{outcome.error}; {said}" if outcome.error else said)


def _plan_for(given: PlanningInput) -> PlanOutcome:
    workload = synthetic("default", min(512, given.model.max_context // 2), 128, count=64)
    blocked = tuple(BlockedPair(link.pair, link.reason) for link in given.blocked)
    links = given.planner_links()
    worldless = given.worldless()
    try:
        cluster, gpu_map = build_cluster_from_peers(list(given.peers), links)
    except (HardwareError, PlanError, ValueError) as exc:
        return PlanOutcome(None, f"cannot build the cluster: {exc}", {}, blocked)
    cluster = cluster.with_worldless(worldless).with_relays({p: r for p, r in given.relays.items() if p in worldless})
    cluster = cluster.with_nics(measured_nics(cluster, given.links))
    cluster = cluster.with_latencies(measured_latencies(cluster, given.links))
    gpu_peer = {k: peer for k, (peer, _) in gpu_map.items()}
    reasons = worldless | {link.pair: link.reason for link in given.blocked}

    def refusal(plan: Plan | None) -> str | None:
        """Why ``plan`` cannot serve (a group or exchange across a blocked pair, a stage across a worldless one)."""
        pair = None if plan is None else needs_pair(plan, gpu_peer, [link.pair for link in given.blocked], worldless)
        return None if pair is None else reasons[pair]

    why = f"{given.failures} worker failures in this membership" if given.failures >= MAX_FAILURE_REPLANS else None
    note = None  # why the plan is not the one asked for, when a blocked pair is why
    try:
        result = None if why else _pinned(given, gpu_map)
        if (refused := refusal(result)) is not None:
            note = f"not serving the pinned plan: {refused}"
            log.info("%s", note)
            result = None
        if result is None and why is None:
            previous = given.previous or _inherited(given.inherited, links)
            if previous is not None:
                result = planner.replan(previous[0], previous[1], cluster, given.model, workload)
            else:
                result = planner.plan_live(cluster, given.model, workload)
        why = why or refusal(result)
        if why is not None:
            # never a plan that cannot serve: one replica per host, and the reason for all to see
            fallback = colocated_plan(cluster, given.model, workload)
            return PlanOutcome(
                fallback, f"{why}; serving colocated replicas that each fit on one host", gpu_map, blocked
            )
    except (PlanError, ValueError) as exc:
        error = str(exc) if why is None else f"{why}; and no host can serve alone: {exc}"
        if why is None and worldless:
            error += f" (no stage may span a worldless pair: {'; '.join(worldless.values())})"
        return PlanOutcome(None, error, gpu_map, blocked)
    assert result is not None
    return PlanOutcome(result, note, gpu_map, blocked, (result, cluster))


def measured_nics(cluster: Cluster, links: Sequence[LinkMeasurement]) -> dict[str, Nic]:
    """Each probed host's NIC, both directions, at the fastest probe measured to or from it.

    A probe is one stream between two hosts, so it cannot outrun either host's NIC: the fastest one a
    host took part in is the best evidence of what its NIC carries. Hosts never probed keep the
    cluster's default (10 Gbit/s); a relay without GPUs (``Cluster.relays``) is a host here too, unlimited
    until probed. Blocked pairs are not probes and do not count. O(links).
    """
    fastest: dict[str, float] = {}
    hosts = {*cluster.hosts, *cluster.relay_hosts}
    for link in links:
        for host in (link.a, link.b):
            if host in hosts:
                fastest[host] = max(fastest.get(host, 0.0), link.gb_s)
    return {host: Nic(rate, rate) for host, rate in fastest.items() if rate > 0}


def measured_latencies(cluster: Cluster, links: Sequence[LinkMeasurement]) -> dict[tuple[str, str], float]:
    """Each probed host pair's one-way latency in seconds: half its RTT, per direction the last probe's, per
    pair the higher of the two directions (as ``build_cluster_from_peers`` takes the lower bandwidth).

    A relayed pair's probe ran through its relay, so its RTT already holds both legs. An RTT of 0 is no
    measurement: probes time a real round trip, while the stand-ins for unprobed and blocked pairs
    (``PlanningInput.planner_links``) carry 0, and those pairs keep the cost model's constants. Pairs naming
    hosts outside the cluster are left out. O(links).
    """
    latest: dict[tuple[str, str], float] = {}
    for link in links:
        if link.rtt_ms > 0 and link.a in cluster.hosts and link.b in cluster.hosts:
            latest[link.a, link.b] = link.rtt_ms
    pairs: dict[tuple[str, str], float] = {}
    for (a, b), rtt_ms in latest.items():
        key = (a, b) if a < b else (b, a)
        pairs[key] = max(rtt_ms / 2 / 1e3, pairs.get(key, 0.0))
    return pairs


def _pinned(given: PlanningInput, gpu_map: dict[int, tuple[str, int]]) -> Plan | None:
    """The operator's pinned layout, when every GPU it names is in the swarm."""
    if given.pinned is None:
        return None
    host_of = {p.peer_id: p.host_name for p in given.peers}
    index = {(host_of[peer], local): i for i, (peer, local) in gpu_map.items()}
    try:
        return pinned_plan(given.pinned, index)
    except PinnedPlanError as exc:
        log.info("not serving the pinned plan yet: %s", exc)
        return None


def _inherited(body: PlanBody | None, links: list[LinkMeasurement]) -> tuple[Plan, Any] | None:
    """An earlier coordinator's adopted plan and the cluster it was made for, when the body says so."""
    if body is None or body.plan is None or not body.peers:
        return None
    try:
        cluster, _ = build_cluster_from_peers(list(body.peers), links)
    except (HardwareError, PlanError, ValueError) as exc:  # an unusable inheritance only costs a full plan
        log.info("planning from scratch: the adopted plan cannot be reused (%s)", exc)
        return None
    return body.plan, cluster
