"""Worldless pairs (linked only through a relay or a hole punch) in planning: no stage spans one, a stage boundary
(a bridged group) or a KV hand-off may cross one at its measured bandwidth, and a plan whose ranks sit on one
moves its hand-offs and bridges over libp2p."""

from __future__ import annotations

import dataclasses

import pytest

from hexgen.coordinator import planner
from hexgen.coordinator.cluster import Cluster, HostSpec, Nic, build_cluster
from hexgen.coordinator.cost import CostModel, LengthStats
from hexgen.coordinator.fallback import needs_pair
from hexgen.coordinator.network import NicQueue, plan_loads
from hexgen.coordinator.parallel import LayoutSearch
from hexgen.coordinator.partition import partition
from hexgen.coordinator.pinned import PinnedGroup, parse_pinned
from hexgen.coordinator.plan import SINK, SOURCE, Flow, Group, Plan, Role, Stage
from hexgen.coordinator.specs import MODELS
from hexgen.coordinator.workload import synthetic
from hexgen.daemon.cluster_view import LinkMeasurement, PeerHardware
from hexgen.daemon.coordination import Coordination
from hexgen.daemon.failure import BlockedLink
from hexgen.daemon.hardware import simulated_profile
from hexgen.daemon.host import new_identity
from hexgen.daemon.pair_links import UNMEASURED_GB_S, bridged_groups, exchange_transport, pair_relays, plan_links
from hexgen.daemon.planning import BLOCKED_LINK_GB_S, PlanningInput, compute_plan
from hexgen.testing.control import FakeClock, adoption_of, swarm_state

A, B, C = "12D3KooWPeerA", "12D3KooWPeerB", "12D3KooWPeerC"
WORKLOAD = synthetic("test", 512, 128, count=64)
SPLIT = "".join(  # prefill on host a, decode on host b
    f'[[groups]]\nrole = "{role}"\nstages = [{{ gpus = ["{host}"], layers = [0, 32] }}]\n'
    for role, host in (("prefill", "a"), ("decode", "b"))
)


def _two_hosts(gpu: str = "A100", gbit_s: float = 10.0, *, worldless: bool = True) -> Cluster:
    cluster = build_cluster([HostSpec("a", gpu, 1), HostSpec("b", gpu, 1)], links={("a", "b"): gbit_s})
    return cluster.with_worldless([("a", "b")] if worldless else [])


def _hosts(plan: Plan, cluster: Cluster) -> list[tuple[Role, set[str]]]:
    return [(g.role, {cluster.gpus[x].host for x in g.gpus}) for g in plan.groups]


def _given(
    model: str = "llama-2-7b", gpu: str = "A100x1", kind: str = "relayed", pinned: tuple[PinnedGroup, ...] | None = None
) -> PlanningInput:
    """Peers A and B (host names a and b) with ``gpu`` each, linked by ``kind``."""
    peers = [PeerHardware(peer, peer[-1].lower(), simulated_profile(gpu)) for peer in (A, B)]
    return PlanningInput(MODELS[model], peers, [], pinned=pinned, link_kinds={(A, B): kind})


def test_a_group_may_span_a_worldless_pair_only_between_its_stages() -> None:
    cluster = _two_hosts()
    assert cluster.spans_worldless((0, 1)) and not cluster.spans_worldless((1,))
    assert cluster.allows_stages([(0,), (1,)]) and not cluster.allows_stages([(0,), (0, 1)])
    assert _two_hosts(worldless=False).allows_stages([(0, 1)])


