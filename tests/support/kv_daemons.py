"""Stand-in daemons for the KV relay's worker end: threads that do with KV parts what ``daemon.kv_relay`` does
(route each to the channel of the rank it names), so engine tests can drive relayed exchanges in one process,
or ranks in processes of their own; a tag can be held back, as a slow link would, and released."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

from hexgen.daemon.kv_channel import KvChannel
from hexgen.daemon.kv_frames import KvPart


class StandInDaemons:
    """``channels[rank]`` is rank ``rank``'s worker end; every part a rank writes is written to the channel of
    the rank it names, unless its tag is held (then once released)."""

    def __init__(self, ranks: int, keep_s: float = 300.0) -> None:
        pairs = [socket.socketpair() for _ in range(ranks)]
        self.daemon_ends = {rank: ours for rank, (ours, _) in enumerate(pairs)}
        self.channels = [KvChannel(theirs, keep_s) for _, theirs in pairs]
        self.lock = threading.Lock()
        self.held: dict[int, list[tuple[int, bytes]]] = {}
        self.dropped: Callable[[int], None] | None = None
        for end in self.daemon_ends.values():
            threading.Thread(target=self._route, args=(end,), daemon=True).start()

    @classmethod
    def for_processes(
        cls, ranks: int, timeout_s: float, dropped: Callable[[int], None] | None = None
    ) -> tuple[StandInDaemons, int]:
        """Stand-ins for the worker ends of ``ranks`` ranks in other processes, and the port each connects to
        (``connect``) within ``timeout_s``. A part for a rank not connected yet is dropped, as a daemon drops
        what it cannot deliver yet, and ``dropped`` hears that rank."""
        self = cls.__new__(cls)
        self.channels = []
        self.lock = threading.Lock()
        self.held = {}
        self.daemon_ends = {}
        self.dropped = dropped
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(timeout_s)

        def accept() -> None:
            with listener, contextlib.suppress(OSError):
                while len(self.daemon_ends) < ranks:
                    end, _ = listener.accept()
                    end.settimeout(None)
                    rank = int.from_bytes(end.recv(4, socket.MSG_WAITALL), "big")
                    with self.lock:
                        self.daemon_ends[rank] = end
                    threading.Thread(target=self._route, args=(end,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return self, listener.getsockname()[1]

    def hold(self, tag: int) -> None:
        with self.lock:
            self.held.setdefault(tag, [])

    def release(self, tag: int) -> None:
        with self.lock:
            for dst, frame in self.held.pop(tag, []):
                self.daemon_ends[dst].sendall(frame)

    def _route(self, end: socket.socket) -> None:
        reader = b""
        with contextlib.suppress(OSError):  # closed under the recv by ``close``
            while chunk := end.recv(1 << 20):
                reader += chunk
                while len(reader) >= 4 and len(reader) >= 4 + (size := int.from_bytes(reader[:4], "big")):
                    frame, reader = reader[: 4 + size], reader[4 + size :]
                    self._forward(KvPart.from_frame(frame), frame)

    def _forward(self, part: KvPart, frame: bytes) -> None:
        with self.lock:
            if part.tag in self.held:
                self.held[part.tag].append((part.dst, frame))
            elif part.dst not in self.daemon_ends:
                if self.dropped is not None:
                    self.dropped(part.dst)
            else:
                self.daemon_ends[part.dst].sendall(frame)

    def close(self) -> None:
        for sock in list(self.daemon_ends.values()):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the routing thread's recv, as a daemon's exit would
            sock.close()


def connect(port: int, rank: int) -> KvChannel:
    """Rank ``rank``'s worker end of ``StandInDaemons.for_processes``."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(rank.to_bytes(4, "big"))
    return KvChannel(sock)
