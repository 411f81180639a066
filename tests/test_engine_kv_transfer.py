"""Layouts, the KV transfer plan (hand-computed cases and hypothesis properties) and real gloo transfers."""

from __future__ import annotations

import select
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.synchronize import Event as EventType

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from hexgen.daemon.kv_channel import KvChannel
from hexgen.engine.kv_transfer import (
    Exchange,
    KVArrivals,
    KVMissing,
    KVShard,
    KVSlice,
    KVTransferError,
    chunk_blocks,
    plan_kv_transfer,
    recv_kv,
    recv_kv_arrivals,
    send_kv,
)
from hexgen.engine.layout import (
    GroupLayout,
    StageLayout,
    head_range,
    kv_head_range,
    rank_position,
    stage_ranks,
    uniform_layout,
    validate_layout,
    world_size,
)
from hexgen.testing.kv_daemons import StandInDaemons
from hexgen.testing.ranks import context, free_port, run_ranks

# ---------------------------------------------------------------------------------------------- layout


def test_uniform_layout_gives_the_remainder_to_early_stages() -> None:
    assert uniform_layout(5, 2, 4) == (StageLayout(0, 3, 4), StageLayout(3, 5, 4))
    assert uniform_layout(7, 3, 1) == (StageLayout(0, 3, 1), StageLayout(3, 5, 1), StageLayout(5, 7, 1))
    with pytest.raises(ValueError, match="non-empty stages"):
        uniform_layout(2, 3, 1)


def test_rank_numbering_is_stage_major() -> None:
    layout = (StageLayout(0, 2, 2), StageLayout(2, 3, 1), StageLayout(3, 5, 4))
    assert world_size(layout) == 7
    assert [rank_position(layout, r) for r in range(7)] == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert stage_ranks(layout, 0) == [0, 1]
    assert stage_ranks(layout, 2) == [3, 4, 5, 6]
    for bad in (-1, 7):
        with pytest.raises(ValueError, match="out of range"):
            rank_position(layout, bad)


def test_head_ranges() -> None:
    assert [kv_head_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [kv_head_range(2, 8, r) for r in range(8)] == [(0, 1)] * 4 + [(1, 2)] * 4
    assert head_range(32, 4, 3) == (24, 32)
    with pytest.raises(ValueError, match="cannot be sharded"):
        kv_head_range(6, 4, 0)
    with pytest.raises(ValueError, match="not divisible"):
        head_range(6, 4, 0)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ((), "at least one stage"),
        ((StageLayout(1, 4, 1),), "starts at layer 1"),
        ((StageLayout(0, 2, 1), StageLayout(3, 4, 1)), "starts at layer 3"),
        ((StageLayout(0, 2, 1), StageLayout(2, 2, 1), StageLayout(2, 4, 1)), "has no layers"),
        ((StageLayout(0, 3, 1),), "end at layer 3"),
        ((StageLayout(0, 4, 0),), "tp must be >= 1"),
        ((StageLayout(0, 4, 3),), "not divisible by tp=3"),
        ((StageLayout(0, 2, 1), StageLayout(2, 4, 6)), "stage 1: 4 KV heads cannot be sharded over tp=6"),
    ],
)
def test_validate_layout_rejects(layout: GroupLayout, message: str) -> None:
    num_heads = 48 if any(s.tp == 6 for s in layout) else 8
    with pytest.raises(ValueError, match=message):
        validate_layout(layout, num_layers=4, num_heads=num_heads, num_kv_heads=4)


def test_validate_layout_accepts_replicated_kv_heads() -> None:
    validate_layout((StageLayout(0, 3, 8), StageLayout(3, 4, 2)), num_layers=4, num_heads=8, num_kv_heads=2)


# ---------------------------------------------------------------------------------------------- plan


def test_plan_tp2_to_pp2() -> None:
    src = (StageLayout(0, 4, 2),)
    dst = (StageLayout(0, 2, 1), StageLayout(2, 4, 1))
    assert plan_kv_transfer(src, dst, 4) == [
        KVSlice(0, 0, (0, 2), (0, 2)),
        KVSlice(0, 1, (2, 4), (0, 2)),
        KVSlice(1, 0, (0, 2), (2, 4)),
        KVSlice(1, 1, (2, 4), (2, 4)),
    ]