def test_a_layout_bridges_a_worldless_pair_between_stages_but_no_stage_spans_it() -> None:
    stats = LengthStats.of(WORKLOAD)
    free = LayoutSearch(CostModel(_two_hosts(worldless=False), MODELS["llama-2-7b"], stats))
    apart = LayoutSearch(CostModel(_two_hosts(), MODELS["llama-2-7b"], stats))
    slow = LayoutSearch(CostModel(_two_hosts(gbit_s=0.12), MODELS["llama-2-7b"], stats))
    bridged, direct = apart.best((0, 1), "decode"), free.best((0, 1), "decode")
    assert bridged is not None and direct is not None and [st.gpus for st in bridged.stages] == [(0,), (1,)]
    # the daemons carry its boundary: slower than a world's, and slower still over a slower pair
    below = slow.best((0, 1), "decode")
    assert below is not None and 0 < below.rate < bridged.rate < direct.rate
    assert apart.uniform((0, 1), "decode", 1) is not None, "one stage per host: bridged"
    assert free.uniform((0, 1), "decode", 2) is not None and apart.uniform((0, 1), "decode", 2) is None, "TP across"
    for role in ("prefill", "decode", "colocated"):
        assert apart.best((1,), role) == free.best((1,), role)


def test_a_bridged_boundary_costs_a_daemon_message_and_the_pair_s_bandwidth() -> None:
    cost = CostModel(_two_hosts(gbit_s=8.0), MODELS["llama-2-7b"], LengthStats.of(WORKLOAD))
    world, bridge = cost.boundary("a", "b", False), cost.boundary("a", "b", True)
    assert world.gbps == bridge.gbps == 1.0 and not bridge.same_host and bridge.bridged
    assert cost.send_time(1e9, *bridge) == pytest.approx(cost.params.bridge_latency_s + 1.0)
    assert cost.send_time(1e9, *world) == pytest.approx(cost.params.inter_host_latency_s + 1.0)


def test_the_disaggregated_search_hands_off_across_a_worldless_pair_at_its_bandwidth() -> None:
    model = MODELS["llama-2-7b"]
    fast = planner.plan(_two_hosts(gbit_s=10.0), model, WORKLOAD)
    assert sorted((role, tuple(hosts)) for role, hosts in _hosts(fast, _two_hosts())) in (
        [("decode", ("a",)), ("prefill", ("b",))],
        [("decode", ("b",)), ("prefill", ("a",))],
    )
    assert any(isinstance(f.src, int) and isinstance(f.dst, int) and f.rate > 0 for f in fast.flows)
    free = planner.plan(_two_hosts(gbit_s=10.0, worldless=False), model, WORKLOAD)
    assert (fast.groups, fast.throughput) == (free.groups, free.throughput), "the best plan spanned nothing"
    slow = planner.plan(_two_hosts(gbit_s=UNMEASURED_GB_S["relayed"] * 8), model, WORKLOAD)
    assert 0 < slow.throughput < fast.throughput, "the hand-off moves at the pair's bandwidth"


def _stage_hosts(plan: Plan, host: dict[int, str]) -> list[list[set[str]]]:
    """Each group's stages as the hosts (or peers) of their GPUs."""
    return [[{host[g] for g in st.gpus} for st in group.stages] for group in plan.groups]


def test_a_model_that_needs_both_hosts_is_served_by_one_group_bridged_between_its_stages() -> None:
    model = MODELS["opt-30b"]  # 60 GB of weights and 32 requests' KV: no A100 (80 GB) holds them alone
    host = {g.id: g.host for g in _two_hosts().gpus}
    direct = planner.plan_live(_two_hosts(worldless=False), model, WORKLOAD)
    bridged = planner.plan_live(_two_hosts(), model, WORKLOAD)
    assert _stage_hosts(bridged, host) == [[{"a"}, {"b"}]] and _stage_hosts(direct, host) == [[{"a"}, {"b"}]]
    assert 0 < bridged.throughput < direct.throughput, "the daemons carry its boundary, slower than a world"
    outcome = compute_plan(_given("opt-30b"))  # A and B relayed, unmeasured: the slowest figure
    assert outcome.plan is not None and outcome.error is None and outcome.throughput > 0
    assert outcome.blocked == ()
    peer = {k: p for k, (p, _) in outcome.gpus.items()}
    assert _stage_hosts(outcome.plan, peer) == [[{A}, {B}]]
    state = swarm_state(FakeClock())
    given = _given("opt-30b")
    body = Coordination(state, new_identity(), None, adoption_of(state)).body(outcome, given, [A, B], 1)
    assert body.exchange == "libp2p" and body.bridged_groups == (0,) and body.gloo_groups == ()
    assert [(link.use, link.kind, link.transport) for link in body.links] == [("stage", "relayed", "libp2p")]
    direct_outcome = compute_plan(_given("opt-30b", kind="direct"))
    assert direct_outcome.plan is not None and len(direct_outcome.plan.groups) == 1
    body = Coordination(state, new_identity(), None, adoption_of(state)).body(
        direct_outcome, _given("opt-30b", kind="direct"), [A, B], 1
    )
    assert body.exchange == "torch" and body.bridged_groups == () and body.links[0].transport == "torch"


