"""The daemon's end of one worker process: the process, its socket pair, its state, and how it starts and stops.

A worker runs ``python -m hexgen.daemon.worker_process --ipc-fd FD --kv-fd FD`` on its ends of two socket
pairs, one for frames and one for relayed KV parts (nothing on the filesystem to collide or to outlive a
crash, and a worker that dies before it answers is an end of file at once); typed frames
(``daemon.worker_frames``) go both ways.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import trio

from hexgen.daemon.deployment import Replica
from hexgen.daemon.failure import WorldFailure
from hexgen.daemon.wire import FrameError, FrameReader, encode_frame
from hexgen.daemon.worker_frames import ShutdownFrame, ToWorker
from hexgen.daemon.worker_process import PARENT_ENV

STOP_TIMEOUT_S = 5.0


class ReplicaUnavailable(Exception):
    """The replica is not served here (not local, not ready, or failed); the request may be re-submitted."""


class WorkerFailed(RuntimeError):
    """A worker failed; ``cause`` says which world could not form, when that was why."""

    def __init__(self, message: str, cause: WorldFailure | None = None) -> None:
        super().__init__(message)
        self.cause = cause


# What telling a worker something can raise: no channel yet, or the channel broke or closed under the send.
SEND_ERRORS = (ReplicaUnavailable, OSError, FrameError, trio.BrokenResourceError, trio.ClosedResourceError)


class SocketChannel:
    """trio's SocketStream with the ``read``/``write`` the frame helpers expect."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def read(self, n: int | None = None) -> bytes:
        return await self.stream.receive_some(n)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)


@dataclass
class LocalWorker:
    """The worker of ``layout_rank`` of ``replica`` on this daemon."""

    replica: Replica
    layout_rank: int
    formed: int  # the epoch whose plan first placed this replica here: its world's store prefix
    process: trio.Process | None = None
    channel: SocketChannel | None = None
    kv: SocketChannel | None = None  # relayed KV parts both ways (``daemon.kv_relay``)
    kv_lock: trio.Lock = field(default_factory=trio.Lock)
    spawned: trio.Event = field(default_factory=trio.Event)
    ready: trio.Event = field(default_factory=trio.Event)
    stopped: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    error: str | None = None
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    # a kept worker moving to a new epoch's exchange group, until it says the group formed
    joining: bool = False
    bridge: str = ""  # what its replica's stages say to each other travels under (``deployment.bridge_prefix``)
    _reader: FrameReader | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        """This worker's rank in the current epoch's exchange numbering."""
        return self.replica.first_rank + self.layout_rank

    @property
    def slot(self) -> tuple[Any, int]:
        return self.replica.key, self.layout_rank

    @property
    def is_driver(self) -> bool:
        return self.layout_rank == self.replica.driver_layout_rank

    @property
    def state(self) -> str:
        if self.error:
            return "failed"
        if self.joining:
            return "joining"
        return "ready" if self.ready.is_set() else "starting"

    async def send(self, frame: ToWorker) -> None:
        """Raises one of SEND_ERRORS when the worker cannot be told."""
        if self.channel is None:
            raise ReplicaUnavailable(f"worker of rank {self.rank} has no channel")
        async with self.send_lock:
            await self.channel.write(encode_frame(frame.to_wire()))

    def reader(self) -> FrameReader:
        """The one reader of the worker's frames (it keeps bytes that arrived early for the next frame)."""
        if self.channel is None:
            raise ReplicaUnavailable(f"worker of rank {self.rank} has no channel")
        if self._reader is None:
            self._reader = FrameReader(self.channel)
        return self._reader

    async def start(self, threads: int) -> None:
        """Start the worker's process on a new socket pair (``process`` and ``channel`` are set)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        kv_ours, kv_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = (theirs.fileno(), kv_theirs.fileno())
        command = [
            sys.executable,
            "-m",
            "hexgen.daemon.worker_process",
            "--ipc-fd",
            str(fds[0]),
            "--kv-fd",
            str(fds[1]),
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), PARENT_ENV: str(os.getpid())}
        try:
            self.process = await trio.lowlevel.open_process(command, env=env, stdin=subprocess.DEVNULL, pass_fds=fds)
        except BaseException:
            ours.close()
            kv_ours.close()
            raise
        finally:
            theirs.close()
            kv_theirs.close()
        self.channel = SocketChannel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        self.kv = SocketChannel(trio.SocketStream(trio.socket.from_stdlib_socket(kv_ours)))
        self.spawned.set()

    async def stop(self) -> None:
        """A ready driver is asked to stop its replica in step; anything else (a worker still forming its
        world, or a follower whose driver is gone) is killed at once. Then the channel closes."""
        process = self.process
        if process is not None:
            if process.returncode is None and self.ready.is_set() and self.error is None:
                if self.is_driver:
                    with contextlib.suppress(*SEND_ERRORS):
                        await self.send(ShutdownFrame())
                with trio.move_on_after(STOP_TIMEOUT_S):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        for channel in (self.channel, self.kv):
            if channel is not None:
                await channel.stream.aclose()
