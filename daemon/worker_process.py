"""The engine worker process: hosts one rank of a replica and talks to its daemon over a unix socket.

Run as ``python -m hexgen.daemon.worker_process --ipc-fd FD`` (the worker's end of a socket pair the daemon made)
or ``--ipc PATH`` (a unix socket the daemon listens on). The daemon sends length-prefixed msgpack frames
(``daemon.wire``): ``configure`` (this rank's replica, the store of the replica's own world, the address its
daemon advertises, whose interface gloo and NCCL bind to, and the epoch's exchange group over which KV moves between replicas, when there is one); then, to a
replica's driver only: ``exchange`` (a later epoch's exchange group, for a replica that carries on across
epochs), ``generate`` (a new request; ``dst`` names the decode replica a prefill replica hands it to),
``import`` (a request prefilled on replica ``src``, whose KV every rank then receives) and ``abort``;
``shutdown`` ends the worker. While it loads, a worker configured with ``progress`` sends ``progress``
frames (bytes of weights loaded of the total). The worker answers ``ready`` or ``failed`` once: ``ready``
only once its world and the epoch's exchange group formed (so it can hand KV to every replica the plan links
it with), ``failed`` with the cause when either could not (``daemon.failure.WorldFailure``: which world, and
the address that could not be reached). Then it streams ``token`` frames (with ``finished``), from a prefill
replica ``handoff`` frames (prompt and first token) just before the KV goes out, ``error`` frames for a
request it refuses (a KV format mismatch), and, every rank of a replica moved to a later epoch's exchange
group, one ``exchange`` frame saying whether that group (its ``prefix``) formed. torch stays in this
process: the daemon's trio loop never waits on a GPU step.
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
from datetime import timedelta
from typing import Any

from hexgen.daemon.failure import WorldFailure
from hexgen.daemon.interfaces import pin_interfaces
from hexgen.daemon.wire import MAX_FRAME, MalformedFrame, decode_payload, encode_frame
from hexgen.engine.bounds import CONNECT_TIMEOUT_S

IDLE_POLL_S = 0.05
PARENT_ENV = "HEXGEN_DAEMON_PID"  # set by the daemon, so a worker whose daemon died before it looked still sees it
KEEPALIVE_S = 10.0
ALIVE_EVERY_S = 1.0  # how often a driver with work in hand says it still steps (engine steps can be long)
PROGRESS_EVERY_S = 1.0
OPERATION_TIMEOUT_S = 120.0


class Channel:
    """Blocking frames over a connected unix socket, with a non-blocking poll for the step loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.lock = threading.Lock()  # the exchange-joining thread reports on this channel too

    def send(self, obj: Any) -> None:
        with self.lock:
            self.sock.sendall(encode_frame(obj))

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

    def poll(self, timeout: float) -> list[Any]:
        """Every complete frame that arrives within ``timeout`` seconds (none: an empty list)."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if ready:
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
        except BaseException as exc:
            self.outcome.append((False, exc))

    def result(self) -> Any:
        self.thread.join()
        ok, value = self.outcome[0]
        if not ok:
            raise value
        return value


def spec_from(raw: dict[str, Any]) -> Any:
    from hexgen.engine.layout import StageLayout
    from hexgen.engine.model_runner import CacheConfig
    from hexgen.engine.replica import ReplicaSpec

    layout = tuple(StageLayout(int(a), int(b), int(tp)) for a, b, tp in raw["layout"])
    cache = CacheConfig(**raw.get("cache", {}))
    return ReplicaSpec(
        str(raw["model_dir"]),
        layout,
        first_rank=int(raw.get("first_rank", 0)),
        mode=str(raw.get("mode", "colocated")),
        dtype=str(raw.get("dtype", "auto")),
        device=str(raw.get("device", "cpu")),
        cache=cache,
    )


def exchange_from(raw: dict[str, Any]) -> Any:
    from hexgen.engine.replica import ExchangeConfig

    host, port = raw["store"]
    peers = tuple(spec_from(r) for r in raw["replicas"])
    prefix, first_rank, size = str(raw["prefix"]), int(raw["first_rank"]), int(raw["size"])
    connect = float(raw.get("connect_timeout_s", CONNECT_TIMEOUT_S))
    return ExchangeConfig(
        str(host), int(port), prefix, first_rank, size, peers, secret=_secret(raw), connect_timeout_s=connect
    )


def _secret(raw: dict[str, Any]) -> bytes | None:
    """The world's store secret (hex in the frame); only worlds started without a daemon have none."""
    return bytes.fromhex(raw["secret"]) if raw.get("secret") is not None else None


