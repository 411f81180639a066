"""Real daemons as separate processes on loopback, and a libp2p client that watches them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from hexgen.daemon import swarm_view
from hexgen.daemon.host import Host, new_identity, open_host
from hexgen.daemon.rpc import query_status

READY_TIMEOUT_S = 60.0


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen
    log_path: Path
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)
    http: str | None = None  # the gateway's URL when started with --http

    @property
    def addr(self) -> str:
        return self.addrs[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float) -> tuple[int | None, str]:
        """The exit status (None if it still ran after ``timeout`` s: then it is killed) and the log."""
        try:
            status: int | None = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            status = None
        return status, self.log()


class Swarm:
    """Starts daemons under ``root`` and kills every one of them on ``close`` (tests call it in teardown)."""

    def __init__(self, root: Path, model: str = "llama-2-7b") -> None:
        self.root = root
        self.model = model
        self.daemons: list[Daemon] = []

    def start(
        self,
        name: str,
        *,
        bootstrap: list[str] | None = None,
        gpu: str = "A100",
        extra: list[str] | None = None,
        key: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Daemon:
        daemon = self.start_process(name, extra, bootstrap=bootstrap, gpu=gpu, key=key, env=env)
        proc = daemon.proc
        ready = _read_ready(proc, READY_TIMEOUT_S)
        if ready is None:
            raise RuntimeError(f"daemon {name} did not start:\n{daemon.log()[-3000:]}")
        daemon.peer_id, daemon.addrs, daemon.http = ready["peer_id"], ready["addrs"], ready.get("http")
        return daemon

    def start_process(
        self,
        name: str,
        extra: list[str] | None = None,
        *,
        bootstrap: list[str] | None = None,
        gpu: str = "A100",
        key: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Daemon:
        """Start a daemon without waiting for its ready line (for daemons expected to fail); ``key`` is its key
        file, by default one of its own."""
        key = key or self.root / f"{name}.key"
        args = [sys.executable, "-m", "hexgen.cli.node", "join", "--key-file", str(key), "--model", self.model]
        args += ["--listen", "127.0.0.1:0", "--simulate-gpu", gpu, "--host-name", name]
        for addr in bootstrap or []:
            args += ["--bootstrap", addr]
        args += extra or []
        log_path = self.root / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
            )
        daemon = Daemon(name, proc, log_path)
        self.daemons.append(daemon)
        return daemon

    def start_many(
        self, count: int, gpus: list[str] | None = None, prefix: str = "n", extra: list[str] | None = None
    ) -> list[Daemon]:
        first = self.start(f"{prefix}0", gpu=(gpus or ["A100"])[0], extra=extra)
        rest = [
            self.start(
                f"{prefix}{i}", bootstrap=[first.addr], gpu=(gpus or ["A100"])[i % len(gpus or ["A100"])], extra=extra
            )
            for i in range(1, count)
        ]
        return [first, *rest]

    def live(self) -> list[Daemon]:
        return [d for d in self.daemons if d.alive()]

    def kill(self, daemon: Daemon) -> None:
        daemon.proc.kill()
        daemon.proc.wait(timeout=10)

    def stop(self, daemon: Daemon, timeout: float = 10.0) -> int:
        daemon.proc.send_signal(signal.SIGTERM)
        return daemon.proc.wait(timeout=timeout)

    def close(self) -> None:
        for daemon in self.daemons:
            if daemon.alive():
                daemon.proc.kill()
            daemon.proc.wait(timeout=10)
            if daemon.proc.stdout:
                daemon.proc.stdout.close()


def _read_ready(proc: subprocess.Popen, timeout: float) -> dict[str, Any] | None:
    """The daemon's first stdout line (its ready event), read in a thread so the wait is bounded."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline().decode()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box or not box[0].strip():
        return None
    event = json.loads(box[0])
    return event if event.get("event") == "ready" else None


async def statuses(
    client: Host, daemons: list[Daemon], request: dict[str, Any] | None = None
) -> dict[str, dict[str, Any] | None]:
    """Each daemon's status (None where it did not answer), asked in parallel."""
    out: dict[str, dict[str, Any] | None] = {}

    async def ask(d: Daemon) -> None:
        try:
            with trio.fail_after(3.0):
                if d.peer_id not in client.connected_peers():
                    await client.connect(d.addr)
                out[d.peer_id] = await query_status(client, d.peer_id, request)
        except Exception:
            out[d.peer_id] = None

    async with trio.open_nursery() as nursery:
        for d in daemons:
            nursery.start_soon(ask, d)
    return out


async def wait_until(
    client: Host,
    daemons: list[Daemon],
    condition: Callable[[dict[str, dict[str, Any] | None]], bool],
    timeout: float,
    what: str,
    request: dict[str, Any] | None = None,
) -> tuple[dict[str, dict[str, Any] | None], float]:
    """Poll every daemon's status until ``condition`` holds; returns the statuses and the seconds it took."""
    start = time.monotonic()
    last: dict[str, dict[str, Any] | None] = {}
    with trio.move_on_after(timeout):
        while True:
            last = await statuses(client, daemons, request)
            if condition(last):
                return last, time.monotonic() - start
            await trio.sleep(0.1)
    summary = {pid[-6:]: _brief(s) for pid, s in last.items()}
    raise AssertionError(f"not {what} within {timeout} s: {summary}")


def _brief(status: dict[str, Any] | None) -> Any:
    if status is None:
        return None
    plan = status.get("plan") or {}
    return {
        "members": len(status["members"]),
        "coordinator": (status.get("coordinator") or "")[-6:],
        "term": status.get("term"),
        "epoch": plan.get("epoch"),
        "rejections": status.get("rejections"),
    }


def open_client(key_pair: Any = None) -> Any:
    return open_host(key_pair or new_identity())


Check = Callable[[dict[str, dict[str, Any] | None]], bool]
Wait = Callable[..., Awaitable[Any]]


def converged(ids: set[str]) -> Check:
    """Every daemon sees exactly ``ids``, agrees on one coordinator, and adopted one plan for ``ids``."""
    return lambda view: swarm_view.converged(view, ids)


def serving(ids: set[str]) -> Check:
    """Converged, and every daemon runs the adopted epoch's workers, all ready."""
    return lambda view: swarm_view.serving(view, ids)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` that kills the daemons runs (benchmarks use it)."""

    def interrupt(signum: int, frame: Any) -> None:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGINT)  # inside trio.run, trio's own handler unwinds it cleanly

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted(exc: BaseException) -> bool:
    """True when ``exc`` is, or groups, a KeyboardInterrupt."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(KeyboardInterrupt) is not None
    return isinstance(exc, KeyboardInterrupt)


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc's children lists)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = {int(c) for c in (task / "children").read_text().split()}
                todo.extend(children - found)
                found |= children
    return found


def zombie(pid: int) -> bool:
    """True for a process that has exited but was not reaped (or is gone)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True
