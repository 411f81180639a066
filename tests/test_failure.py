"""The pure rules of worlds that cannot form: the reported cause, the blocked-pair memory, the colocated
fallback plan, the check that sends a plan there, and how long a request may wait."""

from __future__ import annotations

import dataclasses

import pytest

from hexgen.coordinator.cluster import HostSpec, build_cluster
from hexgen.coordinator.evaluate import PlanError
from hexgen.coordinator.fallback import colocated_plan, needs_pair
from hexgen.coordinator.plan import SINK, SOURCE, Group, Plan, Stage
from hexgen.coordinator.specs import MODELS
from hexgen.coordinator.workload import synthetic
from hexgen.daemon.failure import (
    BLOCK_TTL_S,
    BlockedLinks,
    FailureReport,
    WorldFailure,
    advert_ips,
    blocked_pair,
)
from hexgen.engine.formation import WorldFormationError, remote_address

GLOO_REFUSED = (
    "Gloo connectFullMesh failed with [/x/gloo/transport/tcp/pair.cc:152] timed out connecting: "
    "SO_ERROR: Connection refused, remote=[10.0.0.2]:256$0"
)


def test_gloo_error_names_the_unreachable_address():
    assert remote_address(GLOO_REFUSED) == "10.0.0.2"
    assert remote_address("remote=[fe80::1]:4000") == "fe80::1"
    assert remote_address("Connect timeout [none]") is None
    assert remote_address("remote=[none]:1 then Read error [10.0.0.3]:10118: Connection reset by peer") == "10.0.0.3"
    error = WorldFormationError("replica world", "connect", GLOO_REFUSED)
    assert error.remote == "10.0.0.2" and "cannot reach 10.0.0.2" in str(error)


def test_failure_report_round_trips_and_refuses_bad_bodies():
    report = FailureReport(1, 4, 0, "boom", ("a", "b"), WorldFailure("replica world", "connect", "10.0.0.2"))
    assert FailureReport.from_wire(report.to_wire()) == report
    plain = FailureReport(1, 4, 2, "worker exited")
    assert FailureReport.from_wire(plain.to_wire()) == plain
    for bad in [
        None,
        [],
        {"term": 1, "epoch": "4", "rank": 0},
        {"term": 1, "epoch": 4, "rank": True},
        {"term": 1, "epoch": 4, "rank": 0, "cause": {"world": "moon", "stage": "connect"}},
        {"term": 1, "epoch": 4, "rank": 0, "cause": {"world": "replica world", "stage": "connect", "remote": "x"}},
        {"term": 1, "epoch": 4, "rank": 0, "peers": "ab", "cause": None},
        {"term": 1, "epoch": 4, "rank": 0, "peers": [1]},
    ]:
        with pytest.raises(ValueError):
            FailureReport.from_wire(bad)
    assert FailureReport.from_wire({"term": 1, "epoch": 4, "rank": 0, "error": 7}).error == ""


def connect_failure(peers: tuple[str, ...], remote: str | None) -> FailureReport:
    return FailureReport(1, 2, 0, "x", peers, WorldFailure("exchange group", "connect", remote))


def test_blocked_pair_maps_the_address_to_a_peer_of_the_world():
    addresses = {"a": ["10.0.0.1"], "b": ["10.0.0.2"], "c": ["10.0.0.3"]}
    assert blocked_pair("a", connect_failure(("a", "b", "c"), "10.0.0.3"), addresses) == ("a", "c")
    assert blocked_pair("c", connect_failure(("a", "b", "c"), "10.0.0.1"), addresses) == ("a", "c")
    # the address fits nobody, or several peers (one machine): only a world of two still names the other
    assert blocked_pair("a", connect_failure(("a", "b", "c"), "10.9.9.9"), addresses) is None
    same = {"a": ["127.0.0.1"], "b": ["127.0.0.1"], "c": ["127.0.0.1"]}
    assert blocked_pair("b", connect_failure(("a", "b"), "127.0.0.1"), same) == ("a", "b")
    assert blocked_pair("b", connect_failure(("a", "b", "c"), "127.0.0.1"), same) is None
    # a world of two whose address fits nobody (NAT) still names the other peer
    assert blocked_pair("a", connect_failure(("a", "b"), "10.9.9.9"), addresses) == ("a", "b")
    # no address: a bare timeout (a peer crashed or was slow while forming) says nothing about the link
    assert blocked_pair("b", connect_failure(("a", "b"), None), same) is None
    assert blocked_pair("a", connect_failure(("a", "b", "c"), None), addresses) is None
    # not a connect failure: a worker that crashed, or ranks that never arrived, blocks no link
    assert blocked_pair("a", FailureReport(1, 2, 0, "oom", ("a", "b")), addresses) is None
    late = FailureReport(1, 2, 0, "x", ("a", "b"), WorldFailure("replica world", "arrive"))
    assert blocked_pair("a", late, addresses) is None


