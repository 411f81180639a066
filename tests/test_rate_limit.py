"""Per-peer token buckets: bursts, refill, waits, peers apart, and a bounded table."""

from __future__ import annotations

import pytest

from hexgen.daemon import rate_limit
from hexgen.daemon.rate_limit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate_with_the_wait_named():
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3.0, clock=clock)
    assert [limiter.admit("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.admit("a") == pytest.approx(0.5)
    assert limiter.admit("a") == pytest.approx(0.5)  # a refused request spends nothing
    clock.now += 0.5
    assert limiter.admit("a") == 0.0
    assert limiter.admit("b") == 0.0  # each peer has its own bucket
    clock.now += 60
    assert [limiter.admit("a") for _ in range(4)][-1] > 0  # refills up to the burst, no further


def test_a_rate_of_zero_admits_everything():
    limiter = RateLimiter(rate=0.0, burst=0.0)
    assert all(limiter.admit("a") == 0.0 for _ in range(10_000))


def test_the_table_stays_bounded(monkeypatch):
    monkeypatch.setattr(rate_limit, "MAX_TRACKED_PEERS", 8)
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=2.0, clock=clock)
    for i in range(100):
        limiter.admit(f"p{i}")
        clock.now += 0.01
    assert len(limiter._buckets) <= 8
    clock.now += 10  # every bucket full again: all forgotten at the next trim
    for i in range(9):
        limiter.admit(f"q{i}")
    assert len(limiter._buckets) <= 8 and all(p.startswith("q") for p in limiter._buckets)
