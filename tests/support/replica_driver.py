"""Replicas served by the daemon's own worker processes, driven synchronously as the supervisor drives them.

``generate`` serves prompts on one replica of any layout; ``generate_disaggregated`` prefills on one replica
and decodes on another, the prefill driver handing each request off and its KV going over the epoch's
exchange group. Each runs a rendezvous store (``python -m hexgen.daemon.store``) and one ``python -m
hexgen.daemon.worker_process --ipc-fd`` per rank, configured with the frames the supervisor sends
(``daemon.worker_config`` over a one-host deployment), and returns the completion token ids per prompt.
Needs no trio or libp2p: the GPU check runs it on a bare GPU box.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hexgen.daemon.deployment import Deployment, Replica, replica_prefix
from hexgen.daemon.worker_config import WorkerSettings
from hexgen.daemon.worker_frames import (
    AliveFrame,
    FailedFrame,
    FromWorker,
    GenerateFrame,
    HandoffFrame,
    ImportFrame,
    ReadyFrame,
    ShutdownFrame,
    StepFrame,
    ToWorker,
    frame_from_worker,
)
from hexgen.daemon.worker_process import PARENT_ENV, Channel
from hexgen.daemon.worker_setup import CacheSetup
from hexgen.engine.layout import GroupLayout
from hexgen.engine.sequence import SamplingParams

HOST = "127.0.0.1"
PEER = "local"
Layout = tuple[tuple[int, int, int], ...]


class DriverError(RuntimeError):
    """A worker failed, exited or did not answer in time."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def stages(layout: GroupLayout) -> Layout:
    """The engine's layout as the plan's (first layer, end layer, tp) triples."""
    return tuple((stage.start_layer, stage.end_layer, stage.tp) for stage in layout)


def deployment_of(roles_and_layouts: list[tuple[str, Layout]], store: tuple[str, int], gpu: int = 0) -> Deployment:
    """A one-host deployment of these replicas, ranks numbered replica after replica, all on local GPU
    ``gpu``, every world's store at ``store``; a prefill replica hands off to the decode replica after it."""
    replicas, first = [], 0
    for index, (role, layout) in enumerate(roles_and_layouts):
        size = sum(tp for _, _, tp in layout)
        replicas.append(Replica(index, index, role, layout, first, tuple((PEER, gpu) for _ in range(size))))
        first += size
    hand_offs = {r.index: ((r.index + 1, 1.0),) for r in replicas if r.role == "prefill"}
    entries = tuple((r.index, 1.0) for r in replicas if r.role != "decode")
    return Deployment(1, 1, tuple(replicas), entries, hand_offs, store, tuple(store for _ in replicas))


@dataclass
class Rank:
    """One worker process and the driver's end of its socket pair."""

    replica: Replica
    layout_rank: int
    process: subprocess.Popen[bytes]
    channel: Channel

    @property
    def is_driver(self) -> bool:
        return self.layout_rank == self.replica.driver_layout_rank

    def send(self, frame: ToWorker) -> None:
        self.channel.send(frame.to_wire())

    def name(self) -> str:
        return f"rank {self.layout_rank} of replica {self.replica.index} ({self.replica.role})"


def _spawn(threads: int) -> tuple[subprocess.Popen[bytes], Channel]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), PARENT_ENV: str(os.getpid())}
    command = [sys.executable, "-m", "hexgen.daemon.worker_process", "--ipc-fd", str(theirs.fileno())]
    try:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
    finally:
        theirs.close()
    return process, Channel(ours)


@contextmanager
def rendezvous_store() -> Iterator[tuple[str, int]]:
    """A daemon's rendezvous store process on a free local port, stopped on leaving."""
    port = _free_port()
    command = [sys.executable, "-m", "hexgen.daemon.store", "--host", HOST, "--port", str(port)]
    store = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert store.stdout is not None
        if store.stdout.readline().strip() != b"ready":
            raise DriverError(f"the rendezvous store did not start (exit code {store.wait()})")
        yield HOST, port
    finally:
        store.kill()
        store.wait()


