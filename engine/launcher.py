"""Runs replicas as worker processes over torch.distributed (gloo on CPU, NCCL on CUDA) and collects tokens.

``generate`` serves prompts on one replica of any layout; ``generate_disaggregated`` prefills on one
replica and decodes on another, shipping each sequence's KV between them. Both return the completion
token ids per prompt. The daemon's supervisor reuses ``ReplicaWorker`` the same way inside its workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hexgen.engine.layout import GroupLayout, world_size
from hexgen.engine.replica import (
    ReplicaSpec,
    ReplicaWorker,
    Request,
    StepResult,
    driver_rank,
    init_world,
    replica_groups,
    request_from,
)
from hexgen.engine.sequence import SamplingParams


class LaunchError(RuntimeError):
    """A worker process failed or did not answer in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _requests(prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams] | None) -> list[Request]:
    params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
    return [Request(i, list(p), s) for i, (p, s) in enumerate(zip(prompts, params, strict=True))]


def _total_done(local: int) -> int:
    count = torch.tensor([local], dtype=torch.long)
    dist.all_reduce(count)
    return int(count.item())


def _serve_one(rank: int, spec: ReplicaSpec, requests: list[Request]) -> dict[int, list[int]]:
    worker = ReplicaWorker(spec, rank, replica_groups([spec]))
    done: dict[int, list[int]] = {}
    pending = requests if worker.is_driver else None
    while True:
        result = worker.step(pending, stop=worker.is_driver and len(done) == len(requests))
        pending = None
        if result is None:
            return done if worker.is_driver else {}
        done.update((s.seq_id, s.completion_token_ids) for s in result.finished)


def _serve_pair(rank: int, prefill: ReplicaSpec, decode: ReplicaSpec, requests: list[Request]) -> dict[int, list[int]]:
    """Lockstep: a prefill step, the hand-off of its sequences' KV, a decode step; until all are done."""
    in_prefill = rank in prefill.ranks
    worker = ReplicaWorker(prefill if in_prefill else decode, rank, replica_groups([prefill, decode]))
    prefill_driver = driver_rank(prefill)
    done: dict[int, list[int]] = {}
    pending = requests if rank == prefill_driver else None
    all_done = False
    while True:
        result: StepResult | None = None
        if in_prefill:
            result = worker.step(pending, stop=all_done and worker.is_driver)
            pending = None
        box: list[Any] = [[request_from(s) for s in result.handed_off] if result and rank == prefill_driver else None]
        dist.broadcast_object_list(box, src=prefill_driver)
        if in_prefill:
            if result is not None:
                worker.export_kv(result.handed_off, decode)
        else:
            worker.import_kv(box[0] or [], prefill)
            result = worker.step(stop=all_done and worker.is_driver)
        if result is not None:
            done.update((s.seq_id, s.completion_token_ids) for s in result.finished)
        if all_done:
            return done if worker.is_driver else {}
        all_done = _total_done(len(done) if worker.is_driver else 0) == len(requests)


def _entry(
    rank: int, size: int, port: int, results: Any, target: Callable[..., dict[int, list[int]]], args: tuple
) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        init_world(rank, size, port)
        results.put((rank, "ok", target(rank, *args)))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        raise


def _launch(
    size: int, target: Callable[..., dict[int, list[int]]], args: tuple, timeout_s: float
) -> dict[int, list[int]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, size, port, results, target, args), daemon=True) for r in range(size)]
    try:
        for p in procs:
            p.start()
        merged: dict[int, list[int]] = {}
        for _ in range(size):
            try:
                rank, status, payload = results.get(timeout=timeout_s)
            except queue.Empty:
                raise LaunchError(f"workers did not finish within {timeout_s:.0f} s") from None
            if status == "error":
                raise LaunchError(f"worker rank {rank} failed:\n{payload}")
            merged.update(payload)
        for p in procs:
            p.join(timeout=timeout_s)
        return merged
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def generate(
    model_dir: str | Path,
    layout: GroupLayout,
    prompts: list[list[int]],
    sampling: SamplingParams | list[SamplingParams] | None = None,
    timeout_s: float = 120.0,
    **spec: Any,
) -> list[list[int]]:
    """Serve ``prompts`` (token ids) on one replica laid out as ``layout``; completion ids per prompt."""
    replica = ReplicaSpec(str(model_dir), tuple(layout), **spec)
    out = _launch(world_size(replica.layout), _serve_one, (replica, _requests(prompts, sampling)), timeout_s)
    return [out[i] for i in range(len(prompts))]


def generate_disaggregated(
    model_dir: str | Path,
    prefill_layout: GroupLayout,
    decode_layout: GroupLayout,
    prompts: list[list[int]],
    sampling: SamplingParams | list[SamplingParams] | None = None,
    timeout_s: float = 120.0,
    **spec: Any,
) -> list[list[int]]:
    """Prefill on a replica laid out as ``prefill_layout``, decode on one laid out as ``decode_layout``."""
    prefill = ReplicaSpec(str(model_dir), tuple(prefill_layout), mode="prefill", **spec)
    decode = ReplicaSpec(str(model_dir), tuple(decode_layout), first_rank=len(prefill.ranks), mode="decode", **spec)
    size = len(prefill.ranks) + len(decode.ranks)
    out = _launch(size, _serve_pair, (prefill, decode, _requests(prompts, sampling)), timeout_s)
    return [out[i] for i in range(len(prompts))]
