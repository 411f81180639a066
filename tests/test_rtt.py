"""Measured link latency (half a probe's RTT) in planning: from the daemon's probes into the cluster, and from
there into the cost of a stage boundary, a TP all-reduce and a KV hand-off, and so into the planner's choices."""

from __future__ import annotations

import math

import pytest

from hexgen.coordinator import planner
from hexgen.coordinator.cluster import Cluster, ClusterError, HostSpec, Nic, build_cluster
from hexgen.coordinator.cost import CostModel, LengthStats, stage_hardware
from hexgen.coordinator.network import NicQueue
from hexgen.coordinator.parallel import LayoutSearch
from hexgen.coordinator.plan import SINK, SOURCE, Flow, Group, Plan, Stage
from hexgen.coordinator.simulator import simulate
from hexgen.coordinator.specs import MODELS
from hexgen.coordinator.workload import Request, Workload, synthetic
from hexgen.daemon.cluster_view import LinkMeasurement, PeerHardware
from hexgen.daemon.hardware import simulated_profile
from hexgen.daemon.planning import PlanningInput, compute_plan, measured_latencies

A, B, C = "12D3KooWPeerA", "12D3KooWPeerB", "12D3KooWPeerC"
WORKLOAD = synthetic("test", 512, 128, count=64)
STATS = LengthStats.of(WORKLOAD)
LLAMA_7B = MODELS["llama-2-7b"]


def _three(gbit_s: float = 10.0, gpu: str = "A100") -> Cluster:
    """Hosts a, b and c with one ``gpu`` each, every pair at ``gbit_s``; no latency measured."""
    return build_cluster([HostSpec(name, gpu, 1) for name in "abc"], gbit_s)


def _peers(gpu: str = "A100x1") -> list[PeerHardware]:
    return [PeerHardware(p, p[-1].lower(), simulated_profile(gpu)) for p in (A, B, C)]


def test_a_cluster_keeps_its_measured_latencies_through_its_transformations() -> None:
    plain = _three()
    assert plain.latency_s == {} and plain.latency("a", "b") is None
    cluster = plain.with_latencies({("a", "b"): 0.01, ("a", "zz"): 1.0, ("c", "c"): 1.0})
    assert cluster.latency_s == {frozenset("ab"): 0.01}, "absent hosts and a host with itself are left out"
    assert cluster.latency("b", "a") == 0.01 and cluster.latency("a", "c") is None and cluster.latency("a", "a") is None
    assert cluster.with_latencies({("b", "c"): 0.02}).latency_s == {frozenset("ab"): 0.01, frozenset("bc"): 0.02}
    carried = cluster.with_worldless([("a", "b")]).with_relays({("a", "b"): "r"}).with_nics({"a": Nic(1.0, 1.0)})
    assert carried.latency("a", "b") == 0.01
    assert cluster.subset([0, 1])[0].latency("a", "b") == 0.01
    assert cluster.subset([0, 2])[0].latency_s == {}
    assert cluster.without([2])[0].latency_s == cluster.latency_s
    for bad in (-1e-3, math.nan, math.inf):
        with pytest.raises(ClusterError, match="latency"):
            plain.with_latencies({("a", "b"): bad})


def test_probed_rtts_reach_the_planners_cluster_as_one_way_latencies() -> None:
    probes = [
        LinkMeasurement(A, B, 1.0, 20.0),
        LinkMeasurement(B, A, 1.0, 30.0),  # the slower direction decides, as the lower bandwidth does
        LinkMeasurement(A, C, 1.0, 0.0),  # no measurement: the planner's stand-ins carry 0
        LinkMeasurement(B, "12D3KooWGone", 1.0, 5.0),
    ]
    cluster = build_cluster([HostSpec(p, "A100", 1) for p in (A, B, C)])
    assert measured_latencies(cluster, probes) == {(A, B): pytest.approx(0.015)}
    relayed = {(A, C): "relayed", (B, C): "relayed"}
    given = PlanningInput(LLAMA_7B, _peers(), [*probes, LinkMeasurement(C, B, 0.01, 80.0)], link_kinds=relayed)
    outcome = compute_plan(given)
    assert outcome.plan is not None and outcome.reusable is not None and outcome.error is None
    planned = outcome.reusable[1]
    assert planned.latency(A, B) == pytest.approx(0.015)
    assert planned.latency(B, C) == pytest.approx(0.04), "a relayed pair's RTT, measured through its relay"
    assert planned.latency(A, C) is None, "unprobed: the cost model's constants"


