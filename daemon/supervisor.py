"""The supervisor: one engine worker process per local GPU of the adopted plan, kept across epochs.

For each deployment (daemon.deployment) it keeps the workers of replicas that did not change (same role,
layout and GPUs) and moves them to the new epoch's exchange group, stops the others, and starts a worker
process (daemon.worker_link) per new local rank, configured (daemon.worker_config) with its replica, the
replica's world and the exchange group. It routes what the replica drivers stream back (a frame of
tokens per engine step, hand-offs) to per-request channels (daemon.request_listeners). Requests on a
replica whose worker fails or is replaced, and hand-offs routed under an older epoch, get an error event
(marked ``refused`` when the plan, not the work, ended them), so their entry re-submits them. A hop for an
epoch not deployed here yet waits for it.
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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from hexgen.daemon.deployment import Deployment, Replica, rank_world
from hexgen.daemon.failure import WorldFailure
from hexgen.daemon.request_listeners import Event, RequestListeners
from hexgen.daemon.start_deadline import StartDeadline
from hexgen.daemon.status_reply import ServingStatus, WorkerStatus
from hexgen.daemon.wire import FrameError
from hexgen.daemon.worker_config import WorkerSettings
from hexgen.daemon.worker_frames import (
    AbortFrame,
    AliveFrame,
    ErrorFrame,
    ExchangedFrame,
    ExchangeFrame,
    FailedFrame,
    HandoffFrame,
    ProgressFrame,
    ReadyFrame,
    RequestFrame,
    StepFrame,
    TokenFrame,
    frame_from_worker,
    frame_to_worker,
)
from hexgen.daemon.worker_link import SEND_ERRORS, LocalWorker, WorkerFailed
from hexgen.daemon.worker_link import ReplicaUnavailable as ReplicaUnavailable
from hexgen.daemon.worker_setup import ExchangeSetup
from hexgen.engine.bounds import LOAD_TIMEOUT_S

log = logging.getLogger("hexgen.supervisor")

START_TIMEOUT_S = 120.0  # without a sign of progress (StartDeadline): loading reports progress and moves it
START_CAP_S = 3 * 3600.0  # however much progress: a start that takes longer has something wrong with it
# A worker answers once its worlds formed: ranks arriving (the worker's own bound is START_TIMEOUT_S), then
# connecting within connect_timeout_s; this much longer, its silence is the daemon's to call.
READY_GRACE_S = 30.0
# Once a worker loaded all its weights it is silent at the load barrier for up to LOAD_TIMEOUT_S (waiting on
# slower ranks), then profiles and forms the exchange group (whose ranks arrive within START_TIMEOUT_S).
LOADED_QUIET_S = LOAD_TIMEOUT_S + START_TIMEOUT_S + READY_GRACE_S
# How long a hop for an epoch this daemon has not deployed yet waits for it: plans reach daemons a moment
# apart, and a new epoch is deployed only once the workers it replaces have stopped.
EPOCH_WAIT_S = 15.0
# How often a worker's world asks its head's daemon again for the store secret while that daemon has not
# adopted the plan yet.
SECRET_RETRY_S = 0.3
STORE_RESTART_S = 1.0  # after the rendezvous store exits, before it starts again
STORE_RESTARTS = 5  # quick exits in a row before the daemon stops restarting its store
STORE_STABLE_S = 60.0  # a store that ran this long had not failed quickly

# (epoch, rank, error, cause, peers of the world that failed)
OnFailure = Callable[[int, int, str, WorldFailure | None, list[str]], Awaitable[None]]


class Frames(Protocol):
    """What the supervisor reads a worker's frames from (``daemon.wire.FrameReader``): wire values."""

    async def read(self) -> Any: ...


