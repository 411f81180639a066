"""A daemon's status: what ``/hexgen/status/1``, ``/status`` over HTTP and the status TUI show."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hexgen.daemon.adverts import reachability_of
from hexgen.daemon.host import Stream
from hexgen.daemon.nat_check import UNKNOWN
from hexgen.daemon.rpc import serve_rpc
from hexgen.daemon.serving import Serving
from hexgen.daemon.status_reply import Details, PlanSummary, Status
from hexgen.daemon.swarm_state import SwarmState
from hexgen.daemon.swarm_view import assignments


class StatusView:
    """This node's view as plain data; ``serving`` is None on a daemon that holds no checkpoint."""

    def __init__(
        self,
        state: SwarmState,
        addrs: Callable[[], list[str]],
        serving: Serving | None,
        links: Callable[[], dict[str, str]] = dict,
        reachability: Callable[[], str] = lambda: UNKNOWN,
    ) -> None:
        self.state = state
        self.addrs = addrs
        self.serving = serving
        self.links = links  # how this node is connected to each peer: "direct" or "relayed"
        self.reachability = reachability  # this node's: "public", "private" or "unknown"

    def load(self) -> dict[str, Any]:
        return {} if self.serving is None else self.serving.load()

    def roles(self) -> list[dict[str, Any]]:
        """This node's GPUs in the adopted plan: group, role and stage of each."""
        plan = self.state.plan
        return assignments(plan.body if plan is not None else None).get(self.state.peer_id, [])

    def status(self, brief: bool = False) -> dict[str, Any]:
        return self.reply(brief).to_wire()

    def reply(self, brief: bool = False) -> Status:
        """This node's view; ``brief`` keeps only who is in the swarm, who coordinates and which plan is
        adopted (no plan body, peer records, links, serving state or events): what a watcher polling many
        daemons needs, at a small fraction of the bytes."""
        state = self.state
        plan = state.plan
        return Status(
            peer_id=state.peer_id,
            coordinator=state.election.coordinator,
            term=state.election.term,
            is_coordinator=state.is_coordinator(),
            members=tuple(state.table.live_ids()),
            plan=None
            if plan is None
            else PlanSummary(plan.term, plan.epoch, plan.coordinator, plan.body.members, None if brief else plan.body),
            details=None if brief else self.details(),
        )

    def details(self) -> Details:
        state, me = self.state, self.state.me
        now = state.clock()
        serving = self.serving
        links = self.links()
        return Details(
            addrs=tuple(self.addrs()),
            host=me.host_name,
            hardware=me.hardware.to_dict(),
            model=state.config.model,
            swarm=me.certificate.swarm_id if me.certificate else "open",
            reachability=self.reachability(),
            load=self.load(),
            roles=tuple(self.roles()),
            peers=tuple(
                {
                    "peer_id": r.peer_id,
                    "host": r.host_name,
                    "addrs": r.addrs,
                    "hardware": r.advert.hardware.to_dict(),
                    "load": dict(r.advert.load),
                    "last_seen_s": round(now - r.last_seen, 3),
                    "link": links.get(r.peer_id),  # None: no connection of this node's to the peer
                    "reachability": self._said(r.peer_id),
                    "kv": self._kv_carrier(r.peer_id),  # None: no relayed KV goes to the peer now
                    "measured": self._measured(r.peer_id),  # None: neither end probed the link yet
                }
                for r in sorted(state.table.peers.values(), key=lambda r: r.peer_id)
            ),
            rejections=dict(state.rejections),
            flagged=dict(state.flagged),
            blocked=tuple({"peers": list(link.pair), "reason": link.reason} for link in state.blocked.links.values()),
            spot_checks={} if serving is None else dict(serving.router.checks),
            links=tuple(m.to_dict() for m in state.all_links()),
            serving=None if serving is None else serving.supervisor.status(),
            events=tuple(state.events),
        )

    def _kv_carrier(self, peer: str) -> dict[str, Any] | None:
        """What carries the KV this daemon relays to ``peer``, and the links of its workers' own to it by kind."""
        relay = None if self.serving is None else self.serving.kv_relay
        carrier = None if relay is None else relay.carriers.get(peer)
        own = {} if relay is None else relay.worker_links(peer)
        if carrier is None and not own:
            return None
        return ({} if carrier is None else carrier.to_dict()) | ({"worker_links": own} if own else {})

    def _measured(self, peer: str) -> dict[str, Any] | None:
        """The latest probe of the link between this node and ``peer``: this node's, else the peer's."""
        mine = self.state.measured.get(peer)
        if mine is not None:
            return mine.to_dict()
        record = self.state.table.peers.get(peer)
        theirs = [] if record is None else [m for m in record.advert.links if self.state.peer_id in (m.a, m.b)]
        return theirs[-1].to_dict() if theirs else None

    def _said(self, peer: str) -> str:
        """A member's reachability as its latest signed advert states it."""
        held = self.state.adverts.get(peer)
        return UNKNOWN if held is None else reachability_of(held[0])

    async def serve(self, stream: Stream) -> None:
        def answer(request: dict[str, Any]) -> dict[str, Any]:
            return self.status(brief=request.get("brief") is True)

        await serve_rpc(stream, "status", answer, self.state.may_ask, self.state.reject)