def test_plan_spreads_replicated_heads_over_replicas() -> None:
    # Prefill TP=4 over 2 KV heads: ranks 0 and 1 hold head 0, ranks 2 and 3 head 1.
    src = (StageLayout(0, 2, 4),)
    dst = (StageLayout(0, 1, 1), StageLayout(1, 2, 1))
    assert plan_kv_transfer(src, dst, 2) == [
        KVSlice(0, 0, (0, 1), (0, 1)),
        KVSlice(1, 1, (1, 2), (0, 1)),
        KVSlice(2, 0, (0, 1), (1, 2)),
        KVSlice(3, 1, (1, 2), (1, 2)),
    ]


def test_plan_pp2_to_tp2_splits_layers_and_heads() -> None:
    src = (StageLayout(0, 3, 1), StageLayout(3, 5, 1))
    dst = (StageLayout(0, 5, 2),)
    assert plan_kv_transfer(src, dst, 4) == [
        KVSlice(0, 0, (0, 3), (0, 2)),
        KVSlice(0, 1, (0, 3), (2, 4)),
        KVSlice(1, 0, (3, 5), (0, 2)),
        KVSlice(1, 1, (3, 5), (2, 4)),
    ]


def test_plan_rejects_mismatched_layouts() -> None:
    with pytest.raises(ValueError, match="covers 4 layers but the decode layout 5"):
        plan_kv_transfer((StageLayout(0, 4, 1),), (StageLayout(0, 5, 1),), 4)
    with pytest.raises(ValueError, match="cannot be sharded"):
        plan_kv_transfer((StageLayout(0, 4, 3),), (StageLayout(0, 4, 1),), 4)
    with pytest.raises(ValueError, match="at least one stage"):
        plan_kv_transfer((), (StageLayout(0, 4, 1),), 4)


@st.composite
def layouts(draw: st.DrawFn, num_layers: int) -> GroupLayout:
    num_stages = draw(st.integers(1, min(4, num_layers)))
    cuts = draw(st.sets(st.integers(1, max(1, num_layers - 1)), min_size=num_stages - 1, max_size=num_stages - 1))
    bounds = [0, *sorted(cuts), num_layers]
    return tuple(StageLayout(bounds[i], bounds[i + 1], draw(st.sampled_from([1, 2, 4, 8]))) for i in range(num_stages))


@st.composite
def layout_pairs(draw: st.DrawFn) -> tuple[GroupLayout, GroupLayout, int]:
    num_layers = draw(st.integers(1, 16))
    return draw(layouts(num_layers)), draw(layouts(num_layers)), draw(st.sampled_from([1, 2, 4, 8]))


def _holdings(layout: GroupLayout, num_kv_heads: int, rank: int) -> set[tuple[int, int]]:
    shard = KVShard(layout, rank, num_kv_heads)
    return {(layer, head) for layer in range(*shard.layers) for head in range(*shard.kv_heads)}


@settings(max_examples=300, deadline=None)
@given(layout_pairs())
def test_plan_covers_every_decode_rank_exactly_once_from_holders(case: tuple[GroupLayout, GroupLayout, int]) -> None:
    src, dst, num_kv_heads = case
    slices = plan_kv_transfer(src, dst, num_kv_heads)

    assert slices == plan_kv_transfer(src, dst, num_kv_heads)
    assert slices == sorted(slices, key=lambda s: (s.src, s.dst, s.layers, s.kv_heads))
    assert len({(s.src, s.dst) for s in slices}) == len(slices), "a (src, dst) pair got more than one slice"

    received: dict[int, list[tuple[int, int]]] = {d: [] for d in range(world_size(dst))}
    for s in slices:
        assert s.layers[0] < s.layers[1] and s.kv_heads[0] < s.kv_heads[1]
        cells = [(layer, head) for layer in range(*s.layers) for head in range(*s.kv_heads)]
        assert set(cells) <= _holdings(src, num_kv_heads, s.src), f"{s} sends what its source does not hold"
        received[s.dst].extend(cells)
    for d, cells in received.items():
        assert len(cells) == len(set(cells)), f"decode rank {d} receives some cell twice"
        assert set(cells) == _holdings(dst, num_kv_heads, d), f"decode rank {d} is not covered exactly"


