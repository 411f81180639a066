"""Continuous-batching scheduler: waiting and running queues, a token budget, a sequence cap, preemption by recompute."""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from hexgen.engine.block_manager import BlockManager
from hexgen.engine.sequence import Sequence, Status

MODES = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class SchedulerConfig:
    """``mode``: "prefill" hands every sequence off after its prefill, "decode" takes prefilled sequences
    through ``Scheduler.add_prefilled``, "colocated" does both on one worker.

    ``prefill_chunk`` > 0 turns on chunked prefill: a step prefills at most that many prompt tokens (over
    all its sequences), after one decode token for every running sequence that has finished its prompt,
    so a long prompt takes several steps and never stalls the decode batch; a prompt may then also be
    longer than ``max_num_batched_tokens``. 0 prefills whole prompts in steps of their own.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    mode: str = "colocated"
    prefill_chunk: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"scheduler mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be a positive integer, got {self.max_num_seqs!r}")
        if not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be a positive integer, got {self.max_num_batched_tokens!r}")
        if not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 0:
            raise ValueError(
                f"prefill_chunk must be an integer >= 0 (0 turns chunking off), got {self.prefill_chunk!r}"
            )


def pending(seq: Sequence) -> int:
    """Tokens of ``seq`` whose KV is not in the cache yet: 1 for a sequence that decodes next."""
    return len(seq) - seq.num_cached_tokens


@dataclass
class Batch:
    """One model step: sequence ``i`` computes positions ``[seq.num_cached_tokens, + num_new_tokens[i])``
    and samples a token when that reaches its end. Decode: one token each, position ``len(seq) - 1``.
    Prefill (``is_prefill``): by default every uncached token; with chunked prefill, decode sequences come
    first (one token each), then prompt chunks, and only a chunk that ends its prompt samples."""

    seqs: list[Sequence]
    is_prefill: bool
    num_new_tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.num_new_tokens:
            self.num_new_tokens = [pending(seq) if self.is_prefill else 1 for seq in self.seqs]

    @property
    def num_tokens(self) -> int:
        """Tokens this step computes (the rows of its hidden states)."""
        return sum(self.num_new_tokens)

    @property
    def sampling_seqs(self) -> list[Sequence]:
        """The sequences that get a token this step (all of them unless a prompt chunk ends short)."""
        return [seq for seq, n in zip(self.seqs, self.num_new_tokens, strict=True) if n >= pending(seq)]


class Scheduler:
    """Decides which sequences run each step and tracks them until they finish or leave.

    Sequences never grow past ``max_model_len`` tokens (they finish with reason "length" there): beyond
    it a sequence could neither get the KV blocks for its next decode step nor be re-prefilled within the
    token budget after a preemption, and would stall forever.

    With a windowed block manager every step ends by trimming its sequences to their windows
    (``BlockManager.trim``), and with chunked prefill a prompt gets blocks one chunk at a time, so the
    blocks a sequence holds, which admission and preemption count, stay bounded however long it grows.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, eos_token_ids: Iterable[int] = ()) -> None:
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids: frozenset[int] = frozenset(int(t) for t in eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self._prefill_only = config.mode == "prefill"
        self._decode_only = config.mode == "decode"

    @property
    def max_model_len(self) -> int:
        """The longest sequence this scheduler can hold: its KV must fit the cache and its prefill the budget."""
        bm = self.block_manager
        if self.config.prefill_chunk:
            if bm.peak_blocks(sys.maxsize, self.config.prefill_chunk) <= bm.num_blocks:
                return sys.maxsize  # a window bounds the blocks any length needs
            return bm.num_blocks * bm.block_size
        return min(bm.num_blocks * bm.block_size, self.config.max_num_batched_tokens)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _check_fits(self, seq: Sequence) -> None:
        bm = self.block_manager
        num_blocks = bm.peak_blocks(len(seq), self.config.prefill_chunk)
        if num_blocks > bm.num_blocks:
            raise ValueError(
                f"sequence {seq.seq_id} has {len(seq)} tokens needing {num_blocks} KV blocks at once, "
                f"but the whole cache has only {bm.num_blocks} blocks of {bm.block_size} tokens"
            )
        if not self.config.prefill_chunk and len(seq) > self.config.max_num_batched_tokens:
            raise ValueError(
                f"sequence {seq.seq_id} has {len(seq)} tokens, more than max_num_batched_tokens "
                f"({self.config.max_num_batched_tokens}), so it could never be prefilled in one step"
            )

    def add(self, seq: Sequence) -> None:
        """Queue a new request for prefill."""
        if self._decode_only:
            raise RuntimeError("a decode-mode scheduler takes prefilled sequences through add_prefilled, not add")
        self._check_fits(seq)
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_prefilled(self, seq: Sequence) -> None:
        """Take a sequence whose first ``len(seq) - 1`` tokens' KV is already in its blocks; it decodes next."""
        if self._prefill_only:
            raise RuntimeError("a prefill-mode scheduler does not decode; add_prefilled needs mode decode or colocated")
        self._check_fits(seq)
        num_cached = len(seq) - 1
        if seq.num_cached_tokens != num_cached:
            raise ValueError(
                f"sequence {seq.seq_id} of length {len(seq)} must have num_cached_tokens == {num_cached}, "
                f"got {seq.num_cached_tokens}"
            )
        if len(seq.block_table) < seq.num_blocks(self.block_manager.block_size, num_cached):
            raise ValueError(f"sequence {seq.seq_id} has too few blocks for its {num_cached} cached tokens")
        self.block_manager.trim(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)

    def schedule(self) -> Batch | None:
        """The next batch: a prefill of waiting sequences if any can be admitted, else a decode step.

        ``None`` means nothing can run now: both queues are empty, or (when blocks are held outside this
        scheduler, e.g. by handed-off or importing sequences) the cache is too full to make progress.
        With chunked prefill: decode tokens and prompt chunks in one step (``_schedule_chunked``).
        """
        if self.config.prefill_chunk:
            return self._schedule_chunked()
        batch = self._schedule_prefill()
        if batch is not None or self._prefill_only:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self) -> Batch | None:
        seq_room = self.config.max_num_seqs - len(self.running)
        token_room = self.config.max_num_batched_tokens
        scheduled: list[Sequence] = []
        while self.waiting and len(scheduled) < seq_room:
            seq = self.waiting[0]
            num_new_tokens = pending(seq)
            if num_new_tokens > token_room or not self._admit(seq, len(seq)):
                break
            token_room -= num_new_tokens
            scheduled.append(seq)
        return Batch(scheduled, is_prefill=True) if scheduled else None

    def _schedule_chunked(self) -> Batch | None:
        """One decode token for each running sequence past its prompt (oldest first, up to the caps), then
        up to ``prefill_chunk`` prompt tokens: the unfinished prompts already running first, then newly
        admitted ones. O(running + admitted)."""
        config = self.config
        decodes = [] if self._prefill_only else self._decode_seqs()
        budget = min(config.prefill_chunk, config.max_num_batched_tokens - len(decodes))
        chunks: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if budget <= 0 or len(decodes) + len(chunks) >= config.max_num_seqs:
                break
            # one token short of its prompt's end, a sequence steps as a decode would, except on a prefill
            # replica, which decodes nothing: every sequence it runs is inside its prompt
            if pending(seq) > 1 or self._prefill_only:
                if not self._grow(seq, min(pending(seq), budget)):
                    budget = 0  # its blocks come first: no later prompt may take them meanwhile
                    break
                chunks.append((seq, min(pending(seq), budget)))
                budget -= chunks[-1][1]
        while self.waiting and budget > 0 and len(self.running) < config.max_num_seqs:
            seq = self.waiting[0]
            n = min(pending(seq), budget)
            if not self._admit(seq, seq.num_cached_tokens + n if self.block_manager.window else len(seq)):
                break
            chunks.append((seq, n))
            budget -= n
        if not chunks:
            return Batch(decodes, is_prefill=False) if decodes else None
        seqs = decodes + [seq for seq, _ in chunks]
        return Batch(seqs, is_prefill=True, num_new_tokens=[1] * len(decodes) + [n for _, n in chunks])

    def _grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Blocks for the next ``num_new_tokens`` of a running prompt, if they are free (a windowed manager
        allocates chunk by chunk; otherwise admission took them all)."""
        bm = self.block_manager
        end = seq.num_cached_tokens + num_new_tokens
        if not bm.can_allocate(bm.missing_blocks(seq, end)):
            return False
        bm.allocate(seq, end)
        return True

    def _admit(self, seq: Sequence, num_tokens: int) -> bool:
        """Move the first waiting sequence to running with blocks for its first ``num_tokens`` tokens, if
        they are free; a windowed one only while the most it will hold is free too (admitted on its first
        chunk's blocks alone, it would be preempted again as soon as it grew)."""
        bm = self.block_manager
        if bm.window and not bm.can_allocate(bm.peak_blocks(len(seq), self.config.prefill_chunk)):
            return False
        if not self._grow(seq, num_tokens - seq.num_cached_tokens):
            return False
        self.waiting.popleft()
        seq.status = Status.RUNNING
        self.running.append(seq)
        return True

    def _schedule_decode(self) -> Batch | None:
        scheduled = self._decode_seqs()
        return Batch(scheduled, is_prefill=False) if scheduled else None

    def _decode_seqs(self) -> list[Sequence]:
        """Running sequences past their prompts that get a block for their next token, preempting the
        latest admitted ones (by recompute) while the cache is short. O(running)."""
        running = self.running
        bm = self.block_manager
        max_batch = min(self.config.max_num_seqs, self.config.max_num_batched_tokens)
        scheduled: list[Sequence] = []
        # Walk from the oldest admission; victims come off the other end, so the index stays valid.
        index = 0
        while index < len(running) and len(scheduled) < max_batch:
            seq = running[index]
            if pending(seq) > 1:  # a prompt still being prefilled in chunks: not a decode
                index += 1
                continue
            while not bm.can_append(seq):
                victim = running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                bm.append_slot(seq)
                scheduled.append(seq)
                index += 1
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.block_manager.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def postprocess(self, batch: Batch, token_ids: list[int]) -> list[Sequence]:
        """Record one sampled token per sequence of ``batch.sampling_seqs`` (every sequence, unless a
        prompt chunk ended short: its cached count just advances); returns the sequences that left."""
        seqs = batch.sampling_seqs
        if len(token_ids) != len(seqs):
            raise ValueError(f"got {len(token_ids)} tokens for a batch of {len(seqs)} sampling sequences")
        self._advance_chunks(batch)
        eos_token_ids = self.eos_token_ids
        hand_off = self._prefill_only and batch.is_prefill
        max_model_len = self.max_model_len
        left: list[Sequence] = []
        for seq, token_id in zip(seqs, token_ids, strict=True):
            if seq.status is not Status.RUNNING:
                continue  # aborted between schedule and postprocess
            seq.append(token_id)
            seq.num_cached_tokens = len(seq) - 1
            sampling = seq.sampling
            if (token_id in eos_token_ids and not sampling.ignore_eos) or token_id in sampling.stop_token_ids:
                finish_reason = "stop"
            elif seq.num_completion_tokens >= sampling.max_tokens or (not hand_off and len(seq) > max_model_len):
                finish_reason = "length"
            elif hand_off:
                left.append(seq)  # keeps its blocks until the caller has exported its KV and calls release
                continue
            else:
                continue
            seq.finish_reason = finish_reason
            seq.status = Status.FINISHED
            self.block_manager.free(seq)
            left.append(seq)
        for seq in batch.seqs:
            if seq.status is Status.RUNNING:
                self.block_manager.trim(seq)
        if left:
            self._remove_from_running(left)
        return left

    def _advance_chunks(self, batch: Batch) -> None:
        """The cached count of each running prompt whose chunk ended short of its end. O(batch)."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if n < pending(seq) and seq.status is Status.RUNNING:
                seq.num_cached_tokens += n

    def _remove_from_running(self, seqs: list[Sequence]) -> None:
        running = self.running
        if len(seqs) == 1:
            running.remove(seqs[0])
            return
        gone = {id(seq) for seq in seqs}
        kept = [seq for seq in running if id(seq) not in gone]
        running.clear()
        running.extend(kept)

    def release(self, seq: Sequence) -> None:
        """Free the blocks of a sequence handed off by a prefill-mode step once its KV has been exported."""
        self.block_manager.free(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Drop a waiting or running sequence; ``None`` if no such sequence is queued here."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    self.block_manager.free(seq)
                    seq.status = Status.FINISHED
                    seq.finish_reason = "abort"
                    return seq
        return None