def _join(config: dict[str, Any], progress: Any = None) -> tuple[Any, Any]:
    """The replica worker of ``config`` in its world, and the world's store (None for a tcp:// world).
    ``progress(done, total)`` hears the bytes of weights loaded."""
    import torch

    from hexgen.engine.device import pin_device
    from hexgen.engine.formation import CONNECT_GRACE_S, bounded, connecting
    from hexgen.engine.replica import (
        ReplicaWorker,
        init_world,
        init_world_store,
        join_exchange,
        replica_groups,
        replica_kv_format,
        settle_world,
    )

    torch.set_num_threads(int(config.get("threads", 1)))
    spec = spec_from(config["replica"])
    spec = dataclasses.replace(spec, first_rank=0, device=str(config.get("device", spec.device)))
    pin_device(spec.device)  # before any CUDA work or NCCL group: ranks must not pile onto cuda:0
    rank, size, backend = int(config["rank"]), int(config["world_size"]), str(config.get("backend", "gloo"))
    store_host = str(config["store"][0]) if "store" in config else "127.0.0.1"
    pin_interfaces(str(config.get("advertised") or store_host), store_host)  # before any group forms
    connect_s = float(config.get("connect_timeout_s", CONNECT_TIMEOUT_S))
    # Ready means able to hand KV on: every rank of every replica of the epoch joins this group, in a thread
    # from the start, so ranks meet there as soon as they run (not after loading weights, which can take
    # minutes) and a group that cannot connect is known while the model loads.
    exchange = None
    if config.get("exchange"):
        # the KV format goes out as the group forms: a peer ready before this rank loads reads it at once
        exchange = Background(join_exchange, exchange_from(config["exchange"]), rank, replica_kv_format(spec))
    store = None
    if "store" in config:
        host, port = config["store"]
        prefix = str(config.get("prefix", ""))
        store = init_world_store(
            rank,
            size,
            str(host),
            int(port),
            prefix,
            backend,
            secret=_secret(config),
            connect_timeout_s=connect_s,
            device=spec.device,
        )
        with connecting("replica world"):
            groups = bounded(
                lambda: replica_groups([spec], timedelta(seconds=connect_s)),
                connect_s + CONNECT_GRACE_S,
                "replica world",
            )
        settle_world(groups, OPERATION_TIMEOUT_S)
    else:
        init_world(rank, size, int(config["port"]), backend, device=spec.device)
        groups = replica_groups([spec])
    worker = ReplicaWorker(spec, rank, groups, progress=abort_on_failure(exchange, progress))
    if exchange is not None:
        worker.adopt_exchange(exchange.result())  # raises the group's WorldFormationError
    return worker, store


def abort_on_failure(exchange: Background | None, progress: Any = None) -> Any:
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
            self.channel.send({"op": "alive"})

    def _run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                self.tick()
            except OSError:  # the daemon is gone: the step loop finds out too
                return


def progress_reporter(channel: Channel, every_s: float | None = None) -> Any:
    """A loader callback sending ``progress`` frames (bytes loaded of the total) at most every ``every_s``,
    and always the last one: the daemon moves this worker's start deadline while they arrive."""
    every = PROGRESS_EVERY_S if every_s is None else every_s
    last = [-float("inf")]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= every:
            last[0] = now
            channel.send({"op": "progress", "done": int(done), "total": int(total)})

    return report


def failure_frame(exc: BaseException) -> dict[str, Any]:
    """The ``failed`` frame for ``exc``, with the cause when a world could not form."""
    from hexgen.engine.formation import WorldFormationError

    frame: dict[str, Any] = {"op": "failed", "error": f"{type(exc).__name__}: {exc}"}
    if isinstance(exc, WorldFormationError):
        frame["cause"] = WorldFailure(exc.world, exc.stage, exc.remote).to_dict()
        frame["error"] = str(exc)
    return frame