@dataclass
class Supervisor:
    peer_id: str
    model_dir: str
    device: str = "cpu"
    threads: int = 1
    backend: str = "gloo"
    store_address: tuple[str, int] | None = None  # where peers dial this daemon's store
    store_socket: socket.socket | None = None  # what the store serves on (bound where it listens: 0.0.0.0, NAT)
    store: trio.Process | None = None  # the store process serving on it now
    on_failure: OnFailure | None = None
    connect_timeout_s: float | None = None  # None: the backend's own (engine.bounds: NCCL needs longer)
    prefill_chunk: int | None = None  # None: engine.replica's default for each replica's role
    # asks a world's head daemon for its store secret (the world's prefix); daemon.node fills it in
    fetch_secret: Callable[[str, str], Awaitable[bytes]] | None = None
    # relays a worker's KV parts while its process runs (daemon.kv_relay); never raises
    kv_pump: Callable[[LocalWorker], Awaitable[None]] | None = None
    store_key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    deployment: Deployment | None = None
    workers: dict[tuple[Any, int], LocalWorker] = field(default_factory=dict)
    requests: RequestListeners = field(default_factory=RequestListeners)
    changed: trio.Event = field(default_factory=trio.Event)
    _wanted: Deployment | None = None
    _wanted_changed: trio.Event = field(default_factory=trio.Event)
    _exchanging: bool = False  # kept drivers are being told the new epoch's exchange group
    _planned: trio.Event = field(default_factory=trio.Event)
    _secrets: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def listeners(self) -> dict[int, trio.MemorySendChannel[Event]]:
        """Each request in flight here: the channel its events go to."""
        return self.requests.channels

    @property
    def owners(self) -> dict[int, LocalWorker]:
        return self.requests.owners

    @property
    def settings(self) -> WorkerSettings:
        advertised = None if self.store_address is None else self.store_address[0]
        return WorkerSettings(
            self.model_dir,
            self.device,
            self.threads,
            self.backend,
            self.connect_timeout_s,
            advertised,
            prefill_chunk=self.prefill_chunk,
        )

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
        try:
            async with trio.open_nursery() as nursery:
                if self.store_socket is not None:
                    self.store = await self._start_store(self.store_socket)
                    nursery.start_soon(self._keep_store, self.store_socket)
                while True:
                    await self._wanted_changed.wait()
                    self._wanted_changed = trio.Event()
                    await self._reconcile(nursery, self._wanted)
        finally:
            self.requests.fail_all("the daemon is stopping")  # nothing against the requests
            if self.store is not None:
                self.store.kill()
                with trio.CancelScope(shield=True):
                    await self.store.wait()

    async def _start_store(self, sock: socket.socket) -> trio.Process:
        bind, port = sock.getsockname()[:2]
        fd = sock.fileno()
        command = [sys.executable, "-m", "hexgen.daemon.store", "--host", bind, "--port", str(port)]
        command += ["--listen-fd", str(fd)]
        return await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=(fd,)
        )

    async def _keep_store(self, sock: socket.socket) -> None:
        """Start the store again on ``sock`` (this daemon still holds it, so the port stays this daemon's)
        whenever it exits, STORE_RESTART_S later; after STORE_RESTARTS in a row that each ran less than
        STORE_STABLE_S, say why no world can meet here and stop trying. Worlds forming at the moment lose
        what they had stored and fail, to form again in the next epoch."""
        restarts = 0
        while self.store is not None:
            started = trio.current_time()
            code = await self.store.wait()
            restarts = 1 if trio.current_time() - started > STORE_STABLE_S else restarts + 1
            if restarts > STORE_RESTARTS:
                log.error(
                    "the rendezvous store exited (code %s) %d times in a row: worlds whose rank 0 runs on "
                    "this daemon cannot form; restart the daemon",
                    code,
                    restarts - 1,
                )
                return
            log.error("the rendezvous store exited (code %s); starting it again", code)
            await trio.sleep(STORE_RESTART_S)
            self.store = await self._start_store(sock)

    # ------------------------------------------------------------------ store secrets

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
        """The store secret of a world: this daemon's own, or asked of the head's daemon (cached). Raises
        RuntimeError when the head gives none within EPOCH_WAIT_S."""
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
                except Exception as exc:  # noqa: BLE001 - the ask crosses the network: any failure is retried
                    error = str(exc) or type(exc).__name__
                await trio.sleep(SECRET_RETRY_S)
        raise RuntimeError(f"{head} gave no store secret for {prefix}: {error}")

    async def _secrets_of(self, deployment: Deployment, worker: LocalWorker) -> tuple[bytes, bytes | None]:
        """The store secrets of the worker's replica world and, when there is one, the exchange group."""
        world = rank_world(deployment, worker.replica, worker.layout_rank, worker.formed)
        own = await self._world_secret(world.head, world.prefix)
        if not deployment.needs_exchange:
            return own, None
        return own, await self._exchange_secret(deployment, worker.replica)

    async def _exchange_secret(self, deployment: Deployment, replica: Replica) -> bytes:
        """The gloo exchange group's store secret; a replica outside it (its KV relayed) needs none, and is
        given this daemon's own for the prefix, which opens nothing."""
        if not deployment.in_gloo(replica):
            return self._own_secret(deployment.exchange_prefix)
        return await self._world_secret(deployment.exchange_head, deployment.exchange_prefix)

    # ------------------------------------------------------------------ deployments

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def _reconcile(self, nursery: trio.Nursery, deployment: Deployment | None) -> None:
        """Move the local workers to ``deployment``: keep ready workers of unchanged replicas, stop the rest,
        start what is missing."""
        wanted: dict[tuple[Any, int], Replica] = {}
        if deployment is not None:
            for rank, replica in deployment.local_ranks(self.peer_id):
                wanted[(replica.key, rank - replica.first_rank)] = replica
        await self._stop_unwanted(wanted, deployment is None or deployment.restart)
        # From here to the exchange frames, no await: a hop never sees the new epoch half deployed (a kept
        # worker renumbered but a new replica's worker not yet listed, which read as "no driver here").
        self.deployment = deployment
        if deployment is None:
            self._notify()
            return
        self._secrets = {prefix: s for prefix, s in self._secrets.items() if deployment.world(prefix) is not None}
        kept_drivers = self._renumber_kept(deployment, wanted)
        for slot, replica in wanted.items():
            if slot not in self.workers:
                worker = LocalWorker(replica, slot[1], deployment.epoch)
                self.workers[slot] = worker
                nursery.start_soon(self._run_worker, deployment, worker)
                nursery.start_soon(self._pump_kv, worker)
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

    async def _stop_unwanted(self, wanted: Mapping[tuple[Any, int], Replica], restart: bool) -> None:
        """Stop every worker not kept: all on ``restart``, else those not ``wanted``, failed, not ready, or still
        joining an earlier epoch's exchange group (a worker blocks in that join until the group forms or times
        out, and a superseded epoch's group may never form: its members have moved on)."""
        stopping = []
        for slot, worker in list(self.workers.items()):
            stale = worker.error is not None or not worker.ready.is_set() or worker.joining
            if restart or slot not in wanted or stale:
                del self.workers[slot]
                self.requests.fail_on(worker, "the plan changed", refused=worker.error is None)
                worker.scope.cancel()
                stopping.append(worker)
        for worker in stopping:
            await worker.stopped.wait()

    def _renumber_kept(self, deployment: Deployment, wanted: Mapping[tuple[Any, int], Replica]) -> list[LocalWorker]:
        """Give kept workers their replica in the new numbering; returns their drivers when the epoch has an
        exchange group to move them to."""
        kept_drivers = []
        for slot, worker in self.workers.items():
            worker.replica = wanted[slot]
            if worker.replica.role == "prefill":  # their hand-offs were routed in the old numbering
                self.requests.fail_on(worker, "the plan changed", refused=True)
            if deployment.needs_exchange:
                worker.joining = True  # every rank of the replica joins; each says when its group formed
                if worker.is_driver:
                    kept_drivers.append(worker)
        return kept_drivers

    def _exchange(self, deployment: Deployment, worker: LocalWorker, secret: bytes) -> ExchangeSetup:
        return self.settings.exchange(deployment, worker.replica, secret)

    async def _tell_exchange(self, deployment: Deployment, kept_drivers: list[LocalWorker]) -> None:
        """Send each kept driver the new epoch's exchange group; one that cannot be told has failed (else
        its replica's workers would stay ``joining`` and every hop here be refused until the next epoch)."""
        for worker in kept_drivers:
            try:
                secret = await self._exchange_secret(deployment, worker.replica)
            except RuntimeError as exc:
                await self._failed(worker, deployment.epoch, str(exc))
                continue
            try:
                await worker.send(ExchangeFrame(self._exchange(deployment, worker, secret)))
            except SEND_ERRORS as exc:
                error = f"worker of rank {worker.rank} could not be told the exchange group: {exc}"
                await self._failed(worker, deployment.epoch, error)

    # ------------------------------------------------------------------ one worker

    async def _run_worker(self, deployment: Deployment, worker: LocalWorker) -> None:
        try:
            with worker.scope:
                try:
                    await self._start(deployment, worker)
                    await self._read_events(worker, worker.reader())
                    raise RuntimeError(f"worker of rank {worker.rank} exited")
                except Exception as exc:  # noqa: BLE001 - a worker's task: whatever ends it fails that worker, never the daemon
                    epoch = self.deployment.epoch if self.deployment is not None else deployment.epoch
                    cause = exc.cause if isinstance(exc, WorkerFailed) else None
                    await self._failed(worker, epoch, str(exc) or type(exc).__name__, cause)
                    await trio.sleep_forever()  # stays failed until the next epoch replaces it
        finally:
            with trio.CancelScope(shield=True):
                await worker.stop()
            worker.stopped.set()

    async def _pump_kv(self, worker: LocalWorker) -> None:
        """Run ``kv_pump`` on ``worker`` once its process has started, until the worker stops."""
        if self.kv_pump is None:
            return
        pump = self.kv_pump
        async with trio.open_nursery() as nursery:

            async def pump_once_spawned() -> None:
                await worker.spawned.wait()
                await pump(worker)

            nursery.start_soon(pump_once_spawned)
            await worker.stopped.wait()
            nursery.cancel_scope.cancel()

    async def _start(self, deployment: Deployment, worker: LocalWorker) -> None:
        """Start ``worker``'s process, configure it, and wait until it is ready; raises WorkerFailed."""
        await worker.start(self.threads)
        secret, exchange_secret = await self._secrets_of(deployment, worker)  # while the process imports torch
        frame = self.settings.configure(
            deployment, worker.replica, worker.layout_rank, worker.formed, secret, exchange_secret
        )
        worker.bridge = frame.bridge  # before the worker can say anything on it
        await worker.send(frame)
        reply = frame_from_worker(await self._await_ready(worker, worker.reader()))
        if not isinstance(reply, ReadyFrame):
            error = reply.error if isinstance(reply, FailedFrame) else f"it sent {reply.OP} first"
            cause = reply.cause if isinstance(reply, FailedFrame) else None
            raise WorkerFailed(f"worker of rank {worker.rank} failed to start: {error}", cause)
        worker.ready.set()
        self._notify()
        log.info("epoch %d: rank %d ready", deployment.epoch, worker.rank)

    async def _await_ready(self, worker: LocalWorker, reader: Frames) -> Any:
        """The wire value of the worker's first frame other than ``progress``; each progress report (more
        weights loaded) moves the deadline, so a big model loading slowly is not killed while a silent worker
        is. Raises trio.TooSlowError saying which bound fired, MalformedFrame for a bad progress frame."""
        quiet = START_TIMEOUT_S + READY_GRACE_S
        deadline = StartDeadline(trio.current_time(), quiet, START_CAP_S, loaded_s=LOADED_QUIET_S)
        while True:
            raw = None
            with trio.move_on_at(deadline.deadline) as scope:
                raw = await reader.read()
            if scope.cancelled_caught:
                raise trio.TooSlowError(f"worker of rank {worker.rank} {_too_slow(deadline, quiet)}")
            if not (isinstance(raw, dict) and raw.get("op") == ProgressFrame.OP):
                return raw  # read by the caller
            frame = ProgressFrame.from_wire(raw)
            deadline.progress(trio.current_time(), frame.done, frame.total)

    async def _failed(self, worker: LocalWorker, epoch: int, error: str, cause: WorldFailure | None = None) -> None:
        worker.error = error
        log.warning("epoch %d: %s", epoch, error)
        self.requests.fail_on(worker, error)
        self._notify()
        if self.on_failure is not None:
            peers = worker.replica.peers()
            if cause is not None and cause.world == "exchange group" and self.deployment is not None:
                peers = {peer for r in self.deployment.gloo_replicas for peer in r.peers()}
            await self.on_failure(epoch, worker.rank, error, cause, sorted(peers))

    async def _read_events(self, worker: LocalWorker, reader: Frames) -> None:
        """Route the frames of a ready worker until its channel ends; raises WorkerFailed when it could not
        join a later epoch's exchange group, RuntimeError for a frame that is not one."""
        while True:
            try:
                raw = await reader.read()
                frame = None if raw is None else frame_from_worker(raw)
            except FrameError as exc:
                raise RuntimeError(f"worker of rank {worker.rank} sent a bad frame: {exc}") from None
            if frame is None:
                return
            if isinstance(frame, ExchangedFrame):
                self._exchanged(worker, frame)
            elif isinstance(frame, AliveFrame):
                self.requests.alive(worker)
            elif isinstance(frame, StepFrame | HandoffFrame | ErrorFrame):
                await self._deliver(worker, frame.tokens if isinstance(frame, StepFrame) else (frame,))

    async def _deliver(self, worker: LocalWorker, frames: Iterable[TokenFrame | HandoffFrame | ErrorFrame]) -> None:
        """Pass a worker's frames on to their requests' channels; a request whose consumer is gone or hopelessly
        behind is aborted instead of stalling the batch. O(frames)."""
        for frame in frames:
            if not self.requests.deliver(frame):
                with contextlib.suppress(*SEND_ERRORS):
                    await worker.send(AbortFrame(frame.id))

    def _exchanged(self, worker: LocalWorker, frame: ExchangedFrame) -> None:
        if self.deployment is None or frame.prefix != self.deployment.exchange_prefix:
            return  # an older epoch's group: the replica has moved on since
        if not frame.formed:
            error = f"worker of rank {worker.rank} could not join the exchange group: {frame.error}"
            raise WorkerFailed(error, frame.cause)
        worker.joining = False
        self._notify()

    def status(self) -> ServingStatus:
        deployment = self.deployment
        workers = {
            w.rank: WorkerStatus(
                replica=w.replica.index,
                role=w.replica.role,
                formed=w.formed,
                state=w.state,
                error=w.error,
                pid=None if w.process is None else w.process.pid,
            )
            for w in self.workers.values()
        }
        epoch = None if deployment is None else deployment.epoch
        return ServingStatus(self.model_dir, epoch, workers, len(self.listeners))

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

    async def wait_ready(self, replica: int, version: tuple[int, int], wait_s: float) -> LocalWorker:
        """The local driver of ``replica`` once every local worker of plan ``version`` (term, epoch) is ready,
        within ``wait_s`` (else trio.TooSlowError). A hop for a later plan than this daemon deployed waits
        for it (at most ``EPOCH_WAIT_S``); one for an earlier or another plan, or for a replica that failed or
        is not here, raises ReplicaUnavailable."""
        with trio.fail_after(wait_s):
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
        self, worker: LocalWorker, frame: RequestFrame | Mapping[str, Any], capacity: int
    ) -> trio.MemoryReceiveChannel[Event]:
        """Send ``frame`` (generate or import; its wire map is read as one) to ``worker`` and return the
        channel its events arrive on. An id already in flight here is refused (ReplicaUnavailable)."""
        if isinstance(frame, Mapping):
            parsed = frame_to_worker(frame)
            if not isinstance(parsed, RequestFrame):
                raise ReplicaUnavailable(f"a {parsed.OP} frame is not a request")
            frame = parsed
        receive = self.requests.open(frame.id, worker, capacity)
        try:
            await worker.send(frame)
        except SEND_ERRORS as exc:
            self.forget(frame.id)
            raise ReplicaUnavailable(f"cannot reach the worker: {exc}") from None
        return receive

    async def abort(self, seq_id: int) -> None:
        owner = self.requests.forget(seq_id)
        if owner is not None:
            with contextlib.suppress(*SEND_ERRORS):
                await owner.send(AbortFrame(seq_id))

    def forget(self, seq_id: int) -> None:
        self.requests.forget(seq_id)


def _too_slow(deadline: StartDeadline, quiet_s: float) -> str:
    """Which bound a start that timed out broke, and how far its loading got."""
    loaded = f" after {deadline.done} bytes of weights" if deadline.done >= 0 else ""
    if deadline.capped():
        return f"was not ready within the {START_CAP_S / 3600:g} h cap on a start{loaded}"
    if deadline.loaded:
        return f"loaded its weights but was not ready {LOADED_QUIET_S:.0f} s later{loaded}"
    return f"made no progress for {quiet_s:.0f} s{loaded}"