@dataclass
class Workers:
    """Every rank of a deployment as worker processes; frames in, typed frames out."""

    ranks: list[Rank] = field(default_factory=list)
    deadline: float = 0.0

    def frames(self) -> Iterator[tuple[Rank, FromWorker]]:
        """Each frame any worker sends, as it comes; raises DriverError when one exits or time runs out."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise DriverError("the workers did not finish in time")
            readable, _, _ = select.select([r.channel.sock for r in self.ranks], [], [], min(left, 1.0))
            for rank in self.ranks:
                if rank.channel.sock not in readable and not rank.channel.buffer:
                    continue
                try:
                    raws = rank.channel.poll(0.0)
                except EOFError:
                    raise DriverError(f"{rank.name()} exited with {rank.process.wait(10)}") from None
                for raw in raws:
                    yield rank, frame_from_worker(raw)

    def await_ready(self) -> None:
        waiting = set(range(len(self.ranks)))
        for rank, frame in self.frames():
            if isinstance(frame, FailedFrame):
                raise DriverError(f"{rank.name()} failed to start: {frame.error}")
            if isinstance(frame, ReadyFrame):
                waiting.discard(self.ranks.index(rank))
                if not waiting:
                    return

    def driver(self, replica: Replica) -> Rank:
        return next(r for r in self.ranks if r.replica is replica and r.is_driver)

    def shutdown(self, timeout_s: float) -> None:
        """Stop every replica in step (its driver is told) and wait for every process to exit. Exit codes
        are not judged, as the supervisor does not judge them: torch may abort in a process's teardown."""
        for rank in self.ranks:
            if rank.is_driver:
                rank.send(ShutdownFrame())
        for rank in self.ranks:
            rank.process.wait(timeout_s)


@contextmanager
def started(
    settings: WorkerSettings, roles_and_layouts: list[tuple[str, Layout]], timeout_s: float, gpu: int = 0
) -> Iterator[tuple[Workers, Deployment]]:
    """The replicas' workers (every rank on local GPU ``gpu`` when ``settings`` say cuda), ready, and their
    deployment; every process is killed on leaving. ``Workers.deadline`` is ``timeout_s`` from now."""
    with rendezvous_store() as store, ExitStack() as stack:
        deployment = deployment_of(roles_and_layouts, store, gpu)
        workers = Workers(deadline=time.monotonic() + timeout_s)
        stack.callback(_kill, workers)
        for replica in deployment.replicas:
            for layout_rank in range(replica.size):
                process, channel = _spawn(settings.threads)
                workers.ranks.append(Rank(replica, layout_rank, process, channel))
                secret, exchange = _secrets(deployment, replica)
                frame = settings.configure(deployment, replica, layout_rank, deployment.epoch, secret, exchange)
                workers.ranks[-1].send(frame)
        workers.await_ready()
        yield workers, deployment


def serve(
    settings: WorkerSettings,
    roles_and_layouts: list[tuple[str, Layout]],
    prompts: list[list[int]],
    sampling: list[SamplingParams],
    timeout_s: float,
    gpu: int = 0,
) -> list[list[int]]:
    """Start the replicas, send each prompt to the first one (its hand-off, if a prefill one, to the next),
    and return each completion once all finished."""
    with started(settings, roles_and_layouts, timeout_s, gpu) as (workers, deployment):
        completions = _run(workers, deployment, prompts, sampling)
        workers.shutdown(max(1.0, workers.deadline - time.monotonic()))
        return completions


def _secrets(deployment: Deployment, replica: Replica) -> tuple[bytes, bytes | None]:
    """The store secrets of ``replica``'s world and the exchange group (as a daemon derives them: one per
    world's key prefix)."""
    key = b"hexgen.testing.replica_driver"
    own = hmac.digest(key, replica_prefix(deployment.term, deployment.epoch, replica).encode(), hashlib.sha256)
    exchange = hmac.digest(key, deployment.exchange_prefix.encode(), hashlib.sha256)
    return own, exchange if deployment.needs_exchange else None


