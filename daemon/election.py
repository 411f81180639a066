"""Coordinator election by leases: terms only grow, the holder renews, every node derives the same candidate.

Pure state; the daemon feeds it verified lease envelopes and the live member list. A node claims the
next term when it is the candidate (the smallest live peer id) and no live holder has an unexpired lease.
A holder keeps its lease while it lives, even if a smaller id joins later: stability beats churn.
A higher term is accepted from the candidate, from an id smaller than the current holder's, or once
the current holder is gone, so a live member cannot take over by inventing a term. A holder that sees
such a refused rival claims a term above it, which also settles two holders meeting after a partition
(the smaller id ends up with the highest term).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Lease:
    holder: str
    term: int
    expires: float

    def to_body(self) -> dict[str, Any]:
        return {"holder": self.holder, "term": self.term}


class LeaseRejected(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def candidate(live_ids: list[str]) -> str:
    """The peer every node with the same live table picks: the smallest id."""
    return min(live_ids)


@dataclass
class Election:
    self_id: str
    lease: Lease | None = None
    rival_term: int = 0

    @property
    def term(self) -> int:
        return self.lease.term if self.lease else 0

    @property
    def coordinator(self) -> str | None:
        return self.lease.holder if self.lease else None

    def is_coordinator(self, now: float) -> bool:
        return self.lease is not None and self.lease.holder == self.self_id and now <= self.lease.expires

    def accept(self, lease: Lease, live_ids: list[str], now: float) -> bool:
        """Adopt a verified lease, or raise LeaseRejected with the reason; True if the holder changed."""
        if lease.expires < now:
            raise LeaseRejected("expired", f"lease of {lease.holder} for term {lease.term} has expired")
        if lease.holder not in live_ids:
            raise LeaseRejected("not-member", f"lease holder {lease.holder} is not a live member")
        current = self.lease
        if current is not None:
            if lease.term < current.term:
                raise LeaseRejected("stale-term", f"lease term {lease.term} is older than current term {current.term}")
            # Two claims for one term (views had not converged): the smaller id wins everywhere.
            same_term_rival = lease.term == current.term and lease.holder != current.holder
            if same_term_rival and lease.holder > current.holder and current.expires >= now:
                raise LeaseRejected("conflicting-holder", f"term {lease.term} is already held by {current.holder}")
            if lease.term > current.term and lease.holder != current.holder:
                legitimate = (
                    lease.holder == candidate(live_ids)
                    or lease.holder < current.holder
                    or self.holder_gone(live_ids, now)
                )
                if not legitimate:
                    self.rival_term = max(self.rival_term, lease.term)
                    raise LeaseRejected(
                        "not-candidate",
                        f"{lease.holder} claims term {lease.term} while {current.holder} holds term {current.term}",
                    )
        changed = current is None or current.holder != lease.holder or current.term != lease.term
        self.lease = lease
        return changed

    def holder_gone(self, live_ids: list[str], now: float) -> bool:
        return self.lease is None or self.lease.expires < now or self.lease.holder not in live_ids

    def should_claim(self, live_ids: list[str], now: float) -> bool:
        if self.is_coordinator(now) and self.rival_term >= self.term:
            return True
        return candidate(live_ids) == self.self_id and self.holder_gone(live_ids, now)

    def claim(self, now: float, ttl_s: float) -> Lease:
        """This node's lease for the next term (or a renewal of its current one)."""
        term = self.term
        if (
            self.lease is None
            or self.lease.holder != self.self_id
            or self.lease.expires < now
            or self.rival_term >= term
        ):
            term = max(self.term, self.rival_term) + 1
        self.rival_term = 0
        self.lease = Lease(self.self_id, term, now + ttl_s)
        return self.lease

    def forget_holder(self, peer_id: str) -> None:
        """The holder left or died: keep the term (so stale claims stay refused) but expire the lease."""
        if self.lease is not None and self.lease.holder == peer_id:
            self.lease = Lease(self.lease.holder, self.lease.term, float("-inf"))
