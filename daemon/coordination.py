"""Coordination: election ticks, and while this node holds the lease, planning and publishing signed plans.

A plan is re-made whenever what it depends on changes (``planning_key``): the term, the membership, the
peers flagged by spot-checks, the blocked pairs, the kinds of link members advertise, and worker failures, of which each membership gets
``MAX_FAILURE_REPLANS`` re-plans before the swarm falls back to colocated replicas.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from hexgen.coordinator.plan import Plan
from hexgen.coordinator.specs import ModelSpec
from hexgen.daemon.adoption import Adoption
from hexgen.daemon.adverts import RUNNABLE, reachability_of
from hexgen.daemon.cluster_view import PeerHardware
from hexgen.daemon.envelope import Envelope, seal
from hexgen.daemon.failure import FailureReport
from hexgen.daemon.messages import LeaseBody, PlanBody
from hexgen.daemon.nat_check import UNKNOWN
from hexgen.daemon.pair_links import (
    NO_WORLDS,
    Pair,
    bridged_groups,
    exchange_transport,
    gloo_groups,
    outbound_pairs,
    pair_kinds,
    pair_relays,
    plan_links,
    with_transports,
)
from hexgen.daemon.planning import MAX_FAILURE_REPLANS, PlanningInput, PlanOutcome, compute_plan
from hexgen.daemon.swarm_state import AdoptedPlan, Published, SwarmState
from hexgen.daemon.swarm_view import describe_roles

log = logging.getLogger("hexgen.daemon")

PLAN_TTL_S = 3600.0

Publish = Callable[[list[Envelope]], Awaitable[None]]
Push = Callable[[Envelope, Envelope], None]  # starts handing the plan to members directly


class Coordination:
    """The election's clock and the coordinator's planning; the re-plan budget per membership lives here."""

    def __init__(self, state: SwarmState, key_pair: Any, model: ModelSpec, adoption: Adoption) -> None:
        self.state = state
        self.key_pair = key_pair
        self.model = model
        self.adoption = adoption
        self.previous: tuple[Plan, Any] | None = None
        self.failures_seen: dict[int, int] = {}  # table version -> failure re-plans made for it
        self.failure_replans = 0
        self.failure_replans_published = 0
        self.planned_for: tuple[Any, ...] = ()
        self.reachability: Callable[[], str] = lambda: UNKNOWN  # this node's, as its adverts say (``Adverts``)

    def tick(self, connected: set[str]) -> None:
        """Expire members unheard of for the peer timeout (unless connected), then claim or renew the lease."""
        state = self.state
        now = state.clock()
        for peer in state.table.expire(now, keep=connected):
            state.event("leave", f"peer {peer} timed out", peer=peer)
            state.election.forget_holder(peer)
            state.poke()
        live = state.table.live_ids()
        if not state.leaving and now >= state.claim_after and state.election.should_claim(live, now):
            lease = state.election.claim(now, state.config.lease_ttl_s)
            state.event("election", f"claiming the coordinator lease for term {lease.term}", term=lease.term)
            state.poke()
        elif state.election.is_coordinator(now):
            state.election.claim(now, state.config.lease_ttl_s)

    async def ticks(self, connected: Callable[[], set[str]]) -> None:
        while True:
            self.tick(connected())
            await self.state.changed.wait(self.state.config.tick_s)

    def count_failure(self, report: FailureReport) -> None:
        """A worker of the adopted plan failed: as coordinator, re-plan, rebuilding every replica. The first
        ``MAX_FAILURE_REPLANS`` re-plans of a membership rebuild its plan; the next one plans the colocated
        fallback (``compute_plan`` sees the count), and later failures of that membership re-plan nothing."""
        state, plan = self.state, self.state.plan
        if not state.is_coordinator() or plan is None or (report.term, report.epoch) != (plan.term, plan.epoch):
            return
        made = self.failures_seen.get(state.table.version, 0)
        if made > MAX_FAILURE_REPLANS:
            log.warning("not rebuilding the world again: %d failure re-plans for this membership", made)
            return
        self.failures_seen[state.table.version] = made + 1
        self.failure_replans += 1
        state.poke()

    def planning_key(self) -> tuple[Any, ...]:
        """What a plan depends on besides the clock: a change of any of it makes the coordinator re-plan."""
        state = self.state
        blocked = tuple(link.pair for link in state.blocked.links.values())
        # only links that cannot carry a world change what can be planned; connections coming and going
        # between directly linked members must not re-plan a settled swarm
        kinds = {pair: kind for pair, kind in self.link_kinds().items() if kind in NO_WORLDS}
        relays = tuple(sorted(self.link_relays(kinds).items()))
        key = (state.election.term, state.table.version, self.failure_replans, len(state.flagged), blocked)
        return (*key, tuple(sorted(kinds.items())), relays)

    def link_kinds(self) -> dict[Pair, str]:
        """Each pair's kind of link, from the members' adverts (this node's own links are in its peers'), a
        direct one between a public and a private member being outbound only (``outbound_pairs``)."""
        peers = self.state.table.peers
        kinds = pair_kinds({peer: record.advert.connections for peer, record in peers.items()})
        said = {peer: reachability_of(env) for peer, (env, _) in self.state.adverts.items() if peer in peers}
        return outbound_pairs(kinds, said | {self.state.peer_id: self.reachability()})

    def link_relays(self, kinds: dict[Pair, str]) -> dict[Pair, str]:
        """The relay of each relayed pair of ``kinds`` that the members' advertised addresses tell."""
        addrs = {peer: record.addrs for peer, record in self.state.table.peers.items()}
        return pair_relays(kinds, addrs | {self.state.peer_id: self.state.own_addrs})

    def peer_hardware(self) -> list[PeerHardware]:
        """The hardware the plan may use: every live member's, except peers flagged by spot-checks."""
        state, me = self.state, self.state.me
        peers = [] if me.peer_id in state.flagged else [PeerHardware(me.peer_id, me.host_name, me.hardware)]
        for record in state.table.peers.values():
            if record.peer_id not in state.flagged:
                peers.append(PeerHardware(record.peer_id, record.host_name, record.advert.hardware))
        return peers

    def planning_input(self) -> PlanningInput:
        state = self.state
        peers = self.peer_hardware()
        kinds = self.link_kinds()
        # A block says a world failed between two peers: one whose link now carries no world (it turned out
        # outbound, say) is planned with none anyway, its KV and bridges through the daemons.
        blocked = [b for b in state.blocked.among(p.peer_id for p in peers) if kinds.get(b.pair) not in NO_WORLDS]
        return PlanningInput(
            model=self.model,
            peers=peers,
            links=state.all_links(),
            blocked=blocked,
            failures=self.failures_seen.get(state.table.version, 0),
            pinned=state.config.pinned,
            previous=self.previous,
            inherited=state.plan.body if state.plan is not None else None,
            link_kinds=kinds,
            relays=self.link_relays(kinds),
            quantizations=self.quantizations(),
        )

    def quantizations(self) -> dict[str, tuple[str, ...]]:
        """What each member's advert offers, and this node's own."""
        offered = {peer: record.advert.quantizations for peer, record in self.state.table.peers.items()}
        return offered | {self.state.peer_id: RUNNABLE}

    async def run(self, publish: Publish, push: Push) -> None:
        state = self.state
        while True:
            if state.is_coordinator() and not state.leaving and self.planning_key() != self.planned_for:
                await trio.sleep(state.config.plan_debounce_s)
                key = self.planning_key()
                await self.plan_and_publish(publish, push)
                self.planned_for = key
            await state.changed.wait(state.config.tick_s)

    async def plan_and_publish(self, publish: Publish, push: Push) -> None:
        state = self.state
        members = state.table.live_ids()
        given = self.planning_input()
        term = state.election.term
        outcome = await trio.to_thread.run_sync(compute_plan, given)
        lease = state.election.lease
        if not state.is_coordinator() or state.election.term != term or lease is None:
            # Another holder's lease was accepted while the planner ran: publishing now would sign a plan
            # under its term (a second plan for a (term, epoch) it may have published already).
            log.info("dropped a plan made for term %d: no longer the coordinator", term)
            return
        self.previous = outcome.reusable
        body = self.body(outcome, given, members, term)
        lease_env = seal(
            "lease", LeaseBody(lease.holder, lease.term).to_wire(), self.key_pair, state.config.lease_ttl_s
        )
        plan_env = seal("plan", body.to_wire(), self.key_pair, PLAN_TTL_S)
        state.published = Published(lease_env, plan_env, body.epoch)
        self.adoption.adopt(AdoptedPlan(state.peer_id, body))
        text = f"published plan epoch {body.epoch} of term {term} ({len(members)} members)"
        state.event("plan", text + describe_roles(body, state.peer_id), epoch=body.epoch, term=term)
        await publish([lease_env, plan_env])
        push(lease_env, plan_env)
        state.poke()

    def body(self, outcome: PlanOutcome, given: PlanningInput, members: list[str], term: int) -> PlanBody:
        """The signed plan's body; ``restart`` when a worker failed since the last one (every replica is
        rebuilt: unchanged ones' worlds may be broken too); ``exchange`` says whether its KV hand-offs or a
        bridged group need libp2p (``pair_links.exchange_transport``), and then ``gloo_groups`` which groups
        still use gloo among themselves (``pair_links.gloo_groups``) and ``bridged_groups`` which span a
        worldless pair (``pair_links.bridged_groups``)."""
        plan = self.state.plan
        restart = self.failure_replans != self.failure_replans_published
        self.failure_replans_published = self.failure_replans
        gpu_peer = {index: peer for index, (peer, _) in outcome.gpus.items()}
        exchange = exchange_transport(outcome.plan, gpu_peer, given.link_kinds)
        relayed = exchange == "libp2p"
        gloo = gloo_groups(outcome.plan, gpu_peer, given.link_kinds) if relayed else ()
        bridged = bridged_groups(outcome.plan, gpu_peer, given.link_kinds) if relayed else ()
        links = () if outcome.plan is None else plan_links(outcome.plan, gpu_peer, given.link_kinds)
        return PlanBody(
            term=term,
            epoch=(plan.epoch if plan else 0) + 1,
            members=tuple(members),
            plan=outcome.plan,
            error=outcome.error,
            throughput=outcome.throughput,
            gpus=outcome.gpus,
            blocked=outcome.blocked,
            peers=tuple(given.peers),
            restart=restart,
            links=with_transports(links, exchange, gloo, bridged),
            quantize=given.quantize,
            exchange=exchange,
            gloo_groups=gloo,
            bridged_groups=bridged,
        )
