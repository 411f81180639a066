"""The engine worker process: hosts one rank of a replica and talks to its daemon over a unix socket.

Run as ``python -m hexgen.daemon.worker_process --ipc-fd FD`` (the worker's end of a socket pair the daemon
made) or ``--ipc PATH`` (a unix socket the daemon listens on), with ``--kv-fd FD`` its end of a second pair
for the KV parts of a relayed exchange (``daemon.kv_channel``). The frames both ways are those of
``daemon.worker_frames``: ``configure`` first (this rank's replica, its world's store, the address its daemon
advertises, whose interface gloo and NCCL bind to, and the epoch's exchange group over which KV moves
between replicas, when there is one); then, to a replica's driver only, ``exchange``, ``generate``,
``import``, ``abort`` and ``shutdown``. While it loads, a worker configured with ``progress`` sends
``progress`` frames. It answers ``ready`` or ``failed`` once: ``ready`` only once its world and the epoch's
exchange group formed (so it can hand KV to every replica the plan links it with), ``failed`` with the
cause when either could not (``daemon.failure.WorldFailure``). Then it streams ``step`` (one per engine
step: every token it sampled), ``handoff`` (just before the KV goes out), ``error`` (a request it refuses),
``alive`` and ``exchange`` (whether a later epoch's group formed) frames, a step's frames in one write. torch stays in this process: the daemon's trio loop never waits on a GPU
step. This module and what it imports at load are free of torch, trio and libp2p.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from hexgen.daemon.failure import WorldFailure
from hexgen.daemon.heap import settle_heap
from hexgen.daemon.interfaces import pin_interfaces
from hexgen.daemon.wire import MAX_FRAME, MalformedFrame, decode_payload, encode_frame
from hexgen.daemon.worker_frames import (
    AbortFrame,
    AliveFrame,
    ConfigureFrame,
    ErrorFrame,
    ExchangedFrame,
    ExchangeFrame,
    FailedFrame,
    GenerateFrame,
    HandoffFrame,
    ImportFrame,
    ProgressFrame,
    ReadyFrame,
    ShutdownFrame,
    StepFrame,
    TokenFrame,
    ToWorker,
    frame_to_worker,
)
from hexgen.daemon.worker_setup import ExchangeSetup, ReplicaSetup
from hexgen.engine.quant_bytes import NONE

if TYPE_CHECKING:  # torch: only once the worker runs
    from hexgen.engine.loader import ProgressFn
    from hexgen.engine.replica import ExchangeConfig, Groups, KVRelay, ReplicaSpec, ReplicaWorker, Request, StepResult

IDLE_POLL_S = 0.05
PARENT_ENV = "HEXGEN_DAEMON_PID"  # set by the daemon, so a worker whose daemon died before it looked still sees it
KEEPALIVE_S = 10.0
ALIVE_EVERY_S = 1.0  # how often a driver with work in hand says it still steps (engine steps can be long)
PROGRESS_EVERY_S = 1.0
OPERATION_TIMEOUT_S = 120.0


class Wake(Protocol):
    """Something the step loop's wait selects on besides the daemon's frames (``KvChannel``: relayed KV
    settled)."""

    def fileno(self) -> int: ...

    def drain(self) -> None: ...


class Channel:
    """Blocking frames over a connected unix socket, with a non-blocking poll for the step loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.lock = threading.Lock()  # the exchange-joining thread reports on this channel too

    def send(self, obj: Any) -> None:
        self.send_all([obj])

    def send_all(self, objs: list[Any]) -> None:
        """Several frames in one write: a step's report is one system call."""
        data = b"".join(encode_frame(obj) for obj in objs)
        with self.lock:
            self.sock.sendall(data)

    def _frame(self) -> Any | None:
        if len(self.buffer) < 4:
            return None
        size = int.from_bytes(self.buffer[:4], "big")
        if size > MAX_FRAME:
            raise MalformedFrame(f"frame of {size} bytes from the daemon")
        if len(self.buffer) < 4 + size:
            return None
        payload, self.buffer = self.buffer[4 : 4 + size], self.buffer[4 + size :]
        return decode_payload(payload)

    def poll(self, timeout: float | None, wake: Wake | None = None) -> list[Any]:
        """Every complete frame that arrives within ``timeout`` seconds (None: until one does; none
        arrived: an empty list). A ``wake`` that turns readable meanwhile ends the wait too (drained)."""
        watched: list[Any] = [self.sock] if wake is None else [self.sock, wake]
        ready, _, _ = select.select(watched, [], [], timeout)
        if wake is not None and wake in ready:
            wake.drain()
        if self.sock in ready:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("the daemon closed the worker channel")
            self.buffer += chunk
        frames = []
        while (frame := self._frame()) is not None:
            frames.append(frame)
        return frames

    def receive(self) -> Any:
        while True:
            frames = self.poll(None)
            if frames:
                self.buffer = b"".join(encode_frame(f) for f in frames[1:]) + self.buffer
                return frames[0]


