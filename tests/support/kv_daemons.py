"""Stand-in daemons for the KV relay's worker end: threads that do with KV parts what ``daemon.kv_relay`` does
(route each to the channel of the rank it names), so engine tests can drive relayed exchanges in one process;
a tag can be held back, as a slow link would, and released."""

from __future__ import annotations

import contextlib
import socket
import threading

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
        for end in self.daemon_ends.values():
            threading.Thread(target=self._route, args=(end,), daemon=True).start()

    @classmethod
    def for_processes(cls, ranks: int, timeout_s: float) -> tuple[StandInDaemons, int]:
        """Stand-ins for the worker ends of ``ranks`` ranks in other processes, and the port each connects to
        (``connect``); parts wait for every rank to connect, up to ``timeout_s``."""
        self = cls.__new__(cls)
        self.channels = []
        self.lock = threading.Lock()
        self.held = {}
        self.daemon_ends = {}
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(timeout_s)
        connected = threading.Event()

        def accept() -> None:
            with listener, contextlib.suppress(OSError):
                while len(self.daemon_ends) < ranks:
                    end, _ = listener.accept()
                    end.settimeout(None)
                    self.daemon_ends[int.from_bytes(end.recv(4, socket.MSG_WAITALL), "big")] = end
                    threading.Thread(target=self._route, args=(end, connected, timeout_s), daemon=True).start()
            connected.set()

        threading.Thread(target=accept, daemon=True).start()
        return self, listener.getsockname()[1]

    def hold(self, tag: int) -> None:
        with self.lock:
            self.held.setdefault(tag, [])

    def release(self, tag: int) -> None:
        with self.lock:
            for dst, frame in self.held.pop(tag, []):
                self.daemon_ends[dst].sendall(frame)

    def _route(self, end: socket.socket, connected: threading.Event | None = None, timeout_s: float = 0.0) -> None:
        reader = b""
        with contextlib.suppress(OSError):  # closed under the recv by ``close``
            while chunk := end.recv(1 << 20):
                if connected is not None and not connected.wait(timeout_s):
                    return
                reader += chunk
                while len(reader) >= 4 and len(reader) >= 4 + (size := int.from_bytes(reader[:4], "big")):
                    frame, reader = reader[: 4 + size], reader[4 + size :]
                    self._forward(KvPart.from_frame(frame), frame)

    def _forward(self, part: KvPart, frame: bytes) -> None:
        with self.lock:
            if part.tag in self.held:
                self.held[part.tag].append((part.dst, frame))
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
