"""Per-peer request rate limits: one token bucket per peer, refilled at ``rate`` per second up to ``burst``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_TRACKED_PEERS = 4096


@dataclass
class RateLimiter:
    """``rate`` requests per second per peer on average, ``burst`` at once; a rate of 0 admits everything."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer -> (tokens, when counted)

    def admit(self, peer: str) -> float:
        """Spend one of ``peer``'s tokens and return 0.0, or, with none left, return the seconds until one is
        (spending nothing). O(1), and O(peers) when more than MAX_TRACKED_PEERS are tracked."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        tokens = self._tokens(peer, now)
        if tokens < 1.0:
            self._buckets[peer] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[peer] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_TRACKED_PEERS:
            self._forget(now)
        return 0.0

    def _tokens(self, peer: str, now: float) -> float:
        tokens, counted = self._buckets.get(peer, (self.burst, now))
        return min(self.burst, tokens + (now - counted) * self.rate)

    def _forget(self, now: float) -> None:
        """Drop full buckets (a peer not seen is a full bucket), then, if still too many, the longest idle."""
        self._buckets = {p: b for p, b in self._buckets.items() if self._tokens(p, now) < self.burst}
        while len(self._buckets) > MAX_TRACKED_PEERS:
            del self._buckets[min(self._buckets, key=lambda p: self._buckets[p][1])]
