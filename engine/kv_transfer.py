"""Moving a sequence's KV cache from a prefill replica to a decode replica sharded differently, over torch.distributed.

A worker's cache is one tensor of shape ``[2, num_local_layers, num_blocks, block_size, num_local_kv_heads,
head_dim]`` (index 0 holds K, 1 holds V). :func:`plan_kv_transfer` decides, from the two layouts alone, which
prefill rank sends which (layers, KV heads) to which decode rank; :func:`send_kv` and :func:`recv_kv` then move
the sequence's blocks with point-to-point operations, each side using its own block ids.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hexgen.engine.block_manager import FREED
from hexgen.engine.layout import (
    GroupLayout,
    check_kv_heads_shardable,
    check_stages,
    kv_head_range,
    rank_position,
    world_size,
)

# Two chunks in flight let the next chunk's gather overlap the previous chunk's transfer without holding the
# whole sequence's KV in staging buffers.
_CHUNKS_IN_FLIGHT = 2
# what a wait past the deadline still gets: a message already here is taken, not failed
_MIN_WAIT_S = 0.001
# A message of this size keeps a chunk's gather, send and scatter overlapping and its buffers reusable (a
# fresh buffer of hundreds of MiB costs more in page faults than its copy), yet moves in a few hundred ms.
KV_MESSAGE_BYTES = 16 << 20


class KVTransferError(RuntimeError):
    """A KV send or receive failed or timed out in the communication layer (the peer died, hung or disagreed).

    With gloo a timed-out wait also closes the connection to that peer, so later operations between the two
    ranks fail too: treat the process group as broken and rebuild it.
    """


class KVMissing(Exception):
    """One sequence's KV did not arrive whole (lost with its route, late, or in another format) over a transport
    that stays usable afterwards (the daemons' libp2p streams): only that sequence fails, not the group."""


@dataclass(frozen=True)
class KVSlice:
    """One message stream: prefill rank ``src`` sends decode rank ``dst`` the global ``layers`` x ``kv_heads``."""

    src: int
    dst: int
    layers: tuple[int, int]
    kv_heads: tuple[int, int]


@dataclass(frozen=True)
class KVShard:
    """The part of the model's KV cache that one worker holds: its rank in a layout, and the model's KV heads."""

    layout: GroupLayout
    rank: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        stage_index, _ = rank_position(self.layout, self.rank)
        check_kv_heads_shardable(self.num_kv_heads, self.layout[stage_index].tp)

    @property
    def stage_index(self) -> int:
        return rank_position(self.layout, self.rank)[0]

    @property
    def tp_rank(self) -> int:
        return rank_position(self.layout, self.rank)[1]

    @property
    def layers(self) -> tuple[int, int]:
        """Global layers ``[start, end)`` this worker holds."""
        stage = self.layout[self.stage_index]
        return stage.start_layer, stage.end_layer

    @property
    def kv_heads(self) -> tuple[int, int]:
        """Global KV heads ``[start, end)`` this worker holds."""
        return kv_head_range(self.num_kv_heads, self.layout[self.stage_index].tp, self.tp_rank)


def plan_kv_transfer(src: GroupLayout, dst: GroupLayout, num_kv_heads: int) -> list[KVSlice]:
    """Which prefill rank sends which part of the KV cache to which decode rank.

    Parameters
    ----------
    src, dst : the prefill and decode layouts; both must cover the same layers.
    num_kv_heads : the model's KV heads, shardable over every stage's tp.

    Returns
    -------
    Slices sorted by ``(src, dst, layers)``. Every (layer, KV head) that a decode rank holds is covered by
    exactly one slice whose source rank holds it, and each (src, dst) pair appears at most once (a source rank
    lies in one stage and holds one contiguous run of heads, so the overlap is a single rectangle). When a
    prefill stage replicates a head (tp > num_kv_heads), the decode ranks reading that head from that stage take
    its replicas round-robin in decode rank order, so the replicas' slice counts differ by at most one.

    Raises ValueError when a layout is malformed, the layouts cover different numbers of layers, or the KV heads
    cannot be sharded over some stage.

    Complexity: O(W_dst * (S_src + H) + n log n) for W_dst decode ranks, S_src prefill stages, H KV heads and
    n returned slices (n <= W_dst * min(W_src, S_src * H)).
    """
    _check_layouts(src, dst, num_kv_heads)
    src_first_rank = [0]
    for stage in src:
        src_first_rank.append(src_first_rank[-1] + stage.tp)

    readers: collections.Counter[tuple[int, int]] = collections.Counter()
    slices: list[KVSlice] = []
    for dst_rank in range(world_size(dst)):
        dst_stage_index, dst_tp_rank = rank_position(dst, dst_rank)
        dst_stage = dst[dst_stage_index]
        head_start, head_end = kv_head_range(num_kv_heads, dst_stage.tp, dst_tp_rank)
        for src_stage_index, src_stage in enumerate(src):
            layer_start = max(dst_stage.start_layer, src_stage.start_layer)
            layer_end = min(dst_stage.end_layer, src_stage.end_layer)
            if layer_start >= layer_end:
                continue
            first = src_first_rank[src_stage_index]
            if src_stage.tp <= num_kv_heads:
                per_rank = num_kv_heads // src_stage.tp
                for src_tp_rank in range(head_start // per_rank, -(-head_end // per_rank)):
                    heads = (max(head_start, src_tp_rank * per_rank), min(head_end, (src_tp_rank + 1) * per_rank))
                    slices.append(KVSlice(first + src_tp_rank, dst_rank, (layer_start, layer_end), heads))
            else:
                replicas = src_stage.tp // num_kv_heads
                for head in range(head_start, head_end):
                    replica = readers[src_stage_index, head] % replicas
                    readers[src_stage_index, head] += 1
                    src_rank = first + head * replicas + replica
                    slices.append(KVSlice(src_rank, dst_rank, (layer_start, layer_end), (head, head + 1)))
    slices.sort(key=lambda s: (s.src, s.dst, s.layers, s.kv_heads))
    return slices


def _check_layouts(src: GroupLayout, dst: GroupLayout, num_kv_heads: int) -> None:
    """Raise ValueError unless both layouts are well formed, cover the same layers, and shard the KV heads."""
    if not src or not dst:
        raise ValueError("both layouts need at least one stage")
    num_layers = src[-1].end_layer
    check_stages(src, num_layers)
    if dst[-1].end_layer != num_layers:
        raise ValueError(f"the prefill layout covers {num_layers} layers but the decode layout {dst[-1].end_layer}")
    check_stages(dst, num_layers)
    for stage in (*src, *dst):
        check_kv_heads_shardable(num_kv_heads, stage.tp)


@dataclass(frozen=True)
class _Move:
    """One slice as seen by one side: the peer's process-group rank and the local layer/head ranges."""

    peer: int
    layers: slice
    kv_heads: slice


def _check_cache(kv_cache: torch.Tensor, shard: KVShard) -> None:
    """Raise ValueError unless ``kv_cache`` has the cache layout and holds exactly ``shard``'s layers and heads."""
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 6 or kv_cache.shape[0] != 2:
        shape = tuple(kv_cache.shape) if isinstance(kv_cache, torch.Tensor) else type(kv_cache).__name__
        raise ValueError(
            "kv_cache must have shape [2, layers, blocks, block_size, kv_heads, head_dim], got " + str(shape)
        )
    layer_start, layer_end = shard.layers
    head_start, head_end = shard.kv_heads
    if kv_cache.shape[1] != layer_end - layer_start or kv_cache.shape[4] != head_end - head_start:
        raise ValueError(
            f"kv_cache holds {kv_cache.shape[1]} layers and {kv_cache.shape[4]} KV heads but rank {shard.rank} of the "
            f"layout holds layers [{layer_start}, {layer_end}) and KV heads [{head_start}, {head_end})"
        )


def _local_moves(shard: KVShard, slices: Sequence[KVSlice], sending: bool, peer: Callable[[int], int]) -> list[_Move]:
    """The slices this side takes part in, checked against ``shard`` and turned into local index ranges."""
    layer_start, layer_end = shard.layers
    head_start, head_end = shard.kv_heads
    role = "src" if sending else "dst"
    moves = []
    for kv_slice in slices:
        if (kv_slice.src if sending else kv_slice.dst) != shard.rank:
            continue
        (a, b), (h0, h1) = kv_slice.layers, kv_slice.kv_heads
        if not (layer_start <= a < b <= layer_end and head_start <= h0 < h1 <= head_end):
            raise ValueError(
                f"{kv_slice} names rank {shard.rank} as {role} but that rank holds layers "
                f"[{layer_start}, {layer_end}) and KV heads [{head_start}, {head_end})"
            )
        other = kv_slice.dst if sending else kv_slice.src
        peer_rank = peer(other)
        if not isinstance(peer_rank, int) or peer_rank < 0:
            raise ValueError(f"peer({other}) returned {peer_rank!r}, not a process-group rank")
        moves.append(_Move(peer_rank, slice(a - layer_start, b - layer_start), slice(h0 - head_start, h1 - head_start)))
    return moves


def _used_blocks(kv_cache: torch.Tensor, block_table: Sequence[int], num_tokens: int) -> list[int]:
    """The block ids holding the first ``num_tokens`` tokens, checked against the table and the cache.
    ``FREED`` entries (blocks a windowed cache gave back: no query to come reads them) are skipped, so
    both sides must have trimmed alike (``BlockManager.allocate`` with the receiver's cached count set)."""
    if not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an integer >= 0, got {num_tokens!r}")
    block_size, num_blocks = kv_cache.shape[3], kv_cache.shape[2]
    needed = -(-num_tokens // block_size)
    if needed > len(block_table):
        raise ValueError(
            f"{num_tokens} tokens need {needed} blocks of {block_size} but the block table has {len(block_table)}"
        )
    used = [int(block) for block in block_table[:needed] if block != FREED]
    bad = [block for block in used if not 0 <= block < num_blocks]
    if bad:
        raise ValueError(f"block ids {bad[:8]} are outside the cache's {num_blocks} blocks")
    if len(set(used)) != len(used):
        raise ValueError("the block table repeats a block id")
    return used


_Pending = tuple[list[dist.Work], list[tuple[_Move, torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class Exchange:
    """A process group built apart from the default world (``dist.ProcessGroupGloo`` on its own store), as
    the daemon's workers do per plan epoch: KV moves over it with the group's own send and recv, and peer
    ranks are numbered within it. With a ``relay`` (the daemons' libp2p streams), a peer outside ``ranks``
    is reached through the relay, and a peer in it at its rank in ``group``."""

    group: Any  # a gloo group (None: none formed, every peer is relayed)
    store: Any = None  # what the group formed on: a store written in Python must outlive its group
    prefix: str = ""  # the epoch's key prefix in ``store`` (KV formats are published under it)
    first_rank: int = 0  # this replica's first rank in the group's numbering
    relay: Any = None  # anything with a gloo group's ``send``/``recv`` (``daemon.kv_channel.RelayGroup``)
    ranks: Mapping[int, int] | None = None  # exchange rank -> rank in ``group``; None: the same, for every peer

    def post(self, buffer: torch.Tensor, peer: int, tag: int, sending: bool) -> dist.Work:
        if self.ranks is None:
            group, rank = self.group, peer
        elif peer in self.ranks:
            group, rank = self.group, self.ranks[peer]
        else:
            group, rank = self.relay, peer
        if sending:
            work: dist.Work = group.send([buffer], rank, tag)
        elif group is self.relay:  # the buffer is the chunk's own: it may take the message's memory as it is
            work = group.recv([buffer], rank, tag, adopt=True)
        else:
            work = group.recv([buffer], rank, tag)
        return work

    def arrived(self, expected: Mapping[int, int], tag: int) -> bool:
        """Whether every relayed message of ``expected`` (peer -> how many it sends) under ``tag`` is here
        whole, so receiving them will not wait; messages over the gloo group are never waited for here."""
        relayed = {peer: count for peer, count in expected.items() if not self.through_gloo(peer)}
        return all(self.relay.arrived(peer, tag, count) for peer, count in relayed.items())

    def through_gloo(self, rank: int) -> bool:
        """Whether KV to or from exchange rank ``rank`` goes over the gloo group (its formats are in the store)."""
        return self.ranks is None or rank in self.ranks


Group = dist.ProcessGroup | Exchange | None


def group_backend(group: Group) -> str:
    """The backend a KV message goes over: an Exchange is always gloo (daemon workers build it so)."""
    if isinstance(group, Exchange):
        return "gloo"
    return str(dist.get_backend(group))


def needs_staging(cache_device: torch.device, backend: str) -> bool:
    """Whether KV must pass through host memory: gloo sends and receives CPU tensors only, so a CUDA cache
    (or any non-CPU one) shipped over gloo is copied to a host buffer first; NCCL takes device tensors."""
    return cache_device.type != "cpu" and backend != "nccl"


def _host_buffer(like: torch.Tensor) -> torch.Tensor:
    """A host tensor shaped like ``like``; pinned when CUDA is up, so device copies can run asynchronously."""
    pin = like.device.type == "cuda"
    return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)


def _post_chunk(
    kv_cache: torch.Tensor,
    moves: list[_Move],
    block_ids: list[int],
    sending: bool,
    group: Group,
    tag: int,
    stage: bool = False,
) -> _Pending:
    """Post one chunk's messages. ``stage``: the wire tensors are host copies (gloo with a CUDA cache);
    sends copy device -> host and synchronise the stream before posting, receives copy back in
    ``_finish_chunk``."""
    index = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    ops = []
    buffers = []
    for move in moves:
        view = kv_cache[:, move.layers, :, :, move.kv_heads]
        if sending:
            buffer = view.index_select(2, index)
            if stage:
                host = _host_buffer(buffer)
                host.copy_(buffer, non_blocking=True)
                buffer = host
        else:
            shape = (*view.shape[:2], len(index), *view.shape[3:])
            if stage:
                buffer = torch.empty(shape, dtype=kv_cache.dtype, pin_memory=kv_cache.device.type == "cuda")
            else:
                buffer = torch.empty(shape, dtype=kv_cache.dtype, device=kv_cache.device)
        if not isinstance(group, Exchange):
            ops.append(dist.P2POp(dist.isend if sending else dist.irecv, buffer, move.peer, group, tag))
        buffers.append((move, index, buffer))
    if sending and stage and kv_cache.device.type == "cuda":
        # the non-blocking device -> host copies must have landed before gloo reads the host buffers
        torch.cuda.current_stream(kv_cache.device).synchronize()
    try:  # a peer that left the group already fails the post itself
        if isinstance(group, Exchange):
            return [group.post(buffer, move.peer, tag, sending) for move, _, buffer in buffers], buffers
        return dist.batch_isend_irecv(ops), buffers
    except RuntimeError as error:
        raise _failure(moves, sending, error) from error


def _failure(moves: Sequence[_Move], sending: bool, error: RuntimeError) -> KVTransferError:
    peers = sorted({move.peer for move in moves})
    verb = "sending KV to" if sending else "receiving KV from"
    return KVTransferError(f"{verb} process-group ranks {peers} failed: {error}")


def _finish_chunk(kv_cache: torch.Tensor, pending: _Pending, sending: bool, timeout: timedelta | None) -> None:
    # A backend that coalesces the batch (NCCL) returns one work for all of it, so works and moves need not
    # pair up; name every peer of the chunk on failure.
    works, buffers = pending
    try:
        for work in works:
            if timeout is None:
                work.wait()
            else:
                work.wait(timeout)
    except RuntimeError as error:
        raise _failure([move for move, _, _ in buffers], sending, error) from error
    if not sending:
        for move, index, buffer in buffers:
            # a staged buffer is on the host: copy it to the cache's device first (a no-op otherwise)
            kv_cache[:, move.layers, :, :, move.kv_heads].index_copy_(2, index, buffer.to(kv_cache.device))


def _transfer(
    kv_cache: torch.Tensor,
    moves: list[_Move],
    block_ids: list[int],
    sending: bool,
    group: Group,
    blocks_per_chunk: int,
    timeout: timedelta | None,
    tag: int = 0,
    stage: bool = False,
) -> None:
    """Post every move chunk by chunk, keeping at most ``_CHUNKS_IN_FLIGHT`` chunks outstanding.

    Both sides walk (chunk, slice) in the same order, so each pair's messages match in order and a backend
    that serialises point-to-point operations (NCCL) cannot deadlock. ``tag`` tells one sequence's messages
    from another's between the same pair of ranks (gloo matches by tag; NCCL ignores it).
    """
    pending: collections.deque[_Pending] = collections.deque()
    for chunk_start in range(0, len(block_ids), blocks_per_chunk):
        chunk = block_ids[chunk_start : chunk_start + blocks_per_chunk]
        pending.append(_post_chunk(kv_cache, moves, chunk, sending, group, tag, stage))
        if len(pending) >= _CHUNKS_IN_FLIGHT:
            _finish_chunk(kv_cache, pending.popleft(), sending, timeout)
    while pending:
        _finish_chunk(kv_cache, pending.popleft(), sending, timeout)


def chunk_blocks(block_bytes: int, message_bytes: int = KV_MESSAGE_BYTES) -> int:
    """Blocks per message for blocks of ``block_bytes`` (the whole model's KV of one block: what both sides
    of a hand-off compute alike, their KV formats being equal), so that no message exceeds ``message_bytes``
    unless one block does. O(1)."""
    if block_bytes < 1:
        raise ValueError(f"a KV block holds at least one byte, not {block_bytes}")
    return max(1, message_bytes // block_bytes)


def _check_call(blocks_per_chunk: int, timeout: timedelta | None) -> None:
    if not isinstance(blocks_per_chunk, int) or blocks_per_chunk < 1:
        raise ValueError(f"blocks_per_chunk must be a positive integer, got {blocks_per_chunk!r}")
    if timeout is not None and timeout <= timedelta(0):
        raise ValueError(f"timeout must be positive, got {timeout}")


def send_kv(
    kv_cache: torch.Tensor,
    shard: KVShard,
    slices: Sequence[KVSlice],
    block_table: Sequence[int],
    num_tokens: int,
    peer: Callable[[int], int],
    *,
    group: Group = None,
    blocks_per_chunk: int = 64,
    timeout: timedelta | None = None,
    tag: int = 0,
    stage: bool | None = None,
) -> None:
    """Send this prefill worker's share of a sequence's KV to the decode ranks, and return once it is sent.

    Parameters
    ----------
    kv_cache : this worker's cache, ``[2, local layers, blocks, block_size, local KV heads, head_dim]``.
    shard : this worker's place in the prefill layout.
    slices : the plan from :func:`plan_kv_transfer`; only slices whose ``src`` is ``shard.rank`` are used.
    block_table : the sequence's block ids in this cache; its first ``ceil(num_tokens / block_size)`` are sent,
        less the ``FREED`` ones (a windowed cache's, which the receiver's table has at the same places).
    num_tokens : how many tokens' KV to move.
    peer : maps a decode layout rank to the rank torch.distributed addresses it by (the global rank).
    group : the process group, default the world.
    blocks_per_chunk : blocks per message; bounds the staging memory to two chunks per slice.
    timeout : how long to wait for each message; None uses the process group's timeout.
    tag : tells this sequence's messages from others' between the same ranks; the receiver passes the same.
    stage : pass the KV through host buffers; None decides with :func:`needs_staging` (a CUDA cache over
        gloo stages). The receiver's choice is independent: the wire carries the same bytes either way.

    Raises ValueError before any communication when the cache, slices or block table do not fit ``shard``
    and ``num_tokens``; KVTransferError when the communication fails. The blocks stay allocated: the caller
    frees the sequence afterwards. Gathers and sends O(tokens x local layers x local heads x head_dim) elements
    in ``ceil(blocks / blocks_per_chunk)`` messages per slice.
    """
    _check_call(blocks_per_chunk, timeout)
    _check_cache(kv_cache, shard)
    block_ids = _used_blocks(kv_cache, block_table, num_tokens)
    moves = _local_moves(shard, slices, True, peer)
    if moves and block_ids:
        stage = needs_staging(kv_cache.device, group_backend(group)) if stage is None else stage
        _transfer(kv_cache, moves, block_ids, True, group, blocks_per_chunk, timeout, tag, stage)


@dataclass(frozen=True)
class KVSend:
    """One sequence of :func:`send_kv_all`: the arguments of :func:`send_kv` that differ between sequences."""

    slices: Sequence[KVSlice]
    block_table: Sequence[int]
    num_tokens: int
    peer: Callable[[int], int]
    tag: int


def send_kv_all(
    kv_cache: torch.Tensor,
    shard: KVShard,
    sends: Sequence[KVSend],
    *,
    group: Group = None,
    blocks_per_chunk: int = 64,
    timeout: timedelta | None = None,
    stage: bool | None = None,
) -> dict[int, str]:
    """Post every message of every sequence in ``sends`` before waiting for any, then wait for them all.

    A prefill replica handing sequences to several decode replicas in one step must not wait on one of them
    while that one waits on another prefill replica that waits on it: with every send posted, and told
    apart by its tag, each receiver takes its sequences in whatever order it learns of them. Stages the
    whole batch's KV at once.

    Returns the tags whose messages did not all go, each with why: their receiver left the group (it died,
    or moved to a new plan epoch and dropped the group, which fails a pending send at once) or did not take
    them within ``timeout``, counted from the first wait, so a hung receiver costs ``timeout`` once, not once
    per message. Only those sequences are lost; the others were sent. Raises ValueError like :func:`send_kv`.
    """
    _check_call(blocks_per_chunk, timeout)
    _check_cache(kv_cache, shard)
    pending: list[tuple[int, _Pending]] = []
    failed: dict[int, str] = {}
    for send in sends:
        block_ids = _used_blocks(kv_cache, send.block_table, send.num_tokens)
        moves = _local_moves(shard, send.slices, True, send.peer)
        if not (moves and block_ids):
            continue
        if stage is None:
            stage = needs_staging(kv_cache.device, group_backend(group))
        try:
            for chunk_start in range(0, len(block_ids), blocks_per_chunk):
                chunk = block_ids[chunk_start : chunk_start + blocks_per_chunk]
                pending.append((send.tag, _post_chunk(kv_cache, moves, chunk, True, group, send.tag, stage)))
        except KVTransferError as error:
            failed.setdefault(send.tag, str(error))
    for tag, why in _wait_sends(kv_cache, pending, timeout).items():
        failed.setdefault(tag, why)
    return failed


def _wait_sends(
    kv_cache: torch.Tensor, pending: list[tuple[int, _Pending]], timeout: timedelta | None
) -> dict[int, str]:
    """Wait for every posted chunk, each at most until ``timeout`` after the first wait began; the tags of
    those that failed, with why. O(chunks) waits."""
    deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
    failed: dict[int, str] = {}
    for tag, item in pending:
        left = None if deadline is None else timedelta(seconds=max(deadline - time.monotonic(), _MIN_WAIT_S))
        try:
            _finish_chunk(kv_cache, item, True, left)
        except KVTransferError as error:
            failed.setdefault(tag, str(error))
    return failed


@dataclass
class KVArrivals:
    """A sequence's KV coming through the daemons (an ``Exchange``'s relay), scattered into its blocks chunk by
    chunk as each chunk's messages arrive (``take``), so the last chunk's scatter is all that follows the last
    byte. Made by :func:`recv_kv_arrivals`."""

    kv_cache: torch.Tensor
    moves: list[_Move]
    chunks: list[list[int]]
    group: Exchange
    tag: int
    stage: bool
    timeout: timedelta | None  # for a message over the gloo group, which ``arrived`` does not wait for
    taken: int = 0

    @property
    def whole(self) -> bool:
        return self.taken == len(self.chunks)

    def take(self) -> bool:
        """Receive and scatter each next chunk whose relayed messages are all here; whether every chunk is in.
        Waits on the network only for a peer over the gloo group (at most ``timeout``). Raises KVMissing when
        a chunk was lost or is in another format, KVTransferError as :func:`recv_kv`; O(bytes taken)."""
        while not self.whole and self.group.arrived({move.peer: 1 for move in self.moves}, self.tag):
            chunk = self.chunks[self.taken]
            pending = _post_chunk(self.kv_cache, self.moves, chunk, False, self.group, self.tag, self.stage)
            _finish_chunk(self.kv_cache, pending, False, self.timeout)
            self.taken += 1
        return self.whole


def recv_kv_arrivals(
    kv_cache: torch.Tensor,
    shard: KVShard,
    slices: Sequence[KVSlice],
    block_table: Sequence[int],
    num_tokens: int,
    peer: Callable[[int], int],
    *,
    group: Exchange,
    blocks_per_chunk: int = 64,
    timeout: timedelta | None = None,
    tag: int = 0,
    stage: bool | None = None,
) -> KVArrivals:
    """What :func:`recv_kv` with the same arguments receives, for messages that come through ``group``'s
    relay and are taken as they arrive (``KVArrivals.take``) rather than waited for. Raises ValueError like
    :func:`recv_kv`. O(slices + blocks)."""
    _check_call(blocks_per_chunk, timeout)
    _check_cache(kv_cache, shard)
    block_ids = _used_blocks(kv_cache, block_table, num_tokens)
    moves = _local_moves(shard, slices, False, peer)
    chunks = [block_ids[at : at + blocks_per_chunk] for at in range(0, len(block_ids), blocks_per_chunk)]
    stage = needs_staging(kv_cache.device, "gloo") if stage is None else stage
    return KVArrivals(kv_cache, moves, chunks if moves else [], group, tag, stage, timeout)


def recv_kv(
    kv_cache: torch.Tensor,
    shard: KVShard,
    slices: Sequence[KVSlice],
    block_table: Sequence[int],
    num_tokens: int,
    peer: Callable[[int], int],
    *,
    group: Group = None,
    blocks_per_chunk: int = 64,
    timeout: timedelta | None = None,
    tag: int = 0,
    stage: bool | None = None,
) -> None:
    """Receive this decode worker's share of a sequence's KV into its own blocks, and return once it is written.

    Parameters mirror :func:`send_kv`: ``shard`` is this worker's place in the decode layout, only slices whose
    ``dst`` is ``shard.rank`` are used, ``block_table`` holds the blocks this side allocated for the sequence
    (it may be longer than needed), ``peer`` maps a prefill layout rank to its torch.distributed rank, and
    ``blocks_per_chunk`` must equal the sender's. Blocks outside the first ``ceil(num_tokens / block_size)``
    table entries are left untouched. Both sides must agree on block_size, head_dim and dtype.

    Raises ValueError before any communication on a mismatch with ``shard`` or ``num_tokens``;
    KVTransferError when the communication fails.
    """
    _check_call(blocks_per_chunk, timeout)
    _check_cache(kv_cache, shard)
    block_ids = _used_blocks(kv_cache, block_table, num_tokens)
    moves = _local_moves(shard, slices, False, peer)
    if moves and block_ids:
        stage = needs_staging(kv_cache.device, group_backend(group)) if stage is None else stage
        _transfer(kv_cache, moves, block_ids, False, group, blocks_per_chunk, timeout, tag, stage)
