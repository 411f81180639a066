"""Links carry their kind into planning: relayed and hole-punched pairs hold no world (no stage spans them) but
may carry KV hand-offs, the plan records the kind of link of each pair it moves model data over, and the
messages parse it once."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from hexgen.coordinator.fallback import needs_pair
from hexgen.coordinator.plan import SINK, SOURCE, Flow, Group, Plan, Stage
from hexgen.coordinator.specs import MODELS
from hexgen.daemon.cluster_view import PeerHardware
from hexgen.daemon.hardware import simulated_profile
from hexgen.daemon.messages import MAX_CONNECTIONS, Advert, MessageError, PlanBody, PlanLink
from hexgen.daemon.pair_links import outbound_pairs, pair_kinds, plan_links
from hexgen.daemon.planning import PlanningInput, PlanOutcome, compute_plan

A, B, C = "12D3KooWPeerA", "12D3KooWPeerB", "12D3KooWPeerC"


def _given(
    model: str = "llama-2-13b", gpus: tuple[str, ...] = ("A100x1", "A100x1", "A100x2"), **kinds: str
) -> PlanningInput:
    """Hosts A, B, C with ``gpus``; ``kinds`` maps "AB"-style pair names to their kind of link. The default
    swarm's best plan spans A and B."""
    peers = [PeerHardware(p, p[-1].lower(), simulated_profile(spec)) for p, spec in zip((A, B, C), gpus, strict=True)]
    named = {"A": A, "B": B, "C": C}
    link_kinds = {}
    for name, kind in kinds.items():
        x, y = sorted((named[name[0]], named[name[1]]))
        link_kinds[x, y] = kind
    return PlanningInput(MODELS[model], peers, [], link_kinds=link_kinds)


def _peers_of(outcome: PlanOutcome, group: Group) -> set[str]:
    return {outcome.gpus[g][0] for g in group.gpus}


def test_the_more_direct_report_of_a_pair_wins_and_nonsense_is_left_out() -> None:
    reports = {A: {B: "relayed", C: "direct", A: "direct"}, B: {A: "hole-punched"}, C: {A: "relayed", B: "warp"}}
    assert pair_kinds(reports) == {(A, B): "hole-punched", (A, C): "direct"}


def test_a_direct_pair_of_a_public_and_a_private_member_is_outbound_only() -> None:
    """A public member and a private one linked directly: the private one dialled out, so the pair carries no
    world. Two private members linked directly share a LAN; one end that does not know is taken as dialable;
    a pair already worldless keeps its kind."""
    kinds = {(A, B): "direct", (A, C): "direct", (B, C): "direct"}
    said = {A: "public", B: "private", C: "private"}
    assert outbound_pairs(kinds, said) == {(A, B): "outbound", (A, C): "outbound", (B, C): "direct"}
    assert outbound_pairs(kinds, {A: "public", B: "unknown"}) == kinds
    assert outbound_pairs({(A, B): "relayed"}, said) == {(A, B): "relayed"}
    plan = Plan(
        (Group(0, "colocated", (Stage((0,), (0, 16)), Stage((1,), (16, 32))), 1.0, 8),),
        (Flow(SOURCE, 0, 1.0), Flow(0, SINK, 1.0)),
        1.0,
        "test",
    )
    (link,) = plan_links(plan, {0: A, 1: B}, outbound_pairs(kinds, said))
    assert link.kind == "outbound" and PlanLink.from_wire(link.to_wire()) == link