def test_the_planner_bridges_a_pair_only_where_it_pays() -> None:
    model = MODELS["opt-30b"]  # two A100s hold a replica
    hosts = [HostSpec(name, "A100", 1) for name in "abc"]
    alone = planner.plan_live(build_cluster(hosts[:2], 10.0), model, WORKLOAD).throughput  # a and b only

    def plans(gbps: float) -> tuple[Plan, Plan, Cluster]:
        """c linked to a and b at ``gbps``: the plan were the links direct, and with them relayed."""
        cluster = build_cluster(hosts, 10.0, {("a", "c"): gbps, ("b", "c"): gbps})
        apart = cluster.with_worldless([("a", "c"), ("b", "c")])
        return planner.plan_live(cluster, model, WORKLOAD), planner.plan_live(apart, model, WORKLOAD), apart

    free, bridged, apart = plans(10.0)  # c measured as fast as a and b's direct link: bridging it pays
    assert any(apart.spans_worldless(group.gpus) for group in bridged.groups)
    assert alone < bridged.throughput < free.throughput  # c adds capacity, and its bridge costs some
    _, plan, apart = plans(0.2)  # a slow relay: c is not worth its boundary
    assert not any(apart.spans_worldless(group.gpus) for group in plan.groups)
    assert plan.throughput == pytest.approx(alone)


def test_partition_cuts_a_worldless_pair_however_fast_it_is() -> None:
    hosts = [HostSpec(name, "A100", 1) for name in "abcd"]
    fast = {("a", "b"): 400.0, ("c", "d"): 400.0}
    cluster = build_cluster(hosts, 1.0, fast)
    usable = [1.0] * 4  # two GPUs hold a replica
    assert sorted(partition(cluster, range(4), 2, 2.0, usable)) == [[0, 1], [2, 3]]
    apart = partition(cluster.with_worldless([("a", "b"), ("c", "d")]), range(4), 2, 2.0, usable)
    assert sorted(len(part) for part in apart) == [2, 2]
    assert all({0, 1} - set(part) and {2, 3} - set(part) for part in apart)
    sub, _ = cluster.with_worldless([("a", "b"), ("c", "d")]).subset([0, 1, 2])
    assert sub.worldless == {frozenset("ab")}


def test_needs_pair_lets_a_hand_off_or_a_stage_boundary_cross_a_worldless_pair_but_no_stage() -> None:
    peer = {0: "a", 1: "b"}
    split = Plan(
        (Group(0, "prefill", (Stage((0,), (0, 4)),), 1.0, 1), Group(1, "decode", (Stage((1,), (0, 4)),), 1.0, 1)),
        (Flow(SOURCE, 0, 1.0), Flow(0, 1, 1.0), Flow(1, SINK, 1.0)),
        1.0,
        "test",
    )
    spanning = Plan((Group(0, "colocated", (Stage((0, 1), (0, 4)),), 1.0, 1),), (), 1.0, "test")
    bridged = Plan((Group(0, "colocated", (Stage((0,), (0, 2)), Stage((1,), (2, 4))), 1.0, 1),), (), 1.0, "test")
    assert needs_pair(split, peer, [], [("a", "b")]) is None
    assert needs_pair(bridged, peer, [], [("a", "b")]) is None
    assert needs_pair(spanning, peer, [], [("a", "b")]) == ("a", "b")
    assert needs_pair(bridged, peer, [("a", "b")], []) == ("a", "b"), "a blocked pair holds no group at all"
    assert needs_pair(split, peer, [("a", "b")], []) == ("a", "b"), "a blocked pair holds no exchange"


