"""The live peer table: who is in the swarm, from adverts, heartbeats, disconnects and leave notices."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

MAX_ADDRS = 16
MAX_LINKS = 64


def check_advert(body: Any) -> None:
    """Raise ValueError, naming the field, unless an advert body has the shape the node relies on: ``addrs`` (at
    most 16 strings), ``hardware`` (a map; ``HardwareProfile.from_dict`` checks it), ``host`` (a string), and
    where present ``model`` (a string), ``load`` (a map), ``links`` (a list) and ``rendezvous`` ([host, port])."""
    if not isinstance(body, dict):
        raise ValueError("an advert body is a map")
    addrs = body.get("addrs")
    if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS or not all(isinstance(a, str) for a in addrs):
        raise ValueError(f"advert addrs must be a list of at most {MAX_ADDRS} strings")
    for name, kind, optional in (("hardware", dict, False), ("host", str, False), ("model", str, True)):
        if not isinstance(body.get(name), kind) and not (optional and body.get(name) is None):
            raise ValueError(f"advert {name} must be a {'map' if kind is dict else 'string'}")
    for name, kind in (("load", dict), ("links", list)):
        if body.get(name) is not None and not isinstance(body[name], kind):
            raise ValueError(f"advert {name} must be a {'map' if kind is dict else 'list'}")
    rendezvous = body.get("rendezvous")
    if rendezvous is not None and not (
        isinstance(rendezvous, list)
        and len(rendezvous) == 2
        and isinstance(rendezvous[0], str)
        and rendezvous[0]
        and type(rendezvous[1]) is int
        and 0 < rendezvous[1] < 65536
    ):
        raise ValueError("advert rendezvous must be [host, port]")


@dataclass
class PeerRecord:
    peer_id: str
    addrs: list[str]
    hardware: dict[str, Any]
    host_name: str
    model: str
    load: dict[str, Any]
    advert_issued: float
    last_seen: float
    links: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PeerTable:
    """Peers other than this node, keyed by peer id. ``version`` changes whenever the member set does.

    A peer drops out when its adverts stop for ``timeout_s``, when its connection closes, or when it says it
    is leaving; an advert issued before the drop does not bring it back (gossip can deliver late).
    """

    self_id: str
    timeout_s: float = 6.0
    peers: dict[str, PeerRecord] = field(default_factory=dict)
    dropped_at: dict[str, float] = field(default_factory=dict)
    version: int = 0

    def live_ids(self) -> list[str]:
        """Sorted ids of every live member, this node included."""
        return sorted([self.self_id, *self.peers])

    def apply_advert(self, peer_id: str, body: dict[str, Any], issued: float, now: float) -> bool:
        """Record an advert already verified as signed by ``peer_id``; True if the peer is new. Raises ValueError
        for a body ``check_advert`` refuses."""
        check_advert(body)
        if peer_id == self.self_id or issued <= self.dropped_at.get(peer_id, float("-inf")):
            return False
        known = self.peers.get(peer_id)
        if known is not None and issued < known.advert_issued:
            return False
        self.peers[peer_id] = PeerRecord(
            peer_id=peer_id,
            addrs=list(body["addrs"]),
            hardware=dict(body["hardware"]),
            host_name=body["host"],
            model=body.get("model") or "",
            load=dict(body.get("load") or {}),
            advert_issued=issued,
            last_seen=now,
            links=list(body.get("links") or [])[:MAX_LINKS],
        )
        if known is None:
            self.version += 1
            return True
        return False

    def drop(self, peer_id: str, at: float) -> bool:
        """Remove a peer (disconnect, leave notice, expiry); True if it was a member."""
        record = self.peers.pop(peer_id, None)
        if record is None:
            return False
        self.dropped_at[peer_id] = max(at, record.advert_issued)
        self.version += 1
        return True

    def expire(self, now: float, keep: Collection[str] = ()) -> list[str]:
        """Drop every peer silent for longer than ``timeout_s``, except those in ``keep`` (peers whose
        connection is known healthy); returns their ids."""
        stale = [p for p, r in self.peers.items() if now - r.last_seen > self.timeout_s and p not in keep]
        for peer_id in stale:
            self.drop(peer_id, now)
        return stale
