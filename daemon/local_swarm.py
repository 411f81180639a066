"""A swarm of daemons on this machine's loopback, each a separate ``hexgen-node join`` process.

Each daemon runs in a session of its own, so stopping the swarm reaches its workers too: SIGTERM to the
daemon (it leaves the swarm and stops its workers), then SIGKILL to whatever is left of its process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

STOP_GRACE_S = 10.0


class LocalSwarmError(RuntimeError):
    """A daemon of the local swarm did not start; the message says which and ends with its log."""


@dataclass
class LocalDaemon:
    name: str
    process: trio.Process
    log_path: Path
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)
    http: str | None = None  # the gateway's URL when started with --http

    @property
    def addr(self) -> str:
        return self.addrs[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.asynccontextmanager
async def local_swarm(
    root: Path,
    model: str,
    gpus: Sequence[str],
    *,
    extra: Sequence[str] = (),
    first_extra: Sequence[str] = (),
    ready_timeout: float = 120.0,
) -> AsyncIterator[list[LocalDaemon]]:
    """Start one daemon per entry of ``gpus`` (a ``--simulate-gpu`` value), the first as everyone's bootstrap
    peer; yields them once each printed its ready line, and stops them all on exit, however it exits.
    ``extra`` flags go to every daemon, ``first_extra`` to the first only (e.g. ``--http 0``)."""
    daemons: list[LocalDaemon] = []
    try:
        for i, gpu in enumerate(gpus):
            flags = ["--bootstrap", daemons[0].addr] if daemons else list(first_extra)
            await _start(daemons, root, f"node{i}", model, gpu, [*flags, *extra], ready_timeout)
        yield daemons
    finally:
        with trio.CancelScope(shield=True):
            await stop(daemons)


async def _start(
    daemons: list[LocalDaemon], root: Path, name: str, model: str, gpu: str, extra: list[str], ready_s: float
) -> None:
    args = [sys.executable, "-m", "hexgen.cli.node", "join", "--listen", "127.0.0.1:0", "--simulate-gpu", gpu]
    args += ["--model", model, "--key-file", str(root / f"{name}.key"), "--host-name", name, *extra]
    log_path = root / f"{name}.log"
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, start_new_session=True
        )
    daemon = LocalDaemon(name, process, log_path)
    daemons.append(daemon)
    line = b""
    with trio.move_on_after(ready_s):
        assert process.stdout is not None
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                break
            line += chunk
    try:
        event = json.loads(line)
        daemon.peer_id, daemon.addrs = str(event["peer_id"]), list(event["addrs"])
        daemon.http = event.get("http")
    except (ValueError, KeyError, TypeError):
        tail = daemon.log().strip().splitlines()[-1:] or ["(no output)"]
        raise LocalSwarmError(f"daemon {name} did not start: {tail[0]}") from None


async def stop(daemons: Sequence[LocalDaemon], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every daemon, wait up to ``grace_s`` for all, then SIGKILL each one's whole process group."""
    for daemon in daemons:
        if daemon.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                daemon.process.send_signal(signal.SIGTERM)
    with trio.move_on_after(grace_s):
        for daemon in daemons:
            await daemon.process.wait()
    for daemon in daemons:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(daemon.process.pid, signal.SIGKILL)
        await daemon.process.wait()
        if daemon.process.stdout is not None:
            with contextlib.suppress(Exception):
                await daemon.process.stdout.aclose()