@pytest.mark.parametrize("kind", ["relayed", "hole-punched", "outbound"])
def test_a_pinned_prefill_and_decode_across_a_worldless_pair_is_served_over_libp2p(kind: str) -> None:
    given = _given(kind=kind, pinned=parse_pinned(SPLIT, 32))
    outcome = compute_plan(given)
    assert outcome.plan is not None and outcome.error is None and outcome.plan.meta["planner"] == "pinned"
    gpu_peer = {k: peer for k, (peer, _) in outcome.gpus.items()}
    assert [(link.peers, link.use, link.kind) for link in plan_links(outcome.plan, gpu_peer, given.link_kinds)] == [
        ((A, B), "handoff", kind)
    ]
    state = swarm_state(FakeClock())
    body = Coordination(state, new_identity(), None, adoption_of(state)).body(outcome, given, [A, B], 1)
    assert body.exchange == "libp2p" and body.blocked == ()
    direct = compute_plan(_given(kind="direct", pinned=parse_pinned(SPLIT, 32)))
    assert exchange_transport(direct.plan, gpu_peer, {(A, B): "direct"}) == "torch"


def test_a_pinned_tp_stage_across_a_worldless_pair_is_refused_and_the_planner_serves() -> None:
    spanning = '[[groups]]\nrole = "colocated"\nstages = [{ gpus = ["a", "b"], layers = [0, 32] }]\n'
    outcome = compute_plan(_given(pinned=parse_pinned(spanning, 32)))
    assert outcome.plan is not None and outcome.plan.meta["planner"] != "pinned"
    assert outcome.error == f"not serving the pinned plan: peers {A} and {B} are linked only through a relay; " + (
        "a stage's world needs direct TCP"
    )
    assert all(len({outcome.gpus[g][0] for g in group.gpus}) == 1 for group in outcome.plan.groups)


@pytest.mark.parametrize("kind", ["relayed", "hole-punched"])
def test_a_pinned_group_with_a_stage_on_each_side_of_a_worldless_pair_is_served_bridged(kind: str) -> None:
    stages = '[{ gpus = ["a"], layers = [0, 16] }, { gpus = ["b"], layers = [16, 32] }]'
    given = _given(kind=kind, pinned=parse_pinned(f'[[groups]]\nrole = "colocated"\nstages = {stages}\n', 32))
    outcome = compute_plan(given)
    assert outcome.plan is not None and outcome.error is None and outcome.plan.meta["planner"] == "pinned"
    gpu_peer = {k: peer for k, (peer, _) in outcome.gpus.items()}
    assert _stage_hosts(outcome.plan, gpu_peer) == [[{A}, {B}]]
    assert bridged_groups(outcome.plan, gpu_peer, given.link_kinds) == (0,)
    assert exchange_transport(outcome.plan, gpu_peer, given.link_kinds) == "libp2p", "no prefill group, a bridge"


def test_the_exchange_is_libp2p_exactly_when_a_prefill_plan_has_ranks_on_a_worldless_pair() -> None:
    gpu_peer = {0: A, 1: B, 2: C}

    def plan(*groups: tuple[Role, int]) -> Plan:
        made = tuple(Group(i, role, (Stage((gpu,), (0, 4)),), 1.0, 1) for i, (role, gpu) in enumerate(groups))
        return Plan(made, (), 1.0, "test")

    split = plan(("prefill", 0), ("decode", 1))
    assert exchange_transport(split, gpu_peer, {(A, B): "relayed"}) == "libp2p"
    assert exchange_transport(split, gpu_peer, {(A, B): "hole-punched"}) == "libp2p"
    assert exchange_transport(split, gpu_peer, {(A, B): "direct"}) == "torch"
    assert exchange_transport(split, gpu_peer, {(A, C): "relayed", (B, C): "relayed"}) == "torch", "C hosts no rank"
    with_c = plan(("prefill", 0), ("decode", 1), ("colocated", 2))
    assert exchange_transport(with_c, gpu_peer, {(A, B): "direct", (B, C): "hole-punched"}) == "libp2p"
    colocated = plan(("colocated", 0), ("colocated", 1))
    assert exchange_transport(colocated, gpu_peer, {(A, B): "relayed"}) == "torch", "no hand-off at all"
    assert exchange_transport(None, gpu_peer, {(A, B): "relayed"}) == "torch"


