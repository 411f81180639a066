"""The supervisor: one engine worker process per local GPU of the adopted plan, kept across epochs.

For each deployment (daemon.deployment) it keeps the workers of replicas that did not change (same role,
layout and GPUs) and moves them to the new epoch's exchange group, stops the others, and starts a
``python -m hexgen.daemon.worker_process`` per new local rank, configured over its own socket pair with its
replica, the replica's world and the exchange group. It routes what the replica drivers stream back
(tokens, hand-offs) to per-request channels. Requests on a replica whose worker fails or is replaced,
and hand-offs routed under an older epoch, get an error event (marked ``refused`` when the plan, not the
work, ended them), so their entry re-submits them. A hop for an epoch not deployed here yet waits for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from hexgen.daemon.deployment import Deployment, Replica, replica_prefix
from hexgen.daemon.failure import WorldFailure
from hexgen.daemon.start_deadline import StartDeadline
from hexgen.daemon.wire import FrameError, FrameReader, encode_frame
from hexgen.daemon.worker_process import PARENT_ENV
from hexgen.engine.bounds import LOAD_TIMEOUT_S, connect_timeout_for

log = logging.getLogger("hexgen.supervisor")

START_TIMEOUT_S = 120.0  # without a sign of progress (StartDeadline): loading reports progress and moves it
START_CAP_S = 3 * 3600.0  # however much progress: a start that takes longer has something wrong with it
# A worker answers once its worlds formed: ranks arriving (the worker's own bound is START_TIMEOUT_S), then
# connecting within connect_timeout_s; this much longer, its silence is the daemon's to call.
READY_GRACE_S = 30.0
# Once a worker loaded all its weights it is silent at the load barrier for up to LOAD_TIMEOUT_S (waiting on
# slower ranks), then profiles and forms the exchange group (whose ranks arrive within START_TIMEOUT_S).
LOADED_QUIET_S = LOAD_TIMEOUT_S + START_TIMEOUT_S + READY_GRACE_S
STOP_TIMEOUT_S = 5.0
GPU_KV_BLOCK_SIZE = 256  # what flash-attn's paged KV needs; the SDPA path takes any size (engine.kv_format)
# How long a hop for an epoch this daemon has not deployed yet waits for it: plans reach daemons a moment
# apart, and a new epoch is deployed only once the workers it replaces have stopped.
EPOCH_WAIT_S = 15.0
# How often a worker's world asks its head's daemon again for the store secret while that daemon has not
# adopted the plan yet.
SECRET_RETRY_S = 0.3
SECRET_BYTES = 32  # an AES-256 key (engine.sealed_store): an HMAC-SHA256 of the world's prefix


class ReplicaUnavailable(Exception):
    """The replica is not served here (not local, not ready, or failed); the request may be re-submitted."""


class WorkerFailed(RuntimeError):
    """A worker failed; ``cause`` says which world could not form, when that was why."""

    def __init__(self, message: str, cause: WorldFailure | None = None) -> None:
        super().__init__(message)
        self.cause = cause


def _cause(frame: dict[str, Any]) -> WorldFailure | None:
    try:
        return None if frame.get("cause") is None else WorldFailure.from_dict(frame["cause"])
    except ValueError:
        return None


# (epoch, rank, error, cause, peers of the world that failed)
OnFailure = Callable[[int, int, str, WorldFailure | None, list[str]], Awaitable[None]]


class _SocketStream:
    """trio's SocketStream with the ``read``/``write`` the frame helpers expect."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def read(self, n: int) -> bytes:
        return await self.stream.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)


@dataclass
class LocalWorker:
    replica: Replica
    layout_rank: int
    formed: int  # the epoch whose plan first placed this replica here: its world's store prefix
    process: trio.Process | None = None
    channel: _SocketStream | None = None
    ready: trio.Event = field(default_factory=trio.Event)
    stopped: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    error: str | None = None
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    # a kept worker moving to a new epoch's exchange group, until it says the group formed
    joining: bool = False

    @property
    def rank(self) -> int:
        """This worker's rank in the current epoch's exchange numbering."""
        return self.replica.first_rank + self.layout_rank

    @property
    def slot(self) -> tuple[Any, int]:
        return self.replica.key, self.layout_rank

    @property
    def local_gpu(self) -> int:
        return self.replica.placement[self.layout_rank][1]

    @property
    def is_driver(self) -> bool:
        return self.layout_rank == self.replica.driver_layout_rank

    async def send(self, frame: dict[str, Any]) -> None:
        if self.channel is None:
            raise ReplicaUnavailable(f"worker of rank {self.rank} has no channel")
        async with self.send_lock:
            await self.channel.write(encode_frame(frame))