def _run(
    workers: Workers, deployment: Deployment, prompts: list[list[int]], sampling: list[SamplingParams]
) -> list[list[int]]:
    entry = deployment.replicas[0]
    decode = deployment.replicas[1] if entry.role == "prefill" else None
    dst = -1 if decode is None else decode.index
    for seq_id, (prompt, params) in enumerate(zip(prompts, sampling, strict=True)):
        workers.driver(entry).send(GenerateFrame(seq_id, tuple(prompt), params, dst=dst))
    completions: list[list[int]] = [[] for _ in prompts]
    done = 0
    for rank, frame in workers.frames():
        if isinstance(frame, StepFrame):
            for token in frame.tokens:
                completions[token.id].append(token.token)
                done += token.finished is not None
        elif isinstance(frame, HandoffFrame) and decode is not None:
            follow = ImportFrame(frame.id, frame.tokens, sampling[frame.id], src=entry.index)
            workers.driver(decode).send(follow)
        elif not isinstance(frame, AliveFrame):
            raise DriverError(f"{rank.name()} sent {frame}")
        if done == len(prompts):
            return completions
    raise AssertionError("unreachable: frames() ends only by raising")


def _kill(workers: Workers) -> None:
    for rank in workers.ranks:
        if rank.process.poll() is None:
            rank.process.kill()
        rank.process.wait()
        rank.channel.sock.close()


def _sampling(count: int, sampling: SamplingParams | list[SamplingParams] | None) -> list[SamplingParams]:
    return sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * count


def settings_for(
    model_dir: str | Path,
    device: str = "cpu",
    dtype: str = "auto",
    cache: CacheSetup | None = None,
    prefill_chunk: int | None = None,
) -> tuple[WorkerSettings, int]:
    """The daemon's worker settings for ``device`` (``cpu``, or ``cuda:N``: every rank on GPU N), and N."""
    kind, _, index = device.partition(":")
    settings = WorkerSettings(str(model_dir), device=kind, dtype=dtype, cache=cache, prefill_chunk=prefill_chunk)
    return settings, int(index or 0)


def generate(
    model_dir: str | Path,
    layout: GroupLayout,
    prompts: list[list[int]],
    sampling: SamplingParams | list[SamplingParams] | None = None,
    timeout_s: float = 120.0,
    device: str = "cpu",
    dtype: str = "auto",
    cache: CacheSetup | None = None,
    prefill_chunk: int | None = None,
) -> list[list[int]]:
    """Serve ``prompts`` (token ids) on one replica laid out as ``layout``; completion ids per prompt."""
    settings, gpu = settings_for(model_dir, device, dtype, cache, prefill_chunk)
    replicas = [("colocated", stages(layout))]
    return serve(settings, replicas, prompts, _sampling(len(prompts), sampling), timeout_s, gpu)


def generate_disaggregated(
    model_dir: str | Path,
    prefill_layout: GroupLayout,
    decode_layout: GroupLayout,
    prompts: list[list[int]],
    sampling: SamplingParams | list[SamplingParams] | None = None,
    timeout_s: float = 120.0,
    device: str = "cpu",
    dtype: str = "auto",
    cache: CacheSetup | None = None,
    prefill_chunk: int | None = None,
) -> list[list[int]]:
    """Prefill on a replica laid out as ``prefill_layout``, decode on one laid out as ``decode_layout``."""
    settings, gpu = settings_for(model_dir, device, dtype, cache, prefill_chunk)
    replicas = [("prefill", stages(prefill_layout)), ("decode", stages(decode_layout))]
    return serve(settings, replicas, prompts, _sampling(len(prompts), sampling), timeout_s, gpu)
