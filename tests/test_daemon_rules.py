"""The control plane's rules, each part on its own: a fake clock, a fake host, no process and no network."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import msgpack
import pytest
import trio

from hexgen.daemon.adverts import Adverts
from hexgen.daemon.config import ConfigError, NodeConfig
from hexgen.daemon.connectivity import Connectivity
from hexgen.daemon.coordination import Coordination
from hexgen.daemon.election import Lease
from hexgen.daemon.envelope import seal, to_wire
from hexgen.daemon.failure import FailureReport, WorldFailure
from hexgen.daemon.gossip import GossipIntake, Routes
from hexgen.daemon.hardware import simulated_profile
from hexgen.daemon.host import new_identity
from hexgen.daemon.liveness import Liveness
from hexgen.daemon.messages import Advert, PlanBody
from hexgen.daemon.node_key import peer_id_of
from hexgen.daemon.planning import MAX_FAILURE_REPLANS
from hexgen.daemon.reports import Reports
from hexgen.daemon.swarm_state import AdoptedPlan, SwarmState
from hexgen.testing.control import FakeClock, FakeHost, FakeNursery, Recorder, adoption_of, swarm_state

BOB = new_identity()
BOB_ID = peer_id_of(BOB)
CAROL = new_identity()
CAROL_ID = peer_id_of(CAROL)


def advert_of(host: str = "bob", addrs: tuple[str, ...] = ("/ip4/10.0.0.2/tcp/4001",)) -> Advert:
    return Advert(addrs=addrs, hardware=simulated_profile("A100"), host=host)


def join(state: SwarmState, key=BOB, host: str = "bob") -> str:
    """Make the signer of ``key`` a member, as its advert would."""
    peer = peer_id_of(key)
    adverts = Adverts(state, new_identity(), dict, lambda: None)
    adverts.apply(seal("advert", advert_of(host).to_wire(), key, 30.0, now=state.clock()), state.clock())
    assert peer in state.table.peers
    return peer


async def no_publish(envelopes) -> None:
    return None


# ------------------------------------------------------------------------------------------------ election


def test_a_lone_node_claims_the_lease_after_its_grace_and_renews_it():
    clock = FakeClock()
    state = swarm_state(clock)
    coordination = Coordination(state, new_identity(), None, adoption_of(state))
    state.claim_after = clock.now + 2.0
    coordination.tick(set())
    assert state.election.coordinator is None, "no claim inside the start-up grace"
    clock.advance(2.0)
    coordination.tick(set())
    assert state.is_coordinator() and state.election.term == 1
    first_expiry = state.election.lease.expires
    clock.advance(5.0)
    coordination.tick(set())
    assert state.election.lease.expires > first_expiry and state.election.term == 1, "renewed, same term"
    assert [e["kind"] for e in state.events] == ["election"]


def test_a_member_unheard_of_for_the_peer_timeout_expires_unless_connected():
    clock = FakeClock()
    state = swarm_state(clock, NodeConfig(peer_timeout_s=10.0))
    coordination = Coordination(state, new_identity(), None, adoption_of(state))
    join(state, BOB)
    join(state, CAROL, "carol")
    clock.advance(11.0)
    coordination.tick(connected={CAROL_ID})
    assert set(state.table.peers) == {CAROL_ID}
    assert any(e["kind"] == "leave" and e["peer"] == BOB_ID for e in state.events)


# ------------------------------------------------------------------------------------------------ adoption


def plan_envelope(key, term: int, epoch: int, members: list[str], now: float):
    body = PlanBody(term=term, epoch=epoch, members=tuple(members), error="no GPUs")
    return seal("plan", body.to_wire(), key, 60.0, now=now)


def test_plans_are_adopted_from_the_coordinator_of_the_current_term_only():
    clock = FakeClock()
    state = swarm_state(clock)
    recorder = Recorder()
    adoption = adoption_of(state, recorder)
    join(state, BOB)
    join(state, CAROL, "carol")
    state.election.lease = Lease(BOB_ID, 3, clock.now + 60)
    adoption.apply_plan(plan_envelope(CAROL, 3, 1, [BOB_ID], clock.now))
    assert state.plan is None and state.rejections["not-coordinator"] == 1
    adoption.apply_plan(plan_envelope(BOB, 2, 1, [BOB_ID], clock.now))
    assert state.plan is None and state.rejections["stale-term"] == 1
    adoption.apply_plan(plan_envelope(BOB, 3, 4, [BOB_ID, state.peer_id, "12D3KooWUnknown"], clock.now))
    assert state.plan is not None and (state.plan.term, state.plan.epoch) == (3, 4)
    assert [p.epoch for p in recorder.plans] == [4]
    assert recorder.synced == ["12D3KooWUnknown"], "a member only the coordinator knows is asked for its advert"
    adoption.apply_plan(plan_envelope(BOB, 3, 3, [BOB_ID], clock.now))
    assert state.plan.epoch == 4, "an older epoch of the same holder changes nothing"


def test_a_lease_naming_a_newer_epoch_asks_for_the_plan():
    clock = FakeClock()
    state = swarm_state(clock)
    adoption = adoption_of(state)
    join(state, BOB)
    lease = seal("lease", {"holder": BOB_ID, "term": 1, "epoch": 2}, BOB, 12.0, now=clock.now)
    adoption.apply_lease(lease, clock.now)
    assert state.election.coordinator == BOB_ID and adoption.want_plan.is_set()
    adoption.want_plan = trio.Event()
    state.plan = AdoptedPlan(BOB_ID, PlanBody(term=1, epoch=2, members=(BOB_ID,)))
    adoption.apply_lease(seal("lease", {"holder": BOB_ID, "term": 1, "epoch": 2}, BOB, 12.0, now=clock.now), clock.now)
    assert not adoption.want_plan.is_set(), "the adopted epoch is the lease's"
    with pytest.raises(ValueError, match="holder"):
        adoption.apply_lease(seal("lease", {"holder": CAROL_ID, "term": 2}, BOB, 12.0, now=clock.now), clock.now)


def test_a_push_is_verified_like_gossip():
    clock = FakeClock()
    state = swarm_state(clock)
    adoption = adoption_of(state)
    join(state, BOB)
    lease = seal("lease", {"holder": BOB_ID, "term": 1}, BOB, 12.0, now=clock.now)
    plan = plan_envelope(BOB, 1, 1, [BOB_ID, state.peer_id], clock.now)
    assert adoption.take_push(BOB_ID, [to_wire(lease)]) == {"error": "a push is [lease, plan]"}
    assert "error" in adoption.take_push(CAROL_ID, [to_wire(lease), to_wire(plan)]), "pushed by another peer"
    assert adoption.take_push(BOB_ID, [to_wire(lease), to_wire(plan)]) == {"ok": True}
    assert state.plan is not None and state.plan.coordinator == BOB_ID


# ---------------------------------------------------------------------------------------- re-plan budget


def coordinating(clock: FakeClock) -> tuple[SwarmState, Coordination, Reports]:
    state = swarm_state(clock)
    state.claim_after = clock.now
    coordination = Coordination(state, new_identity(), None, adoption_of(state))
    coordination.tick(set())
    assert state.is_coordinator()
    state.plan = AdoptedPlan(state.peer_id, PlanBody(term=state.election.term, epoch=5, members=(state.peer_id,)))
    return state, coordination, Reports(state, new_identity(), coordination, no_publish)


def test_each_membership_gets_a_bounded_number_of_failure_replans():
    clock = FakeClock()
    state, coordination, reports = coordinating(clock)
    term = state.election.term
    keys = set()
    for _ in range(MAX_FAILURE_REPLANS + 3):
        reports.take_failure(state.peer_id, FailureReport(term, 5, 0, "worker died"))
        keys.add(coordination.planning_key())
    assert coordination.failure_replans == MAX_FAILURE_REPLANS + 1
    assert len(keys) == MAX_FAILURE_REPLANS + 1, "the key stops changing once the budget is spent"
    given = coordination.planning_input()
    assert given.failures == MAX_FAILURE_REPLANS + 1, "the planner is told: it serves the fallback"
    reports.take_failure(state.peer_id, FailureReport(term, 4, 0, "an older epoch's worker"))
    assert coordination.failure_replans == MAX_FAILURE_REPLANS + 1
    join(state, BOB)
    reports.take_failure(state.peer_id, FailureReport(term, 5, 0, "worker died"))
    assert coordination.failure_replans == MAX_FAILURE_REPLANS + 2, "a new membership has a fresh budget"


def test_only_the_coordinator_counts_failures_but_every_node_blocks_the_pair():
    clock = FakeClock()
    state = swarm_state(clock)
    coordination = Coordination(state, new_identity(), None, adoption_of(state))
    reports = Reports(state, new_identity(), coordination, no_publish)
    join(state, BOB)
    state.plan = AdoptedPlan(BOB_ID, PlanBody(term=1, epoch=2, members=(BOB_ID, state.peer_id)))
    state.own_addrs = ["/ip4/10.0.0.1/tcp/4001"]
    cause = WorldFailure("replica world", "connect", "10.0.0.2")
    reports.take_failure(state.peer_id, FailureReport(1, 2, 0, "refused", (state.peer_id, BOB_ID), cause))
    assert coordination.failure_replans == 0
    (link,) = state.blocked.links.values()
    assert set(link.pair) == {state.peer_id, BOB_ID} and "10.0.0.2" in link.reason and "bob" in link.reason


def test_suspects_are_flagged_once_and_left_out_of_the_plan():
    clock = FakeClock()
    state, coordination, reports = coordinating(clock)
    join(state, BOB)
    before = coordination.planning_key()
    reports.apply_suspect(seal("suspect", {"peers": [BOB_ID], "reason": "wrong tokens"}, CAROL, 60.0, now=clock.now))
    reports.apply_suspect(seal("suspect", {"peers": [BOB_ID], "reason": "again"}, CAROL, 60.0, now=clock.now))
    assert state.flagged[BOB_ID]["reason"] == "wrong tokens"
    assert coordination.planning_key() != before
    assert [p.peer_id for p in coordination.peer_hardware()] == [state.peer_id]


# ----------------------------------------------------------------------------------------- silent peers


def test_a_silent_member_is_dropped_watched_and_forgotten_after_the_peer_timeout():
    clock = FakeClock()
    state = swarm_state(clock, NodeConfig(peer_timeout_s=30.0))
    host = FakeHost()
    liveness = Liveness(state, host, Connectivity(state, host, Adverts(state, new_identity(), dict, lambda: None), 0))
    join(state, BOB)
    assert liveness.drop_silent(BOB_ID, f"peer {BOB_ID} stopped answering heartbeats")
    assert BOB_ID not in state.table.peers and BOB_ID in liveness.silent
    assert not liveness.drop_silent(BOB_ID, "again"), "a peer is dropped once"
    clock.advance(29.0)
    liveness.forget_silent()
    assert BOB_ID in liveness.silent
    clock.advance(2.0)
    liveness.forget_silent()
    assert BOB_ID not in liveness.silent


def test_a_silent_coordinator_delays_the_next_claim():
    clock = FakeClock()
    state = swarm_state(clock)
    host = FakeHost()
    liveness = Liveness(state, host, Connectivity(state, host, Adverts(state, new_identity(), dict, lambda: None), 0))
    join(state, BOB)
    state.election.lease = Lease(BOB_ID, 2, clock.now + 60)
    state.claim_after = clock.now
    liveness._nursery = FakeNursery()
    liveness.drop_silent(BOB_ID, f"coordinator {BOB_ID} stopped its heartbeats")
    config = state.config
    assert state.claim_after == clock.now + config.hung_after_s + config.tick_s
    assert state.election.lease.expires < clock.now, "its lease is void at once"
    assert liveness._nursery.started == [(liveness.sweep, ())], "each remaining peer is asked once"


# ------------------------------------------------------------------------------------------- gossip intake


def intake_of(state: SwarmState) -> tuple[GossipIntake, list[str]]:
    seen: list[str] = []
    adverts = Adverts(state, new_identity(), dict, lambda: None)
    adoption = adoption_of(state)

    def note(kind):
        return lambda env, now: seen.append(kind)

    routes = Routes(
        adverts.apply, adoption.apply_lease, adoption.apply_plan, note("failure"), note("suspect"), seen.append
    )
    return GossipIntake(state, routes), seen


def test_gossip_is_counted_never_raised():
    clock = FakeClock()
    state = swarm_state(clock)
    intake, seen = intake_of(state)
    intake.take(BOB_ID, b"\xc1")
    intake.take(BOB_ID, msgpack.packb({"not": "a list"}))
    intake.take(BOB_ID, b"\x00" * (257 << 10))
    assert state.rejections == {"malformed": 2, "oversized": 1}
    failure = seal("failure", {"term": 1, "epoch": 1, "rank": 0, "error": "x"}, BOB, 60.0, now=clock.now)
    intake.take(BOB_ID, msgpack.packb([to_wire(failure)], use_bin_type=True))
    assert state.rejections["not-member"] == 1 and seen == [], "reports from non-members are refused"
    advert = seal("advert", advert_of().to_wire(), BOB, 30.0, now=clock.now)
    intake.take(BOB_ID, msgpack.packb([to_wire(advert), to_wire(failure)], use_bin_type=True))
    assert BOB_ID in state.table.peers and seen == [] and state.rejections["replayed"] == 1, "one nonce, once"
    again = seal("failure", {"term": 1, "epoch": 1, "rank": 0, "error": "x"}, BOB, 60.0, now=clock.now)
    intake.take(BOB_ID, msgpack.packb([to_wire(again)], use_bin_type=True))
    assert seen == ["failure"]
    leave = seal("leave", {}, BOB, 10.0, now=clock.now)
    intake.take(BOB_ID, msgpack.packb([to_wire(leave)], use_bin_type=True))
    assert BOB_ID not in state.table.peers and BOB_ID not in state.adverts


def test_adverts_of_another_model_or_too_old_are_not_taken():
    clock = FakeClock()
    state = swarm_state(clock, model_hash="abc")
    adverts = Adverts(state, new_identity(), dict, lambda: None)
    adverts.apply(seal("advert", advert_of().to_wire(), BOB, 30.0, now=clock.now), clock.now)
    assert state.rejections["model-mismatch"] == 1 and not state.table.peers
    old = seal("advert", advert_of().to_wire() | {"model_hash": "abc"}, BOB, 300.0, now=clock.now - 100)
    adverts.apply(old, clock.now)
    assert not state.table.peers, "a replayed advert says nothing about liveness"


# ----------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"peer_timeout_s": 0.0}, "peer_timeout_s 0.0: give a positive number of seconds"),
        ({"redial_first_s": -1.0}, "redial_first_s -1.0: give a non-negative number of seconds"),
        ({"verify_fraction": 1.5}, "a fraction is 0 to 1"),
        ({"http_port": 70000}, "a port is 0-65535"),
        ({"api_key": "k"}, "api_key guards the HTTP API: give http_port too"),
        ({"http_port": 0, "api_key": " "}, "api_key must not be empty"),
        ({"request_timeout_s": float("nan")}, "request_timeout_s"),
    ],
)
def test_node_settings_check_themselves(fields, message):
    with pytest.raises(ConfigError, match=message):
        NodeConfig(**fields)
    NodeConfig()


def public_coordinator(clock: FakeClock) -> tuple[Coordination, Callable[[object, str, str], None]]:
    """A coordinator that knows it is public, and how to take a member's advert: its key, host name and the
    reachability it states, linked directly to this node."""
    state = swarm_state(clock)
    coordination = Coordination(state, new_identity(), None, adoption_of(state))
    coordination.reachability = lambda: "public"
    adverts = Adverts(state, new_identity(), dict, lambda: None)

    def advertise(key: object, host: str, reachability: str) -> None:
        advert = dataclasses.replace(advert_of(host), connections={state.peer_id: "direct"})
        body = advert.to_wire() | {"reachability": reachability}
        adverts.apply(seal("advert", body, key, 30.0, now=clock.now), clock.now)

    return coordination, advertise


def test_the_coordinator_takes_a_direct_link_between_a_public_and_a_private_member_as_outbound_only():
    """This node (public) is linked directly to Bob (private: Bob dialled out of his NAT) and to Carol (who
    does not know yet): the pair with Bob carries no world and the planning key says so, so the change of
    this node's reachability re-plans."""
    coordination, advertise = public_coordinator(FakeClock())
    me = coordination.state.peer_id
    advertise(BOB, "bob", "private")
    advertise(CAROL, "carol", "unknown")
    kinds = coordination.link_kinds()
    assert kinds[tuple(sorted((me, BOB_ID)))] == "outbound" and kinds[tuple(sorted((me, CAROL_ID)))] == "direct"
    key = coordination.planning_key()
    coordination.reachability = lambda: "unknown"
    assert coordination.planning_key() != key
    assert set(coordination.link_kinds().values()) == {"direct"}


def test_a_block_on_a_pair_that_turned_out_worldless_binds_no_plan():
    """A world failed between this node and Bob while their link looked direct; once Bob's advert says he is
    private (so the link is outbound only), the planner is not told of the block: the pair is worldless."""
    clock = FakeClock()
    coordination, advertise = public_coordinator(clock)
    state = coordination.state
    me = state.peer_id
    advertise(BOB, "bob", "unknown")
    state.blocked.block((me, BOB_ID), "the exchange group did not form", state.peer_addresses(), clock.now)
    assert [b.pair for b in coordination.planning_input().blocked] == [tuple(sorted((me, BOB_ID)))]
    clock.advance(1.0)
    advertise(BOB, "bob", "private")
    given = coordination.planning_input()
    assert given.blocked == [] and list(given.worldless()) == [tuple(sorted((me, BOB_ID)))]
