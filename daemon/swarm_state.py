"""What one daemon knows of the swarm, shared by its control-plane parts: members, election, plan, events."""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from hexgen.daemon.certificates import Certificate, CertificateError, verify_certificate
from hexgen.daemon.cluster_view import LinkMeasurement
from hexgen.daemon.config import NodeConfig
from hexgen.daemon.election import Election
from hexgen.daemon.envelope import Envelope, ReplayGuard
from hexgen.daemon.failure import BlockedLinks, advert_ips
from hexgen.daemon.hardware_profile import HardwareProfile
from hexgen.daemon.membership import PeerTable
from hexgen.daemon.messages import Advert, PlanBody

log = logging.getLogger("hexgen.daemon")

MAX_EVENTS = 200


@dataclass(frozen=True)
class AdoptedPlan:
    """A plan this node follows: who signed it, and its body."""

    coordinator: str
    body: PlanBody

    @property
    def term(self) -> int:
        return self.body.term

    @property
    def epoch(self) -> int:
        return self.body.epoch

    @property
    def members(self) -> list[str]:
        return list(self.body.members)


@dataclass(frozen=True)
class Published:
    """The coordinator's latest signed lease and plan, and the plan's epoch."""

    lease: Envelope
    plan: Envelope
    epoch: int


class Pulse:
    """Wakes every waiter at once whenever ``fire`` is called; a waiter gives up after its timeout."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self, at_most_s: float = math.inf) -> None:
        with trio.move_on_after(at_most_s):
            await self._event.wait()


@dataclass(frozen=True)
class SelfInfo:
    """Who this node is: fixed for the life of the process."""

    peer_id: str
    host_name: str
    hardware: HardwareProfile
    certificate: Certificate | None
    model_hash: str | None


@dataclass
class SwarmState:
    """The node's view of the swarm, read and changed by its parts (all in one trio thread). ``changed``
    fires on any change a part may want to react to (membership, election, plan, reports)."""

    me: SelfInfo
    config: NodeConfig
    clock: Callable[[], float]
    table: PeerTable
    election: Election
    replay: ReplayGuard = field(default_factory=lambda: ReplayGuard(window_s=60.0, max_entries=100_000))
    rejections: Counter[str] = field(default_factory=Counter)
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    flagged: dict[str, dict[str, Any]] = field(default_factory=dict)  # caught by spot-checks: by whom and why
    blocked: BlockedLinks = field(default_factory=BlockedLinks)  # peer pairs whose link cannot carry a world
    measured: dict[str, LinkMeasurement] = field(default_factory=dict)  # this node's probes, by peer
    plan: AdoptedPlan | None = None
    published: Published | None = None  # while this node coordinates
    adverts: dict[str, tuple[Envelope, Advert]] = field(default_factory=dict)  # each member's latest
    own_addrs: list[str] = field(default_factory=list)
    leaving: bool = False
    claim_after: float = math.inf  # no lease is claimed before this time
    changed: Pulse = field(default_factory=Pulse)

    @staticmethod
    def create(me: SelfInfo, config: NodeConfig, clock: Callable[[], float]) -> SwarmState:
        return SwarmState(me, config, clock, PeerTable(me.peer_id, config.peer_timeout_s), Election(me.peer_id))

    @property
    def peer_id(self) -> str:
        return self.me.peer_id

    def poke(self) -> None:
        self.changed.fire()

    def event(self, kind: str, text: str, **fields: Any) -> None:
        """Log a swarm event and keep it for the status view (joins, leaves, elections, plans, failures)."""
        self.events.append({"t": round(self.clock(), 3), "kind": kind, "text": text, **fields})
        log.log(logging.WARNING if kind == "failure" else logging.INFO, text, extra={"event": kind, **fields})

    def reject(self, reason: str, message: str) -> None:
        self.rejections[reason] += 1
        log.warning("rejected: %s (%s)", message, reason)

    def is_member(self, peer_id: str) -> bool:
        return peer_id == self.peer_id or peer_id in self.table.peers

    def credentials(self) -> dict[str, Any]:
        """What a request to another daemon carries to show this node is a member of a private swarm."""
        return {"cert": self.me.certificate.to_bytes()} if self.me.certificate is not None else {}

    def may_ask(self, peer: str, cert: Any) -> bool:
        """In a private swarm only members (or a client presenting its own certificate) get answers."""
        certificate = self.me.certificate
        if certificate is None or self.is_member(peer):
            return True
        if isinstance(cert, bytes):
            try:
                verify_certificate(cert, certificate.swarm_public_key, peer, self.clock())
                return True
            except CertificateError:
                pass
        return False

    def is_coordinator(self) -> bool:
        return self.election.is_coordinator(self.clock())

    def peer_name(self, peer: str) -> str:
        record = self.table.peers.get(peer)
        host = self.me.host_name if peer == self.peer_id else record.host_name if record is not None else "?"
        return f"{host} ({peer[-8:]})"

    def peer_addresses(self) -> dict[str, list[str]]:
        """Each known peer's IP addresses, from its advert (this node's from its host)."""
        addresses = {peer: advert_ips(record.addrs) for peer, record in self.table.peers.items()}
        addresses[self.peer_id] = advert_ips(self.own_addrs)
        return addresses

    def lose(self, peer: str, text: str) -> bool:
        """Drop a member that left, disconnected or timed out; True if it was one. Forgets it as lease holder."""
        if not self.table.drop(peer, self.clock()):
            return False
        self.event("leave", text, peer=peer)
        self.election.forget_holder(peer)
        self.poke()
        return True

    def all_links(self) -> list[LinkMeasurement]:
        """This node's own probes and every member's advertised ones."""
        return [*self.measured.values(), *(link for r in self.table.peers.values() for link in r.advert.links)]
