"""Scheduler: budgets, FIFO admission, modes, preemption by recompute, stop conditions, abort, and a random-workload property."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hexgen.engine.block_manager import FREED, BlockManager
from hexgen.engine.scheduler import Batch, Scheduler, SchedulerConfig
from hexgen.engine.sequence import SamplingParams, Sequence, Status

EOS = 2


def _scheduler(
    num_blocks: int = 64, block_size: int = 4, eos: tuple[int, ...] = (EOS,), **config: Any
) -> tuple[Scheduler, BlockManager]:
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(**config), bm, eos), bm


def _seq(num_tokens: int, max_tokens: int = 16, **sampling: Any) -> Sequence:
    return Sequence([10 + i for i in range(num_tokens)], SamplingParams(max_tokens=max_tokens, **sampling))


def _fake_token(seq: Sequence) -> int:
    """A deterministic 'model': the next token depends only on the prompt and the position, never eos."""
    return 100 + (seq.token_ids[0] * 31 + len(seq) * 7) % 1000


def _step(scheduler: Scheduler, token: int | None = None) -> tuple[Batch, list[Sequence]]:
    batch = scheduler.schedule()
    assert batch is not None
    tokens = [_fake_token(s) if token is None else token for s in batch.seqs]
    return batch, scheduler.postprocess(batch, tokens)


def _new_tokens(batch: Batch) -> int:
    return sum(len(s) - s.num_cached_tokens for s in batch.seqs) if batch.is_prefill else len(batch.seqs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "both"}, "mode"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**kwargs)


def test_add_rejects_prompts_that_can_never_fit() -> None:
    scheduler, _ = _scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="whole cache"):
        scheduler.add(_seq(17))
    scheduler, _ = _scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        scheduler.add(_seq(9))
    scheduler.add(_seq(8))
    assert scheduler.num_waiting == 1


def test_token_budget_limits_a_prefill_batch() -> None:
    scheduler, _ = _scheduler(max_num_batched_tokens=10)
    seqs = [_seq(4), _seq(4), _seq(4)]
    for s in seqs:
        scheduler.add(s)
    batch = scheduler.schedule()
    assert batch is not None and batch.is_prefill
    assert batch.seqs == seqs[:2]
    assert all(s.status is Status.RUNNING for s in seqs[:2])
    assert list(scheduler.waiting) == [seqs[2]]
    assert scheduler.num_running == 2


def test_admission_is_fifo_without_skipping() -> None:
    scheduler, _ = _scheduler(max_num_batched_tokens=10)
    first, big, small = _seq(4), _seq(8), _seq(1)
    for s in (first, big, small):
        scheduler.add(s)
    batch = scheduler.schedule()
    assert batch is not None and batch.seqs == [first]
    assert list(scheduler.waiting) == [big, small]


def test_sequence_cap_limits_running() -> None:
    scheduler, _ = _scheduler(max_num_seqs=2)
    seqs = [_seq(3) for _ in range(3)]
    for s in seqs:
        scheduler.add(s)
    batch, _ = _step(scheduler)
    assert batch.is_prefill and batch.seqs == seqs[:2]
    batch, _ = _step(scheduler)  # no room to admit the third: decode
    assert not batch.is_prefill and batch.seqs == seqs[:2]
    assert scheduler.num_waiting == 1


def test_colocated_prefers_prefill_over_decode() -> None:
    scheduler, _ = _scheduler()
    first = _seq(3)
    scheduler.add(first)
    batch, _ = _step(scheduler)
    assert batch.is_prefill
    assert first.num_cached_tokens == 3 and len(first) == 4
    second = _seq(5)
    scheduler.add(second)
    batch, _ = _step(scheduler)
    assert batch.is_prefill and batch.seqs == [second]
    batch, _ = _step(scheduler)
    assert not batch.is_prefill and batch.seqs == [first, second]
    assert first.num_cached_tokens == 4 and len(first) == 5


def test_nothing_to_do_is_none() -> None:
    scheduler, _ = _scheduler()
    assert scheduler.schedule() is None
    assert not scheduler.has_unfinished()


def test_prefill_mode_hands_sequences_off_and_release_frees() -> None:
    scheduler, bm = _scheduler(num_blocks=16, block_size=4, mode="prefill")
    handed, done = _seq(6, max_tokens=8), _seq(5, max_tokens=1)
    scheduler.add(handed)
    scheduler.add(done)
    batch, left = _step(scheduler)
    assert batch.is_prefill
    assert left == [handed, done]
    assert scheduler.num_running == 0 and not scheduler.has_unfinished()
    assert handed.status is Status.RUNNING and handed.finish_reason is None
    assert handed.num_cached_tokens == 6 and len(handed) == 7
    assert handed.block_table == [0, 1]  # kept for the KV export
    assert done.status is Status.FINISHED and done.finish_reason == "length" and done.block_table == []
    assert bm.num_free_blocks == 14
    assert scheduler.schedule() is None  # never a decode batch in prefill mode
    scheduler.release(handed)
    assert handed.block_table == [] and bm.num_free_blocks == 16
    with pytest.raises(RuntimeError, match="add_prefilled"):
        scheduler.add_prefilled(_seq(3))


def _imported(bm: BlockManager, num_tokens: int, max_tokens: int = 16) -> Sequence:
    """A sequence as a decode worker gets it: prompt plus first token, KV of all but the last token imported."""
    seq = _seq(num_tokens - 1, max_tokens=max_tokens)
    seq.append(7)
    bm.allocate(seq, len(seq) - 1)
    seq.num_cached_tokens = len(seq) - 1
    return seq


def test_decode_mode_runs_prefilled_sequences() -> None:
    scheduler, bm = _scheduler(num_blocks=16, block_size=4, mode="decode")
    with pytest.raises(RuntimeError, match="add_prefilled"):
        scheduler.add(_seq(3))
    a, b = _imported(bm, 5, max_tokens=3), _imported(bm, 9, max_tokens=2)
    scheduler.add_prefilled(a)
    scheduler.add_prefilled(b)
    assert a.status is Status.RUNNING and scheduler.num_running == 2 and scheduler.num_waiting == 0
    batch, left = _step(scheduler)
    assert not batch.is_prefill and batch.seqs == [a, b]
    assert left == [b] and b.finish_reason == "length"
    batch, left = _step(scheduler)
    assert batch.seqs == [a] and left == [a] and a.num_completion_tokens == 3
    assert not scheduler.has_unfinished()
    assert bm.num_free_blocks == 16


def test_add_prefilled_validates_the_cache_state() -> None:
    scheduler, bm = _scheduler(num_blocks=16, block_size=4, mode="decode")
    seq = _imported(bm, 6)
    seq.num_cached_tokens = 2
    with pytest.raises(ValueError, match="num_cached_tokens"):
        scheduler.add_prefilled(seq)
    short = _seq(9)
    short.num_cached_tokens = 8
    bm.allocate(short, 4)
    with pytest.raises(ValueError, match="too few blocks"):
        scheduler.add_prefilled(short)
    assert scheduler.num_running == 0


def test_preemption_recomputes_the_newest_sequence_first() -> None:
    # 4 blocks of 2 tokens: two 3-token prompts fill the cache once each has 4 tokens.
    scheduler, bm = _scheduler(num_blocks=4, block_size=2)
    old, new = _seq(3, max_tokens=3), _seq(3, max_tokens=5)
    waiting_behind = _seq(2, max_tokens=1)
    scheduler.add(old)
    scheduler.add(new)
    _step(scheduler)  # prefill both: 4 tokens each, 2 blocks each
    scheduler.add(waiting_behind)  # cannot be admitted: no free blocks
    batch, _ = _step(scheduler)  # decode position 3: fits the blocks they have
    assert not batch.is_prefill and batch.seqs == [old, new]
    assert len(old) == len(new) == 5
    expected_new_tokens = list(new.token_ids)

    batch, left = _step(scheduler)  # both need a third block: the newest is preempted
    assert batch.seqs == [old]
    assert list(scheduler.waiting) == [new, waiting_behind]
    assert new.status is Status.WAITING and new.block_table == [] and new.num_cached_tokens == 0
    assert left == [old] and old.finish_reason == "length"

    batch, _ = _step(scheduler)  # re-prefill with prompt and generated tokens together
    assert batch.is_prefill and batch.seqs[0] is new
    assert new.token_ids[:5] == expected_new_tokens
    assert new.num_cached_tokens == 5 and len(new) == 6
    while scheduler.has_unfinished():
        _step(scheduler)
    assert new.completion_token_ids == [_fake_token(Sequence(new.token_ids[:n])) for n in range(3, 8)]
    assert bm.num_free_blocks == 4


def test_a_sequence_that_cannot_grow_preempts_itself() -> None:
    scheduler, bm = _scheduler(num_blocks=5, block_size=2)
    first, second = _seq(3), _seq(3)
    scheduler.add(first)
    scheduler.add(second)
    _step(scheduler)
    _step(scheduler)  # 5 tokens each, 2 blocks each, 1 free
    batch, _ = _step(scheduler)  # first takes the free block; second has nobody newer to preempt
    assert batch.seqs == [first]
    assert list(scheduler.waiting) == [second] and second.status is Status.WAITING
    assert list(scheduler.running) == [first]
    assert bm.num_free_blocks == 2


def test_stop_on_eos_stop_ids_and_max_tokens() -> None:
    scheduler, bm = _scheduler()
    eos = _seq(3)
    ignoring = _seq(3, ignore_eos=True)
    stop_id = _seq(3, ignore_eos=True, stop_token_ids=(EOS,))
    length = _seq(3, max_tokens=1)
    for s in (eos, ignoring, stop_id, length):
        scheduler.add(s)
    _, left = _step(scheduler, token=EOS)
    assert left == [eos, stop_id, length]
    assert [s.finish_reason for s in left] == ["stop", "stop", "stop"]  # stop outranks length
    assert all(s.status is Status.FINISHED and s.block_table == [] for s in left)
    assert list(scheduler.running) == [ignoring] and ignoring.finish_reason is None
    scheduler.add(other := _seq(3, max_tokens=2, stop_token_ids=(5,)))
    _, left = _step(scheduler, token=5)
    assert left == [other] and other.finish_reason == "stop"
    assert bm.num_free_blocks == 64 - 1


def test_max_tokens_finishes_with_length() -> None:
    scheduler, _ = _scheduler()
    seq = _seq(3, max_tokens=3)
    scheduler.add(seq)
    lefts = [_step(scheduler)[1] for _ in range(3)]
    assert lefts == [[], [], [seq]]
    assert seq.finish_reason == "length" and seq.num_completion_tokens == 3


def test_a_sequence_stops_where_the_cache_ends() -> None:
    scheduler, bm = _scheduler(num_blocks=2, block_size=2)  # at most 4 tokens of KV
    seq = _seq(3, max_tokens=10)
    scheduler.add(seq)
    assert scheduler.max_model_len == 4
    _, left = _step(scheduler)
    assert left == []  # 4 tokens: one more decode step fits
    _, left = _step(scheduler)
    assert left == [seq] and seq.finish_reason == "length" and len(seq) == 5
    assert bm.num_free_blocks == 2


def test_abort_waiting_and_running() -> None:
    scheduler, bm = _scheduler(max_num_seqs=1)
    running, waiting = _seq(5), _seq(3)
    scheduler.add(running)
    scheduler.add(waiting)
    batch = scheduler.schedule()
    assert batch is not None and batch.seqs == [running]
    assert scheduler.abort(waiting.seq_id) is waiting
    assert waiting.status is Status.FINISHED and waiting.finish_reason == "abort"
    assert scheduler.abort(running.seq_id) is running
    assert running.finish_reason == "abort" and running.block_table == []
    assert scheduler.postprocess(batch, [9]) == []  # aborted while its step ran
    assert scheduler.abort(12345678) is None
    assert not scheduler.has_unfinished() and bm.num_free_blocks == 64


def test_postprocess_needs_one_token_per_sequence() -> None:
    scheduler, _ = _scheduler()
    scheduler.add(_seq(3))
    batch = scheduler.schedule()
    assert batch is not None
    with pytest.raises(ValueError, match="tokens"):
        scheduler.postprocess(batch, [1, 2])


@st.composite
def _workloads(draw: st.DrawFn) -> tuple[int, int, int, int, list[tuple[int, int, int]]]:
    block_size = draw(st.integers(1, 4))
    num_blocks = draw(st.integers(2, 24))
    max_num_seqs = draw(st.integers(1, 6))
    max_num_batched_tokens = draw(st.integers(2, 40))
    max_model_len = min(num_blocks * block_size, max_num_batched_tokens)
    requests = []
    for _ in range(draw(st.integers(1, 12))):
        arrival = draw(st.integers(0, 30))
        prompt_len = draw(st.integers(1, max_model_len))
        max_tokens = draw(st.integers(1, max_model_len - prompt_len + 1))
        requests.append((arrival, prompt_len, max_tokens))
    return block_size, num_blocks, max_num_seqs, max_num_batched_tokens, requests


@settings(max_examples=150, deadline=None)
@given(_workloads(), st.sampled_from([0, 0, 1, 3]), st.sampled_from([0, 0, 1, 5]))
def test_random_workloads_finish_within_budgets_and_free_every_block(
    workload: tuple[int, int, int, int, list[tuple[int, int, int]]], chunk: int, window: int
) -> None:
    block_size, num_blocks, max_num_seqs, max_num_batched_tokens, requests = workload
    bm = BlockManager(num_blocks, block_size, window)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, prefill_chunk=chunk
    )
    scheduler = Scheduler(config, bm, eos_token_ids=(EOS,))
    pending = sorted(requests)
    seqs: list[Sequence] = []
    step = 0
    while pending or scheduler.has_unfinished():
        while pending and pending[0][0] <= step:
            _, prompt_len, max_tokens = pending.pop(0)
            seq = Sequence([1000 + len(seqs) + i for i in range(prompt_len)], SamplingParams(max_tokens=max_tokens))
            scheduler.add(seq)
            seqs.append(seq)
        step += 1
        assert step < 5000, "the scheduler stopped making progress"
        batch = scheduler.schedule()
        if batch is None:
            assert not scheduler.has_unfinished()  # all blocks are the scheduler's, so it can always progress
            continue
        assert 0 < len(batch.seqs) <= max_num_seqs
        assert scheduler.num_running <= max_num_seqs
        assert batch.num_tokens <= max_num_batched_tokens
        assert batch.num_tokens == _new_tokens(batch) or chunk, "unchunked steps finish their prompts"
        held: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            assert seq.status is Status.RUNNING
            assert len(seq.block_table) * block_size >= seq.num_cached_tokens + n
            assert bm.live_blocks(seq) <= bm.peak_blocks(len(seq), chunk)
            if not batch.is_prefill:
                assert seq.num_cached_tokens == len(seq) - 1
        for seq in scheduler.running:
            held.extend(b for b in seq.block_table if b != FREED)
        assert len(set(held)) == len(held)
        assert len(held) + bm.num_free_blocks == num_blocks
        scheduler.postprocess(batch, [_fake_token(s) for s in batch.sampling_seqs])

    assert bm.num_free_blocks == num_blocks
    assert not scheduler.waiting and not scheduler.running
    for seq in seqs:
        assert seq.status is Status.FINISHED and seq.finish_reason == "length"
        assert seq.num_completion_tokens == seq.sampling.max_tokens
        # Recompute after preemption produced the very tokens an uninterrupted run would have.
        prompt_len = seq.num_prompt_tokens
        expected = [_fake_token(Sequence(seq.token_ids[:n])) for n in range(prompt_len, len(seq))]
        assert seq.completion_token_ids == expected


@pytest.mark.parametrize(("prompt_len", "chunk"), [(5, 4), (30, 4), (30, 1)])
def test_a_windowed_sequence_holds_a_bounded_number_of_blocks(prompt_len: int, chunk: int) -> None:
    """Far past its window of 8, a sequence holds at most ceil(8 / 4) + 1 blocks while it decodes, one
    more while a chunk of its prompt is written, in a cache of 4 blocks that could not hold it whole."""
    window, block_size, num_blocks, max_tokens = 8, 4, 4, 120
    bm = BlockManager(num_blocks, block_size, window)
    scheduler = Scheduler(SchedulerConfig(prefill_chunk=chunk), bm)
    assert scheduler.max_model_len > prompt_len + max_tokens > num_blocks * block_size
    seq = _seq(prompt_len, max_tokens=max_tokens)
    scheduler.add(seq)
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        assert batch is not None
        bound = -(-window // block_size) + 1 + (1 if batch.is_prefill else 0)  # while the step writes
        assert bm.live_blocks(seq) <= bound
        assert bm.live_blocks(seq) + bm.num_free_blocks == num_blocks
        scheduler.postprocess(batch, [_fake_token(s) for s in batch.sampling_seqs])
    assert scheduler.num_preemptions == 0
    assert seq.finish_reason == "length" and seq.num_completion_tokens == max_tokens
    assert bm.num_free_blocks == num_blocks
    expected = [_fake_token(Sequence(seq.token_ids[:n])) for n in range(prompt_len, len(seq))]
    assert seq.completion_token_ids == expected


def test_an_unwindowed_cache_cuts_the_same_sequence_at_its_size() -> None:
    scheduler, _ = _scheduler(num_blocks=4, block_size=4, prefill_chunk=4)
    assert scheduler.max_model_len == 16
    seq = _seq(5, max_tokens=120)
    scheduler.add(seq)
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        assert batch is not None
        scheduler.postprocess(batch, [_fake_token(s) for s in batch.sampling_seqs])
    assert seq.finish_reason == "length" and len(seq) == 17
