"""The control topic: signed envelopes published in small batches, and each one received verified and routed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from hexgen.daemon.certificates import CertificateError
from hexgen.daemon.election import LeaseRejected
from hexgen.daemon.envelope import Envelope, EnvelopeRejected, from_wire, to_wire, verify
from hexgen.daemon.host import Host, peer_id_from_bytes
from hexgen.daemon.swarm_state import SwarmState

log = logging.getLogger("hexgen.daemon")

CONTROL_TOPIC = "hexgen/control/1"
MAX_GOSSIP_BYTES = 256 << 10
MAX_BATCH = 8
KINDS = frozenset({"advert", "lease", "plan", "leave", "failure", "suspect"})

Handler = Callable[[Envelope, float], None]


def topic_for(swarm_id: str | None) -> str:
    """An open swarm's topic, or a private swarm's own."""
    return CONTROL_TOPIC + (f"/{swarm_id}" if swarm_id else "")


class Publisher:
    """Publishes envelopes on the control topic; a failed publish is logged (gossip is best effort)."""

    def __init__(self, host: Host, topic: str) -> None:
        self.host = host
        self.topic = topic

    async def __call__(self, envelopes: list[Envelope]) -> None:
        data = msgpack.packb([to_wire(e) for e in envelopes], use_bin_type=True)
        try:
            await self.host.pubsub.publish(self.topic, data)
        except Exception as exc:  # noqa: BLE001 - libp2p raises many kinds; the next round re-sends
            log.debug("publishing %d envelopes failed: %s", len(envelopes), exc)


@dataclass(frozen=True)
class Routes:
    """Where each kind of verified envelope goes. ``advert`` sees adverts of other members only."""

    advert: Handler
    lease: Handler
    plan: Handler
    failure: Handler
    suspect: Handler
    own_advert: Callable[[Envelope], None]  # an advert signed with this node's key, from elsewhere


class GossipIntake:
    """Verifies gossip from the control topic and hands each envelope to its route; anything bad is rejected
    and counted, never raised."""

    def __init__(self, state: SwarmState, routes: Routes) -> None:
        self.state = state
        self.routes = routes

    async def read(self, subscription: Any) -> None:
        while True:
            msg = await subscription.get()
            sender = peer_id_from_bytes(msg.from_id)
            if sender == self.state.peer_id:
                self.check_own(msg.data)
            else:
                self.take(sender, msg.data)

    def check_own(self, data: bytes) -> None:
        """Gossip signed with this node's key comes back to it; an advert in it with other addresses than
        this node's was sent by another process holding the same key, now or before (gossip replays)."""
        try:
            items = msgpack.unpackb(data, raw=False, strict_map_key=False)[:MAX_BATCH]
            envelopes = [from_wire(item) for item in items]
        except (ValueError, TypeError, KeyError, EnvelopeRejected, msgpack.UnpackException):
            return  # this node's own gossip parses; anything else is not an advert
        for env in envelopes:
            if env.kind == "advert" and env.signer == self.state.peer_id:
                self.routes.own_advert(env)

    def take(self, sender: str, data: bytes) -> None:
        """Verify and apply one gossip message (a list of envelopes); bad parts are rejected and counted."""
        state = self.state
        if len(data) > MAX_GOSSIP_BYTES:
            state.reject("oversized", f"gossip from {sender} of {len(data)} bytes")
            return
        try:
            items = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException):
            state.reject("malformed", f"gossip from {sender} is not msgpack")
            return
        if not isinstance(items, list) or len(items) > MAX_BATCH:
            state.reject("malformed", f"gossip from {sender} is not a short list of envelopes")
            return
        now = state.clock()
        for item in items:
            try:
                env = verify(from_wire(item), kind=KINDS, now=now, sender=sender, replay=state.replay)
                self.route(env, now)
            except (EnvelopeRejected, LeaseRejected) as exc:
                state.reject(exc.reason, f"{exc} (from {sender})")
            except (KeyError, TypeError, ValueError, CertificateError) as exc:
                state.reject("malformed", f"{type(exc).__name__}: {exc} (from {sender})")

    def route(self, env: Envelope, now: float) -> None:
        state, routes = self.state, self.routes
        if env.kind == "advert":
            routes.advert(env, now)
        elif not state.is_member(env.signer):
            state.reject("not-member", f"{env.kind} from {env.signer}, which is not a live member")
        elif env.kind == "leave":
            state.adverts.pop(env.signer, None)  # gone for good: not dialled again
            state.lose(env.signer, f"peer {env.signer} left")
        else:
            handler = {"lease": routes.lease, "plan": routes.plan, "failure": routes.failure}.get(env.kind)
            (handler or routes.suspect)(env, now)
