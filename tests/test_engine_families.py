"""Every family beside Llama and OPT (Qwen2 with sliding windows and yarn, Qwen3, Mistral, Phi-3, Gemma,
Gemma 2, Mixtral) gives transformers' greedy tokens for prompts and generations shorter and longer than its
sliding window: at TP=1, and at TP=2, PP=2 and prefill TP=2 -> decode PP=2 in one spawned world of four
ranks that runs every family in turn."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hexgen.engine.attention import AttentionMetadata, decode_window_mask
from hexgen.engine.config import load_config, parse_config
from hexgen.engine.layers import Shard
from hexgen.engine.layout import uniform_layout
from hexgen.engine.llm import LLM
from hexgen.engine.loader import load_weights
from hexgen.engine.model_runner import CacheConfig
from hexgen.engine.models import build_model
from hexgen.engine.replica import ReplicaSpec, ReplicaWorker, Request, init_world, replica_groups, spec_for
from hexgen.engine.sequence import SamplingParams, Sequence
from hexgen.engine.varlen import plan_prefill, prefill_mask
from hexgen.testing.checkpoints import NEW_FAMILIES, SMALL, WINDOW, save_random_checkpoint
from hexgen.testing.ranks import free_port, run_ranks

MAX_TOKENS = 20
# lengths 21 and 5 straddle the window of 8 and the rope contexts of 16; every generation runs past both.
# The longer comes first: transformers keeps dynamic rope frequencies from one generation to the next unless
# the next starts within the trained context, and the engine computes them afresh for each sequence.
PROMPT_LENGTHS = (21, 5)
CACHE = CacheConfig(num_blocks=32)


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[list[int]]]]:
    """name -> (checkpoint, transformers' greedy completions of PROMPTS)."""
    from hexgen.testing.checkpoints import reference_greedy

    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in NEW_FAMILIES:
        model_dir = save_random_checkpoint(name, root / name)
        out[name] = (model_dir, reference_greedy(model_dir, prompts(), MAX_TOKENS))
    return out


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, SMALL["vocab_size"], (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def test_window_masks_see_the_query_and_the_window_before_it():
    cpu = torch.device("cpu")
    tables = torch.zeros(2, 1, dtype=torch.int32)  # a cached prefix: keys are read by position from the cache
    [plan] = plan_prefill([3, 4], [6, 5], tables, cpu)  # one length class: one group
    first, second = (prefill_mask(plan, 2)[b, 0] for b in range(2))
    assert [row.nonzero().flatten().tolist() for row in first[:3]] == [[2, 3], [3, 4], [4, 5]]  # the last 3 of 6
    assert first[3].all()  # a padding row sees everything, so its softmax has something to normalize
    assert [row.nonzero().flatten().tolist() for row in second] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    [plan] = plan_prefill([3, 4], [3, 4], None, cpu)  # no prefix: keys are the step's own, padded alike
    assert [row.nonzero().flatten().tolist() for row in prefill_mask(plan, 0)[0, 0, :3]] == [[0], [0, 1], [0, 1, 2]]
    short, long = plan_prefill([3, 9, 4], [3, 9, 4], None, cpu)  # two classes, each its own padded batch
    assert (short.batch, short.q_width, long.batch, long.q_width) == (2, 4, 1, 9)
    assert short.source is not None and short.source.tolist() == [0, 1, 2, 12, 13, 14, 15]
    meta = AttentionMetadata(False, torch.zeros(2, dtype=torch.long), [1, 1], [3, 6], gather_len=6)
    meta.decode_lens = torch.tensor([3, 6])
    seen = [row.nonzero().flatten().tolist() for row in decode_window_mask(meta, 4).view(2, 6)]
    assert seen == [[0, 1, 2], [2, 3, 4, 5]]


def test_windows_and_lengths_cover_the_case():
    assert min(PROMPT_LENGTHS) < WINDOW < max(PROMPT_LENGTHS)
    assert {n for spec in NEW_FAMILIES.values() if (n := spec.get("sliding_window"))} == {WINDOW}


@pytest.mark.parametrize("name", sorted(NEW_FAMILIES))
def test_tp1_matches_transformers(families, name):
    model_dir, expected = families[name]
    ours = LLM(model_dir, cache=CACHE).generate(prompts(), SamplingParams(max_tokens=MAX_TOKENS))
    assert [o.token_ids for o in ours] == expected


def test_layouts_match_transformers(families):
    dirs = {name: str(model_dir) for name, (model_dir, _) in families.items()}
    outcomes = run_ranks(_rank, 4, (free_port(), dirs), timeout_s=240)
    assert all(isinstance(o, dict) for o in outcomes.values()), outcomes
    for name, (_, expected) in families.items():
        # the drivers: rank 0 of TP=2, rank 3 (PP stage 1) of PP=2 and of the decode replica
        got = {
            "tp2": outcomes[0][name]["tp2"],
            "pp2": outcomes[3][name]["pp2"],
            "tp2->pp2": outcomes[3][name]["disagg"],
        }
        assert got == dict.fromkeys(got, expected), name


def _rank(rank: int, port: int, dirs: dict[str, str]) -> dict[str, dict[str, list[list[int]]]]:
    """Ranks 0-1 are a TP=2 replica, ranks 2-3 a PP=2 one; each family is served on both side by side, then
    prefilled on the first and decoded on the second. Returns what each driver saw, by family and layout."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    init_world(rank, 4, port)
    tp2 = spec_for("", uniform_layout(4, 1, 2), cache=CACHE)
    pp2 = spec_for("", uniform_layout(4, 2, 1), first_rank=2, cache=CACHE)
    groups = replica_groups([tp2, pp2])
    out: dict[str, dict[str, list[list[int]]]] = {}
    for name, model_dir in dirs.items():
        tp2, pp2 = (dataclasses.replace(s, model_dir=model_dir) for s in (tp2, pp2))
        mine = tp2 if rank < 2 else pp2
        colocated = _generate(ReplicaWorker(mine, rank, groups), _requests())
        prefill, decode = dataclasses.replace(tp2, mode="prefill"), dataclasses.replace(pp2, mode="decode")
        worker = ReplicaWorker(prefill if rank < 2 else decode, rank, groups)
        disagg = _prefill(worker, decode) if rank < 2 else _decode(worker, prefill)
        out[name] = {"tp2" if rank < 2 else "pp2": colocated, "disagg": disagg}
    dist.destroy_process_group()
    return out


def _requests() -> list[Request]:
    return [Request(i, p, SamplingParams(max_tokens=MAX_TOKENS)) for i, p in enumerate(prompts())]


def _generate(worker: ReplicaWorker, requests: list[Request] | None = None) -> list[list[int]]:
    """Step a replica until every sequence finished (the driver adds ``requests`` first); every rank steps
    alike and sees the same results."""
    done: dict[int, list[int]] = {}
    result = worker.step(requests if worker.is_driver else None)
    while True:
        assert result is not None
        done |= {seq.seq_id: seq.completion_token_ids for seq in result.finished}
        if len(done) == len(PROMPT_LENGTHS):
            return [done[i] for i in sorted(done)]
        result = worker.step()


def _share(seqs: list[Sequence] | None) -> list[list[int]]:
    """Rank 0's handed-off token lists, broadcast to the world (prompt + first token each)."""
    sizes = torch.tensor([len(s) for s in seqs] if seqs else [0] * len(PROMPT_LENGTHS))
    dist.broadcast(sizes, src=0)
    flat = (
        torch.tensor([t for s in seqs for t in s.token_ids])
        if seqs
        else torch.empty(int(sizes.sum()), dtype=torch.long)
    )
    dist.broadcast(flat, src=0)
    return [part.tolist() for part in torch.split(flat, sizes.tolist())]


def _prefill(worker: ReplicaWorker, decode: ReplicaSpec) -> list[list[int]]:
    handed: list[Sequence] = []
    result = worker.step(_requests() if worker.is_driver else None)
    while True:
        assert result is not None
        handed += result.handed_off
        if len(handed) == len(PROMPT_LENGTHS):
            break
        result = worker.step()
    handed.sort(key=lambda s: s.seq_id)
    _share(handed if worker.rank == 0 else None)
    worker.export_kv(handed, decode)
    return []


def _decode(worker: ReplicaWorker, prefill: ReplicaSpec) -> list[list[int]]:
    tokens = _share(None)
    sampling = SamplingParams(max_tokens=MAX_TOKENS)
    worker.import_kv([Request(i, t, sampling) for i, t in enumerate(tokens)], prefill)
    return _generate(worker)


def test_configs_parse_as_their_family(families):
    windows = {name: load_config(d).layer_windows for name, (d, _) in families.items()}
    assert windows["mistral"] == windows["phi3"] == (WINDOW,) * 4
    assert windows["qwen2"] == (0, 0, WINDOW, WINDOW)
    assert windows["gemma2"] == (WINDOW, 0, WINDOW, 0)
    assert windows["qwen3"] == windows["gemma"] == windows["mixtral"] == ()


@torch.no_grad()
def test_gemma2_soft_capped_logits_match_transformers(families):
    """The final soft-cap is monotone, so greedy tokens cannot show it: the logits themselves must match."""
    import transformers

    model_dir, _ = families["gemma2"]
    config = load_config(model_dir)
    model = build_model(config, Shard(0, config.num_layers, config.num_layers))
    load_weights(model, model_dir, torch.float32)
    ids = torch.tensor(prompts()[0])
    n = len(ids)
    meta = AttentionMetadata(True, torch.empty(0, dtype=torch.long), [n], [n])
    meta.prefill = plan_prefill([n], [n], None, torch.device("cpu"))
    ours = model.logits(model(ids, torch.arange(n), meta)[-1:])
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.testing.assert_close(ours, reference(ids[None]).logits[0, -1:], atol=1e-4, rtol=1e-4)


def test_rope_scaling_stretches_the_context():
    """Qwen2.5's long-context recipe keeps max_position_embeddings at the trained 32768 and adds yarn x4."""
    base = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    base |= {"vocab_size": 10, "intermediate_size": 8, "max_position_embeddings": 32768}
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert parse_config({**base, "rope_scaling": yarn}).max_position == 4 * 32768
    assert parse_config({**base, "rope_scaling": {"type": "dynamic", "factor": 2.0}}).max_position == 2 * 32768
    assert parse_config(base).max_position == 32768


# A cache trimmed to the window (every layer of Mistral is windowed): blocks of 4 tokens, so a prompt of 21
# and its 20 tokens span 11 blocks while the window of 8 needs at most 3, 4 with a chunk of 4 being written.
WINDOWED = ("mistral", "phi3")
SMALL_BLOCKS = 4


@pytest.mark.parametrize(
    ("name", "attention", "chunk", "num_blocks"),
    [
        ("mistral", "sdpa", 0, 32),  # whole prompts in one step, trimmed after it
        ("mistral", "sdpa", 4, 8),  # chunked: the two sequences' 22 blocks in a cache of 8
        # FlexAttention's paged decode past FREED table entries, from decode graphs' static tables (each
        # step replayed by running it again) that are wider than the cache
        ("phi3", "flex", 4, 8),
    ],
)
def test_window_trimmed_cache_matches_transformers(families, name, attention, chunk, num_blocks):
    model_dir, expected = families[name]
    cache = CacheConfig(block_size=SMALL_BLOCKS, num_blocks=num_blocks, attention=attention)
    llm = LLM(model_dir, cache=cache, prefill_chunk=chunk)
    graphs = llm.runner.enable_graphs(lambda step: step, max_batch=2) if attention == "flex" else None
    assert llm.block_manager.window == WINDOW
    whole = sum(-(-(n + MAX_TOKENS) // SMALL_BLOCKS) for n in PROMPT_LENGTHS)
    assert chunk == 0 or whole > num_blocks  # the cache could not hold the sequences untrimmed
    ours = llm.generate(prompts(), SamplingParams(max_tokens=MAX_TOKENS))
    assert [o.token_ids for o in ours] == expected
    assert llm.block_manager.num_free_blocks == num_blocks
    assert graphs is None or graphs.num_replays > 0


def test_gemma2_keeps_every_block_for_its_global_layers(families):
    llm = LLM(families["gemma2"][0], cache=CacheConfig(block_size=SMALL_BLOCKS, num_blocks=32))
    assert llm.block_manager.window == 0


def test_window_trimmed_hand_off_matches_transformers(families):
    """Prefill on one rank, decode on another, both caches trimmed to the window: only held blocks move."""
    model_dir, expected = families["mistral"]
    outcomes = run_ranks(_hand_off_rank, 2, (free_port(), str(model_dir)), timeout_s=120)
    assert outcomes[1] == expected, outcomes


def _hand_off_rank(rank: int, port: int, model_dir: str) -> list[list[int]]:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    init_world(rank, 2, port)
    cache = CacheConfig(block_size=SMALL_BLOCKS, num_blocks=8)
    layout = uniform_layout(4, 1, 1)
    prefill = spec_for(model_dir, layout, cache=cache, mode="prefill", prefill_chunk=4)
    decode = spec_for(model_dir, layout, first_rank=1, cache=cache, mode="decode", prefill_chunk=4)
    groups = replica_groups([prefill, decode])
    worker = ReplicaWorker(prefill if rank == 0 else decode, rank, groups)
    out = _prefill(worker, decode) if rank == 0 else _decode(worker, prefill)
    dist.destroy_process_group()
    return out
