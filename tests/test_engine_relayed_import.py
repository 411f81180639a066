"""A decode replica takes a KV relayed through the daemons only once it has arrived whole, and decodes its other
sequences meanwhile: stories260K, prefill and decode replicas in one process, the relay's daemons stood in by
threads (``hexgen.testing.kv_daemons``), tokens equal to transformers'."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hexgen.engine.config import load_config
from hexgen.engine.kv_transfer import Exchange
from hexgen.engine.layout import uniform_layout
from hexgen.engine.replica import ReplicaWorker, Request, StepResult, init_world, kv_tag, replica_groups, spec_for
from hexgen.engine.sequence import SamplingParams
from hexgen.testing.checkpoints import reference_greedy
from hexgen.testing.kv_daemons import StandInDaemons
from hexgen.testing.ranks import free_port

MAX_TOKENS = 24
PROMPTS = ([1, 403, 407, 261, 378], [1, 365, 263, 443, 297, 311])
PREFIX = "hexgen/1/1/exchange/"
STEPS_LIMIT = 400


@pytest.fixture
def replicas(
    stories_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ReplicaWorker, ReplicaWorker, StandInDaemons]]:
    """A prefill and a decode replica of one rank each, in a world of this process alone, whose exchange
    relays every KV."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    init_world(0, 1, free_port())
    daemons = StandInDaemons(2)
    try:
        layout = uniform_layout(load_config(stories_dir).num_layers, 1, 1)
        specs = [
            spec_for(stories_dir, layout, mode="prefill"),
            spec_for(stories_dir, layout, first_rank=1, mode="decode"),
        ]
        groups = replica_groups(specs)
        workers = [ReplicaWorker(spec, rank, groups) for rank, spec in enumerate(specs)]
        for rank, worker in enumerate(workers):
            worker.adopt_exchange((Exchange(None, relay=daemons.channels[rank].bind(PREFIX, rank), ranks={}), specs))
        yield workers[0], workers[1], daemons
    finally:
        daemons.close()
        dist.destroy_process_group()


def _prefill(prefill: ReplicaWorker, seq_id: int) -> list[int]:
    """Prefill ``PROMPTS[seq_id]`` for decode replica 1 and send its KV; returns prompt plus first token."""
    sampling = SamplingParams(max_tokens=MAX_TOKENS)
    result = prefill.step([Request(seq_id, list(PROMPTS[seq_id]), sampling, dst=1)])
    for _ in range(STEPS_LIMIT):
        assert result is not None
        if result.handed_off:
            (seq,) = result.handed_off
            tokens = list(seq.token_ids)
            prefill.export_routed(result.handed_off)
            return tokens
        result = prefill.step()
    raise AssertionError("the prefill replica never handed the sequence off")


def test_a_decode_replica_keeps_decoding_while_a_relayed_kv_is_on_its_way(
    replicas: tuple[ReplicaWorker, ReplicaWorker, StandInDaemons], stories_dir: Path
) -> None:
    prefill, decode, daemons = replicas
    sampling = SamplingParams(max_tokens=MAX_TOKENS)
    out: dict[int, list[int]] = {0: [], 1: []}
    finished: set[int] = set()

    def step(imports: list[Request] | None = None) -> StepResult:
        result = decode.step(imports=imports)
        assert result is not None and not result.failed, result
        for seq_id, token in result.sampled:
            out[seq_id].append(token)
        finished.update(seq.seq_id for seq in result.finished)
        return result

    first = _prefill(prefill, 0)
    out[0].append(first[-1])
    step([Request(0, first, sampling, src=0)])
    for _ in range(STEPS_LIMIT):  # sequence 0's KV arrives, and it decodes
        if out[0][1:]:
            break
        step()
    daemons.hold(kv_tag(1))  # a slow link: sequence 1's KV is on its way
    second = _prefill(prefill, 1)
    out[1].append(second[-1])
    step([Request(1, second, sampling, src=0)])
    decoded = len(out[0])
    for _ in range(3):
        assert decode.pending_imports
        step()
    assert len(out[0]) >= decoded + 3 and out[1] == second[-1:]  # sequence 0 went on decoding
    daemons.release(kv_tag(1))
    for _ in range(STEPS_LIMIT):
        if finished == {0, 1}:
            break
        step()
    assert not decode.pending_imports
    assert [out[0], out[1]] == reference_greedy(stories_dir, [list(p) for p in PROMPTS], MAX_TOKENS)


def test_a_relayed_kv_that_never_arrives_fails_only_its_sequence(
    replicas: tuple[ReplicaWorker, ReplicaWorker, StandInDaemons], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hexgen.engine import replica as replica_module

    prefill, decode, daemons = replicas
    monkeypatch.setattr(replica_module, "TRANSFER_TIMEOUT", replica_module.timedelta(microseconds=1))
    daemons.hold(kv_tag(0))
    tokens = _prefill(prefill, 0)
    free = decode.block_manager.num_free_blocks
    result = decode.step(imports=[Request(0, tokens, SamplingParams(max_tokens=MAX_TOKENS), src=0)])
    assert result is not None
    assert [(seq_id, "did not arrive" in why) for seq_id, why in result.failed] == [(0, True)]
    assert not decode.pending_imports and decode.block_manager.num_free_blocks == free
