"""The live peer table: who is in the swarm, from adverts, heartbeats, disconnects and leave notices."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from hexgen.daemon.messages import Advert


@dataclass
class PeerRecord:
    """A live member: its latest advert, when that was issued and when it was last heard of."""

    peer_id: str
    advert: Advert
    advert_issued: float
    last_seen: float

    @property
    def addrs(self) -> list[str]:
        return list(self.advert.addrs)

    @property
    def host_name(self) -> str:
        return self.advert.host


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

    def apply_advert(self, peer_id: str, advert: Advert, issued: float, now: float) -> bool:
        """Record an advert already verified as signed by ``peer_id``; True if the peer is new."""
        if peer_id == self.self_id or issued <= self.dropped_at.get(peer_id, float("-inf")):
            return False
        known = self.peers.get(peer_id)
        if known is not None and issued < known.advert_issued:
            return False
        self.peers[peer_id] = PeerRecord(peer_id, advert, issued, now)
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
