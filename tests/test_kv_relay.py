"""The daemons' KV relay: which arriving KV parts a daemon delivers (daemon/kv_relay.py ``accepts``)."""

from __future__ import annotations

import dataclasses

from hexgen.daemon.deployment import Deployment, Replica
from hexgen.daemon.kv_frames import KvPart
from hexgen.daemon.kv_relay import accepts

PREFILL = Replica(0, 0, "prefill", ((0, 5, 2),), 0, (("A", 0), ("B", 0)))
DECODE = Replica(1, 1, "decode", ((0, 5, 1),), 2, (("C", 0),))
RELAYED = Deployment(
    3, 7, (PREFILL, DECODE), ((0, 1.0),), {0: ((1, 1.0),)}, ("a", 1), (("a", 1), ("c", 1)), False, "libp2p"
)
PART = KvPart(RELAYED.exchange_prefix, 1, 2, 9, 0, 0, 1, "float32", (1,), bytes(4))


def test_a_part_is_delivered_only_from_the_host_of_its_source_rank_to_the_host_of_its_destination() -> None:
    assert RELAYED.rank_peer(0) == "A" and RELAYED.rank_peer(1) == "B" and RELAYED.rank_peer(2) == "C"
    assert RELAYED.rank_peer(3) is None
    assert accepts(RELAYED, PART, "B", "C") is None
    assert "which peer A does not host" in (accepts(RELAYED, PART, "A", "C") or "")  # A hosts rank 0, not 1
    assert "which this daemon does not host" in (accepts(RELAYED, PART, "B", "A") or "")
    elsewhere = dataclasses.replace(PART, dst=5)
    assert "which this daemon does not host" in (accepts(RELAYED, elsewhere, "B", "C") or "")


def test_a_part_of_another_epoch_or_of_a_gloo_exchange_is_dropped() -> None:
    older = dataclasses.replace(PART, prefix="hexgen/3/6/exchange/")
    assert "not this daemon's relayed exchange" in (accepts(RELAYED, older, "B", "C") or "")
    direct = dataclasses.replace(RELAYED, exchange="torch")
    assert "not this daemon's relayed exchange" in (accepts(direct, PART, "B", "C") or "")
    assert accepts(None, PART, "B", "C") is not None
