"""Plan adoption and distribution: which lease and which signed plan a node follows, fetched or pushed.

A plan goes out once by gossip and is pushed to every connected member; a node whose adopted epoch is behind
the one the coordinator's lease names fetches the plan from the coordinator directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from hexgen.daemon.election import Lease
from hexgen.daemon.envelope import Envelope, EnvelopeRejected, from_wire, to_wire, verify
from hexgen.daemon.host import Host, Stream, stream_peer
from hexgen.daemon.messages import LeaseBody, PlanBody
from hexgen.daemon.rpc import PLAN_PROTOCOL, RPC_TIMEOUT_S, call, serve_rpc
from hexgen.daemon.swarm_state import AdoptedPlan, SwarmState
from hexgen.daemon.swarm_view import describe_roles

log = logging.getLogger("hexgen.daemon")

PLAN_FETCH_GAP_S = 0.5

OnPlan = Callable[[AdoptedPlan], None]
SyncMember = Callable[[str], None]


class Adoption:
    """Takes leases and plans (from gossip, a push or a fetch) and keeps the adopted plan in ``state.plan``.
    ``on_plan`` hears of each adopted plan; ``sync_member`` is asked to learn a member this node lacks."""

    def __init__(self, state: SwarmState, on_plan: OnPlan, sync_member: SyncMember) -> None:
        self.state = state
        self.on_plan = on_plan
        self.sync_member = sync_member
        self.want_plan = trio.Event()

    def apply_lease(self, env: Envelope, now: float) -> None:
        """Raises MessageError for a malformed body and LeaseRejected for a lease the election refuses."""
        state = self.state
        body = LeaseBody.from_wire(env.body)
        if body.holder != env.signer:
            raise ValueError("lease body must name its signer as holder")
        lease = Lease(env.signer, body.term, env.expires)
        was_coordinator = state.election.coordinator == state.peer_id
        if state.election.accept(lease, state.table.live_ids(), now):
            text = f"coordinator is {lease.holder} (term {lease.term})"
            state.event("coordinator", text, peer=lease.holder, term=lease.term)
            if was_coordinator:
                state.published = None
            state.poke()
        if body.epoch is not None and self.behind(env.signer, lease.term, body.epoch):
            self.want_plan.set()

    def behind(self, coordinator: str, term: int, epoch: int) -> bool:
        """True when the current coordinator's lease names a plan this node has not adopted."""
        election = self.state.election
        if coordinator != election.coordinator or term != election.term or epoch <= 0:
            return False
        plan = self.state.plan
        return plan is None or plan.coordinator != coordinator or plan.term != term or plan.epoch < epoch

    def apply_plan(self, env: Envelope, now: float = 0.0) -> None:
        """Adopt a verified plan envelope from the current coordinator; raises MessageError for a bad body."""
        state, election = self.state, self.state.election
        body = PlanBody.from_wire(env.body)
        if body.term < election.term:
            state.reject("stale-term", f"plan for term {body.term} while the term is {election.term}")
            return
        if env.signer != election.coordinator or body.term != election.term:
            coordinator = election.coordinator
            state.reject("not-coordinator", f"plan from {env.signer}, but the coordinator is {coordinator}")
            return
        plan = state.plan
        if plan is not None and plan.coordinator == env.signer and plan.term == body.term and body.epoch <= plan.epoch:
            return  # a re-announcement of a plan we have
        # Otherwise the holder changed (two claims for one term were settled): its plan wins whatever its epoch.
        self.adopt(AdoptedPlan(env.signer, body))
        # The coordinator knows members this node does not (dropped while cut off from them, and back through
        # the coordinator): ask each for its advert, fresh, rather than wait for its next one.
        for member in sorted(set(body.members) - set(state.table.live_ids())):
            self.sync_member(member)
        roles = describe_roles(body, state.peer_id)
        text = f"adopted plan epoch {body.epoch} of term {body.term} ({len(body.members)} members){roles}"
        state.event("plan", text, epoch=body.epoch, term=body.term)
        state.poke()

    def adopt(self, plan: AdoptedPlan) -> None:
        self.state.plan = plan
        self.on_plan(plan)

    async def fetch_plans(self, host: Host) -> None:
        """Fetch the signed plan from the coordinator whenever its lease names an epoch not adopted here."""
        state = self.state
        while True:
            await self.want_plan.wait()
            self.want_plan = trio.Event()
            coordinator = state.election.coordinator
            if coordinator is not None and coordinator != state.peer_id:
                await self._fetch(host, coordinator)
            await trio.sleep(PLAN_FETCH_GAP_S)

    async def _fetch(self, host: Host, coordinator: str) -> None:
        state = self.state
        try:
            with trio.fail_after(RPC_TIMEOUT_S):
                reply = await call(host, coordinator, PLAN_PROTOCOL, state.credentials())
        except Exception as exc:  # noqa: BLE001 - unreachable or slow: the next lease asks again
            log.debug("fetching the plan from %s failed: %s", coordinator, exc)
            return
        try:
            if reply.get("error"):
                raise ValueError(reply["error"])
            self.apply_plan(verify(from_wire(reply.get("plan")), kind="plan", now=state.clock(), sender=coordinator))
        except EnvelopeRejected as exc:
            state.reject(exc.reason, f"fetched plan: {exc} (from {coordinator})")
        except (KeyError, TypeError, ValueError) as exc:
            state.reject("malformed", f"fetched plan: {exc} (from {coordinator})")

    async def serve(self, stream: Stream) -> None:
        """Answers a fetch with the published plan, and takes a plan the coordinator pushes (``push``: its
        lease and plan envelopes), verified exactly as if they came by gossip."""
        state = self.state
        sender = stream_peer(stream)

        def answer(request: dict[str, Any]) -> dict[str, Any]:
            if "push" in request:
                return self.take_push(sender, request["push"])
            if state.published is None or not state.is_coordinator():
                return {"error": "this node is not the coordinator"}
            return {"plan": to_wire(state.published.plan)}

        await serve_rpc(stream, "plan", answer, state.may_ask, state.reject)

    def take_push(self, sender: str, items: Any) -> dict[str, Any]:
        state = self.state
        if not isinstance(items, list) or len(items) != 2:
            state.reject("malformed", f"plan push from {sender} is not [lease, plan]")
            return {"error": "a push is [lease, plan]"}
        now = state.clock()
        try:
            for item, kind in zip(items, ("lease", "plan"), strict=True):
                env = verify(from_wire(item), kind=kind, now=now, sender=sender)
                if not state.is_member(env.signer):
                    raise EnvelopeRejected("not-member", f"{sender} is not a live member")
                (self.apply_lease if kind == "lease" else self.apply_plan)(env, now)
        except EnvelopeRejected as exc:
            state.reject(exc.reason, f"plan push: {exc} (from {sender})")
            return {"error": str(exc)}
        except (KeyError, TypeError, ValueError) as exc:
            state.reject("malformed", f"plan push: {exc} (from {sender})")
            return {"error": str(exc)}
        return {"ok": True}

    async def push(self, host: Host, lease: Envelope, plan: Envelope) -> None:
        """Hand a new plan to every connected member directly. Gossip reaches a member outside the
        publisher's mesh only through the next heartbeat's IHAVE, seconds later on a busy swarm."""
        request = self.state.credentials() | {"push": [to_wire(lease), to_wire(plan)]}
        connected = host.connected_peers()

        async def push_to(peer: str) -> None:
            with trio.move_on_after(RPC_TIMEOUT_S):
                try:
                    await call(host, peer, PLAN_PROTOCOL, request)
                except Exception as exc:  # noqa: BLE001 - gossip and the lease's fetch still bring it
                    log.debug("pushing the plan to %s failed: %s", peer, exc)

        async with trio.open_nursery() as nursery:
            for peer in self.state.table.peers:
                if peer in connected:
                    nursery.start_soon(push_to, peer)
