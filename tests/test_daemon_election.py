"""Election and peer-table rules: pure state, no network."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hexgen.daemon.election import Election, Lease, LeaseRejected, candidate
from hexgen.daemon.membership import PeerTable

ADVERT = {"addrs": ["/ip4/127.0.0.1/tcp/1"], "hardware": {}, "host": "h"}


def test_candidate_is_smallest_id():
    assert candidate(["c", "a", "b"]) == "a"


def test_claim_when_alone_and_renew_keeps_term():
    e = Election("a")
    assert e.should_claim(["a"], now=0.0)
    lease = e.claim(0.0, ttl_s=3.0)
    assert lease.term == 1 and e.is_coordinator(1.0)
    assert e.claim(1.0, ttl_s=3.0).term == 1
    assert not e.should_claim(["a"], now=2.0)


def test_non_candidate_waits_while_holder_lives():
    e = Election("b")
    assert not e.should_claim(["a", "b"], now=0.0)
    e.accept(Lease("c", 4, 10.0), ["a", "b", "c"], now=0.0)
    assert not e.should_claim(["a", "b", "c"], now=1.0)


def test_failover_claims_next_term():
    e = Election("b")
    e.accept(Lease("a", 3, 10.0), ["a", "b"], now=0.0)
    e.forget_holder("a")
    assert e.should_claim(["b", "c"], now=1.0)
    assert e.claim(1.0, 3.0).term == 4


def test_stale_term_refused():
    e = Election("b")
    e.accept(Lease("a", 5, 10.0), ["a", "b"], now=0.0)
    with pytest.raises(LeaseRejected) as info:
        e.accept(Lease("c", 4, 10.0), ["a", "b", "c"], now=0.0)
    assert info.value.reason == "stale-term"
    assert e.coordinator == "a" and e.term == 5


def test_expired_and_non_member_leases_refused():
    e = Election("b")
    with pytest.raises(LeaseRejected, match="expired") as info:
        e.accept(Lease("a", 1, 5.0), ["a", "b"], now=6.0)
    assert info.value.reason == "expired"
    with pytest.raises(LeaseRejected) as info:
        e.accept(Lease("z", 1, 10.0), ["a", "b"], now=0.0)
    assert info.value.reason == "not-member"
    assert e.lease is None


def test_same_term_conflict_resolves_to_smaller_id_everywhere():
    first = Election("x")
    first.accept(Lease("b", 1, 10.0), ["a", "b", "x"], now=0.0)
    first.accept(Lease("a", 1, 10.0), ["a", "b", "x"], now=0.0)
    second = Election("y")
    second.accept(Lease("a", 1, 10.0), ["a", "b", "y"], now=0.0)
    with pytest.raises(LeaseRejected):
        second.accept(Lease("b", 1, 10.0), ["a", "b", "y"], now=0.0)
    assert first.coordinator == second.coordinator == "a"


@given(st.lists(st.tuples(st.sampled_from("abcde"), st.integers(1, 6)), max_size=30))
def test_terms_never_decrease(claims):
    e = Election("z")
    live = list("abcdez")
    seen = 0
    for holder, term in claims:
        with contextlib.suppress(LeaseRejected):
            e.accept(Lease(holder, term, 100.0), live, now=0.0)
        assert e.term >= seen
        seen = e.term


def test_peer_table_join_drop_and_late_adverts():
    t = PeerTable("self", timeout_s=5.0)
    assert t.apply_advert("p", ADVERT, issued=1.0, now=1.0)
    assert not t.apply_advert("p", ADVERT, issued=2.0, now=2.0)
    assert t.live_ids() == ["p", "self"]
    version = t.version
    assert t.drop("p", at=3.0)
    assert t.version == version + 1
    assert not t.apply_advert("p", ADVERT, issued=2.5, now=3.1), "an advert issued before the leave must not revive"
    assert t.apply_advert("p", ADVERT, issued=4.0, now=4.0)


def test_peer_table_expiry():
    t = PeerTable("self", timeout_s=5.0)
    t.apply_advert("p", ADVERT, issued=0.0, now=0.0)
    t.apply_advert("q", ADVERT, issued=0.0, now=4.0)
    assert t.expire(now=6.0) == ["p"]
    assert t.live_ids() == ["q", "self"]


def test_peer_table_keeps_silent_peers_with_a_healthy_connection():
    t = PeerTable("self", timeout_s=5.0)
    t.apply_advert("p", ADVERT, issued=0.0, now=0.0)
    t.apply_advert("q", ADVERT, issued=0.0, now=0.0)
    assert t.expire(now=60.0, keep={"q"}) == ["p"]
    assert t.live_ids() == ["q", "self"]
    assert t.expire(now=61.0) == ["q"]


def test_live_member_cannot_take_over_with_a_higher_term():
    e = Election("c")
    e.accept(Lease("b", 2, 10.0), ["b", "c", "z"], now=0.0)
    with pytest.raises(LeaseRejected) as info:
        e.accept(Lease("z", 9, 10.0), ["b", "c", "z"], now=0.0)
    assert info.value.reason == "not-candidate"
    assert e.coordinator == "b" and e.term == 2


def test_smaller_id_or_candidate_may_raise_the_term():
    e = Election("c")
    e.accept(Lease("b", 2, 10.0), ["a", "b", "c"], now=0.0)
    assert e.accept(Lease("a", 3, 10.0), ["a", "b", "c"], now=0.0)
    assert e.coordinator == "a"


def test_holder_answers_a_refused_rival_by_raising_its_term():
    holder = Election("b")
    holder.lease = Lease("b", 2, 10.0)
    live = ["a", "b", "z"]
    with pytest.raises(LeaseRejected):
        holder.accept(Lease("z", 7, 10.0), live, now=1.0)
    assert holder.should_claim(live, now=1.0)
    assert holder.claim(1.0, 3.0) == Lease("b", 8, 4.0)
    assert not holder.should_claim(live, now=1.5)


def test_partition_merge_settles_on_the_smaller_holder():
    # Two holders meet: "b" at term 3 and "m" at term 5, neither the candidate "a".
    b, m, follower = Election("b"), Election("m"), Election("x")
    b.lease, m.lease = Lease("b", 3, 10.0), Lease("m", 5, 10.0)
    follower.accept(Lease("m", 5, 10.0), ["a", "b", "m", "x"], now=0.0)
    live = ["a", "b", "m", "x"]
    with pytest.raises(LeaseRejected):
        follower.accept(Lease("b", 3, 10.0), live, now=1.0)
    with pytest.raises(LeaseRejected):
        b.accept(Lease("m", 5, 10.0), live, now=1.0)
    raised = b.claim(1.0, 3.0)
    assert raised.term == 6
    assert m.accept(raised, live, now=1.0) and follower.accept(raised, live, now=1.0)
    assert b.coordinator == m.coordinator == follower.coordinator == "b"


def test_plan_of_a_new_holder_in_the_same_term_replaces_an_equal_epoch():
    """Two claims for one term each published epoch N; the settled holder's plan must still be adopted."""
    from hexgen.daemon.envelope import seal
    from hexgen.daemon.host import new_identity
    from hexgen.daemon.node_key import peer_id_of
    from hexgen.testing.control import adoption_of, swarm_state

    state = swarm_state()
    adoption = adoption_of(state)
    loser, winner = new_identity(), new_identity()
    for key in (loser, winner):
        state.election.lease = Lease(peer_id_of(key), 3, 1e18)
        adoption.apply_plan(seal("plan", {"term": 3, "epoch": 19, "members": [peer_id_of(key)]}, key, 60.0))
        assert state.plan is not None and state.plan.coordinator == peer_id_of(key)
    adoption.apply_plan(seal("plan", {"term": 3, "epoch": 19, "members": ["x"]}, winner, 60.0))
    assert state.plan.members == [peer_id_of(winner)], "a re-announcement by the same holder changes nothing"