@pytest.mark.parametrize("kind", ["relayed", "hole-punched", "outbound"])
def test_a_pair_that_cannot_carry_a_world_is_in_no_group_and_not_blocked(kind: str) -> None:
    free = compute_plan(_given())
    assert free.plan is not None
    gpu_peer = {k: peer for k, (peer, _) in free.gpus.items()}
    spanning = [
        pair for pair in itertools.combinations(sorted({A, B, C}), 2) if needs_pair(free.plan, gpu_peer, [pair])
    ]
    assert spanning, "the unconstrained plan must use some pair for this test to mean anything"
    a, b = spanning[0]
    names = {A: "A", B: "B", C: "C"}
    outcome = compute_plan(_given(**{names[a] + names[b]: kind}))
    assert outcome.plan is not None and outcome.error is None
    gpu_peer = {k: peer for k, (peer, _) in outcome.gpus.items()}
    assert needs_pair(outcome.plan, gpu_peer, [], [(a, b)]) is None
    assert not any({a, b} <= _peers_of(outcome, group) for group in outcome.plan.groups)
    assert all(link.use == "handoff" for link in plan_links(outcome.plan, gpu_peer, {}) if link.peers == (a, b))
    assert outcome.blocked == ()


def test_a_swarm_linked_only_through_relays_keeps_every_group_on_one_host() -> None:
    outcome = compute_plan(_given(AB="relayed", AC="relayed", BC="relayed"))
    assert outcome.plan is not None and outcome.throughput > 0
    assert [len(_peers_of(outcome, g)) for g in outcome.plan.groups] == [1] * len(outcome.plan.groups)
    gpu_peer = {k: peer for k, (peer, _) in outcome.gpus.items()}
    assert {link.use for link in plan_links(outcome.plan, gpu_peer, {})} <= {"handoff"}
    assert outcome.blocked == ()


def test_the_plan_names_the_kind_of_link_of_each_stage_boundary_and_hand_off() -> None:
    prefill = Group(0, "prefill", (Stage((0,), (0, 16)), Stage((1,), (16, 32))), 1.0, 8)
    decode = Group(1, "decode", (Stage((2,), (0, 32)),), 1.0, 8)
    flows = (Flow(SOURCE, 0, 1.0), Flow(0, 1, 1.0), Flow(1, SINK, 1.0))
    plan = Plan((prefill, decode), flows, 1.0, "test")
    kinds = {(A, B): "direct", (A, C): "relayed"}
    links = plan_links(plan, {0: A, 1: B, 2: C}, kinds)
    assert set(links) == {
        PlanLink((A, B), "stage", "direct", (0, 0)),
        PlanLink((A, C), "handoff", "relayed", (0, 1)),
        PlanLink((B, C), "handoff", "unknown", (0, 1)),
    }
    body = PlanBody(term=1, epoch=2, members=(A, B, C), plan=plan, links=links)
    assert PlanBody.from_wire(body.to_wire()) == body


@pytest.mark.parametrize(
    "link",
    [
        {"peers": [A], "use": "stage", "kind": "direct", "groups": [0, 0]},
        {"peers": [A, B], "use": "teleport", "kind": "direct", "groups": [0, 0]},
        {"peers": [A, B], "use": "stage", "kind": "carrier-pigeon", "groups": [0, 0]},
        {"peers": [A, B], "use": "stage", "kind": "direct", "groups": [0, "1"]},
        {"peers": [A, B], "use": ["stage"], "kind": "direct", "groups": [0, 0]},
        "direct",
    ],
)
def test_a_malformed_plan_link_is_refused(link: object) -> None:
    wire = PlanBody(term=1, epoch=1, members=(A,)).to_wire() | {"links": [link]}
    with pytest.raises(MessageError):
        PlanBody.from_wire(wire)


def test_an_advert_carries_its_links_kinds_and_refuses_bad_ones() -> None:
    advert = Advert((), simulated_profile("A100x2"), "a", connections={B: "hole-punched", C: "relayed"})
    assert Advert.from_wire(advert.to_wire()) == advert
    assert "connections" not in dataclasses.replace(advert, connections={}).to_wire()
    wire = advert.to_wire()
    too_many = {f"12D3KooWPeer{i}": "direct" for i in range(MAX_CONNECTIONS + 1)}
    for bad in ({B: "tunnelled"}, {B: 1}, {"": "direct"}, [B, "direct"], too_many, {B: ["direct"]}):
        with pytest.raises(MessageError):
            Advert.from_wire(wire | {"connections": bad})