@settings(max_examples=200, deadline=None)
@given(layout_pairs())
def test_plan_balances_reads_over_replicas(case: tuple[GroupLayout, GroupLayout, int]) -> None:
    src, dst, num_kv_heads = case
    slices = plan_kv_transfer(src, dst, num_kv_heads)
    for stage_index, stage in enumerate(src):
        replicas = stage.tp // num_kv_heads
        if replicas <= 1:
            continue
        first = stage_ranks(src, stage_index)[0]
        for head in range(num_kv_heads):
            holders = range(first + head * replicas, first + (head + 1) * replicas)
            counts = [sum(1 for s in slices if s.src == holder) for holder in holders]
            assert max(counts) - min(counts) <= 1, f"stage {stage_index} head {head} reads per replica: {counts}"


# ---------------------------------------------------------------------------------------------- validation


def _shard_and_cache(blocks: int = 6, block_size: int = 4) -> tuple[KVShard, torch.Tensor, list[KVSlice]]:
    src = (StageLayout(0, 4, 2),)
    dst = (StageLayout(0, 2, 1), StageLayout(2, 4, 1))
    shard = KVShard(src, 1, 4)
    return shard, torch.zeros(2, 4, blocks, block_size, 2, 8), plan_kv_transfer(src, dst, 4)


def _unused_peer(rank: int) -> int:
    raise AssertionError("validation must fail before any peer is looked up")


def test_a_kv_message_holds_as_many_whole_blocks_as_fit_its_size_and_at_least_one() -> None:
    assert chunk_blocks(2 << 20, 16 << 20) == 8  # a 2 MiB block (8-layer, 16-head float32 model, 16 tokens)
    assert chunk_blocks(3 << 20, 16 << 20) == 5
    assert chunk_blocks(32 << 20, 16 << 20) == 1  # a block over the size still moves, one per message
    assert chunk_blocks(2048) == 8192
    with pytest.raises(ValueError, match="at least one byte"):
        chunk_blocks(0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_tokens": 13}, "need 4 blocks of 4 but the block table has 3"),
        ({"num_tokens": -1}, "num_tokens must be an integer >= 0"),
        ({"block_table": [0, 9, 1]}, "outside the cache's 6 blocks"),
        ({"block_table": [0, 1, 1]}, "repeats a block id"),
        ({"kv_cache": torch.zeros(2, 4, 6, 4, 4, 8)}, "holds 4 layers and 4 KV heads but rank 1"),
        ({"kv_cache": torch.zeros(4, 6, 4, 2, 8)}, "must have shape"),
        ({"slices": [KVSlice(1, 0, (0, 2), (0, 2))]}, "names rank 1 as src but that rank holds"),
        ({"blocks_per_chunk": 0}, "blocks_per_chunk must be a positive integer"),
    ],
)
def test_send_kv_rejects_mismatches_before_communicating(change: dict[str, object], message: str) -> None:
    shard, cache, slices = _shard_and_cache()
    arguments: dict[str, object] = {
        "kv_cache": cache,
        "shard": shard,
        "slices": slices,
        "block_table": [0, 2, 1],
        "num_tokens": 10,
        "peer": _unused_peer,
        "blocks_per_chunk": 64,
    }
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        send_kv(**arguments)  # type: ignore[arg-type]


def test_recv_kv_rejects_a_short_block_table() -> None:
    dst = (StageLayout(0, 2, 1), StageLayout(2, 4, 1))
    slices = plan_kv_transfer((StageLayout(0, 4, 2),), dst, 4)
    with pytest.raises(ValueError, match="need 2 blocks"):
        recv_kv(torch.zeros(2, 2, 4, 4, 4, 8), KVShard(dst, 0, 4), slices, [3], 5, _unused_peer)


def test_kv_shard_rejects_a_rank_outside_the_layout() -> None:
    with pytest.raises(ValueError, match="out of range"):
        KVShard((StageLayout(0, 4, 2),), 2, 4)


# ---------------------------------------------------------------------------------------------- gloo transfers

BLOCK_SIZE = 4
HEAD_DIM = 3
UNTOUCHED = -5.0


@dataclass(frozen=True)
class Scenario:
    """A transfer among the 4 processes: the prefill ranks' and decode ranks' global ranks in layout order."""

    name: str
    num_layers: int
    num_kv_heads: int
    src: GroupLayout
    dst: GroupLayout
    src_ranks: tuple[int, ...]
    dst_ranks: tuple[int, ...]
    num_tokens: int
    blocks_per_chunk: int
    dtype: torch.dtype = torch.float32