class Background:
    """``fn(*args)`` in a daemon thread: a worker that fails meanwhile exits without waiting for it."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.outcome: list[tuple[bool, Any]] = []
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self.outcome.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that asks for the result, which raises it
            self.outcome.append((False, exc))

    def result(self) -> Any:
        self.thread.join()
        ok, value = self.outcome[0]
        if not ok:
            raise value
        return value


def spec_from(setup: ReplicaSetup) -> ReplicaSpec:
    from hexgen.engine.layout import StageLayout
    from hexgen.engine.model_runner import CacheConfig
    from hexgen.engine.replica import ReplicaSpec

    return ReplicaSpec(
        setup.model_dir,
        tuple(StageLayout(*stage) for stage in setup.layout),
        first_rank=setup.first_rank,
        mode=setup.mode,
        dtype=setup.dtype,
        device=setup.device,
        cache=CacheConfig(**setup.cache.overrides()),
        prefill_chunk=setup.prefill_chunk,
        quantize=None if setup.quantize == NONE else setup.quantize,
    )


def exchange_from(setup: ExchangeSetup) -> ExchangeConfig:
    from hexgen.engine.replica import ExchangeConfig

    host, port = setup.store
    peers = tuple(spec_from(r) for r in setup.replicas)
    return ExchangeConfig(
        host,
        port,
        setup.prefix,
        setup.first_rank,
        setup.size,
        peers,
        secret=setup.secret,
        connect_timeout_s=setup.connect_timeout_s,
        transport=setup.transport,
        members=setup.members,
    )


def _join(
    config: ConfigureFrame, progress: ProgressFn | None = None, relay: KVRelay | None = None
) -> tuple[ReplicaWorker, object]:
    """The replica worker of ``config`` in its world, and the world's store (None for a tcp:// world).
    ``progress(done, total)`` hears the bytes of weights loaded; ``relay`` carries a "libp2p" exchange's KV."""
    import torch

    from hexgen.engine.device import pin_device
    from hexgen.engine.replica import ReplicaWorker, join_exchange, replica_kv_format

    torch.set_num_threads(config.threads)
    spec = dataclasses.replace(spec_from(config.replica), first_rank=0, device=config.device or config.replica.device)
    pin_device(spec.device)  # before any CUDA work or NCCL group: ranks must not pile onto cuda:0
    store_host = config.store[0] if config.store is not None else "127.0.0.1"
    pin_interfaces(config.advertised or store_host, store_host)  # before any group forms
    # Ready means able to hand KV on: every rank of every replica of the epoch joins this group, in a thread
    # from the start, so ranks meet there as soon as they run (not after loading weights, which can take
    # minutes) and a group that cannot connect is known while the model loads.
    exchange = None
    if config.exchange is not None:
        # the KV format goes out as the group forms: a peer ready before this rank loads reads it at once
        setup = exchange_from(config.exchange)
        exchange = Background(join_exchange, setup, config.replica_rank, replica_kv_format(spec), relay)
    store, groups = _form_world(config, spec)
    bridge = None
    if config.bridge:
        if relay is None:
            raise RuntimeError("a bridged replica's stages talk through the daemon, but this worker has no KV channel")
        bridge = relay.bind(config.bridge, config.replica_rank)
    worker = ReplicaWorker(
        spec, config.replica_rank, groups, progress=abort_on_failure(exchange, progress), bridge=bridge
    )
    worker.kv_relay = relay
    if exchange is not None:
        worker.adopt_exchange(exchange.result())  # raises the group's WorldFormationError
    return worker, store


