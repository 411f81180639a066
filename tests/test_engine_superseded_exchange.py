"""A KV hand-off pending on an exchange group that a new plan epoch superseded fails at once, not after
TRANSFER_TIMEOUT, on either side: a rank told of the new epoch drops the old group, which ends its peer's
pending send or receive; that peer loses only the sequence concerned and carries on in the new epoch. A prefill
and a decode worker of a tiny random checkpoint in spawned processes."""

from __future__ import annotations

import dataclasses
import pickle
import time
import traceback
from datetime import timedelta
from typing import Any

import pytest

from hexgen.testing.checkpoints import LLAMA_GQA, reference_greedy
from hexgen.testing.ranks import free_port, run_ranks

PROMPT = [5, 17, 33, 2, 90, 41, 7]
MAX_TOKENS = 6
# TRANSFER_TIMEOUT in both workers: a superseded transfer that ran into it was not ended by the epoch change
TRANSFER_S = 20.0
WAIT = timedelta(seconds=30)


def _prefill(worker: Any, store: Any, epochs: list[Any]) -> dict[str, Any]:
    """Hand sequence 1 off while the decode replica moves to epoch 2, then sequence 2 over epoch 2's group;
    then move to epoch 3 while the decode replica waits for sequence 3's KV."""
    from hexgen.engine.replica import Request
    from hexgen.engine.sequence import SamplingParams

    sampling = SamplingParams(max_tokens=MAX_TOKENS)
    result = worker.step([Request(1, PROMPT, sampling, dst=1)])
    assert result is not None and [s.seq_id for s in result.handed_off] == [1]
    store.set("handing-off", b"1")
    start = time.monotonic()
    failed = worker.export_routed(result.handed_off)  # the decode replica moves on meanwhile
    elapsed = time.monotonic() - start
    assert worker.block_manager.num_free_blocks == worker.block_manager.num_blocks
    assert worker.step(exchange=epochs[1]) is not None
    result = worker.step([Request(2, PROMPT, sampling, dst=1)])
    assert result is not None and [s.seq_id for s in result.handed_off] == [2]
    handed = list(result.handed_off[0].token_ids)
    store.set("handed", pickle.dumps(handed))
    assert worker.export_routed(result.handed_off) == []  # the new group carries the next hand-off
    store.wait(["importing"], WAIT)
    assert worker.step(exchange=epochs[2]) is not None  # sequence 3's KV never goes
    assert worker.step() is not None
    return {"failed": failed, "elapsed": elapsed, "tokens": handed[len(PROMPT) :]}


def _decode(worker: Any, store: Any, epochs: list[Any]) -> dict[str, Any]:
    """Move to epoch 2 while sequence 1's KV is being sent; decode sequence 2; wait for sequence 3's KV while
    the prefill replica moves to epoch 3."""
    from hexgen.engine.replica import Request
    from hexgen.engine.sequence import SamplingParams

    sampling = SamplingParams(max_tokens=MAX_TOKENS)
    store.wait(["handing-off"], WAIT)
    assert worker.step(exchange=epochs[1]) is not None  # sequence 1's import is never asked for
    store.wait(["handed"], WAIT)
    result = worker.step(imports=[Request(2, pickle.loads(store.get("handed")), sampling, src=0)])
    tokens = []
    while result is not None and not result.failed and result.ran:
        tokens += [token for seq_id, token in result.sampled if seq_id == 2]
        result = worker.step() if worker.scheduler.has_unfinished() else None
    assert result is None, result
    free = worker.block_manager.num_free_blocks
    store.set("importing", b"1")
    start = time.monotonic()
    result = worker.step(imports=[Request(3, [*PROMPT, 1], sampling, src=0)])
    elapsed = time.monotonic() - start
    assert result is not None and worker.block_manager.num_free_blocks == free
    assert not worker.scheduler.has_unfinished()
    assert worker.step(exchange=epochs[2]) is not None and worker.step() is not None  # it carries on
    return {"failed": result.failed, "elapsed": elapsed, "tokens": tokens}


def _rank(rank: int, port: int, model_dir: str, exchange_port: int) -> Any:
    try:
        import torch
        import torch.distributed as dist

        from hexgen.engine import replica as replica_module
        from hexgen.engine.layout import uniform_layout
        from hexgen.engine.model_runner import CacheConfig
        from hexgen.engine.replica import ExchangeConfig, ReplicaSpec, ReplicaWorker, init_world, replica_groups

        replica_module.TRANSFER_TIMEOUT = timedelta(seconds=TRANSFER_S)
        torch.set_num_threads(1)
        init_world(rank, 2, port)
        layout = uniform_layout(LLAMA_GQA["num_hidden_layers"], 1, 1)
        cache = CacheConfig(block_size=16)
        prefill = ReplicaSpec(model_dir, layout, mode="prefill", cache=cache)
        decode = ReplicaSpec(model_dir, layout, first_rank=1, mode="decode", cache=cache)
        worker = ReplicaWorker((prefill, decode)[rank], rank, replica_groups([prefill, decode]))
        first = ExchangeConfig("127.0.0.1", exchange_port, "epoch-1/", rank, 2, (prefill, decode), timeout_s=30.0)
        epochs = [dataclasses.replace(first, prefix=f"epoch-{n}/") for n in (1, 2, 3)]
        worker.begin_exchange(epochs[0])
        worker.await_exchange()
        assert worker.exchange is not None
        store = worker.exchange.store  # the test's store: the ranks meet there (it outlives the epochs' groups)
        outcome = (_prefill, _decode)[rank](worker, store, epochs)
        dist.barrier()
        return outcome
    except BaseException:
        return "ERROR " + traceback.format_exc()


def test_a_transfer_pending_on_a_superseded_exchange_fails_at_once(
    tiny_models: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed as dist

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    exchange_port = free_port()
    store = dist.TCPStore("127.0.0.1", exchange_port, is_master=True, wait_for_workers=False)
    try:
        outcomes = run_ranks(_rank, 2, (free_port(), str(tiny_models["llama-gqa"]), exchange_port), 90)
    finally:
        del store
    errors = [str(m) for m in outcomes.values() if not isinstance(m, dict)]
    assert not errors, "\n".join(errors)
    prefill, decode = outcomes[0], outcomes[1]
    for side, seq_id, what in ((prefill, 1, "sending KV to"), (decode, 3, "receiving KV from")):
        assert [s for s, _ in side["failed"]] == [seq_id], side["failed"]
        assert what in side["failed"][0][1]
        assert side["elapsed"] < TRANSFER_S / 2, f"{what} took {side['elapsed']:.1f} s: it waited for the timeout"
    # sequence 2 went over epoch 2's group: prefilled there, decoded here, as transformers continues it
    assert prefill["tokens"] + decode["tokens"] == reference_greedy(tiny_models["llama-gqa"], [PROMPT], MAX_TOKENS)[0]