def serve(channel: Channel) -> None:
    from hexgen.engine.replica import Request
    from hexgen.engine.sequence import SamplingParams

    config = channel.receive()
    if not isinstance(config, dict) or config.get("op") != "configure":
        channel.send({"op": "failed", "error": "the first frame must be configure"})
        return
    try:
        report = progress_reporter(channel) if config.get("progress") else None  # the daemon asks for them
        worker, _world_store = _join(config, report)  # the store outlives the world while serve runs
    except Exception as exc:
        channel.send(failure_frame(exc))
        return
    channel.send(
        {"op": "ready", "rank": worker.rank, "driver": worker.is_driver, "blocks": worker.block_manager.num_blocks}
    )

    def exchanged(prefix: str, outcome: BaseException | None) -> None:
        frame = {"op": "exchange", "formed": True} if outcome is None else failure_frame(outcome) | {"op": "exchange"}
        frame["prefix"] = prefix
        with contextlib.suppress(OSError):
            channel.send(frame)

    worker.on_exchange = exchanged
    pending: list[Any] = []
    imports: list[Any] = []
    aborts: list[int] = []
    exchange = None
    stop = False
    idle_since = time.monotonic()
    # a daemon thread: it ends with the process, and a send on the closed channel ends it sooner
    liveness = Liveness(channel, lambda: worker.receiving_kv).start() if worker.is_driver else None
    while True:
        if worker.is_driver:
            idle = not pending and not imports and not worker.scheduler.has_unfinished()
            for frame in channel.poll(IDLE_POLL_S if idle else 0.0):
                op = frame.get("op") if isinstance(frame, dict) else None
                if op in ("generate", "import"):
                    fields = dict(frame.get("sampling", {}))
                    fields["stop_token_ids"] = tuple(fields.get("stop_token_ids", ()))
                    sampling = SamplingParams(**fields)
                    tokens = [int(t) for t in frame["tokens"]]
                    if op == "generate":
                        pending.append(Request(int(frame["id"]), tokens, sampling, dst=int(frame.get("dst", -1))))
                    else:
                        imports.append(Request(int(frame["id"]), tokens, sampling, src=int(frame["src"])))
                elif op == "abort":
                    aborts.append(int(frame["id"]))
                elif op == "exchange":
                    imports.clear()  # routed under the old epoch: their entries re-submit them
                    exchange = exchange_from(frame["exchange"])
                elif op == "shutdown":
                    stop = True
            if liveness is not None:  # a request waiting in the queue is taken, not stuck
                liveness.busy = bool(pending or imports or worker.scheduler.has_unfinished())
            # Followers wait inside a collective; an empty step now and then keeps it from timing out.
            busy = pending or imports or aborts or exchange or stop
            if idle and not busy and time.monotonic() - idle_since < KEEPALIVE_S:
                continue
            idle_since = time.monotonic()
        result = worker.step(pending, aborts, stop=stop, imports=imports, exchange=exchange)
        pending, imports, aborts, exchange = [], [], [], None
        if result is None:
            return
        if worker.is_driver:
            finished = {s.seq_id: s.finish_reason for s in result.finished}
            for seq_id, token in result.sampled:
                channel.send({"op": "token", "id": seq_id, "token": token, "finished": finished.get(seq_id)})
            for seq_id, why in result.failed:  # imports refused here (a KV format mismatch): the request fails
                channel.send({"op": "error", "id": seq_id, "error": why})
            refused = worker.refusals(result.handed_off)
            for seq in result.handed_off:
                if seq.seq_id in refused:
                    channel.send({"op": "error", "id": seq.seq_id, "error": refused[seq.seq_id]})
                else:
                    channel.send({"op": "handoff", "id": seq.seq_id, "tokens": list(seq.token_ids)})
        if result.handed_off:
            worker.export_routed(result.handed_off)


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
        serve(channel)
    except EOFError:
        return 0
    except Exception as exc:
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