def test_a_boundary_across_a_high_rtt_pair_costs_more_than_across_a_low_rtt_one() -> None:
    cluster = _three().with_latencies({("a", "b"): 0.5e-3, ("a", "c"): 50e-3})
    cost = CostModel(cluster, LLAMA_7B, STATS)
    near, far, unmeasured = (
        cost.boundary("a", "b", False),
        cost.boundary("a", "c", False),
        cost.boundary("b", "c", False),
    )
    assert near.gbps == far.gbps == unmeasured.gbps
    assert cost.send_time(1e6, *far) - cost.send_time(1e6, *near) == pytest.approx(50e-3 - 0.5e-3)
    assert cost.send_time(0.0, *unmeasured) == cost.params.inter_host_latency_s
    bridged = cost.boundary("a", "c", True)
    assert cost.send_time(0.0, *bridged) == pytest.approx(50e-3 + cost.params.bridge_latency_s), "on top"
    assert cost.send_time(0.0, *cost.boundary("b", "c", True)) == cost.params.bridge_latency_s
    # a decode step of a two-stage pipeline pays it once per boundary, so the far group serves less; the
    # groups' hardware is the same, so only the boundary's latency tells their layouts apart
    two = (Stage((0,), (0, 16)), Stage((1,), (16, 32)))
    slow = (Stage((0,), (0, 16)), Stage((2,), (16, 32)))
    step = cost.decode_stage_times(two, 32, 8.0, 600.0)
    assert cost.decode_stage_times(slow, 32, 8.0, 600.0)[0] == pytest.approx(step[0] + 50e-3 - 0.5e-3)
    search = LayoutSearch(cost)
    ab, ac = search.best((0, 1), "decode"), search.best((0, 2), "decode")
    assert ab is not None and ac is not None and len(ab.stages) == len(ac.stages) == 2
    assert 0 < ac.rate < ab.rate


def test_an_allreduce_across_hosts_waits_for_the_slowest_measured_pair() -> None:
    cluster = _three()
    plain = CostModel(cluster, LLAMA_7B, STATS)
    hw = stage_hardware(cluster, [0, 1, 2])
    assert hw.latency_s is None
    assert plain.allreduce_time(0.0, hw) == pytest.approx(4 * plain.params.inter_host_latency_s)
    measured = cluster.with_latencies({("a", "b"): 1e-3, ("b", "c"): 5e-3})
    hw = stage_hardware(measured, [0, 1, 2])
    assert hw.latency_s == 5e-3
    assert CostModel(measured, LLAMA_7B, STATS).allreduce_time(0.0, hw) == pytest.approx(4 * 5e-3)
    assert stage_hardware(measured, [0]).latency_s is None