def _form_world(config: ConfigureFrame, spec: ReplicaSpec) -> tuple[object, Groups]:
    """This rank's replica world, met at the daemon's store (or, without one, a tcp:// world on a local
    port): its store and groups. A bridged replica's rank forms its stage's world, whose only group is
    itself: no groups."""
    from hexgen.engine.formation import CONNECT_GRACE_S, bounded, connecting
    from hexgen.engine.replica import init_world, init_world_store, replica_groups, settle_world

    rank, size, backend, connect_s = config.rank, config.world_size, config.backend, config.connect_timeout_s
    if config.store is None:
        init_world(rank, size, config.port or 0, backend, device=spec.device)
        return None, {} if config.bridge else replica_groups([spec])
    host, port = config.store
    store = init_world_store(
        rank,
        size,
        host,
        port,
        config.prefix,
        backend,
        secret=config.secret,
        connect_timeout_s=connect_s,
        device=spec.device,
    )
    with connecting("replica world"):
        groups = bounded(
            lambda: {} if config.bridge else replica_groups([spec], timedelta(seconds=connect_s)),
            connect_s + CONNECT_GRACE_S,
            "replica world",
        )
    settle_world(groups, OPERATION_TIMEOUT_S)
    return store, groups


def abort_on_failure(exchange: Background | None, progress: ProgressFn | None = None) -> ProgressFn:
    """A loader callback that raises the exchange thread's error as soon as it is known: a group that
    could not form is reported (``failed`` with its cause) within seconds, not after a long model load."""

    def report(done: int, total: int) -> None:
        if exchange is not None and exchange.outcome and not exchange.outcome[0][0]:
            raise exchange.outcome[0][1]
        if progress is not None:
            progress(done, total)

    return report


class Liveness:
    """Sends ``alive`` every ``every_s`` from a thread while ``busy`` (the driver has work in hand), so a
    single long step (a long prefill, a big KV transfer) does not look stuck to the entry; silent while
    ``quiet()`` (the replica waits for an imported KV: one that never comes must look stuck, so the entry
    fails over)."""

    def __init__(self, channel: Channel, quiet: Callable[[], bool], every_s: float = ALIVE_EVERY_S) -> None:
        self.channel, self.quiet, self.every_s = channel, quiet, every_s
        self.busy = False  # set by the step loop
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="alive", daemon=True)

    def start(self) -> Liveness:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def tick(self) -> None:
        if self.busy and not self.quiet():
            self.channel.send(AliveFrame().to_wire())

    def _run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                self.tick()
            except OSError:  # the daemon is gone: the step loop finds out too
                return


def progress_reporter(channel: Channel, every_s: float | None = None) -> ProgressFn:
    """A loader callback sending ``progress`` frames (bytes loaded of the total) at most every ``every_s``,
    and always the last one: the daemon moves this worker's start deadline while they arrive."""
    every = PROGRESS_EVERY_S if every_s is None else every_s
    last = [-float("inf")]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= every:
            last[0] = now
            channel.send(ProgressFrame(int(done), int(total)).to_wire())

    return report


def failure_frame(exc: BaseException) -> FailedFrame:
    """The ``failed`` frame for ``exc``, with the cause when a world could not form."""
    from hexgen.engine.formation import WorldFormationError

    if isinstance(exc, WorldFormationError):
        return FailedFrame(str(exc), WorldFailure(exc.world, exc.stage, exc.remote))
    return FailedFrame(f"{type(exc).__name__}: {exc}")