def test_the_bridged_groups_are_those_spanning_a_worldless_pair_and_need_libp2p_without_a_prefill_group() -> None:
    gpu_peer = {0: A, 1: B, 2: C, 3: C}
    two = (Stage((0,), (0, 2)), Stage((1,), (2, 4)))
    groups = (
        Group(0, "colocated", (Stage((2,), (0, 4)),), 1.0, 1),
        Group(1, "colocated", two, 1.0, 1),
        Group(2, "colocated", (Stage((3,), (0, 4)),), 1.0, 1),
    )
    plan = Plan(groups, (), 1.0, "test")
    for kind in ("relayed", "hole-punched"):
        assert bridged_groups(plan, gpu_peer, {(A, B): kind}) == (1,)
        assert exchange_transport(plan, gpu_peer, {(A, B): kind}) == "libp2p"
    assert bridged_groups(plan, gpu_peer, {(A, B): "direct", (A, C): "relayed"}) == ()
    assert exchange_transport(plan, gpu_peer, {(A, B): "direct", (A, C): "relayed"}) == "torch"
    assert bridged_groups(plan, gpu_peer, {}) == () and bridged_groups(None, gpu_peer, {(A, B): "relayed"}) == ()
    # group 2's stages on C and A, behind a hole punch: both bridged, in id order
    both = Plan((*groups[:2], Group(2, "colocated", (Stage((3,), (0, 2)), Stage((4,), (2, 4))), 1.0, 1)), (), 1.0, "t")
    assert bridged_groups(both, gpu_peer | {4: A}, {(A, B): "relayed", (A, C): "hole-punched"}) == (1, 2)


def test_the_planner_is_told_a_probe_figure_else_a_conservative_one_and_blocked_pairs_carry_nothing() -> None:
    peers = [PeerHardware(peer, peer[-1].lower(), simulated_profile("A100x1")) for peer in (A, B, C)]
    kinds = {(A, B): "relayed", (A, C): "hole-punched", (B, C): "direct"}
    given = PlanningInput(MODELS["llama-2-7b"], peers, [], link_kinds=kinds)
    figures = {frozenset((link.a, link.b)): link.gb_s for link in given.planner_links()}
    assert figures == {
        frozenset((A, B)): UNMEASURED_GB_S["relayed"],
        frozenset((A, C)): UNMEASURED_GB_S["hole-punched"],
    }
    probe = LinkMeasurement(B, A, 0.05, 20.0)
    blocked = BlockedLink((A, C), "a world failed", ((), ()))
    given = PlanningInput(MODELS["llama-2-7b"], peers, [probe], [blocked], link_kinds=kinds)
    assert given.worldless().keys() == {(A, B)}, "a blocked pair is blocked, not worldless"
    figures = {frozenset((link.a, link.b)): link.gb_s for link in given.planner_links()}
    assert figures == {frozenset((A, B)): probe.gb_s, frozenset((A, C)): BLOCKED_LINK_GB_S}


