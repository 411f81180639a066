"""Block manager: allocation and growth, all-or-nothing failure, shared prefixes with reference counts, slots,
and trimming to a sliding window."""

from __future__ import annotations

import pytest

from hexgen.engine.block_manager import FREED, BlockManager, NoFreeBlocks, cache_window
from hexgen.engine.sequence import Sequence


def _seq(num_tokens: int) -> Sequence:
    return Sequence(list(range(num_tokens)))


@pytest.mark.parametrize(
    ("num_blocks", "block_size", "window"), [(0, 4, 0), (4, 0, 0), (-1, 4, 0), (4, -2, 0), (4, 4, -1)]
)
def test_rejects_non_positive_sizes(num_blocks: int, block_size: int, window: int) -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size, window)


def test_allocate_covers_the_sequence_in_deterministic_order() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq(5)
    bm.allocate(seq)
    assert seq.block_table == [0, 1]
    assert bm.num_free_blocks == 6
    assert [bm.ref_count(b) for b in range(3)] == [1, 1, 0]
    other = _seq(4)
    bm.allocate(other)
    assert other.block_table == [2]


def test_allocate_grows_only_the_missing_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq(4)
    bm.allocate(seq)
    assert seq.block_table == [0]
    bm.allocate(seq)  # already covered: no-op
    assert seq.block_table == [0]
    seq.token_ids.extend(range(5))  # 9 tokens
    bm.allocate(seq)
    assert seq.block_table == [0, 1, 2]
    bm.allocate(seq, num_tokens=13)
    assert seq.block_table == [0, 1, 2, 3]
    bm.allocate(seq, num_tokens=2)  # never shrinks
    assert seq.block_table == [0, 1, 2, 3]
    assert bm.num_free_blocks == 4


def test_no_free_blocks_changes_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    holder = _seq(3)
    bm.allocate(holder)
    seq = _seq(2)
    bm.allocate(seq)
    seq.token_ids.extend([7, 7, 7])  # 5 tokens need 3 blocks, has 1, only 0 free
    assert not bm.can_allocate(2)
    with pytest.raises(NoFreeBlocks):
        bm.allocate(seq)
    assert seq.block_table == [2]
    assert bm.num_free_blocks == 0
    assert [bm.ref_count(b) for b in range(3)] == [1, 1, 1]


def test_can_append_and_append_slot() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = _seq(4)
    bm.allocate(seq)
    assert bm.can_append(seq)  # position 3 is in block 0
    seq.append(9)
    assert bm.can_append(seq)
    bm.append_slot(seq)
    assert seq.block_table == [0, 1]
    seq.token_ids.extend([9, 9, 9, 9])  # 9 tokens: a third block that does not exist
    assert not bm.can_append(seq)
    with pytest.raises(NoFreeBlocks):
        bm.append_slot(seq)
    assert seq.block_table == [0, 1]


def test_share_counts_references_and_free_returns_blocks_only_at_zero() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    src = _seq(9)
    bm.allocate(src)
    assert src.block_table == [0, 1, 2]
    dst = _seq(10)
    bm.share(src, dst, 8)
    assert dst.block_table == [0, 1]
    assert dst.num_cached_tokens == 8
    assert [bm.ref_count(b) for b in range(3)] == [2, 2, 1]
    bm.allocate(dst)  # its own third block; the shared ones stay shared
    assert dst.block_table == [0, 1, 3]
    assert bm.num_free_blocks == 2

    bm.free(src)
    assert src.block_table == []
    assert src.num_cached_tokens == 0
    assert [bm.ref_count(b) for b in range(4)] == [1, 1, 0, 1]
    assert bm.num_free_blocks == 3  # only block 2 came back

    bm.free(dst)
    assert bm.num_free_blocks == 6
    assert all(bm.ref_count(b) == 0 for b in range(6))
    assert dst.num_cached_tokens == 0


def test_share_validates_its_arguments() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    src = _seq(9)
    bm.allocate(src)
    with pytest.raises(ValueError, match="multiple"):
        bm.share(src, _seq(9), 6)
    with pytest.raises(ValueError, match="fewer"):
        bm.share(src, _seq(20), 16)
    with pytest.raises(ValueError, match="length"):
        bm.share(src, _seq(3), 4)
    owned = _seq(4)
    bm.allocate(owned)
    with pytest.raises(ValueError, match="empty"):
        bm.share(src, owned, 4)
    assert [bm.ref_count(b) for b in range(4)] == [1, 1, 1, 1]
    empty = _seq(4)
    bm.share(src, empty, 0)
    assert empty.block_table == []


