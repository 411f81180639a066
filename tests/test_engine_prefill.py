"""Chunked and varlen prefill, and FlexAttention's paged decode: same greedy tokens as transformers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from hexgen.engine.attention import Attention, AttentionMetadata, choose_attention
from hexgen.engine.block_manager import BlockManager
from hexgen.engine.llm import LLM
from hexgen.engine.model_runner import CacheConfig
from hexgen.engine.paged import PagedDecode
from hexgen.engine.scheduler import Scheduler, SchedulerConfig
from hexgen.engine.sequence import SamplingParams, Sequence
from hexgen.testing.checkpoints import reference_greedy

MAX_TOKENS = 16


def _prompts(vocab: int) -> list[list[int]]:
    """One long prompt among short ones, so a chunked run decodes the short ones while the long one fills."""
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (9, 100, 4, 33)]


@pytest.fixture(scope="module")
def stories_reference(stories_dir):
    prompts = _prompts(512)
    return prompts, reference_greedy(stories_dir, prompts, MAX_TOKENS)


FLEX = CacheConfig(attention="flex", num_blocks=3)  # eager on CPU it scores every slot: a small cache


@pytest.mark.parametrize(
    ("chunk", "cache", "picked", "max_tokens"),
    [(0, CacheConfig(), (0, 1, 2, 3), MAX_TOKENS), (16, CacheConfig(), (0, 1, 2, 3), MAX_TOKENS), (7, FLEX, (0, 3), 5)],
    ids=["whole-prompts", "chunks-of-16", "chunks-of-7-flex-decode"],
)
def test_prefill_matches_transformers(stories_dir, stories_reference, chunk, cache, picked, max_tokens):
    prompts, expected = ([pair[i] for i in picked] for pair in stories_reference)
    expected = [tokens[:max_tokens] for tokens in expected]  # greedy: a shorter run is a prefix
    llm = LLM(stories_dir, prefill_chunk=chunk, cache=cache)
    steps = []
    for prompt in prompts:
        llm.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    seqs = list(llm.scheduler.waiting)
    while llm.has_unfinished():
        batch = llm.scheduler.schedule()
        assert batch is not None
        steps.append((batch.is_prefill, len(batch.seqs), batch.num_tokens))
        tokens = llm.runner.run(batch.seqs, batch.is_prefill, num_new_tokens=batch.num_new_tokens)
        assert tokens is not None and tokens.shape[0] == len(batch.sampling_seqs)
        picked = tokens.argmax(-1).tolist()
        llm.scheduler.postprocess(batch, picked)
    assert [s.completion_token_ids for s in seqs] == expected
    if chunk:  # every step stays within the chunk plus one token per decoding sequence
        assert all(tokens <= chunk + n for _, n, tokens in steps)
        assert any(is_prefill and tokens > chunk for is_prefill, _, tokens in steps), "no mixed step ran"
    else:
        assert steps[0] == (True, len(prompts), sum(map(len, prompts)))  # one varlen call for every prompt


def test_scheduler_decodes_while_a_long_prompt_prefills():
    bm = BlockManager(64, 4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, prefill_chunk=8), bm)
    short = Sequence([5, 6, 7], SamplingParams(max_tokens=50))
    scheduler.add(short)
    first = scheduler.schedule()
    assert first is not None and first.seqs == [short] and first.num_new_tokens == [3]
    scheduler.postprocess(first, [1])
    long = Sequence(list(range(10, 40)), SamplingParams(max_tokens=50))  # 30 tokens: chunks of 8, 8, 8, 6
    scheduler.add(long)
    chunks = []
    while len(long) == 30:
        batch = scheduler.schedule()
        assert batch is not None and batch.is_prefill
        assert batch.seqs == [short, long], "the decode sequence steps with every chunk"
        chunks.append(batch.num_new_tokens[1])
        sampled = batch.sampling_seqs
        before = len(short)
        scheduler.postprocess(batch, [2] * len(sampled))
        assert len(short) == before + 1
        assert (long in sampled) == (sum(chunks) == 30)
    assert chunks == [8, 8, 8, 6]
    assert long.num_cached_tokens == 30 and len(long) == 31
    after = scheduler.schedule()
    assert after is not None and not after.is_prefill and after.seqs == [short, long]


def test_chunked_prefill_takes_prompts_longer_than_the_token_budget():
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=16, prefill_chunk=8), BlockManager(64, 4))
    scheduler.add(Sequence(list(range(40))))  # unchunked, this prompt could never run
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(SchedulerConfig(max_num_batched_tokens=16), BlockManager(64, 4)).add(Sequence(list(range(40))))
    with pytest.raises(ValueError, match="prefill_chunk"):
        SchedulerConfig(prefill_chunk=-1)


@pytest.mark.parametrize(("window", "softcap"), [(0, 0.0), (5, 0.0), (0, 20.0)])
def test_flex_paged_decode_equals_the_gathering_path(window, softcap):
    torch.manual_seed(0)
    heads, kv_heads, dim, block, blocks = 4, 2, 16, 8, 12
    attn = Attention(heads, kv_heads, dim, dim**-0.5, window, softcap)
    attn.k_cache = torch.randn(blocks, block, kv_heads, dim)
    attn.v_cache = torch.randn(blocks, block, kv_heads, dim)
    tables = torch.tensor([[3, 1, 0], [5, 0, 0], [2, 7, 9]], dtype=torch.int32)  # padded with block 0
    lens = torch.tensor([13, 5, 24])
    q, k, v = torch.randn(3, heads, dim), torch.randn(3, kv_heads, dim), torch.randn(3, kv_heads, dim)
    slots = torch.tensor([1 * block + 4, 5 * block + 4, 9 * block + 7])  # each sequence's last position

    def meta() -> AttentionMetadata:
        m = AttentionMetadata(False, slots, [1, 1, 1], lens.tolist(), num_decode=3, decode_lens=lens)
        m.gather, m.gather_len = tables.long().view(-1), int(lens.max())
        m.mask = (torch.arange(m.gather_len) < lens.unsqueeze(1)).view(3, 1, 1, -1)
        return m

    gathered = attn(q, k, v, meta())
    paged = PagedDecode(blocks, block, torch.device("cpu"), max_seqs=2)  # grows to the batch
    paged.update(tables, lens)
    flex_meta = meta()
    flex_meta.paged = paged
    torch.testing.assert_close(attn(q, k, v, flex_meta), gathered, atol=1e-5, rtol=1e-5)


class EagerCapture:
    """A capture for CPU: records each step it is given and replays it by running it again, so a step that
    read anything but the static buffers would produce wrong tokens."""

    def __init__(self) -> None:
        self.captured = 0

    def __call__(self, step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        self.captured += 1
        step()
        return step


def test_decode_graphs_replay_with_static_buffers(stories_dir, stories_reference):
    prompts, expected = ([pair[i] for i in (0, 2, 3)] for pair in stories_reference)
    llm = LLM(stories_dir, prefill_chunk=0, cache=FLEX)
    capture = EagerCapture()
    graphs = llm.runner.enable_graphs(capture, max_batch=3)
    assert graphs.buckets == [4, 2, 1]
    done = llm.generate(prompts[:1], SamplingParams(max_tokens=3, ignore_eos=True))  # bucket 1
    done += llm.generate(prompts[1:], SamplingParams(max_tokens=5, ignore_eos=True))  # 2 rows: bucket 2
    done += llm.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True))  # 3 rows padded to bucket 4
    assert [c.token_ids for c in done] == [expected[0][:3], expected[1][:5], expected[2][:5]] + [
        e[:3] for e in expected
    ]
    assert capture.captured == graphs.num_captures == 3
    assert graphs.num_replays == 2 + 4 + 2


@pytest.mark.parametrize(
    ("device", "flash", "prefer", "backend", "block"),
    [
        ("cuda", True, "auto", "flash-attn", 256),
        ("cuda", False, "auto", "flex", 128),
        ("cuda", True, "flex", "flex", 128),
        ("cuda", True, "sdpa", "sdpa", 16),
        ("cpu", False, "auto", "sdpa", 16),
        ("cpu", False, "flex", "flex", 128),
    ],
)
def test_flash_first_then_flex_on_cuda(device, flash, prefer, backend, block):
    choice = choose_attention(device, (9, 0), flash, torch.bfloat16, 0, prefer, flex_ok=True)
    assert (choice.backend, choice.block_size) == (backend, block)
    assert choose_attention(device, (9, 0), False, torch.bfloat16, 0, "auto", flex_ok=False).backend == "sdpa"
    with pytest.raises(ValueError, match="flash-attn attention was asked for but cannot run"):
        choose_attention("cpu", None, False, torch.bfloat16, 0, "flash-attn", flex_ok=True)
    with pytest.raises(ValueError, match="attention must be one of"):
        choose_attention(device, (9, 0), flash, torch.bfloat16, 0, "fast", flex_ok=True)


def test_a_prefill_replica_hands_off_each_prompt_once_whole():
    """Chunks of 4 leave one token of the 5- and 9-token prompts for a last step: a prefill-mode
    scheduler (which schedules no decodes) must still run it, and hand a sequence off only then."""
    scheduler = Scheduler(SchedulerConfig(mode="prefill", prefill_chunk=4), BlockManager(64, 4))
    seqs = [Sequence(list(range(3, 3 + n))) for n in (5, 9)]
    for seq in seqs:
        scheduler.add(seq)
    handed: list[Sequence] = []
    for _ in range(len(seqs) * 10):
        batch = scheduler.schedule()
        if batch is None:
            break
        assert batch.is_prefill and batch.num_tokens <= 4
        left = scheduler.postprocess(batch, [7] * len(batch.sampling_seqs))
        assert all(seq.num_cached_tokens == seq.num_prompt_tokens for seq in left), "handed off mid-prompt"
        handed += left
    assert handed == seqs and not scheduler.has_unfinished()
    assert [seq.token_ids[-1] for seq in seqs] == [7, 7] and [len(seq) for seq in seqs] == [6, 10]
