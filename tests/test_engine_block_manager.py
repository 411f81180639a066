"""Block manager: allocation and growth, all-or-nothing failure, shared prefixes with reference counts, slots."""

from __future__ import annotations

import pytest

from hexgen.engine.block_manager import BlockManager, NoFreeBlocks
from hexgen.engine.sequence import Sequence


def _seq(num_tokens: int) -> Sequence:
    return Sequence(list(range(num_tokens)))


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (4, 0), (-1, 4), (4, -2)])
def test_rejects_non_positive_sizes(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


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