def test_blocked_links_last_until_an_advert_changes_its_addresses():
    links = BlockedLinks()
    addresses = {"a": ["10.0.0.1"], "b": ["10.0.0.2"], "c": ["10.0.0.3"]}
    assert links.block(("b", "a"), "refused", addresses, now=0.0)
    assert not links.block(("a", "b"), "refused again", addresses, now=1.0)
    assert [link.pair for link in links.among(["a", "b", "c"])] == [("a", "b")]
    assert links.among(["a", "c"]) == []
    assert links.refresh(addresses, now=2.0) == []
    assert links.refresh({"a": ["10.0.0.1"]}, now=3.0) == []  # b is away for now: the pair stays blocked
    assert links.refresh({"a": ["10.0.0.1"], "b": ["10.0.0.2", "10.1.0.2"]}, now=4.0) == [("a", "b")]
    assert links.among(["a", "b"]) == []


def test_blocked_links_expire_so_a_host_back_on_the_same_addresses_is_tried_again():
    links = BlockedLinks()
    addresses = {"a": ["10.0.0.1"], "b": ["10.0.0.2"]}
    assert links.block(("a", "b"), "refused", addresses, now=100.0)
    assert links.refresh(addresses, now=100.0 + BLOCK_TTL_S - 1) == []  # unchanged addresses, not yet expired
    assert links.refresh({}, now=100.0 + BLOCK_TTL_S) == [("a", "b")]  # expired, even with a peer away
    assert links.among(["a", "b"]) == []
    # blocked again after the expiry: a new block, with a new reason
    assert links.block(("a", "b"), "refused once more", addresses, now=800.0)
    assert links.links[("a", "b")].reason == "refused once more"
    # an expired pair not yet swept may be blocked again at once
    assert links.block(("a", "b"), "later", addresses, now=800.0 + BLOCK_TTL_S)


def test_advert_ips():
    addrs = ["/ip4/127.0.0.1/tcp/4001/p2p/Qm", "/ip6/::1/tcp/1", "/dns4/x/tcp/1", "/ip4/nope/tcp/1", 7]
    assert advert_ips(addrs) == ["127.0.0.1", "::1"]


def test_colocated_fallback_puts_one_replica_on_each_host_that_can_hold_one():
    cluster = build_cluster([HostSpec("h0", "A100", 2), HostSpec("h1", "L40", 1), HostSpec("h2", "A6000", 1)])
    model = MODELS["llama-2-7b"]
    plan = colocated_plan(cluster, model, synthetic("default", 256, 64, count=16))
    hosts = cluster.hosts
    by_host = {cluster.gpus[g.gpus[0]].host for g in plan.groups}
    assert all(g.role == "colocated" for g in plan.groups)
    assert by_host == {"h0", "h1", "h2"}, "each host holds a 7B replica"
    for group in plan.groups:
        assert len({cluster.gpus[gpu].host for gpu in group.gpus}) == 1, "no group crosses a host"
        assert set(group.gpus) <= set(hosts[cluster.gpus[group.gpus[0]].host])
    assert {f.dst for f in plan.flows if f.src == SOURCE} == {g.id for g in plan.groups}
    assert {f.src for f in plan.flows if f.dst == SINK} == {g.id for g in plan.groups}
    assert plan.meta["planner"] == "colocated-fallback"
    assert Plan.from_dict(plan.to_dict()).groups == plan.groups
    tiny = build_cluster([HostSpec("t", "A6000", 1)])
    with pytest.raises(PlanError, match="no host can hold"):
        colocated_plan(tiny, MODELS["llama-2-70b"], synthetic("default", 256, 64, count=16))


