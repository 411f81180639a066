"""A pipeline whose stages share no world: each stage is a torch.distributed world of its own (its TP ranks), and
the driver's broadcasts, the all-reduces that keep the ranks' schedulers in step and the hidden states between
stages all travel as KV-channel messages through stand-in daemons (``hexgen.testing.kv_daemons``), as they do
between hosts with no direct link. Every rank is its own process; tokens equal transformers' greedy ones."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from hexgen.engine.layout import StageLayout
from hexgen.engine.tokenizer import Tokenizer
from hexgen.testing.checkpoints import reference_greedy
from hexgen.testing.kv_daemons import StandInDaemons, connect
from hexgen.testing.ranks import context, free_port, run_ranks

PREFIX = "hexgen/1/1/exchange/"
PROMPTS = ["Once upon a time", "The little dog", "One day, a big"]
MAX_TOKENS = 40
STEPS_LIMIT = 2000
RANKS_TIMEOUT_S = 240.0
# pp2 with a TP stage: stories260K's 5 layers as 2 on one rank, then 3 over two ranks
LAYOUTS = {
    "pp2": (StageLayout(0, 2, 1), StageLayout(2, 5, 1)),
    "pp2-tp2": (StageLayout(0, 2, 1), StageLayout(2, 5, 2)),
    "pp3": (StageLayout(0, 1, 1), StageLayout(1, 3, 1), StageLayout(3, 5, 1)),
}


def _stage_world(layout: tuple[StageLayout, ...], rank: int, ports: list[int]) -> None:
    """Join the world of ``rank``'s stage alone, at that stage's port."""
    from hexgen.engine.layout import rank_position
    from hexgen.engine.replica import init_world

    stage, tp_rank = rank_position(layout, rank)
    init_world(tp_rank, layout[stage].tp, ports[stage])


def _serve(
    rank: int,
    layout: tuple[StageLayout, ...],
    model_dir: str,
    router: int,
    ports: list[int],
    prompts: list[list[int]],
    early: Any,
) -> list[list[int]] | None:
    """Rank ``rank`` of a bridged replica; the driver submits ``prompts`` (prefilled in chunks of 4 tokens)
    and returns their completions, the other ranks step until told to stop. The driver comes only once the
    stand-in daemons dropped something sent to it (``early`` set): what a daemon that has not started its
    worker yet does."""
    import os

    import torch

    from hexgen.engine.replica import ReplicaWorker, Request, spec_for
    from hexgen.engine.sequence import SamplingParams

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    if rank == _driver(layout) and not early.wait(RANKS_TIMEOUT_S):
        return None
    channel = connect(router, rank + 10)  # the bridge's numbering starts at 10, as an exchange's may
    _stage_world(layout, rank, ports)
    spec = spec_for(model_dir, layout, prefill_chunk=4)
    worker = ReplicaWorker(spec, rank, {}, bridge=channel.bind(PREFIX, rank + 10), bridge_offset=10)
    if not worker.is_driver:
        while worker.step() is not None:
            pass
        return None
    sampling = SamplingParams(max_tokens=MAX_TOKENS)
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    result = worker.step([Request(i, p, sampling) for i, p in enumerate(prompts)])
    for _ in range(STEPS_LIMIT):
        assert result is not None and not result.failed, result
        for seq_id, token in result.sampled:
            out[seq_id].append(token)
        if all(len(tokens) == MAX_TOKENS or (tokens and tokens[-1] == 2) for tokens in out.values()):
            break
        result = worker.step()
    worker.step(stop=True)
    return [out[i] for i in range(len(prompts))]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_a_pipeline_over_the_daemons_gives_transformers_tokens(stories_dir: Path, name: str) -> None:
    layout = LAYOUTS[name]
    prompts = [Tokenizer.from_dir(stories_dir).encode(p) for p in PROMPTS]
    expected = reference_greedy(stories_dir, prompts, MAX_TOKENS)
    ranks, driver = sum(stage.tp for stage in layout), _driver(layout)
    early = context.Event()
    daemons, router = StandInDaemons.for_processes(
        ranks, RANKS_TIMEOUT_S, lambda dst: dst == driver + 10 and early.set()
    )
    try:
        ports = [free_port() for _ in layout]
        args = (layout, str(stories_dir), router, ports, prompts, early)
        outcomes = run_ranks(_serve, ranks, args, RANKS_TIMEOUT_S)
    finally:
        daemons.close()
    assert early.is_set()
    assert outcomes[driver] == expected, outcomes
    assert all(outcomes[r] is None for r in range(ranks) if r != driver), outcomes


def _driver(layout: tuple[StageLayout, ...]) -> int:
    return sum(stage.tp for stage in layout[:-1])


def _alone(_: int, model_dir: str, router: int, port: int, rank: int) -> str:
    """Rank ``rank`` of a pp2 replica whose other rank never comes: what the wait for it raised."""
    import torch

    from hexgen.engine.replica import ReplicaWorker, spec_for
    from hexgen.engine.stage_link import StageLinkError

    torch.set_num_threads(1)
    channel = connect(router, rank)
    layout = LAYOUTS["pp2"]
    _stage_world(layout, rank, [port, port])
    spec = spec_for(model_dir, layout)
    try:
        ReplicaWorker(spec, rank, {}, load_timeout=timedelta(seconds=2), bridge=channel.bind(PREFIX, rank))
    except StageLinkError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("rank", [0, 1])  # the first stage's, then the driver
def test_a_stage_that_never_comes_is_named_once_the_load_timeout_passes(stories_dir: Path, rank: int) -> None:
    daemons, router = StandInDaemons.for_processes(2, RANKS_TIMEOUT_S)
    try:
        outcomes = run_ranks(_alone, 1, (str(stories_dir), router, free_port(), rank), RANKS_TIMEOUT_S)
    finally:
        daemons.close()
    assert outcomes[0] == f"replica rank {rank} heard nothing from rank {1 - rank} in 2 s", outcomes
