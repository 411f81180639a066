"""A replica spread over processes: TP ranks per stage, stages in a pipeline, one driver that samples.

Every rank of a replica runs the same scheduler on the same inputs, so they agree on every batch without
shipping batch metadata: per step the driver (tensor rank 0 of the last stage) broadcasts a small header
(and, when there are any, the new requests), the stages pass hidden states down the pipeline, and the
driver broadcasts the sampled tokens so every rank's scheduler advances identically.
"""

from __future__ import annotations

import dataclasses
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import PrefixStore, ProcessGroup, Store

from hexgen.engine.block_manager import BlockManager
from hexgen.engine.bounds import CONNECT_TIMEOUT_S, LOAD_TIMEOUT_S
from hexgen.engine.config import ModelConfig, load_config
from hexgen.engine.device import nccl_device_id
from hexgen.engine.formation import (
    CONNECT_GRACE_S,
    Timeouts,
    WorldFormationError,
    arrive,
    bounded,
    connecting,
    form_gloo,
    prove,
    reach_store,
)
from hexgen.engine.kv_format import KVFormat, KVFormatError, format_key, mismatch, replica_format
from hexgen.engine.kv_transfer import (
    Exchange,
    KVArrivals,
    KVMissing,
    KVSend,
    KVShard,
    KVSlice,
    KVTransferError,
    chunk_blocks,
    plan_kv_transfer,
    recv_kv,
    recv_kv_arrivals,
    send_kv,
    send_kv_all,
)
from hexgen.engine.layers import Shard
from hexgen.engine.layout import GroupLayout, rank_position, stage_ranks, validate_layout, world_size
from hexgen.engine.loader import ProgressFn
from hexgen.engine.model_runner import CacheConfig, ModelRunner, kv_format_for, resolve_dtype
from hexgen.engine.sampler import sample
from hexgen.engine.scheduler import Batch, Scheduler, SchedulerConfig
from hexgen.engine.sequence import SamplingParams, Sequence
from hexgen.engine.stage_link import BridgedComm, PointToPoint, ReplicaComm, WorldComm

TRANSFER_TIMEOUT = timedelta(seconds=60)
# How long a rank that has loaded waits in the world's first collective for the slowest rank to load: a
# 35 GB stage at 300 MB/s takes two minutes, a slow disk or a cold network share many more.
LOAD_TIMEOUT = timedelta(seconds=LOAD_TIMEOUT_S)
OP_TIMEOUT = timedelta(seconds=120)  # what the worlds are created with (init_world_store) and restored to
FORMAT_TIMEOUT = timedelta(seconds=30)  # a peer publishes its KV format as it joins the exchange
# Prompt tokens per step (scheduler.SchedulerConfig.prefill_chunk) where a spec names none. Where sequences
# decode (colocated, and decode replicas re-prefilling a preempted one) 512 tokens keep a step within a few
# decode steps' time while already filling the matmuls of a GPU; a prefill replica has no decode batch to keep
# moving, so its chunk only bounds a step's activations and lets prompts outgrow max_num_batched_tokens.
PREFILL_CHUNK = {"colocated": 512, "decode": 512, "prefill": 2048}

# replica_groups' groups by their sorted global ranks: None for a single rank, and on a rank outside a group
# torch's GroupMember.NON_GROUP_MEMBER (an int)
Groups = dict[tuple[int, ...], ProcessGroup | int | None]


@dataclass(frozen=True)
class ReplicaSpec:
    """What one replica runs: the checkpoint, its layout and where its ranks sit in the world."""

    model_dir: str
    layout: GroupLayout
    first_rank: int = 0
    mode: str = "colocated"
    dtype: str = "auto"
    device: str = "cpu"
    cache: CacheConfig = field(default_factory=CacheConfig)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    quantize: str | None = None  # every rank's linear weights: None, "int8" or "int4" (engine.quant)
    prefill_chunk: int | None = None  # prompt tokens per step; 0: whole prompts; None: PREFILL_CHUNK[mode]

    @property
    def chunk(self) -> int:
        """The prompt tokens a step of this replica prefills at most (0: whole prompts in steps of their own)."""
        return PREFILL_CHUNK.get(self.mode, 0) if self.prefill_chunk is None else self.prefill_chunk

    @property
    def ranks(self) -> list[int]:
        return list(range(self.first_rank, self.first_rank + world_size(self.layout)))

    def global_rank(self, layout_rank: int) -> int:
        return self.first_rank + layout_rank


@dataclass(frozen=True)
class Request:
    """A sequence entering a replica: new (``src`` -1), or prefilled elsewhere with its KV arriving from
    replica ``src``; a prefill replica hands it off to replica ``dst``."""

    seq_id: int
    token_ids: list[int]
    sampling: SamplingParams
    src: int = -1
    dst: int = -1


@dataclass
class StepResult:
    """What one step changed: sequences that finished, and (prefill mode) ones handed off with their KV."""

    finished: list[Sequence] = field(default_factory=list)
    handed_off: list[Sequence] = field(default_factory=list)
    ran: bool = False
    sampled: list[tuple[int, int]] = field(default_factory=list)  # (seq_id, token) in batch order
    failed: list[tuple[int, str]] = field(default_factory=list)  # (seq_id, why): imports refused or lost here