def test_a_relay_is_named_only_where_the_ends_circuit_addresses_narrow_it_to_one() -> None:
    def via(*relays: str) -> list[str]:
        return ["/ip4/10.0.0.9/tcp/4001", *(f"/ip4/1.2.3.4/tcp/4001/p2p/{r}/p2p-circuit" for r in relays)]

    kinds = {(A, B): "relayed", (A, C): "relayed", (B, C): "hole-punched"}
    assert pair_relays(kinds, {A: via("R1", "R2"), B: via("R2"), C: via("R1", "R2")}) == {(A, B): "R2"}, "A-C: two"
    assert pair_relays(kinds, {A: via(), B: via("R1"), C: via("R3")}) == {(A, B): "R1", (A, C): "R3"}
    assert pair_relays({(A, B): "relayed"}, {A: via("R1"), B: via("R2")}) == {}, "either relay may carry it"
    assert pair_relays(kinds, {A: ["/p2p-circuit", "garbage"], B: []}) == {}


def test_relayed_hand_offs_share_the_relays_nic() -> None:
    model = MODELS["llama-2-7b"]
    free = _two_hosts(gbit_s=8.0)
    relayed = free.with_relays({("a", "b"): "r"}).with_nics({"r": Nic(0.01, 0.01)})
    assert relayed.relay_hosts == ["r"] and free.relay_hosts == []
    open_relay, tight = planner.plan(free, model, WORKLOAD), planner.plan(relayed, model, WORKLOAD)
    assert 0 < tight.throughput < open_relay.throughput, "the relay's NIC caps the hand-off"
    loads = plan_loads(tight, CostModel(relayed, model, LengthStats.of(WORKLOAD)))
    assert 0 < loads["r", "in"] == loads["r", "out"] <= relayed.nics["r"].ingress * 1e9 * (1 + 1e-6)
    for cluster, turns in ((free, 1), (relayed, 2)):  # the other direction waits for the relay, not a NIC
        queue = NicQueue(cluster)
        one = queue.reserve({("a", "b"): 1e7}, 0.0)
        assert queue.reserve({("b", "a"): 1e7}, 0.0) == pytest.approx(turns * one)


def test_a_bridged_boundary_across_a_relayed_pair_shares_the_relays_nic() -> None:
    model = MODELS["opt-30b"]  # one replica across both hosts, bridged
    relayed = _two_hosts(gbit_s=8.0).with_relays({("a", "b"): "r"})
    tight = relayed.with_nics({"r": Nic(0.01, 0.01)})
    open_relay, capped = planner.plan_live(relayed, model, WORKLOAD), planner.plan_live(tight, model, WORKLOAD)
    host = {g.id: g.host for g in relayed.gpus}
    assert _stage_hosts(open_relay, host) == _stage_hosts(capped, host) == [[{"a"}, {"b"}]]
    assert 0 < capped.throughput < open_relay.throughput, "the relay's NIC caps the boundary's activations"
    loads = plan_loads(capped, CostModel(tight, model, LengthStats.of(WORKLOAD)))
    assert 0 < loads["r", "in"] == loads["r", "out"] <= tight.nics["r"].ingress * 1e9 * (1 + 1e-6)


def test_the_coordinator_charges_a_relay_its_adverts_name() -> None:
    probes = [LinkMeasurement(A, B, 0.05, 30.0), LinkMeasurement(A, C, 0.004, 1.0), LinkMeasurement(B, C, 0.004, 1.0)]
    base = _given(pinned=parse_pinned(SPLIT, 32))
    relay = PeerHardware(C, "c", dataclasses.replace(simulated_profile("A100x1"), gpus=()))
    given = dataclasses.replace(base, peers=[*base.peers, relay], links=probes, relays={(A, B): C})
    outcome = compute_plan(given)
    assert outcome.plan is not None and outcome.reusable is not None and outcome.error is None
    cluster = outcome.reusable[1]
    assert cluster.relays == {frozenset((A, B)): C} and cluster.nics[C] == Nic(0.004, 0.004)
    loads = plan_loads(outcome.plan, CostModel(cluster, MODELS["llama-2-7b"], LengthStats.of(WORKLOAD)))
    assert loads[C, "in"] == loads[C, "out"] == loads[A, "out"] > 0
    unnamed = compute_plan(dataclasses.replace(given, relays={}))
    assert unnamed.reusable is not None and unnamed.reusable[1].relays == {} and C not in unnamed.reusable[1].nics
