"""Adverts: this node's own, announced on gossip with the coordinator's lease, and every member's, taken in."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from hexgen.daemon.certificates import CertificateError, verify_certificate
from hexgen.daemon.envelope import Envelope, seal
from hexgen.daemon.messages import MAX_CONNECTIONS, Advert, LeaseBody
from hexgen.daemon.nat_check import PRIVATE, PUBLIC, UNKNOWN
from hexgen.daemon.swarm_state import SwarmState
from hexgen.engine.quant_bytes import QUANTIZATIONS

log = logging.getLogger("hexgen.daemon")

MAX_ADVERTISED_LINKS = 32
ANNOUNCE_GAP_S = 0.3
# this version's engine loads each on any device: torch's int8/int4 kernels where they take a layer's shape, a
# dequantizing matmul elsewhere (engine.quant)
RUNNABLE = QUANTIZATIONS

Publish = Callable[[list[Envelope]], Awaitable[None]]


def reachability_of(env: Envelope) -> str:
    """The reachability a member's signed advert states ("public", "private"), "unknown" when it states none."""
    body = env.body if isinstance(env.body, dict) else {}
    found = body.get("reachability")
    return found if found in (PUBLIC, PRIVATE) else UNKNOWN


class Adverts:
    """Builds, seals and announces this node's advert; verifies and records the members' adverts."""

    def __init__(
        self,
        state: SwarmState,
        key_pair: Any,
        load: Callable[[], dict[str, Any]],
        rendezvous: Callable[[], tuple[str, int] | None],
    ) -> None:
        self.state = state
        self.key_pair = key_pair
        self.load = load
        self.rendezvous = rendezvous
        config = state.config
        self.freshness = config.advert_refresh_s + config.advert_interval_s + 1.0
        self._announce_now = trio.Event()
        self.reachability = UNKNOWN  # this node's, from its AutoNAT checks (nat_check)
        self.link_kinds: Callable[[], Mapping[str, str]] = dict  # this node's links to peers (Host.link_kinds)

    def own(self) -> Advert:
        state, me = self.state, self.state.me
        rendezvous = self.rendezvous()
        return Advert(
            addrs=tuple(state.own_addrs),
            hardware=me.hardware,
            host=me.host_name,
            model=state.config.model,
            load=self.load(),
            links=tuple(list(state.measured.values())[-MAX_ADVERTISED_LINKS:]),
            cert=None if me.certificate is None else me.certificate.to_bytes(),
            model_hash=me.model_hash if rendezvous is not None else None,
            rendezvous=rendezvous,
            connections=self.connections(),
            quantizations=RUNNABLE,
            relay=state.config.relay,
        )

    def connections(self) -> dict[str, str]:
        """The kind of this node's link to each member it is connected to (relays and clients left out)."""
        members = self.state.table.peers
        kinds = sorted((peer, kind) for peer, kind in self.link_kinds().items() if peer in members)
        return dict(kinds[:MAX_CONNECTIONS])

    def seal_own(self) -> Envelope:
        return seal("advert", self.wire(self.own()), self.key_pair, self.freshness)

    def wire(self, advert: Advert) -> dict[str, Any]:
        """The advert's body as signed: with this node's reachability, which ``reachability_of`` reads back."""
        return advert.to_wire() | {"reachability": self.reachability}

    def announce_soon(self) -> None:
        self._announce_now.set()

    def apply(self, env: Envelope, now: float) -> None:
        """Take a verified advert envelope of another member; raises MessageError for a malformed body."""
        state = self.state
        if now - env.issued > self.freshness:
            # Gossip replays cached messages to newcomers: an old advert says nothing about liveness.
            log.debug("ignored an advert of %s issued %.1f s ago", env.signer, now - env.issued)
            return
        advert = Advert.from_wire(env.body)
        if not self._admitted(env.signer, advert, now):
            return
        if state.table.apply_advert(env.signer, advert, env.issued, now):
            state.event("join", f"peer {env.signer} joined ({advert.host})", peer=env.signer)
            state.poke()
        for pair in state.blocked.refresh(state.peer_addresses(), state.clock()):
            state.event("unblocked", f"peers {pair[0]} and {pair[1]} may form worlds again (new addresses or expired)")
            state.poke()
        record = state.table.peers.get(env.signer)
        if record is not None and record.advert_issued == env.issued:
            state.adverts[env.signer] = (env, advert)

    def _admitted(self, signer: str, advert: Advert, now: float) -> bool:
        """In a private swarm, only adverts with a valid certificate; always, only adverts of this model."""
        state = self.state
        certificate = state.me.certificate
        if certificate is not None:
            if advert.cert is None:
                state.reject("not-member", f"advert of {signer} carries no swarm certificate")
                return False
            try:
                verify_certificate(advert.cert, certificate.swarm_public_key, signer, now)
            except CertificateError as exc:
                state.reject("not-member", f"advert of {signer}: {exc}")
                return False
        if advert.model_hash != state.me.model_hash:
            state.reject("model-mismatch", f"advert of {signer} serves another model ({advert.model})")
            return False
        return True

    def lease_envelope(self) -> Envelope | None:
        """The coordinator's lease naming its latest plan's epoch; None unless this node coordinates."""
        state = self.state
        lease, published = state.election.lease, state.published
        if lease is None or published is None or not state.is_coordinator():
            return None
        body = LeaseBody(lease.holder, lease.term, published.epoch)
        return seal("lease", body.to_wire(), self.key_pair, state.config.lease_ttl_s)

    async def announce(self, publish: Publish) -> None:
        """An advert at once (at most every 0.3 s) when a new connection appears, so a newcomer is seen in
        one gossip hop; every ``advert_interval_s`` when its content (load, links) changed, else every
        ``advert_refresh_s``; while coordinator, the lease every third of its lifetime, naming the plan's
        epoch. Unchanged adverts are rare because directly connected peers are watched by the connection
        itself: an idle swarm's gossip is mostly these re-announcements."""
        config = self.state.config
        last_advert = last_check = -math.inf
        last: Advert | None = None
        lease_every = config.lease_ttl_s / 3
        while not self.state.leaving:
            outgoing = []
            now = trio.current_time()
            if self._announce_now.is_set() or now - last_check >= config.advert_interval_s:
                last_check = now
                advert = self.own()
                stale = now - last_advert >= config.advert_refresh_s
                if self._announce_now.is_set() or advert != last or stale:
                    outgoing.append(seal("advert", self.wire(advert), self.key_pair, self.freshness))
                    last_advert, last = now, advert
            lease = self.lease_envelope()
            if lease is not None:
                outgoing.append(lease)
            self._announce_now = trio.Event()
            if outgoing:
                await publish(outgoing)
            await trio.sleep(ANNOUNCE_GAP_S)
            wait = min(lease_every, last_check + config.advert_interval_s - trio.current_time())
            with trio.move_on_after(max(0.0, wait - ANNOUNCE_GAP_S)):
                await self._announce_now.wait()
