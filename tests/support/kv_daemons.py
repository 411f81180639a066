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
        self.daemon_ends = [ours for ours, _ in pairs]
        self.channels = [KvChannel(theirs, keep_s) for _, theirs in pairs]
        self.lock = threading.Lock()
        self.held: dict[int, list[tuple[int, bytes]]] = {}
        for end in self.daemon_ends:
            threading.Thread(target=self._route, args=(end,), daemon=True).start()

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
            else:
                self.daemon_ends[part.dst].sendall(frame)

    def close(self) -> None:
        for sock in self.daemon_ends:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the routing thread's recv, as a daemon's exit would
            sock.close()