def test_needs_pair_sees_groups_and_exchanges_that_span_a_blocked_pair():
    peer = {0: "a", 1: "b", 2: "c"}

    def plan(*groups: tuple[str, tuple[int, ...]]) -> Plan:
        made = tuple(Group(i, role, (Stage(gpus, (0, 4)),), 1.0, 1) for i, (role, gpus) in enumerate(groups))
        return Plan(made, (), 1.0, "")

    assert needs_pair(plan(("colocated", (0, 1))), peer, [("a", "b")]) == ("a", "b")
    assert needs_pair(plan(("colocated", (0,)), ("colocated", (1,))), peer, [("a", "b")]) is None
    split = plan(("prefill", (0,)), ("decode", (1,)))
    assert needs_pair(split, peer, [("a", "b")]) == ("a", "b"), "the exchange group spans a and b"
    assert needs_pair(split, peer, [("a", "c")]) is None
    assert needs_pair(plan(("prefill", (0,)), ("decode", (2,)), ("colocated", (1,))), peer, [("b", "c")])


def test_request_patience_counts_from_the_latest_token_and_says_why():
    from hexgen.daemon.patience import Patience

    patience = Patience(30.0, since=100.0)
    assert patience.deadline == 130.0 and patience.hop_silence_s == 15.0
    patience.progress(112.0)
    assert patience.deadline == 142.0
    assert patience.message(None, None) == "no replica took the request within 30 s"
    text = patience.message("no word from replica 1 for 15 s", "peers a and b cannot form a world")
    assert text == (
        "no replica took the request within 30 s (last attempt: no word from replica 1 for 15 s); "
        "the coordinator says: peers a and b cannot form a world"
    )


def test_the_coordinator_plans_around_a_blocked_pair_and_falls_back_after_repeated_failures():
    from hexgen.coordinator.pinned import parse_pinned
    from hexgen.coordinator.specs import resolve_model
    from hexgen.daemon.cluster_view import PeerHardware
    from hexgen.daemon.failure import BlockedLinks
    from hexgen.daemon.hardware import simulated_profile
    from hexgen.daemon.planning import MAX_FAILURE_REPLANS, PlanningInput, compute_plan

    pinned = parse_pinned('[[groups]]\nrole = "colocated"\nstages = [{ gpus = ["a", "b"], layers = [0, 32] }]\n')
    a, b = "12D3KooWPeerA", "12D3KooWPeerB"
    peers = [PeerHardware(a, "a", simulated_profile("A100x1")), PeerHardware(b, "b", simulated_profile("A100x1"))]
    given = PlanningInput(resolve_model("llama-2-7b"), peers, [], pinned=pinned)
    outcome = compute_plan(given)
    assert outcome.error is None and outcome.plan is not None and len(outcome.plan.groups) == 1, "TP=2 spans both"
    blocked = BlockedLinks()
    blocked.block((a, b), "peers a and b cannot form a world: refused at 10.0.0.2", {}, 0.0)
    outcome = compute_plan(dataclasses.replace(given, blocked=blocked.among([a, b])))
    assert outcome.error == "not serving the pinned plan: peers a and b cannot form a world: refused at 10.0.0.2"
    assert [(p.peers, p.reason) for p in outcome.blocked] == [
        ((a, b), "peers a and b cannot form a world: refused at 10.0.0.2")
    ]
    assert outcome.plan is not None
    for group in outcome.plan.groups:
        assert len({outcome.gpus[g][0] for g in group.gpus}) == 1
    if any(g.role == "prefill" for g in outcome.plan.groups):
        raise AssertionError("an exchange group would span the blocked pair")
    outcome = compute_plan(dataclasses.replace(given, failures=MAX_FAILURE_REPLANS))
    assert outcome.plan is not None and outcome.plan.meta["planner"] == "colocated-fallback"
    assert outcome.error is not None
    assert outcome.error.startswith(f"{MAX_FAILURE_REPLANS} worker failures in this membership; serving colocated")
    assert outcome.reusable is None, "a fallback is not a plan to re-plan from"
