"""A replica world formed the way the daemon's worker forms it (init_world_store with a connect timeout,
replica_groups, settle_world), for layouts where a rank sits outside some of the replica's groups."""

from __future__ import annotations

import dataclasses
import os
import threading
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from hexgen.engine.config import load_config
from hexgen.engine.kv_format import KVFormat, KVFormatError, format_key
from hexgen.engine.layout import StageLayout
from hexgen.engine.model_runner import CacheConfig, resolve_dtype
from hexgen.engine.replica import (
    ExchangeConfig,
    ReplicaSpec,
    ReplicaWorker,
    init_world_store,
    join_exchange,
    replica_groups,
    replica_kv_format,
    settle_world,
)
from hexgen.testing.ranks import run_ranks


def _form(rank: int, port: int) -> list[int]:
    """Rank ``rank`` of a PP2 x TP2 replica joins, settles and all-reduces over its own stage's group."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    spec = ReplicaSpec("unused", (StageLayout(0, 2, 2), StageLayout(2, 4, 2)))
    store = init_world_store(rank, 4, "127.0.0.1", port, "w/", connect_timeout_s=10.0)
    groups = replica_groups([spec], timedelta(seconds=10))
    settle_world(groups, 120.0)  # raised "Invalid process group specified" for the other stage's group
    stage = (0, 1) if rank < 2 else (2, 3)
    value = torch.tensor([rank])
    dist.all_reduce(value, group=groups[stage])
    del store
    return [int(value.item())]


def test_pp2_tp2_replica_world_settles_on_every_rank():
    server = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    outcomes = run_ranks(_form, 4, (server.port,), timeout_s=90)
    assert outcomes == {0: [1], 1: [1], 2: [5], 3: [5]}, outcomes


class _MissingStore:
    """An exchange store in which no peer ever published: each wait fails (after FORMAT_TIMEOUT, for real)."""

    def __init__(self) -> None:
        self.waits = 0

    def wait(self, keys: list[str], timeout: timedelta) -> None:
        self.waits += 1
        raise RuntimeError("wait timeout")


def test_a_missing_kv_format_costs_one_wait_per_epoch():
    worker = ReplicaWorker.__new__(ReplicaWorker)  # only the format cache is exercised
    store = _MissingStore()
    worker.exchange, worker._formats = SimpleNamespace(store=store, prefix="x/"), {}
    for _ in range(3):
        with pytest.raises(KVFormatError, match="exchange rank 3 is unavailable"):
            worker._format_of(3)
    assert store.waits == 1


def test_joining_an_exchange_publishes_the_kv_format(tiny_models):
    """The format goes out as the group forms, before any weight loads, and matches what the runner pages."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    spec = ReplicaSpec(str(tiny_models["llama-gqa"]), (StageLayout(0, 4, 1),))
    kv_format = replica_kv_format(spec)
    server = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    config = ExchangeConfig("127.0.0.1", server.port, "e/", 2, 3, (), timeout_s=10.0)
    joined: list[object] = []

    def join(first_rank: int, layout_rank: int) -> None:  # ranks 0, 1 of one replica, rank 2 of another
        joined.append(join_exchange(dataclasses.replace(config, first_rank=first_rank), layout_rank, kv_format))

    threads = [threading.Thread(target=join, args=ranks, daemon=True) for ranks in ((0, 0), (0, 1), (2, 0))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(joined) == 3
    assert [KVFormat.from_bytes(server.get(format_key("e/", r))) for r in range(3)] == [kv_format] * 3
    config = load_config(spec.model_dir)
    device = torch.device("cpu")
    runner_block = CacheConfig().resolved_block_size(device, resolve_dtype("auto", config, device))
    assert kv_format.block_size == runner_block


def test_a_replica_outside_a_relayed_exchange_s_gloo_group_forms_nothing_and_relays_all():
    """Replica 0 (ranks 0-1) is not among the gloo members: it neither dials the exchange store (nothing
    listens at its address) nor joins a group, and every peer is reached through its relay."""
    spec = ReplicaSpec("/models/m", (StageLayout(0, 4, 2),))
    other = dataclasses.replace(spec, first_rank=2)
    config = ExchangeConfig("127.0.0.1", 1, "e/", 0, 4, (spec, other), timeout_s=1.0, transport="libp2p", members=(1,))
    bound: list[tuple[str, int]] = []

    class Relay:
        def bind(self, prefix: str, rank: int) -> str:
            bound.append((prefix, rank))
            return "relay group"

    exchange, peers = join_exchange(config, 1, None, Relay())
    assert bound == [("e/", 1)] and peers == [spec, other]
    assert exchange.group is None and exchange.store is None and exchange.relay == "relay group"
    assert not exchange.through_gloo(2) and not exchange.through_gloo(0)
    with pytest.raises(ValueError, match="needs the worker's KV relay"):
        join_exchange(config, 1, None, None)
