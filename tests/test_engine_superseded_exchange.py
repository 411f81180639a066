"""A KV hand-off pending on an exchange group that a new plan epoch superseded fails at once, not after
TRANSFER_TIMEOUT: the decode replica moves to the new epoch's group (dropping the old one) while the prefill
replica's send waits; the prefill replica loses only that sequence, carries on, and hands the next one off
over the new group. Two workers of a tiny random checkpoint in spawned processes."""

from __future__ import annotations

import dataclasses
import pickle
import time
import traceback
from datetime import timedelta

import pytest

from hexgen.testing.checkpoints import LLAMA_GQA, reference_greedy
from hexgen.testing.ranks import free_port, run_ranks

PROMPT = [5, 17, 33, 2, 90, 41, 7]
MAX_TOKENS = 6
# TRANSFER_TIMEOUT in both workers: a superseded send that ran into it was not ended by the epoch change
TRANSFER_S = 20.0


def _rank(rank: int, port: int, model_dir: str, exchange_port: int) -> tuple[list[tuple[int, str]], float, list[int]]:
    import torch
    import torch.distributed as dist

    from hexgen.engine import replica as replica_module
    from hexgen.engine.layout import uniform_layout
    from hexgen.engine.model_runner import CacheConfig
    from hexgen.engine.replica import ExchangeConfig, ReplicaSpec, ReplicaWorker, Request, init_world, replica_groups
    from hexgen.engine.sequence import SamplingParams

    replica_module.TRANSFER_TIMEOUT = timedelta(seconds=TRANSFER_S)
    torch.set_num_threads(1)
    init_world(rank, 2, port)
    layout = uniform_layout(LLAMA_GQA["num_hidden_layers"], 1, 1)
    cache = CacheConfig(block_size=16)
    prefill = ReplicaSpec(model_dir, layout, mode="prefill", cache=cache)
    decode = ReplicaSpec(model_dir, layout, first_rank=1, mode="decode", cache=cache)
    worker = ReplicaWorker((prefill, decode)[rank], rank, replica_groups([prefill, decode]))
    epoch = ExchangeConfig("127.0.0.1", exchange_port, "epoch-1/", rank, 2, (prefill, decode), timeout_s=30.0)
    worker.begin_exchange(epoch)
    worker.await_exchange()
    assert worker.exchange is not None
    store = worker.exchange.store  # the test's store: the ranks meet there (it outlives the epoch's group)
    sampling = SamplingParams(max_tokens=MAX_TOKENS)
    new_epoch = dataclasses.replace(epoch, prefix="epoch-2/")
    if rank == 0:
        result = worker.step([Request(1, PROMPT, sampling, dst=1)])
        assert result is not None and [s.seq_id for s in result.handed_off] == [1]
        store.set("handing-off", b"1")
        start = time.monotonic()
        failed = worker.export_routed(result.handed_off)  # the decode replica moves on meanwhile
        elapsed = time.monotonic() - start
        assert worker.block_manager.num_free_blocks == worker.block_manager.num_blocks
        assert worker.step(exchange=new_epoch) is not None
        result = worker.step([Request(2, PROMPT, sampling, dst=1)])
        assert result is not None and [s.seq_id for s in result.handed_off] == [2]
        handed = list(result.handed_off[0].token_ids)
        store.set("handed", pickle.dumps(handed))
        assert worker.export_routed(result.handed_off) == []  # the new group carries the next hand-off
        dist.barrier()
        return failed, elapsed, handed[len(PROMPT) :]
    store.wait(["handing-off"], timedelta(seconds=30))
    assert worker.step(exchange=new_epoch) is not None  # sequence 1's import is never asked for
    store.wait(["handed"], timedelta(seconds=30))
    result = worker.step(imports=[Request(2, pickle.loads(store.get("handed")), sampling, src=0)])
    tokens = []
    while result is not None and not result.failed and result.ran:
        tokens += [token for seq_id, token in result.sampled if seq_id == 2]
        result = worker.step() if worker.scheduler.has_unfinished() else None
    assert result is None, result
    dist.barrier()
    return [], 0.0, tokens


def _outcome(rank: int, port: int, model_dir: str, exchange_port: int) -> object:
    try:
        return _rank(rank, port, model_dir, exchange_port)
    except BaseException:
        return "ERROR " + traceback.format_exc()


def test_a_send_pending_on_a_superseded_exchange_fails_at_once(
    tiny_models: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed as dist

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    exchange_port = free_port()
    store = dist.TCPStore("127.0.0.1", exchange_port, is_master=True, wait_for_workers=False)
    try:
        outcomes = run_ranks(_outcome, 2, (free_port(), str(tiny_models["llama-gqa"]), exchange_port), 90)
    finally:
        del store
    errors = [str(m) for m in outcomes.values() if not isinstance(m, tuple)]
    assert not errors, "\n".join(errors)
    failed, elapsed, _ = outcomes[0]
    assert [seq_id for seq_id, _ in failed] == [1], failed
    assert "sending KV to process-group ranks [1] failed" in failed[0][1]
    assert elapsed < TRANSFER_S / 2, f"the superseded send took {elapsed:.1f} s: it waited for the timeout"
    # the next sequence went over the new group: prefilled there, decoded here, as transformers continues it
    assert outcomes[0][2] + outcomes[1][2] == reference_greedy(tiny_models["llama-gqa"], [PROMPT], MAX_TOKENS)[0]
