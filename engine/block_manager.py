"""Paged KV-cache bookkeeping: which cache blocks each sequence owns, with reference counts for shared prefixes."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Seq

from hexgen.engine.sequence import Sequence

FREED = -1  # a block-table entry whose block went back to the pool: no query still to come reads its positions


def cache_window(layer_windows: Seq[int]) -> int:
    """The window the cache may trim to: the widest layer window when every layer has one, else 0 (a
    full-attention layer, e.g. Gemma 2's global ones, reads every position). O(layers)."""
    if not layer_windows or min(layer_windows) <= 0:
        return 0
    return max(layer_windows)


def span_blocks(num_positions: int, block_size: int) -> int:
    """The most blocks ``num_positions`` consecutive positions can touch (they may start mid-block). O(1)."""
    return 0 if num_positions <= 0 else (num_positions - 2 + block_size) // block_size + 1


class NoFreeBlocks(RuntimeError):
    """The cache has fewer free blocks than an allocation needs."""


class BlockManager:
    """Hands out fixed-size KV-cache blocks to sequences.

    A sequence's ``block_table`` lists its blocks in token order; token ``p`` lives in slot
    ``block_table[p // block_size] * block_size + p % block_size`` of the flat cache. Blocks are
    reference counted so several sequences can share the full blocks of a common prefix; a block goes
    back to the free pool when its last user frees it. Free blocks are reused in FIFO order.

    With ``window`` > 0 (every layer of the model attends to at most that many latest positions) a block
    that lies wholly before the window of a sequence's next position is never read again: ``trim`` returns
    it to the pool and leaves ``FREED`` in its table entry, so tables keep indexing by position while a
    sequence holds at most ``span_blocks(window + chunk - 1)`` blocks, however long it grows.
    """

    def __init__(self, num_blocks: int, block_size: int, window: int = 0) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks!r}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size!r}")
        if window < 0:
            raise ValueError(f"window must be >= 0 (0: no window), got {window!r}")
        self.num_blocks: int = num_blocks
        self.block_size: int = block_size
        self.window: int = window
        self._free_blocks: deque[int] = deque(range(num_blocks))
        self._ref_counts: list[int] = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free_blocks)

    def dead_blocks(self, position: int) -> int:
        """How many leading blocks no query at ``position`` or later reads: every position in them is at
        least ``window`` before it. 0 without a window. O(1)."""
        if not self.window:
            return 0
        return max(0, (position - self.window + 1) // self.block_size)

    def peak_blocks(self, num_tokens: int, chunk: int) -> int:
        """The most blocks a sequence of ``num_tokens`` tokens holds at once when each step computes at
        most ``chunk`` of its positions (``chunk`` 0: all of them in one step). O(1)."""
        whole = (num_tokens + self.block_size - 1) // self.block_size
        if not self.window or not chunk:
            return whole
        return min(whole, span_blocks(self.window - 1 + chunk, self.block_size))

    def live_blocks(self, seq: Sequence) -> int:
        """The blocks ``seq`` holds (its table less the ``FREED`` entries). O(table)."""
        return sum(1 for block_id in seq.block_table if block_id != FREED)

    def missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to take from the pool to cover ``num_tokens``: entries already dead become ``FREED``."""
        start, end = len(seq.block_table), (num_tokens + self.block_size - 1) // self.block_size
        skipped = max(0, min(end, self.dead_blocks(seq.num_cached_tokens)) - start)
        return end - start - skipped

    def allocate(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Grow ``seq.block_table`` to cover ``num_tokens`` (default ``len(seq)``) tokens; all or nothing.
        New entries already dead for ``seq.num_cached_tokens`` (a window) are ``FREED`` and take no block."""
        n = len(seq) if num_tokens is None else num_tokens
        end = -(-n // self.block_size)
        if end <= len(seq.block_table):
            return
        missing = self.missing_blocks(seq, n)
        free_blocks = self._free_blocks
        if missing > len(free_blocks):
            raise NoFreeBlocks(
                f"sequence {seq.seq_id} needs {missing} more KV blocks but only {len(free_blocks)} are free"
            )
        ref_counts = self._ref_counts
        table = seq.block_table
        table.extend([FREED] * (end - len(table) - missing))
        for _ in range(missing):
            block_id = free_blocks.popleft()
            ref_counts[block_id] = 1
            table.append(block_id)

    def trim(self, seq: Sequence) -> int:
        """Return to the pool the blocks of ``seq`` that no query from ``seq.num_cached_tokens`` on reads
        (a window); returns how many. ``FREED`` entries are a prefix, so O(blocks freed)."""
        table = seq.block_table
        index = min(self.dead_blocks(seq.num_cached_tokens), len(table)) - 1
        freed = 0
        while index >= 0 and table[index] != FREED:
            self._release(table[index])
            table[index] = FREED
            freed += 1
            index -= 1
        return freed

    def _release(self, block_id: int) -> None:
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            self._free_blocks.append(block_id)

    def can_append(self, seq: Sequence) -> bool:
        """Whether the KV of all ``len(seq)`` tokens fits (a decode step writes position ``len(seq) - 1``)."""
        return self.missing_blocks(seq, len(seq)) <= len(self._free_blocks)

    def append_slot(self, seq: Sequence) -> None:
        self.allocate(seq, len(seq))

    def share(self, src: Sequence, dst: Sequence, num_tokens: int) -> None:
        """Let ``dst`` (with no blocks yet) reuse ``src``'s full blocks holding its first ``num_tokens`` tokens."""
        if dst.block_table:
            raise ValueError(f"sequence {dst.seq_id} already has blocks; share needs an empty block table")
        if num_tokens < 0 or num_tokens % self.block_size:
            raise ValueError(f"num_tokens must be a multiple of block_size {self.block_size}, got {num_tokens}")
        num_shared = num_tokens // self.block_size
        if num_shared > len(src.block_table):
            raise ValueError(
                f"sequence {src.seq_id} holds {len(src.block_table)} blocks, fewer than the {num_shared} to share"
            )
        if num_tokens > len(dst):
            raise ValueError(f"cannot share {num_tokens} tokens with sequence {dst.seq_id} of length {len(dst)}")
        shared = src.block_table[:num_shared]
        if FREED in shared:
            raise ValueError(f"sequence {src.seq_id} no longer holds the start of its prefix (trimmed to its window)")
        ref_counts = self._ref_counts
        for block_id in shared:
            ref_counts[block_id] += 1
        dst.block_table = shared
        dst.num_cached_tokens = num_tokens

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s hold on its blocks; each returns to the free pool once nobody else holds it."""
        for block_id in seq.block_table:
            if block_id != FREED:
                self._release(block_id)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def slot(self, seq: Sequence, position: int) -> int:
        block_index, offset = divmod(position, self.block_size)
        return seq.block_table[block_index] * self.block_size + offset

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Flat cache slots of positions ``[start, end)``, filled block by block."""
        if start < 0 or end < start:
            raise ValueError(f"invalid position range [{start}, {end})")
        block_size = self.block_size
        table = seq.block_table
        result: list[int] = []
        position = start
        while position < end:
            block_index, offset = divmod(position, block_size)
            run = min(end - position, block_size - offset)
            first = table[block_index] * block_size + offset
            result.extend(range(first, first + run))
            position += run
        return result