def exchange_reporter(channel: Channel) -> Callable[[str, BaseException | None], None]:
    """The replica's ``on_exchange``: tells the daemon whether a later epoch's exchange group formed."""

    def exchanged(prefix: str, outcome: BaseException | None) -> None:
        if outcome is None:
            frame = ExchangedFrame(prefix, formed=True)
        else:
            failed = failure_frame(outcome)
            frame = ExchangedFrame(prefix, formed=False, error=failed.error, cause=failed.cause)
        with contextlib.suppress(OSError):
            channel.send(frame.to_wire())

    return exchanged


def start(channel: Channel, relay: KVRelay | None = None) -> tuple[ReplicaWorker, object] | None:
    """Read ``configure``, join the worlds and answer ``ready`` (the worker and its world's store, which
    must outlive the world), or answer ``failed`` (None)."""
    try:
        config = frame_to_worker(channel.receive())
    except MalformedFrame as exc:
        config = None
        error = f"a bad first frame: {exc}"
    if not isinstance(config, ConfigureFrame):
        channel.send(FailedFrame(error if config is None else "the first frame must be configure").to_wire())
        return None
    try:
        report = progress_reporter(channel) if config.progress else None  # the daemon asks for them
        worker, store = _join(config, report, relay)
    except Exception as exc:  # noqa: BLE001 - the worker's start: whatever failed is the daemon's to hear
        channel.send(failure_frame(exc).to_wire())
        return None
    settle_heap()  # torch and the model loaded: a full collection must not walk them between steps
    channel.send(ReadyFrame(worker.rank, worker.is_driver, worker.block_manager.num_blocks).to_wire())
    worker.on_exchange = exchange_reporter(channel)
    return worker, store


@dataclass
class Inbox:
    """What the daemon asked of a replica's driver since its last step."""

    pending: list[Request] = field(default_factory=list)
    imports: list[Request] = field(default_factory=list)
    aborts: list[int] = field(default_factory=list)
    exchange: ExchangeConfig | None = None
    stop: bool = False

    def take(self, frame: ToWorker) -> None:
        from hexgen.engine.replica import Request

        if isinstance(frame, GenerateFrame):
            self.pending.append(Request(frame.id, list(frame.tokens), frame.sampling, dst=frame.dst))
        elif isinstance(frame, ImportFrame):
            self.imports.append(Request(frame.id, list(frame.tokens), frame.sampling, src=frame.src))
        elif isinstance(frame, AbortFrame):
            self.aborts.append(frame.id)
        elif isinstance(frame, ExchangeFrame):
            self.imports.clear()  # routed under the old epoch: their entries re-submit them
            self.exchange = exchange_from(frame.exchange)
        elif isinstance(frame, ShutdownFrame):
            self.stop = True

    @property
    def requests(self) -> bool:
        return bool(self.pending or self.imports)

    @property
    def empty(self) -> bool:
        return not (self.pending or self.imports or self.aborts or self.exchange or self.stop)


def report(channel: Channel, worker: ReplicaWorker, result: StepResult) -> None:
    """A driver's step, told to the daemon in one write: a ``step`` frame with every token it sampled, then
    refused imports and hand-offs. O(sequences in the step)."""
    finished = {s.seq_id: s.finish_reason for s in result.finished}
    frames: list[Any] = []
    if result.sampled:
        tokens = tuple(TokenFrame(seq_id, token, finished.get(seq_id)) for seq_id, token in result.sampled)
        frames.append(StepFrame(tokens).to_wire())
    # imports refused here (a KV format mismatch) or whose KV was lost: the request fails
    frames.extend(ErrorFrame(seq_id, why).to_wire() for seq_id, why in result.failed)
    refused = worker.refusals(result.handed_off)
    for seq in result.handed_off:
        frame = ErrorFrame(seq.seq_id, refused[seq.seq_id]) if seq.seq_id in refused else None
        frames.append((frame or HandoffFrame(seq.seq_id, tuple(seq.token_ids))).to_wire())
    if frames:
        channel.send_all(frames)