SCENARIOS = (
    Scenario("tp2->pp2", 4, 4, (StageLayout(0, 4, 2),), uniform_layout(4, 2, 1), (0, 1), (2, 3), 10, 2),
    Scenario("pp2->tp2", 5, 4, uniform_layout(5, 2, 1), (StageLayout(0, 5, 2),), (2, 3), (0, 1), 17, 64),
    Scenario("replicated", 2, 1, (StageLayout(0, 2, 2),), uniform_layout(2, 2, 1), (1, 3), (0, 2), 8, 1),
    Scenario(
        "three->one",
        3,
        2,
        (StageLayout(0, 2, 2), StageLayout(2, 3, 1)),
        (StageLayout(0, 3, 1),),
        (3, 0, 1),
        (2,),
        9,
        2,
        torch.float64,
    ),
)


def _reference(scenario: Scenario) -> torch.Tensor:
    """Distinct values for every (k/v, layer, position, head, dim) the sequence's blocks hold."""
    positions = -(-scenario.num_tokens // BLOCK_SIZE) * BLOCK_SIZE
    shape = (2, scenario.num_layers, positions, scenario.num_kv_heads, HEAD_DIM)
    return torch.arange(torch.Size(shape).numel(), dtype=scenario.dtype).reshape(shape)


def _block_table(scenario: Scenario, side: str, layout_rank: int, num_blocks: int) -> list[int]:
    """A different permutation of block ids on each side and rank, longer than the sequence needs."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{scenario.name}/{side}/{layout_rank}".encode()))
    return torch.randperm(num_blocks, generator=generator)[: num_blocks - 2].tolist()


def _run_scenario(scenario: Scenario, rank: int, group: Exchange | None = None) -> None:
    num_blocks = -(-scenario.num_tokens // BLOCK_SIZE) + 4
    slices = plan_kv_transfer(scenario.src, scenario.dst, scenario.num_kv_heads)
    reference = _reference(scenario)
    used = -(-scenario.num_tokens // BLOCK_SIZE)
    for side, layout, ranks in (("src", scenario.src, scenario.src_ranks), ("dst", scenario.dst, scenario.dst_ranks)):
        if rank not in ranks:
            continue
        shard = KVShard(layout, ranks.index(rank), scenario.num_kv_heads)
        (l0, l1), (h0, h1) = shard.layers, shard.kv_heads
        table = _block_table(scenario, side, shard.rank, num_blocks)
        cache = torch.full((2, l1 - l0, num_blocks, BLOCK_SIZE, h1 - h0, HEAD_DIM), UNTOUCHED, dtype=scenario.dtype)
        expected = cache.clone()
        for i, block in enumerate(table[:used]):
            expected[:, :, block] = reference[:, l0:l1, i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE, h0:h1]
        options = {"blocks_per_chunk": scenario.blocks_per_chunk, "timeout": timedelta(seconds=20), "group": group}
        if side == "src":
            cache.copy_(expected)
            peer = scenario.dst_ranks.__getitem__
            send_kv(cache, shard, slices, table, scenario.num_tokens, peer, **options)  # type: ignore[arg-type]
        else:
            peer = scenario.src_ranks.__getitem__
            recv_kv(cache, shard, slices, table, scenario.num_tokens, peer, **options)  # type: ignore[arg-type]
        if not torch.equal(cache, expected):
            wrong = (cache != expected).nonzero()[:5].tolist()
            raise AssertionError(f"{scenario.name}: {side} rank {shard.rank} cache differs at {wrong}")


def _expect_timeout() -> None:
    """Receiving from a rank that never sends fails with KVTransferError once the timeout passes."""
    layout = (StageLayout(0, 1, 1),)
    slices = plan_kv_transfer(layout, layout, 1)
    cache = torch.zeros(2, 1, 2, BLOCK_SIZE, 1, HEAD_DIM)
    started = time.monotonic()
    with pytest.raises(KVTransferError, match=r"receiving KV from process-group ranks \[0\] failed: .*[Tt]imed out"):
        recv_kv(cache, KVShard(layout, 0, 1), slices, [1], 1, lambda _: 0, timeout=timedelta(seconds=0.3))
    assert time.monotonic() - started < 5


def _worker(rank: int, world: int, port: int, timed_out: EventType) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    for scenario in SCENARIOS:
        _run_scenario(scenario, rank)
    dist.barrier()
    # Rank 0 stays connected until rank 2's receive has timed out, or rank 2 would see a closed pair instead.
    if rank == 2:
        try:
            _expect_timeout()
        finally:
            timed_out.set()
    elif not timed_out.wait(timeout=30):
        raise TimeoutError("rank 2 never finished its timeout check")
    dist.destroy_process_group()


def test_gloo_transfers_between_differently_sharded_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    world = 4
    outcomes = run_ranks(_worker, world, (world, free_port(), context.Event()), 60)
    errors = {rank: error for rank, error in outcomes.items() if error}
    assert not errors, "\n".join(f"rank {rank}:\n{error}" for rank, error in sorted(errors.items()))


# ---------------------------------------------------------------------------------------------- relayed transfers


RELAYED = (
    *SCENARIOS,
    Scenario(
        "bf16 tp2->pp2", 4, 4, (StageLayout(0, 4, 2),), uniform_layout(4, 2, 1), (0, 1), (2, 3), 700, 64, torch.bfloat16
    ),
)


def test_relayed_transfers_move_the_same_kv_as_gloo() -> None:
    daemons = StandInDaemons(4)
    try:
        for scenario in RELAYED:
            groups = [
                Exchange(None, relay=channel.bind("hexgen/1/1/exchange/", rank), ranks={})
                for rank, channel in enumerate(daemons.channels)
            ]
            with ThreadPoolExecutor(4) as pool:
                for outcome in [pool.submit(_run_scenario, scenario, rank, groups[rank]) for rank in range(4)]:
                    outcome.result(timeout=60)
    finally:
        daemons.close()


def test_a_mixed_exchange_moves_kv_over_gloo_among_its_members_and_through_the_relay_otherwise() -> None:
    """The first prefill rank and the first decode rank of each scenario share a gloo group (their hosts are
    linked directly); every other pair's KV is relayed. The caches come out the same."""
    daemons = StandInDaemons(4)
    store = dist.HashStore()
    try:
        for scenario in RELAYED:
            members = sorted({scenario.src_ranks[0], scenario.dst_ranks[0]})
            prefix = f"hexgen/1/{scenario.name}/exchange/"

            def run(
                rank: int, scenario: Scenario = scenario, members: list[int] = members, prefix: str = prefix
            ) -> None:
                relay = daemons.channels[rank].bind(prefix, rank)
                numbering = {r: i for i, r in enumerate(members)}
                if rank not in numbering:  # as join_exchange builds it: a rank outside the group relays all
                    _run_scenario(scenario, rank, Exchange(None, relay=relay, ranks={}))
                    return
                group = dist.ProcessGroupGloo(
                    dist.PrefixStore(prefix, store), numbering[rank], len(members), timedelta(seconds=30)
                )
                _run_scenario(scenario, rank, Exchange(group, relay=relay, ranks=numbering))

            with ThreadPoolExecutor(4) as pool:
                for outcome in [pool.submit(run, rank) for rank in range(4)]:
                    outcome.result(timeout=60)
    finally:
        daemons.close()


def test_a_relayed_kv_that_never_comes_or_does_not_fit_fails_only_its_sequence() -> None:
    daemons = StandInDaemons(2)
    try:
        layout = (StageLayout(0, 1, 1),)
        slices = plan_kv_transfer(layout, layout, 1)
        shard = KVShard(layout, 0, 1)
        sender, receiver = (
            Exchange(None, relay=c.bind("hexgen/1/1/exchange/", r), ranks={}) for r, c in enumerate(daemons.channels)
        )
        cache = torch.zeros(2, 1, 2, BLOCK_SIZE, 1, HEAD_DIM)
        with pytest.raises(KVMissing, match=r"did not arrive: not whole within 0\.3 s"):
            recv_kv(cache, shard, slices, [1], 1, lambda _: 0, group=receiver, timeout=timedelta(seconds=0.3), tag=5)
        wide = torch.ones(2, 1, 2, BLOCK_SIZE, 1, HEAD_DIM + 1)
        send_kv(wide, shard, slices, [1], 1, lambda _: 1, group=sender, tag=6)
        with pytest.raises(KVMissing, match="the replicas' KV formats differ"):
            recv_kv(cache, shard, slices, [1], 1, lambda _: 0, group=receiver, timeout=timedelta(seconds=20), tag=6)
        send_kv(cache + 2, shard, slices, [1], 1, lambda _: 1, group=sender, tag=7)
        recv_kv(cache, shard, slices, [0], 1, lambda _: 0, group=receiver, timeout=timedelta(seconds=20), tag=7)
        assert torch.equal(cache[:, :, 0], torch.full_like(cache[:, :, 0], 2.0))
        assert torch.equal(cache[:, :, 1], torch.zeros_like(cache[:, :, 1]))
    finally:
        daemons.close()


def test_a_relayed_kv_taken_as_it_arrives_scatters_each_chunk_once_its_message_is_here() -> None:
    """Three one-block chunks: after the first message alone, its block is in place and the others untouched;
    after the rest, the whole KV; a chunk told lost fails only that receive, with why."""
    daemons = StandInDaemons(2)
    try:
        layout = (StageLayout(0, 1, 1),)
        slices = plan_kv_transfer(layout, layout, 1)
        shard = KVShard(layout, 0, 1)
        prefix = "hexgen/1/1/exchange/"
        sender, receiver = (Exchange(None, relay=c.bind(prefix, r), ranks={}) for r, c in enumerate(daemons.channels))
        source = torch.arange(2 * 3 * BLOCK_SIZE * HEAD_DIM, dtype=torch.float32).reshape(2, 1, 3, BLOCK_SIZE, 1, -1)
        cache = torch.full_like(source, UNTOUCHED)
        arrivals = recv_kv_arrivals(
            cache, shard, slices, [2, 0, 1], 3 * BLOCK_SIZE, lambda _: 0, group=receiver, blocks_per_chunk=1, tag=4
        )
        assert not arrivals.take() and torch.equal(cache, torch.full_like(source, UNTOUCHED))
        send_kv(source, shard, slices, [0], BLOCK_SIZE, lambda _: 1, group=sender, blocks_per_chunk=1, tag=4)
        _take_until(arrivals, daemons.channels[1], lambda: arrivals.taken == 1)
        assert not arrivals.whole and torch.equal(cache[:, :, 2], source[:, :, 0])
        assert torch.equal(cache[:, :, :2], torch.full_like(cache[:, :, :2], UNTOUCHED))
        send_kv(source, shard, slices, [1, 2], 2 * BLOCK_SIZE, lambda _: 1, group=sender, blocks_per_chunk=1, tag=4)
        _take_until(arrivals, daemons.channels[1], lambda: arrivals.whole)
        assert torch.equal(cache, source[:, :, [1, 2, 0]])

        lost = recv_kv_arrivals(cache, shard, slices, [0], 1, lambda _: 0, group=receiver, tag=5)
        daemons.channels[1].lose([(prefix, 0, 1, 5, 0)], "its route broke")
        with pytest.raises(KVMissing, match="its route broke"):
            lost.take()
    finally:
        daemons.close()


def _take_until(arrivals: KVArrivals, channel: KvChannel, done: Callable[[], bool]) -> None:
    """``arrivals.take()`` each time ``channel`` says a message settled, until ``done()`` (at most 20 s)."""
    deadline = time.monotonic() + 20
    while not (arrivals.take() or done()):
        assert time.monotonic() < deadline, f"only {arrivals.taken} chunks arrived"
        select.select([channel.fileno()], [], [], 1.0)
        channel.drain()


def test_a_relayed_receive_fails_at_once_when_the_daemon_is_gone() -> None:
    daemons = StandInDaemons(1)
    layout = (StageLayout(0, 1, 1),)
    receiver = Exchange(None, relay=daemons.channels[0].bind("hexgen/1/1/exchange/", 0), ranks={})
    daemons.close()
    cache = torch.zeros(2, 1, 2, BLOCK_SIZE, 1, HEAD_DIM)
    with pytest.raises(KVMissing, match="the daemon closed the KV channel"):
        recv_kv(
            cache,
            KVShard(layout, 0, 1),
            plan_kv_transfer(layout, layout, 1),
            [1],
            1,
            lambda _: 0,
            group=receiver,
            timeout=timedelta(seconds=30),
        )