def test_freed_blocks_are_reused_first_in_first_out() -> None:
    bm = BlockManager(num_blocks=4, block_size=1)
    a, b = _seq(2), _seq(2)
    bm.allocate(a)
    bm.allocate(b)
    bm.free(b)
    bm.free(a)
    fresh = _seq(4)
    bm.allocate(fresh)
    assert fresh.block_table == [2, 3, 0, 1]


def test_slots_follow_the_block_table() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq(11)
    seq.block_table = [5, 0, 3]
    assert bm.slot(seq, 0) == 20
    assert bm.slot(seq, 5) == 1
    assert bm.slot(seq, 10) == 14
    for start, end in [(0, 11), (3, 9), (4, 8), (10, 11), (6, 6), (0, 1)]:
        assert bm.slots(seq, start, end) == [bm.slot(seq, p) for p in range(start, end)]
    assert bm.slots(seq, 2, 6) == [22, 23, 0, 1]
    with pytest.raises(ValueError):
        bm.slots(seq, 5, 4)


def test_the_cache_trims_only_when_every_layer_is_windowed() -> None:
    assert cache_window((8, 8, 8)) == 8
    assert cache_window((4, 8)) == 8  # the widest window bounds what any layer reads
    assert cache_window((8, 0, 8, 0)) == 0  # Gemma 2: its global layers read every position
    assert cache_window(()) == 0


def test_trim_returns_the_blocks_wholly_before_the_window() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, window=6)
    seq = _seq(20)
    bm.allocate(seq)
    assert seq.block_table == [0, 1, 2, 3, 4]
    seq.num_cached_tokens = 12  # position 12 reads keys 7..12: block 1 (positions 4-7) is still read
    assert bm.trim(seq) == 1
    assert seq.block_table == [FREED, 1, 2, 3, 4]
    seq.num_cached_tokens = 14  # reads 9..14
    assert bm.trim(seq) == 1
    assert bm.trim(seq) == 0
    assert seq.block_table == [FREED, FREED, 2, 3, 4]
    assert (bm.num_free_blocks, bm.live_blocks(seq), bm.ref_count(0)) == (5, 3, 0)
    bm.free(seq)
    assert bm.num_free_blocks == 8
    assert all(bm.ref_count(b) == 0 for b in range(8))


def test_without_a_window_nothing_is_trimmed() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq(20)
    bm.allocate(seq)
    seq.num_cached_tokens = 19
    assert bm.trim(seq) == 0
    assert bm.live_blocks(seq) == 5


def test_allocate_leaves_blocks_before_the_window_unallocated() -> None:
    """A sequence whose KV arrives from elsewhere holds only the window of its next position."""
    bm = BlockManager(num_blocks=4, block_size=4, window=8)
    seq = _seq(22)
    seq.num_cached_tokens = 21  # position 21 reads keys 14..21: blocks 3 to 5
    assert bm.missing_blocks(seq, 21) == 3
    bm.allocate(seq, 21)
    assert seq.block_table == [FREED, FREED, FREED, 0, 1, 2]
    assert bm.num_free_blocks == 1
    seq.append(7)
    seq.token_ids.extend([7, 7])  # 25 tokens: position 24 needs a seventh entry
    seq.num_cached_tokens = 24
    bm.trim(seq)
    assert seq.block_table == [FREED, FREED, FREED, FREED, 1, 2]
    bm.append_slot(seq)
    assert seq.block_table == [FREED, FREED, FREED, FREED, 1, 2, 3]


def test_peak_blocks_bound_a_windowed_sequence_of_any_length() -> None:
    bm = BlockManager(num_blocks=64, block_size=4, window=8)
    assert bm.peak_blocks(1000, 1) == 8 // 4 + 1  # decoding: the window may start mid-block
    assert bm.peak_blocks(1000, 4) == 4  # a chunk of 4 more positions: one more block
    assert bm.peak_blocks(1000, 0) == 250  # whole prompts in one step hold all of them
    assert bm.peak_blocks(6, 4) == 2
    assert BlockManager(64, 4).peak_blocks(1000, 1) == 250


def test_a_trimmed_prefix_cannot_be_shared() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, window=4)
    src = _seq(12)
    bm.allocate(src)
    src.num_cached_tokens = 11
    bm.trim(src)
    with pytest.raises(ValueError, match="trimmed"):
        bm.share(src, _seq(12), 8)
