"""Paged KV-cache bookkeeping: which cache blocks each sequence owns, with reference counts for shared prefixes."""

from __future__ import annotations

from collections import deque

from hexgen.engine.sequence import Sequence


class NoFreeBlocks(RuntimeError):
    """The cache has fewer free blocks than an allocation needs."""


class BlockManager:
    """Hands out fixed-size KV-cache blocks to sequences.

    A sequence's ``block_table`` lists its blocks in token order; token ``p`` lives in slot
    ``block_table[p // block_size] * block_size + p % block_size`` of the flat cache. Blocks are
    reference counted so several sequences can share the full blocks of a common prefix; a block goes
    back to the free pool when its last user frees it. Free blocks are reused in FIFO order.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks!r}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size!r}")
        self.num_blocks: int = num_blocks
        self.block_size: int = block_size
        self._free_blocks: deque[int] = deque(range(num_blocks))
        self._ref_counts: list[int] = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free_blocks)

    def _missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size - len(seq.block_table)

    def allocate(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Grow ``seq.block_table`` to cover ``num_tokens`` (default ``len(seq)``) tokens; all or nothing."""
        missing = self._missing_blocks(seq, len(seq) if num_tokens is None else num_tokens)
        if missing <= 0:
            return
        free_blocks = self._free_blocks
        if missing > len(free_blocks):
            raise NoFreeBlocks(
                f"sequence {seq.seq_id} needs {missing} more KV blocks but only {len(free_blocks)} are free"
            )
        ref_counts = self._ref_counts
        table = seq.block_table
        for _ in range(missing):
            block_id = free_blocks.popleft()
            ref_counts[block_id] = 1
            table.append(block_id)

    def can_append(self, seq: Sequence) -> bool:
        """Whether the KV of all ``len(seq)`` tokens fits (a decode step writes position ``len(seq) - 1``)."""
        return self._missing_blocks(seq, len(seq)) <= len(self._free_blocks)

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
        ref_counts = self._ref_counts
        for block_id in shared:
            ref_counts[block_id] += 1
        dst.block_table = shared
        dst.num_cached_tokens = num_tokens

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s hold on its blocks; each returns to the free pool once nobody else holds it."""
        ref_counts = self._ref_counts
        free_blocks = self._free_blocks
        for block_id in seq.block_table:
            ref_counts[block_id] -= 1
            if ref_counts[block_id] == 0:
                free_blocks.append(block_id)
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