@dataclass
class Supervisor:
    peer_id: str
    model_dir: str
    device: str = "cpu"
    threads: int = 1
    backend: str = "gloo"
    store_address: tuple[str, int] | None = None  # where peers dial this daemon's store
    store_listen: str | None = None  # where the store binds, when not the dialled address (0.0.0.0, NAT)
    on_failure: OnFailure | None = None
    connect_timeout_s: float | None = None  # None: the backend's own (engine.bounds: NCCL needs longer)
    # asks a world's head daemon for its store secret (the world's prefix); daemon.node fills it in
    fetch_secret: Callable[[str, str], Awaitable[bytes]] | None = None
    store_key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    deployment: Deployment | None = None
    workers: dict[tuple[Any, int], LocalWorker] = field(default_factory=dict)
    listeners: dict[int, trio.MemorySendChannel[dict[str, Any]]] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)
    owners: dict[int, LocalWorker] = field(default_factory=dict)
    _wanted: Deployment | None = None
    _wanted_changed: trio.Event = field(default_factory=trio.Event)
    _exchanging: bool = False  # kept drivers are being told the new epoch's exchange group
    _planned: trio.Event = field(default_factory=trio.Event)
    _secrets: dict[str, bytes] = field(default_factory=dict, repr=False)

    def want(self, deployment: Deployment | None) -> None:
        """Ask for ``deployment`` (None: no workers); the run loop converges on the latest (term, epoch)."""
        if (None if deployment is None else deployment.version) == self._key():
            return
        self._wanted = deployment
        self._wanted_changed.set()
        self._planned.set()
        self._planned = trio.Event()

    def _key(self) -> tuple[int, int] | None:
        return None if self._wanted is None else self._wanted.version

    async def run(self) -> None:
        store = None
        try:
            async with trio.open_nursery() as nursery:
                if self.store_address is not None:
                    host, port = self.store_address
                    bind = self.store_listen or host
                    command = [sys.executable, "-m", "hexgen.daemon.store", "--host", bind, "--port", str(port)]
                    store = await trio.lowlevel.open_process(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
                while True:
                    await self._wanted_changed.wait()
                    self._wanted_changed = trio.Event()
                    await self._reconcile(nursery, self._wanted)
        finally:
            self._fail_all("the daemon is stopping")
            if store is not None:
                store.kill()
                with trio.CancelScope(shield=True):
                    await store.wait()

    async def grant(self, peer: str, prefix: str, wait_s: float) -> bytes:
        """The store secret of the world under ``prefix`` for ``peer``: only when this daemon's store hosts
        that world and ``peer`` is one of its members in a deployment wanted here. A plan may reach the asker
        first, so this waits up to ``wait_s`` for one; raises PermissionError otherwise."""
        with trio.move_on_after(wait_s):
            while self.store_address is not None:
                for deployment in (self._wanted, self.deployment):
                    world = None if deployment is None else deployment.world(prefix)
                    if world is not None and world[0] == self.peer_id and peer in world[1]:
                        return self._own_secret(prefix)
                await self._planned.wait()
        raise PermissionError(f"no world under {prefix!r} hosted here has {peer} as a member")

    def _own_secret(self, prefix: str) -> bytes:
        return hmac.digest(self.store_key, prefix.encode(), hashlib.sha256)

    async def _world_secret(self, head: str, prefix: str) -> bytes:
        """The store secret of a world: this daemon's own, or asked of the head's daemon (cached)."""
        if head == self.peer_id:
            return self._own_secret(prefix)
        if prefix in self._secrets:
            return self._secrets[prefix]
        if self.fetch_secret is None:
            raise RuntimeError(f"no way to ask {head} for the store secret of {prefix}")
        error = "no answer"
        with trio.move_on_after(EPOCH_WAIT_S):
            while True:
                try:
                    self._secrets[prefix] = await self.fetch_secret(head, prefix)
                    return self._secrets[prefix]
                except Exception as exc:
                    error = str(exc) or type(exc).__name__
                await trio.sleep(SECRET_RETRY_S)
        raise RuntimeError(f"{head} gave no store secret for {prefix}: {error}")

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _fail_all(self, reason: str) -> None:
        for seq_id in list(self.listeners):
            self._fail(seq_id, reason, refused=True)  # the daemon is stopping: nothing against the request

    def _fail(self, seq_id: int, reason: str, refused: bool = False) -> None:
        """End a request with an error event; ``refused``: withdrawn for the plan's sake, not because the
        work failed (the entry does not count it against the request's re-submission limit)."""
        channel = self.listeners.pop(seq_id, None)
        self.owners.pop(seq_id, None)
        if channel is not None:
            event: dict[str, Any] = {"error": reason, "retry": True} | ({"refused": True} if refused else {})
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                channel.send_nowait(event)

    def _fail_worker_requests(self, worker: LocalWorker, reason: str, refused: bool = False) -> None:
        for seq_id in [i for i, w in self.owners.items() if w is worker]:
            self._fail(seq_id, reason, refused)

    async def _reconcile(self, nursery: trio.Nursery, deployment: Deployment | None) -> None:
        """Move the local workers to ``deployment``: keep ready workers of unchanged replicas, stop the rest,
        start what is missing."""
        wanted: dict[tuple[Any, int], Replica] = {}
        if deployment is not None:
            for rank, replica in deployment.local_ranks(self.peer_id):
                wanted[(replica.key, rank - replica.first_rank)] = replica
        restart = deployment is None or deployment.restart
        stopping = []
        for slot, worker in list(self.workers.items()):
            if restart or slot not in wanted or worker.error is not None or not worker.ready.is_set():
                del self.workers[slot]
                self._fail_worker_requests(worker, "the plan changed", refused=worker.error is None)
                worker.scope.cancel()
                stopping.append(worker)
        for worker in stopping:
            await worker.stopped.wait()
        # From here to the exchange frames, no await: a hop never sees the new epoch half deployed (a kept
        # worker renumbered but a new replica's worker not yet listed, which read as "no driver here").
        self.deployment = deployment
        if deployment is None:
            self._notify()
            return
        self._secrets = {prefix: s for prefix, s in self._secrets.items() if deployment.world(prefix) is not None}
        kept_drivers = []
        for slot, worker in self.workers.items():
            worker.replica = wanted[slot]
            if worker.replica.role == "prefill":  # their hand-offs were routed in the old numbering
                self._fail_worker_requests(worker, "the plan changed", refused=True)
            if deployment.needs_exchange:
                worker.joining = True  # every rank of the replica joins; each says when its group formed
                if worker.is_driver:
                    kept_drivers.append(worker)
        for slot, replica in wanted.items():
            if slot not in self.workers:
                worker = LocalWorker(replica, slot[1], deployment.epoch)
                self.workers[slot] = worker
                nursery.start_soon(self._run_worker, deployment, worker)
        kept = len(self.workers) - len([w for w in self.workers.values() if w.formed == deployment.epoch])
        log.info("epoch %d: %d local worker(s), %d kept from earlier epochs", deployment.epoch, len(wanted), kept)
        # A kept driver must have the new exchange group before its first request of the new epoch: hops for
        # the epoch wait (``wait_ready``) until these frames are out.
        self._exchanging = True
        try:
            if kept_drivers:
                await self._tell_exchange(deployment, kept_drivers)
        finally:
            self._exchanging = False
            self._notify()

    async def _tell_exchange(self, deployment: Deployment, kept_drivers: list[LocalWorker]) -> None:
        """Send each kept driver the new epoch's exchange group; one that cannot be told has failed (else
        its replica's workers would stay ``joining`` and every hop here be refused until the next epoch)."""
        try:
            secret = await self._world_secret(deployment.exchange_head, deployment.exchange_prefix)
        except RuntimeError as exc:
            for worker in kept_drivers:
                await self._failed(worker, deployment.epoch, str(exc))
            return
        for worker in kept_drivers:
            frame = {"op": "exchange", "exchange": self._exchange(deployment, worker, secret)}
            try:
                await worker.send(frame)
            except Exception as exc:  # whatever broke the channel, the driver never heard of the group
                error = f"worker of rank {worker.rank} could not be told the exchange group: {exc}"
                await self._failed(worker, deployment.epoch, error)

    async def _run_worker(self, deployment: Deployment, worker: LocalWorker) -> None:
        # A socket pair, not a listening path: nothing on the filesystem to collide or to outlive a crash,
        # and a worker that dies before it answers is an end of file at once.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = [sys.executable, "-m", "hexgen.daemon.worker_process", "--ipc-fd", str(theirs.fileno())]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.threads)}
        env[PARENT_ENV] = str(os.getpid())
        try:
            with worker.scope:
                try:
                    worker.process = await trio.lowlevel.open_process(
                        command, env=env, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),)
                    )
                    theirs.close()
                    worker.channel = _SocketStream(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
                    secrets = await self._secrets_of(deployment, worker)  # while the process imports torch
                    await worker.send(self._configure_frame(deployment, worker, *secrets))
                    reader = FrameReader(worker.channel)
                    reply = await self._await_ready(worker, reader)
                    if not isinstance(reply, dict) or reply.get("op") != "ready":
                        error = reply.get("error") if isinstance(reply, dict) else reply
                        cause = _cause(reply) if isinstance(reply, dict) else None
                        raise WorkerFailed(f"worker of rank {worker.rank} failed to start: {error}", cause)
                    worker.ready.set()
                    self._notify()
                    log.info("epoch %d: rank %d ready", deployment.epoch, worker.rank)
                    await self._read_events(worker, reader)
                    raise RuntimeError(f"worker of rank {worker.rank} exited")
                except (Exception, trio.TooSlowError) as exc:
                    epoch = self.deployment.epoch if self.deployment is not None else deployment.epoch
                    cause = exc.cause if isinstance(exc, WorkerFailed) else None
                    await self._failed(worker, epoch, str(exc) or type(exc).__name__, cause)
                    await trio.sleep_forever()  # stays failed until the next epoch replaces it
        finally:
            theirs.close()
            with trio.CancelScope(shield=True):
                if worker.process is not None:
                    await self._stop(worker, worker.process)
                if worker.channel is not None:
                    await worker.channel.stream.aclose()
                else:
                    ours.close()
            worker.stopped.set()

    async def _await_ready(self, worker: LocalWorker, reader: FrameReader) -> Any:
        """The worker's first frame other than ``progress``; each progress report (more weights loaded)
        moves the deadline, so a big model loading slowly is not killed while a silent worker is."""
        quiet = START_TIMEOUT_S + READY_GRACE_S
        deadline = StartDeadline(trio.current_time(), quiet, START_CAP_S, loaded_s=LOADED_QUIET_S)
        while True:
            with trio.move_on_at(deadline.deadline):
                reply = await reader.read()
                if not (isinstance(reply, dict) and reply.get("op") == "progress"):
                    return reply
                deadline.progress(trio.current_time(), reply.get("done"), reply.get("total"))
                continue
            loaded = f" after {deadline.done} bytes of weights" if deadline.done >= 0 else ""
            if deadline.capped():
                why = f"was not ready within the {START_CAP_S / 3600:g} h cap on a start"
            elif deadline.loaded:
                why = f"loaded its weights but was not ready {LOADED_QUIET_S:.0f} s later"
            else:
                why = f"made no progress for {quiet:.0f} s"
            raise trio.TooSlowError(f"worker of rank {worker.rank} {why}{loaded}")

    async def _failed(self, worker: LocalWorker, epoch: int, error: str, cause: WorldFailure | None = None) -> None:
        worker.error = error
        log.warning("epoch %d: %s", epoch, error)
        self._fail_worker_requests(worker, error)
        self._notify()
        if self.on_failure is not None:
            peers = worker.replica.peers()
            if cause is not None and cause.world == "exchange group" and self.deployment is not None:
                peers = {peer for r in self.deployment.replicas for peer in r.peers()}
            await self.on_failure(epoch, worker.rank, error, cause, sorted(peers))

    async def _secrets_of(self, deployment: Deployment, worker: LocalWorker) -> tuple[bytes, bytes | None]:
        """The store secrets of the worker's replica world and, when there is one, the exchange group."""
        replica = worker.replica
        own = await self._world_secret(replica.head, replica_prefix(deployment.term, worker.formed, replica))
        if not deployment.needs_exchange:
            return own, None
        return own, await self._world_secret(deployment.exchange_head, deployment.exchange_prefix)

    async def _stop(self, worker: LocalWorker, process: trio.Process) -> None:
        """A ready driver is asked to stop its replica in step; anything else (a worker still forming its
        world, or a follower whose driver is gone) is killed at once."""
        if process.returncode is None and worker.ready.is_set() and worker.error is None:
            if worker.is_driver:
                with contextlib.suppress(Exception):
                    await worker.send({"op": "shutdown"})
            with trio.move_on_after(STOP_TIMEOUT_S):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()

    def _spec(self, replica: Replica) -> dict[str, Any]:
        spec = {
            "model_dir": self.model_dir,
            "layout": [list(stage) for stage in replica.layout],
            "first_rank": replica.first_rank,
            "mode": replica.role,
            "device": self.device,
        }
        if self.device.startswith("cuda"):
            # one KV block size on every GPU host, flash-attn or not, so their replicas can hand KV over
            spec["cache"] = {"block_size": GPU_KV_BLOCK_SIZE}
        return spec

    def _exchange(self, deployment: Deployment, worker: LocalWorker, secret: bytes) -> dict[str, Any]:
        return {
            "store": list(deployment.rendezvous),
            "prefix": deployment.exchange_prefix,
            "secret": secret.hex(),
            "first_rank": worker.replica.first_rank,
            "size": deployment.world_size,
            "replicas": [self._spec(r) for r in deployment.replicas],
            "connect_timeout_s": self._connect_timeout(),
        }

    def _backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else self.backend

    def _connect_timeout(self) -> float:
        return self.connect_timeout_s if self.connect_timeout_s is not None else connect_timeout_for(self._backend())

    def _configure_frame(
        self, deployment: Deployment, worker: LocalWorker, secret: bytes, exchange_secret: bytes | None
    ) -> dict[str, Any]:
        replica = worker.replica
        return {
            "op": "configure",
            "rank": worker.layout_rank,
            "world_size": replica.size,
            "store": list(deployment.replica_rendezvous[replica.index]),
            # gloo and NCCL bind to the interface that carries this address (daemon.interfaces)
            "advertised": None if self.store_address is None else self.store_address[0],
            "prefix": replica_prefix(deployment.term, worker.formed, replica),
            "secret": secret.hex(),
            "replica": self._spec(replica) | {"first_rank": 0},
            "exchange": None if exchange_secret is None else self._exchange(deployment, worker, exchange_secret),
            "device": self.device if self.device == "cpu" else f"{self.device}:{worker.local_gpu}",
            "threads": self.threads,
            "backend": self._backend(),
            "progress": True,  # load progress frames move the start deadline (_await_ready)
            "connect_timeout_s": self._connect_timeout(),
        }

    async def _read_events(self, worker: LocalWorker, reader: FrameReader) -> None:
        while True:
            try:
                frame = await reader.read()
            except FrameError as exc:
                raise RuntimeError(f"worker of rank {worker.rank} sent a bad frame: {exc}") from None
            if frame is None:
                return
            if isinstance(frame, dict) and frame.get("op") == "exchange":
                current = self.deployment is not None and frame.get("prefix") == self.deployment.exchange_prefix
                if not current:
                    continue  # an older epoch's group: the replica has moved on since
                if frame.get("formed") is not True:
                    error = f"worker of rank {worker.rank} could not join the exchange group: {frame.get('error')}"
                    raise WorkerFailed(error, _cause(frame))
                worker.joining = False
                self._notify()
                continue
            if isinstance(frame, dict) and frame.get("op") == "alive":
                self._alive(worker)
                continue
            if not isinstance(frame, dict) or not isinstance(frame.get("id"), int):
                continue
            channel = self.listeners.get(frame["id"])
            if channel is None:
                continue
            if frame.get("op") == "token":
                event = {"token": frame["token"], "finished": frame.get("finished")}
            elif frame.get("op") == "handoff":
                event = {"handoff": frame["tokens"]}
            elif frame.get("op") == "error":  # the worker refused the request (a KV format mismatch)
                self._fail(frame["id"], str(frame.get("error"))[:500])
                continue
            else:
                continue
            try:
                channel.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                # the consumer is gone or hopelessly behind: free the work instead of stalling the batch
                self.listeners.pop(frame["id"], None)
                with contextlib.suppress(Exception):
                    await worker.send({"op": "abort", "id": frame["id"]})
            if event.get("finished") is not None or "handoff" in event:
                self.forget(frame["id"])

    def _alive(self, worker: LocalWorker) -> None:
        """Tell each request on ``worker`` that it still steps; a listener with events unread needs no word."""
        for seq_id in [i for i, w in self.owners.items() if w is worker]:
            channel = self.listeners.get(seq_id)
            if channel is not None and channel.statistics().current_buffer_used == 0:
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    channel.send_nowait({"alive": True})

    def status(self) -> dict[str, Any]:
        deployment = self.deployment
        return {
            "model": self.model_dir,
            "epoch": None if deployment is None else deployment.epoch,
            "workers": {
                str(rank): {
                    "replica": w.replica.index,
                    "role": w.replica.role,
                    "formed": w.formed,
                    "state": "failed"
                    if w.error
                    else "joining"
                    if w.joining
                    else "ready"
                    if w.ready.is_set()
                    else "starting",
                    "error": w.error,
                    "pid": None if w.process is None else w.process.pid,
                }
                for rank, w in sorted((w.rank, w) for w in self.workers.values())
            },
            "in_flight": len(self.listeners),
        }

    # ------------------------------------------------------------------ requests

    def driver_of(self, replica: int, version: tuple[int, int]) -> LocalWorker:
        deployment = self.deployment
        if deployment is None or deployment.version != version:
            raise ReplicaUnavailable(f"epoch {version[1]} of term {version[0]} is not served here")
        for worker in self.workers.values():
            if worker.replica.index == replica and worker.is_driver:
                if worker.error is not None:
                    raise ReplicaUnavailable(worker.error)
                return worker
        raise ReplicaUnavailable(f"replica {replica} has no driver here")

    async def wait_ready(self, replica: int, version: tuple[int, int], timeout: float) -> LocalWorker:
        """The local driver of ``replica`` once every local worker of plan ``version`` (term, epoch) is ready.
        A hop for a later plan than this daemon deployed waits for it (at most ``EPOCH_WAIT_S``); one for an
        earlier or another plan, or for a replica that failed or is not here, raises ReplicaUnavailable."""
        with trio.fail_after(timeout):
            with trio.move_on_after(EPOCH_WAIT_S):
                while self.deployment is None or self.deployment.version < version or self._exchanging:
                    await self.changed.wait()
            while True:
                worker = self.driver_of(replica, version)
                if all(w.ready.is_set() and not w.joining for w in self.workers.values()):
                    return worker
                failed = [w.error for w in self.workers.values() if w.error]
                if failed:
                    raise ReplicaUnavailable(failed[0])
                await self.changed.wait()

    async def submit(
        self, worker: LocalWorker, frame: dict[str, Any], capacity: int
    ) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        """Send ``frame`` (generate or import) to ``worker`` and return the channel its events arrive on. An id
        already in flight here is refused: the entry picks ids, and a second hop under one would take over the
        first one's events."""
        if frame["id"] in self.listeners:
            raise ReplicaUnavailable(f"request id {frame['id']} is already in flight here")
        send, receive = trio.open_memory_channel[dict[str, Any]](capacity)
        self.listeners[frame["id"]] = send
        self.owners[frame["id"]] = worker
        try:
            await worker.send(frame)
        except Exception as exc:
            self.forget(frame["id"])
            raise ReplicaUnavailable(f"cannot reach the worker: {exc}") from None
        return receive

    async def abort(self, seq_id: int) -> None:
        self.listeners.pop(seq_id, None)
        owner = self.owners.pop(seq_id, None)
        if owner is not None:
            with contextlib.suppress(Exception):
                await owner.send({"op": "abort", "id": seq_id})

    def forget(self, seq_id: int) -> None:
        self.listeners.pop(seq_id, None)
        self.owners.pop(seq_id, None)