def test_a_kv_hand_off_pays_its_pairs_latency_once() -> None:
    cluster = build_cluster([HostSpec("p", "H100", 1), HostSpec("d", "A100", 1)])
    far = cluster.with_latencies({("p", "d"): 0.1})
    pre, dec = (Stage((0,), (0, 32)),), (Stage((1,), (0, 32)),)
    plain_cost, far_cost = CostModel(cluster, LLAMA_7B, STATS), CostModel(far, LLAMA_7B, STATS)
    extra = 0.1 - plain_cost.params.inter_host_latency_s
    assert far_cost.kv_transfer_time(1000, pre, dec) - plain_cost.kv_transfer_time(1000, pre, dec) == pytest.approx(
        extra
    )
    for c, landing in ((cluster, 1e-3), (far, 0.1)):
        assert NicQueue(c).reserve({("p", "d"): 1.25e9}, 0.0, 1e-3, measured=True) == pytest.approx(1.0 + landing)
        assert NicQueue(c).reserve({("p", "d"): 1.25e9}, 0.0, 1e-3) == pytest.approx(1.001), "unless asked"
    # in the simulator a request's KV lands that much later: its first token does not move, its last does
    groups = (Group(0, "prefill", pre, 1.0, 16), Group(1, "decode", dec, 1.0, 16))
    plan = Plan(groups, (Flow(SOURCE, 0, 1.0), Flow(0, 1, 1.0), Flow(1, SINK, 1.0)), 0.0, "test")
    one = Workload("one", (Request(0.0, 1000, 20),))
    before, after = simulate(plan, plain_cost, one), simulate(plan, far_cost, one)
    assert after.ttft_mean_s == pytest.approx(before.ttft_mean_s, rel=1e-12)
    assert after.latency_mean_s - before.latency_mean_s == pytest.approx(extra, rel=1e-9)


def test_the_planner_bridges_a_worldless_pair_at_a_short_rtt_but_not_at_a_long_one() -> None:
    """opt-30b needs two A100s a replica; a and b share a world, c reaches them only relayed, at their speed.
    Bridged to c, a three-stage replica gains c's memory for more resident sequences, but its decode step pays
    both boundaries' latency: at a 1 ms RTT that pays, at 100 ms it costs more than c adds."""
    model = MODELS["opt-30b"]
    hosts = [HostSpec(name, "A100", 1) for name in "abc"]
    alone = planner.plan_live(build_cluster(hosts[:2], 10.0), model, WORKLOAD).throughput
    apart = build_cluster(hosts, 10.0).with_worldless([("a", "c"), ("b", "c")])
    bridges = []
    for one_way in (0.5e-3, 50e-3):
        cluster = apart.with_latencies({("a", "c"): one_way, ("b", "c"): one_way})
        plan = planner.plan_live(cluster, model, WORKLOAD)
        bridges.append((any(cluster.spans_worldless(g.gpus) for g in plan.groups), plan.throughput))
    (near_bridged, near), (far_bridged, far) = bridges
    assert near_bridged and alone < near
    assert not far_bridged and far == pytest.approx(alone)
    # the same choice from the daemons' probes, through compute_plan
    kinds = {(A, B): "direct", (A, C): "relayed", (B, C): "relayed"}
    for rtt_ms, bridged in ((1.0, True), (100.0, False)):
        probes = [
            LinkMeasurement(A, B, 1.25, 0.1),
            LinkMeasurement(A, C, 1.25, rtt_ms),
            LinkMeasurement(C, B, 1.25, rtt_ms),
        ]
        outcome = compute_plan(PlanningInput(model, _peers(), probes, link_kinds=kinds))
        assert outcome.plan is not None and outcome.reusable is not None and outcome.error is None
        cluster = outcome.reusable[1]
        assert any(cluster.spans_worldless(g.gpus) for g in outcome.plan.groups) == bridged, rtt_ms


def test_a_measured_latency_equal_to_the_constant_plans_as_an_unmeasured_one() -> None:
    """A measured figure replaces the constant, never adds to it (outside a bridge): measured at exactly the
    constant, every pair plans as before, while any other figure moves the prediction."""
    model = MODELS["opt-30b"]  # two A100s a replica, so boundaries cross hosts
    plain = _three()
    constant = CostModel(plain, model, STATS).params.inter_host_latency_s
    pairs = {("a", "b"): constant, ("a", "c"): constant, ("b", "c"): constant}
    before = planner.plan_live(plain, model, WORKLOAD)
    same = planner.plan_live(plain.with_latencies(pairs), model, WORKLOAD)
    slower = planner.plan_live(plain.with_latencies({pair: 10 * constant for pair in pairs}), model, WORKLOAD)
    assert same.throughput == before.throughput and same.groups == before.groups
    assert slower.throughput < before.throughput