def replica_groups(specs: list[ReplicaSpec], timeout: timedelta | None = None) -> Groups:
    """Create, in the same order on every rank of the world, each replica's group and each stage's TP
    group; returns them keyed by their sorted global ranks. Every rank must call this with the same specs.
    ``timeout`` bounds connecting each group and then its operations, until the caller sets another (None:
    torch's default for the backend, 30 minutes for gloo)."""
    groups: Groups = {}
    for spec in specs:
        for ranks in [spec.ranks] + [
            [spec.global_rank(r) for r in stage_ranks(spec.layout, s)] for s in range(len(spec.layout))
        ]:
            key = tuple(ranks)
            if key not in groups:
                groups[key] = dist.new_group(list(key), timeout=timeout) if len(key) > 1 else None
    return groups


class ReplicaWorker:
    """The part of a replica living in this process. Every rank of the replica calls ``step`` in lockstep;
    only the driver passes requests in, and every rank gets the same StepResult back."""

    # payload sizes in bytes of the new requests, aborts, imports and a new exchange; the stop flag
    HEADER = 5

    def __init__(
        self,
        spec: ReplicaSpec,
        rank: int,
        groups: Groups,
        progress: ProgressFn | None = None,
        load_timeout: timedelta = LOAD_TIMEOUT,
        bridge: PointToPoint | None = None,
        bridge_offset: int = 0,
    ) -> None:
        """Load this rank's shard (``progress`` hears bytes loaded of the total), wait for every rank of the
        replica to have loaded (up to ``load_timeout``), then size the KV cache they all agree on.

        With a ``bridge`` the replica's stages share no world: this rank's world is its stage alone (its TP
        ranks, numbered from 0), ``groups`` is unused, and everything between stages goes over the bridge,
        which numbers replica rank ``r`` as ``r + bridge_offset`` (``stage_link.BridgedComm``)."""
        self.spec = spec
        self.config: ModelConfig = load_config(spec.model_dir)
        validate_layout(spec.layout, self.config.num_layers, self.config.num_heads, self.config.num_kv_heads)
        self.layout_rank = rank - spec.first_rank
        self.stage, tp_rank = rank_position(spec.layout, self.layout_rank)
        stage = spec.layout[self.stage]
        self.stage_ranks = [spec.global_rank(r) for r in stage_ranks(spec.layout, self.stage)]
        world_ranks = tuple(self.stage_ranks) if bridge is None else tuple(range(stage.tp))
        tp_group = _member(groups.get(world_ranks)) if bridge is None else None  # None: the stage's own world
        shard = Shard(
            stage.start_layer, stage.end_layer, self.config.num_layers, stage.tp, tp_rank, tp_group, world_ranks
        )
        self.device = torch.device(spec.device)
        on_gpu = dist.get_backend() == "nccl" and bridge is None  # the daemons carry host memory only
        self.comm_device = self.device if on_gpu else torch.device("cpu")
        dtype = resolve_dtype(spec.dtype, self.config, self.device)
        self.dtype = dtype
        self.kv_format = kv_format_for(self.config, dtype, self.device, spec.cache)  # what replica_kv_format says
        if dist.is_initialized():  # the default world doubles as the exchange until one is joined
            store = dist.distributed_c10d._get_default_store()
            store.set(format_key("", rank), self.kv_format.to_bytes())  # type: ignore[arg-type]  # torch's stub says str; stores take bytes
        self.receiving_kv = False  # set while import_kv waits for a KV: the driver's liveness goes quiet then
        self.runner = ModelRunner(
            spec.model_dir,
            self.config,
            shard,
            dtype,
            self.device,
            spec.cache,
            allocate=False,
            progress=progress,
            quantize=spec.quantize,
        )
        self.driver_rank = driver_rank(spec)
        self.group = _member(groups.get(tuple(spec.ranks))) if bridge is None else None
        self.comm: ReplicaComm = (
            WorldComm(self.group)
            if bridge is None
            else BridgedComm(bridge, rank, tuple(spec.ranks), self.driver_rank, bridge_offset, OP_TIMEOUT)
        )
        self.solo = len(spec.ranks) == 1  # no collectives: the world may hold other replicas
        if not self.solo:
            # the first collective after loading: a rank done early must not time out on a slower one
            self.comm.barrier(load_timeout, OP_TIMEOUT)
        # sized now that the groups exist (NCCL's buffers are allocated) and every rank has loaded
        local = self.runner.blocks_that_fit(spec.max_num_batched_tokens, spec.max_num_seqs)
        num_blocks = self._agree_on_blocks(local)
        self.runner.allocate_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, self.runner.block_size, self.runner.kv_window)
        scheduler_config = SchedulerConfig(spec.max_num_seqs, spec.max_num_batched_tokens, spec.mode, spec.chunk)
        self.scheduler = Scheduler(scheduler_config, self.block_manager, self.config.eos_token_ids)
        last = len(spec.layout) - 1
        self.is_driver = rank == self.driver_rank
        self.rank = rank
        self.next_stage = (
            [spec.global_rank(r) for r in stage_ranks(spec.layout, self.stage + 1)]
            if self.stage < last and tp_rank == 0
            else []
        )
        self.prev_stage_leader = spec.global_rank(stage_ranks(spec.layout, self.stage - 1)[0]) if self.stage else None
        self.seqs: dict[int, Sequence] = {}
        self.kv_shard = KVShard(spec.layout, self.layout_rank, self.config.num_kv_heads)
        self.peers: list[ReplicaSpec] = []  # every replica of the world, indexed like Request.src and .dst
        self.routes: dict[int, int] = {}
        self.exchange: Exchange | None = None  # the group KV moves over, when it is not this default world
        self._next_exchange: threading.Thread | None = None
        self._joined: list[tuple[Exchange, list[ReplicaSpec]] | BaseException] = []
        if self.runner.block_size != self.kv_format.block_size:  # published before loading: must not drift
            raise RuntimeError(f"the KV cache pages {self.runner.block_size} tokens, not {self.kv_format}")
        self.exchange_first_rank = spec.first_rank  # this replica's first rank in the exchange numbering
        self._formats: dict[int, KVFormat | str] = {}  # exchange rank -> its format, or why it is unreadable
        # told, from the joining thread, how joining an exchange group (its prefix) ended (None: formed)
        self.on_exchange: Callable[[str, BaseException | None], None] | None = None
        self.kv_relay: KVRelay | None = None  # how a "libp2p" exchange reaches the daemons
        self.waiting: list[_Waiting] = []  # relayed imports whose KV is on its way, in arrival order

    def _agree_on_blocks(self, local: int) -> int:
        if self.solo:
            return local
        count = torch.tensor([local], dtype=torch.long, device=self.comm_device)
        self.comm.all_reduce(count, "min")
        return int(count.item())

    def _broadcast_bytes(self, payload: bytes | None, size: int) -> bytes:
        buf = torch.empty(size, dtype=torch.uint8, device=self.comm_device)
        if self.is_driver:
            buf.copy_(torch.frombuffer(bytearray(payload or b""), dtype=torch.uint8))
        if not self.solo:
            self.comm.broadcast(buf, self.driver_rank)
        return bytes(buf.cpu().numpy()) if not self.is_driver else payload or b""

    def step(
        self,
        requests: list[Request] | None = None,
        aborts: list[int] | None = None,
        stop: bool = False,
        imports: list[Request] | None = None,
        exchange: ExchangeConfig | None = None,
    ) -> StepResult | None:
        """One replica step; returns None once the driver said stop. ``imports`` are prefilled sequences
        whose KV every rank receives from replica ``Request.src`` of ``peers`` before the step. ``exchange``
        moves the replica to a new exchange group (a new plan epoch): sequences still waiting to be handed
        off under the old one are dropped, and every rank starts joining the new group in the background."""
        payloads = self._payloads(requests, aborts, imports, exchange)
        header = torch.tensor([*map(len, payloads), int(stop)], dtype=torch.long, device=self.comm_device)
        if not self.solo:
            self.comm.broadcast(header, self.driver_rank)
        new_size, abort_size, import_size, exchange_size, stopped = (int(x) for x in header.tolist())
        if stopped:
            return None
        new_payload, abort_payload, import_payload, exchange_payload = payloads
        if exchange_size:
            self.begin_exchange(pickle.loads(self._broadcast_bytes(exchange_payload, exchange_size)))
        if new_size:
            for req in pickle.loads(self._broadcast_bytes(new_payload, new_size)):
                self.add(req)
        if abort_size:
            self._abort(pickle.loads(self._broadcast_bytes(abort_payload, abort_size)))
        if import_size:
            failed = self._imports(pickle.loads(self._broadcast_bytes(import_payload, import_size)))
        else:
            failed = self._take_arrived() if self.waiting else []
        return self._run_batch(failed)

    def _payloads(
        self,
        requests: list[Request] | None,
        aborts: list[int] | None,
        imports: list[Request] | None,
        exchange: ExchangeConfig | None,
    ) -> list[bytes]:
        """What the driver broadcasts this step, pickled (empty where there is nothing, and on other ranks)."""
        if not self.is_driver:
            return [b"", b"", b"", b""]
        return [pickle.dumps(part) if part else b"" for part in (requests, aborts, imports, exchange)]

    def _abort(self, seq_ids: list[int]) -> None:
        self._drop_waiting(set(seq_ids))
        for seq_id in seq_ids:
            self.scheduler.abort(seq_id)
            self.seqs.pop(seq_id, None)
            self.routes.pop(seq_id, None)

    def _imports(self, reqs: list[Request]) -> list[tuple[int, str]]:
        """Receive the KV of each prefilled request whose source's KV format matches; the rest, with why not.
        A KV relayed through the daemons is received once it has arrived whole (``_take_arrived``), so a
        slow link never stalls the sequences already decoding; one over gloo is received now."""
        self.await_exchange()
        failed, received, lost = [], [], []
        for req in reqs:
            why = self.kv_refusal(self.peers[req.src], self._own_exchange_spec())
            if why is not None:  # refused on both sides alike: the prefill rank sent nothing
                failed.append((req.seq_id, why))
            elif self._relayed(self.peers[req.src]):
                self.waiting.append(self._wait_for(req))
            else:
                received.append(req)
                lost += self._receive_now(req)
        failed += self._agree_on_failures(received, lost)
        return failed + self._take_arrived() if self.waiting else failed

    def _receive_now(self, req: Request) -> list[tuple[int, str]]:
        """Receive ``req``'s KV over the gloo group now. A receive that fails (its prefill rank died, or left
        the group for a new epoch's) loses only this sequence: returns it with why, its blocks freed."""
        seq = self._allocate_import(req)
        try:
            self._receive(seq, self.peers[req.src])
        except KVTransferError as exc:
            self.block_manager.free(seq)
            return [(req.seq_id, str(exc))]
        return []

    def _relayed(self, src: ReplicaSpec) -> bool:
        """Whether KV from replica ``src`` comes through the daemons rather than over gloo."""
        exchange = self.exchange
        own = self._own_exchange_spec()
        return exchange is not None and not all(exchange.through_gloo(s.global_rank(0)) for s in (src, own))

    @property
    def kv_chunk_blocks(self) -> int:
        """Blocks per KV message, from the KV format (equal on both sides of any hand-off that goes ahead)."""
        f = self.kv_format
        item = self.runner.kv_cache.element_size()
        return chunk_blocks(2 * f.num_layers * f.block_size * f.num_kv_heads * f.head_dim * item)

    @property
    def pending_imports(self) -> bool:
        """Whether relayed imports wait for their KV: the driver steps on to take them."""
        return bool(self.waiting)

    def _wait_for(self, req: Request) -> _Waiting:
        """A relayed import, its blocks allocated, whose chunks are scattered as they arrive."""
        seq = self._allocate_import(req)
        assert self.exchange is not None  # a relayed import implies a relaying exchange
        arrivals = recv_kv_arrivals(
            *self._import_of(seq, self.peers[req.src]),
            group=self.exchange,
            timeout=TRANSFER_TIMEOUT,
            tag=kv_tag(seq.seq_id),
            blocks_per_chunk=self.kv_chunk_blocks,
        )
        return _Waiting(req, seq, time.monotonic(), arrivals)

    def _take_arrived(self) -> list[tuple[int, str]]:
        """Scatter what arrived of each relayed import waiting; take those whose KV every rank of the replica
        has whole, or lost (so no rank waits on the network), and fail those a rank has waited for past
        TRANSFER_TIMEOUT; the rest wait for a later step. Every rank holds the same waiting list, so all
        decide alike."""
        now = time.monotonic()
        limit = TRANSFER_TIMEOUT.total_seconds()
        settled = [int(self._take_chunks(w)) for w in self.waiting]
        late = [int(now - w.since > limit) for w in self.waiting]
        if not self.solo:
            flags = torch.tensor([*settled, *(-x for x in late)], dtype=torch.long, device=self.comm_device)
            self.comm.all_reduce(flags, "min")
            agreed = flags.tolist()
            settled, late = agreed[: len(settled)], [-x for x in agreed[len(settled) :]]
        failed, taken, still = [], [], []
        for waiting, done, overdue in zip(self.waiting, settled, late, strict=True):
            if done:
                taken.append(waiting)
            elif overdue:
                self.block_manager.free(waiting.seq)
                failed.append(
                    (waiting.req.seq_id, f"its KV did not arrive from replica {waiting.req.src} in {limit:g} s")
                )
            else:
                still.append(waiting)
        self.waiting = still
        lost = []
        for waiting in taken:
            if waiting.lost is None:
                self.scheduler.add_prefilled(waiting.seq)
                self.seqs[waiting.seq.seq_id] = waiting.seq
            else:
                self.block_manager.free(waiting.seq)
                lost.append((waiting.req.seq_id, waiting.lost))
        return failed + self._agree_on_failures([w.req for w in taken], lost)

    def _take_chunks(self, waiting: _Waiting) -> bool:
        """Scatter the chunks of ``waiting`` that arrived; whether it is settled: whole, or lost (a chunk lost
        on its way or in another format: only this sequence fails)."""
        if waiting.lost is None and not waiting.arrivals.whole:
            self.receiving_kv = True  # a peer over gloo that never sends must look stuck to the entry
            try:
                waiting.arrivals.take()
            except KVMissing as exc:
                waiting.lost = str(exc)
            finally:
                self.receiving_kv = False
        return waiting.lost is not None or waiting.arrivals.whole

    def _import_of(
        self, seq: Sequence, src: ReplicaSpec
    ) -> tuple[torch.Tensor, KVShard, list[KVSlice], list[int], int, Callable[[int], int]]:
        """The arguments ``recv_kv`` and ``recv_kv_arrivals`` share for ``seq``'s KV from replica ``src``."""
        slices = plan_kv_transfer(src.layout, self.spec.layout, self.config.num_kv_heads)
        return self.runner.kv_cache, self.kv_shard, slices, seq.block_table, len(seq) - 1, src.global_rank

    def _agree_on_failures(self, reqs: list[Request], failed: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """A KV may reach some ranks of the replica and not others: a sequence any rank lost is dropped by every
        rank, so all schedule alike."""
        if self.solo or not reqs:
            return failed
        lost = {seq_id for seq_id, _ in failed}
        flags = torch.tensor([int(req.seq_id in lost) for req in reqs], dtype=torch.long, device=self.comm_device)
        self.comm.all_reduce(flags, "max")
        why = dict(failed)
        agreed = []
        for req, flag in zip(reqs, flags.tolist(), strict=True):
            if flag and req.seq_id not in lost:
                self.scheduler.abort(req.seq_id)
                self.seqs.pop(req.seq_id, None)
            if flag:
                agreed.append((req.seq_id, why.get(req.seq_id, "another rank of the replica lost its KV")))
        return agreed

    def _run_batch(self, failed: list[tuple[int, str]]) -> StepResult:
        """Schedule, run and sample one batch, if there is one."""
        batch = self.scheduler.schedule()
        if batch is None:
            return StepResult(failed=failed)
        tokens = self._forward(batch)
        sampling = batch.sampling_seqs  # before postprocess, which moves the chunked prompts on
        left = self.scheduler.postprocess(batch, tokens)
        sampled = [(seq.seq_id, t) for seq, t in zip(sampling, tokens, strict=True)]
        result = StepResult(ran=True, sampled=sampled, failed=failed)
        for seq in left:
            (result.finished if seq.finished else result.handed_off).append(seq)
            if seq.finished:
                self.seqs.pop(seq.seq_id, None)
        return result

    def add(self, req: Request) -> Sequence:
        seq = Sequence(list(req.token_ids), req.sampling, seq_id=req.seq_id)
        self.scheduler.add(seq)
        self.seqs[seq.seq_id] = seq
        if req.dst >= 0:
            self.routes[seq.seq_id] = req.dst
        return seq

    def export_routed(self, seqs: list[Sequence]) -> list[tuple[int, str]]:
        """Ship handed-off ``seqs`` to the replicas their requests named (``Request.dst``), every send posted
        before any is waited for (``send_kv_all``), then release their blocks. Returns the sequences whose KV
        did not go, with why (their decode replica is gone or moved to a new epoch: the entry re-submits
        them); this replica carries on."""
        self.await_exchange()
        refused = self.refusals(seqs)
        sends = []
        for seq in seqs:
            dst = self.peers[self.routes.pop(seq.seq_id)]
            if seq.seq_id in refused:
                continue  # the decode side refuses it alike and posts no receive
            slices = plan_kv_transfer(self.spec.layout, dst.layout, self.config.num_kv_heads)
            sends.append(KVSend(slices, seq.block_table, len(seq) - 1, dst.global_rank, kv_tag(seq.seq_id)))
        failed = send_kv_all(
            self.runner.kv_cache,
            self.kv_shard,
            sends,
            group=self.exchange,
            timeout=TRANSFER_TIMEOUT,
            blocks_per_chunk=self.kv_chunk_blocks,
        )
        for seq in seqs:
            self.scheduler.release(seq)
            self.seqs.pop(seq.seq_id, None)
        return [(seq.seq_id, failed[kv_tag(seq.seq_id)]) for seq in seqs if kv_tag(seq.seq_id) in failed]

    def _own_exchange_spec(self) -> ReplicaSpec:
        return dataclasses.replace(self.spec, first_rank=self.exchange_first_rank)

    def refusals(self, seqs: list[Sequence]) -> dict[int, str]:
        """Of handed-off ``seqs``, those whose decode replica's KV format differs from this one's, with why.
        Every rank of the replica gets the same answer (call before ``export_routed`` to tell the daemon)."""
        self.await_exchange()  # routes of a new epoch name replicas in its numbering
        own = self._own_exchange_spec()
        out = {}
        for seq in seqs:
            route = self.routes.get(seq.seq_id)
            if route is not None and (why := self.kv_refusal(own, self.peers[route])) is not None:
                out[seq.seq_id] = why
        return out

    def kv_refusal(self, src: ReplicaSpec, dst: ReplicaSpec) -> str | None:
        """Why KV cannot move from replica ``src`` to replica ``dst`` (exchange numbering), or None. Reads the
        formats every rank of both published, so all ranks of both replicas decide alike. A KV relayed through
        the daemons is checked message by message against the receiver's buffer instead (``KVMissing``)."""
        exchange = self.exchange
        if exchange is not None and not all(exchange.through_gloo(s.global_rank(0)) for s in (src, dst)):
            return None
        try:
            formats = [
                replica_format([self._format_of(s.global_rank(r)) for r in range(len(s.ranks))], f"replica {what}")
                for s, what in ((src, f"at rank {src.first_rank}"), (dst, f"at rank {dst.first_rank}"))
            ]
        except KVFormatError as exc:
            return str(exc)
        return mismatch(*formats)

    def _format_of(self, rank: int) -> KVFormat:
        if rank not in self._formats:
            try:
                if self.exchange is not None:
                    store, prefix = self.exchange.store, self.exchange.prefix
                else:
                    store, prefix = dist.distributed_c10d._get_default_store(), ""
                store.wait([format_key(prefix, rank)], FORMAT_TIMEOUT)
                self._formats[rank] = KVFormat.from_bytes(store.get(format_key(prefix, rank)))
            except KVFormatError as exc:
                self._formats[rank] = str(exc)
            except (RuntimeError, ValueError) as exc:  # the store is gone (torch's DistError), refused the value
                # (RendezvousRefused), the default world is gone, or the peer never published: refuse, do not crash
                # kept for the epoch (reset with the numbering): a missing peer costs one wait, not one a step
                self._formats[rank] = f"the KV format of exchange rank {rank} is unavailable: {exc}"
        found = self._formats[rank]
        if isinstance(found, str):
            raise KVFormatError(found)
        return found

    def _forward(self, batch: Batch) -> list[int]:
        """Run this rank's part of ``batch`` (``batch.num_tokens`` rows of hidden states between stages) and
        return the tokens the driver sampled for ``batch.sampling_seqs``, the same on every rank."""
        hidden = None
        if self.prev_stage_leader is not None:
            hidden = torch.empty(batch.num_tokens, self.config.hidden_size, dtype=self.dtype, device=self.comm_device)
            self.comm.recv(hidden, self.prev_stage_leader)
            hidden = hidden.to(self.device)
        out = self.runner.run(batch.seqs, batch.is_prefill, hidden, num_new_tokens=batch.num_new_tokens)
        if self.next_stage:
            assert out is not None  # a stage before the last returns its hidden states
            out = out.to(self.comm_device).contiguous()
            self.comm.send(out, self.next_stage)
        seqs = batch.sampling_seqs
        if not seqs:  # every sequence is inside its prompt: no rank samples or waits for tokens
            return []
        sampled = torch.empty(len(seqs), dtype=torch.long, device=self.comm_device)
        if self.is_driver:
            assert out is not None  # the driver is tensor rank 0 of the last stage, which gathers the logits
            sampled.copy_(torch.tensor(sample(out, seqs)))
        if not self.solo:
            self.comm.broadcast(sampled, self.driver_rank)
        return sampled.tolist()

    def export_kv(self, seqs: list[Sequence], dst: ReplicaSpec) -> None:
        """Send the KV of handed-off ``seqs`` to replica ``dst`` (which calls ``import_kv`` with the same
        list in the same order), then release their blocks."""
        slices = plan_kv_transfer(self.spec.layout, dst.layout, self.config.num_kv_heads)
        for seq in seqs:
            send_kv(
                self.runner.kv_cache,
                self.kv_shard,
                slices,
                seq.block_table,
                len(seq) - 1,
                dst.global_rank,
                group=self.exchange,
                timeout=TRANSFER_TIMEOUT,
                tag=kv_tag(seq.seq_id),
                blocks_per_chunk=self.kv_chunk_blocks,
            )
            self.scheduler.release(seq)
            self.seqs.pop(seq.seq_id, None)

    def import_kv(self, requests: list[Request], src: ReplicaSpec) -> list[Sequence]:
        """Receive prefilled sequences (prompt + first token in ``token_ids``) from replica ``src`` and
        queue them for decoding."""
        seqs = [self._allocate_import(req) for req in requests]
        for seq in seqs:
            self._receive(seq, src)
        return seqs

    def _allocate_import(self, req: Request) -> Sequence:
        """The sequence of a prefilled request, with the blocks its KV goes to."""
        seq = Sequence(list(req.token_ids), req.sampling, seq_id=req.seq_id, num_prompt_tokens=len(req.token_ids) - 1)
        seq.num_cached_tokens = len(seq) - 1  # a windowed cache allocates no block before the window
        self.block_manager.allocate(seq, len(seq) - 1)
        return seq

    def _receive(self, seq: Sequence, src: ReplicaSpec) -> None:
        """Receive ``seq``'s KV from replica ``src`` into its blocks and queue it for decoding."""
        self.receiving_kv = True  # a KV that never comes must look stuck to the entry, which fails over
        try:
            recv_kv(
                *self._import_of(seq, src),
                group=self.exchange,
                timeout=TRANSFER_TIMEOUT,
                tag=kv_tag(seq.seq_id),
                blocks_per_chunk=self.kv_chunk_blocks,
            )
        except KVMissing:
            self.block_manager.free(seq)
            raise
        finally:
            self.receiving_kv = False
        self.scheduler.add_prefilled(seq)
        self.seqs[seq.seq_id] = seq

    def _drop_waiting(self, seq_ids: set[int]) -> None:
        for waiting in [w for w in self.waiting if w.req.seq_id in seq_ids]:
            self.block_manager.free(waiting.seq)
            self.waiting.remove(waiting)

    def begin_exchange(self, config: ExchangeConfig) -> None:
        """Start joining the exchange group of ``config`` in a thread (every rank of every replica of the
        epoch joins it, some only after they start); sequences routed under the old one are dropped."""
        for seq_id in list(self.routes):
            self.scheduler.abort(seq_id)
            self.seqs.pop(seq_id, None)
        self.routes.clear()
        self._drop_waiting({w.req.seq_id for w in self.waiting})  # routed under the old numbering
        # Nothing moves over the superseded group any more, and dropping it closes its connections: a peer still
        # blocked sending or receiving this rank's KV over it fails at once instead of after TRANSFER_TIMEOUT.
        self.exchange = None
        self._joined = []  # a thread still joining an older group appends to the list it was given
        self._next_exchange = threading.Thread(target=self._join_exchange, args=(config, self._joined), daemon=True)
        self._next_exchange.start()

    def _join_exchange(
        self, config: ExchangeConfig, joined: list[tuple[Exchange, list[ReplicaSpec]] | BaseException]
    ) -> None:
        outcome: BaseException | None = None
        try:
            joined.append(join_exchange(config, self.layout_rank, self.kv_format, self.kv_relay))
        except BaseException as exc:  # noqa: BLE001 - handed to the step thread, which raises it in await_exchange
            joined.append(exc)
            outcome = exc
        if self.on_exchange is not None:
            self.on_exchange(config.prefix, outcome)

    def adopt_exchange(self, joined: tuple[Exchange, list[ReplicaSpec]]) -> None:
        """Use an exchange group joined before this worker was built (``join_exchange``, which published this
        rank's KV format as the group formed)."""
        self.exchange, self.peers = joined
        self.exchange_first_rank = self.exchange.first_rank
        self._formats = {}

    def await_exchange(self) -> None:
        """Switch to the exchange being joined, waiting for it; raises the WorldFormationError of a group that
        could not form, or KVTransferError for any other failure to join."""
        if self._next_exchange is None:
            return
        self._next_exchange.join()
        self._next_exchange = None
        outcome = self._joined.pop()
        if isinstance(outcome, WorldFormationError):
            raise outcome
        if isinstance(outcome, BaseException):
            raise KVTransferError(f"joining the exchange group failed: {outcome}") from outcome
        self.exchange, self.peers = outcome
        self.exchange_first_rank = self.exchange.first_rank
        self._formats = {}  # a new numbering


@dataclass
class _Waiting:
    """A relayed import whose KV is still on its way: its request, its sequence (blocks allocated), since when
    it waits, and what of its KV arrived."""

    req: Request
    seq: Sequence
    since: float
    arrivals: KVArrivals
    lost: str | None = None  # why its KV will never be whole here


@dataclass(frozen=True)
class ExchangeConfig:
    """Where to join an epoch's exchange group, this replica's first rank in it, and every replica in its
    numbering."""

    host: str
    port: int
    prefix: str
    first_rank: int
    size: int
    peers: tuple[ReplicaSpec, ...]
    timeout_s: float = 120.0
    secret: bytes | None = None  # seals the store's values (engine.sealed_store)
    connect_timeout_s: float = CONNECT_TIMEOUT_S  # for the ranks to connect once all arrived (engine.formation)
    transport: str = "torch"  # "libp2p": KV goes through the daemons (``KVRelay``) ...
    members: tuple[int, ...] = ()  # ... but among these replicas of ``peers`` over a gloo group


class KVRelay(Protocol):
    """A worker's way to the daemons' KV relay: ``bind`` gives the group an ``Exchange`` posts on for one
    epoch (its key prefix) as one exchange rank."""

    def bind(self, prefix: str, rank: int) -> Any: ...


def join_exchange(
    config: ExchangeConfig, layout_rank: int, kv_format: KVFormat | None = None, relay: KVRelay | None = None
) -> tuple[Exchange, list[ReplicaSpec]]:
    """Join the exchange group of ``config`` as layout rank ``layout_rank`` of its replica (forming it as
    ``engine.formation`` says) and publish ``kv_format`` there; raises WorldFormationError. Needs no model:
    a new worker joins while it loads, and a peer ready before it reads its format without waiting. In a
    "libp2p" exchange the gloo group holds only the ranks of ``config.members`` (a replica outside forms
    nothing), and KV to or from any other rank moves through ``relay``, its format checked per message."""
    rank = config.first_rank + layout_rank
    relayed = None
    if config.transport == "libp2p":
        if relay is None:
            raise ValueError("a libp2p exchange needs the worker's KV relay")
        relayed = relay.bind(config.prefix, rank)
    numbering = None  # exchange rank -> gloo rank, when the gloo group holds only some replicas
    gloo_rank, gloo_size = rank, config.size
    if relayed is not None:
        members = (config.peers[i] for i in config.members)
        numbering = {
            global_rank: i
            for i, global_rank in enumerate(p.global_rank(r) for p in members for r in range(len(p.ranks)))
        }
        if rank not in numbering:  # every hand-off of this replica is relayed
            return Exchange(None, None, config.prefix, config.first_rank, relayed, {}), list(config.peers)
        gloo_rank, gloo_size = numbering[rank], len(numbering)
    from hexgen.engine.sealed_store import open_store  # cryptography: only where worlds span hosts

    timeouts = Timeouts(config.timeout_s, config.connect_timeout_s, config.timeout_s)
    reach_store(config.host, config.port, config.connect_timeout_s, "exchange group")
    store = open_store(config.host, config.port, timedelta(seconds=config.timeout_s), config.secret)
    group = form_gloo(store, config.prefix, gloo_rank, gloo_size, timeouts, "exchange group")
    if kv_format is not None:
        store.set(format_key(config.prefix, rank), kv_format.to_bytes())  # type: ignore[arg-type]  # torch's stub says str; stores take bytes
    return Exchange(group, store, config.prefix, config.first_rank, relayed, numbering), list(config.peers)


def replica_kv_format(spec: ReplicaSpec) -> KVFormat:
    """The KV format ``spec``'s ranks will have, from its config alone (before loading any weight)."""
    config = load_config(spec.model_dir)
    device = torch.device(spec.device)
    return kv_format_for(config, resolve_dtype(spec.dtype, config, device), device, spec.cache)


def kv_tag(seq_id: int) -> int:
    """The point-to-point tag of a sequence's KV messages (gloo wants a non-negative 31-bit int)."""
    return seq_id & 0x7FFFFFFF


def driver_rank(spec: ReplicaSpec) -> int:
    """The global rank that samples and speaks for a replica: tensor rank 0 of its last stage."""
    return spec.global_rank(stage_ranks(spec.layout, len(spec.layout) - 1)[0])


def init_world_store(
    rank: int,
    size: int,
    host: str,
    port: int,
    prefix: str,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    secret: bytes | None = None,
    device: str = "cpu",
    connect_timeout_s: float | None = None,
) -> Store:
    """Join a world through the store served at ``host:port`` (by another process: hexgen.daemon.store);
    keys live under ``prefix`` (one per plan epoch), so a late worker of an older epoch can never
    rendezvous with a newer world, and values are sealed with ``secret``, so an outsider cannot join it.
    Returns the store, which the caller keeps as long as the world: a Python store whose object is gone
    fails every later call the world makes into it (new groups, barriers). ``device``: this rank's pinned
    GPU, handed to NCCL as its device_id. With ``connect_timeout_s`` the world forms as ``engine.formation``
    says (ranks arrive, then connect within it; a gloo world is proven by an all-reduce) and keeps that
    timeout until the caller sets ``timeout_s`` (``settle_world``), once its subgroups are made; raises
    WorldFormationError."""
    timeout = timedelta(seconds=timeout_s)
    from hexgen.engine.sealed_store import open_store

    if connect_timeout_s is not None:
        reach_store(host, port, connect_timeout_s, "replica world")
    store = open_store(host, port, timeout, secret, world_size=size)
    if connect_timeout_s is None:
        dist.init_process_group(
            backend,
            store=PrefixStore(prefix, store),
            rank=rank,
            world_size=size,
            timeout=timeout,
            device_id=nccl_device_id(device, backend),
        )
        return store
    arrive(store, prefix, rank, size, timeout_s, "replica world")
    with connecting("replica world"):
        bounded(
            lambda: dist.init_process_group(
                backend,
                store=PrefixStore(prefix, store),
                rank=rank,
                world_size=size,
                timeout=timedelta(seconds=connect_timeout_s),
                device_id=nccl_device_id(device, backend),
            ),
            connect_timeout_s + CONNECT_GRACE_S,
            "replica world",
        )
        if backend == "gloo" and size > 1:
            prove(None, connect_timeout_s)
    return store


def settle_world(groups: Groups, timeout_s: float) -> None:
    """Give the default world and those of ``groups`` this rank is in their long per-operation timeout, once
    all are formed. ``replica_groups`` makes every stage's group on every rank; outside one a rank holds
    NON_GROUP_MEMBER, which torch refuses to time (a PP>=2, TP>=2 replica has such groups)."""
    timeout = timedelta(seconds=timeout_s)
    member = [g for g in groups.values() if isinstance(g, ProcessGroup)]  # not None, not NON_GROUP_MEMBER
    for group in [None, *member]:
        dist.distributed_c10d._set_pg_timeout(timeout, group)


def init_world(
    rank: int, size: int, port: int, backend: str = "gloo", timeout_s: float = 120.0, device: str = "cpu"
) -> None:
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=timeout_s),
        device_id=nccl_device_id(device, backend),
    )


def request_from(seq: Sequence) -> Request:
    return Request(seq.seq_id, list(seq.token_ids), seq.sampling)


def spec_for(model_dir: str | Path, layout: GroupLayout, **kwargs: Any) -> ReplicaSpec:
    return dataclasses.replace(ReplicaSpec(str(model_dir), tuple(layout)), **kwargs)


def _member(group: ProcessGroup | int | None) -> ProcessGroup | None:
    """One of ``replica_groups`` that this rank is in (its replica's, its stage's): never NON_GROUP_MEMBER."""
    assert not isinstance(group, int)
    return group