def run_steps(channel: Channel, worker: ReplicaWorker, kv: Wake | None = None) -> None:
    """Step the replica until its driver says stop. The driver takes the daemon's frames between steps;
    followers wait inside the step's first collective. An idle driver also wakes when ``kv`` (its KV
    channel) settles a message, so a relayed KV is taken as it arrives."""
    inbox = Inbox()
    idle_since = time.monotonic()
    # a daemon thread: it ends with the process, and a send on the closed channel ends it sooner
    liveness = Liveness(channel, lambda: worker.receiving_kv).start() if worker.is_driver else None
    while True:
        if worker.is_driver:
            idle = not inbox.requests and not worker.scheduler.has_unfinished()
            for raw in channel.poll(IDLE_POLL_S if idle else 0.0, kv if worker.pending_imports else None):
                inbox.take(frame_to_worker(raw))
            if liveness is not None:  # a request waiting in the queue, or for its relayed KV, is taken, not stuck
                liveness.busy = inbox.requests or worker.scheduler.has_unfinished() or worker.pending_imports
            # Followers wait inside a collective; an empty step now and then keeps it from timing out. A relayed
            # KV on its way is looked for when the driver's part of it arrives, and every IDLE_POLL_S for the
            # followers' parts.
            if idle and inbox.empty and not worker.pending_imports and time.monotonic() - idle_since < KEEPALIVE_S:
                continue
            idle_since = time.monotonic()
        result = worker.step(
            inbox.pending, inbox.aborts, stop=inbox.stop, imports=inbox.imports, exchange=inbox.exchange
        )
        inbox = Inbox()
        if result is None:
            return
        if worker.is_driver:
            report(channel, worker, result)
        if result.handed_off:
            for seq_id, why in worker.export_routed(result.handed_off):
                # its hand-off went out already: the decode side's refusal or timeout has the entry re-submit it
                print(f"hexgen-worker: the KV of request {seq_id} was not handed off: {why}", file=sys.stderr)


def serve(channel: Channel, kv_fd: int | None = None) -> None:
    relay = None
    if kv_fd is not None:
        from hexgen.daemon.kv_channel import KvChannel  # torch

        relay = KvChannel(socket.socket(fileno=kv_fd))
    started = start(channel, relay)
    if started is not None:
        worker, _world_store = started  # the store outlives the world while the replica steps
        run_steps(channel, worker, relay)
        leave_worlds()


def leave_worlds() -> None:
    """Tear the process groups down before the interpreter does: left to exit, torch's destructors can
    abort the process (SIGABRT) while a peer's connections close."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def exit_with_parent(interval_s: float = 0.5) -> None:
    """End this process when the daemon that started it is gone, even while torch blocks the main thread
    (forming a world can wait minutes for peers that will never come)."""
    parent = int(os.environ.get(PARENT_ENV, os.getppid()))

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _expected(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the worlds the worker runs in, reported in one line."""
    from hexgen.engine.formation import WorldFormationError
    from hexgen.engine.kv_format import KVFormatError
    from hexgen.engine.kv_transfer import KVTransferError

    return isinstance(exc, WorldFormationError | KVTransferError | KVFormatError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hexgen-worker", description="hexgen engine worker (started by the daemon)")
    ipc = parser.add_mutually_exclusive_group(required=True)
    ipc.add_argument("--ipc", metavar="PATH", help="the daemon's unix socket for this worker")
    ipc.add_argument("--ipc-fd", type=int, metavar="FD", help="this worker's end of a socket pair with the daemon")
    parser.add_argument("--kv-fd", type=int, metavar="FD", help="its end of a socket pair for relayed KV")
    args = parser.parse_args(argv)
    exit_with_parent()
    try:
        if args.ipc_fd is not None:
            sock = socket.socket(fileno=args.ipc_fd)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(args.ipc)
    except OSError as exc:
        print(f"hexgen-worker: error: cannot reach the daemon at {args.ipc or args.ipc_fd}: {exc}", file=sys.stderr)
        return 2
    channel = Channel(sock)
    try:
        serve(channel, args.kv_fd)
    except EOFError:
        return 0
    except Exception as exc:  # noqa: BLE001 - the process's top level: any failure ends it with a message
        if not _expected(exc):
            traceback.print_exc()
            return 1
        # a world or exchange that broke, a KV that did not arrive: the cause, not a traceback
        print(f"hexgen-worker: error: {exc}", file=sys.stderr)
        return 1
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
