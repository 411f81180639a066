"""A worker's own KV links: sealed TCP connections (``daemon.kv_link``) that its daemon set up with another
daemon and handed over (``KvLinkGrant``), so the messages of one route go from worker to worker as sealed
records, with neither daemon reading, sealing or writing their bytes.

Blocking sockets in the worker's threads: the sending end in the thread that sends (a full link holds it back
as a full daemon socket would), the receiving end in a thread of its own per link. An unacknowledged write
fails the link after USER_TIMEOUT_S instead of waiting on a connection that silently died.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from hexgen.daemon.kv_frames import Key, KvPart, Route, from_daemon
from hexgen.daemon.sealed import LENGTH_BYTES, Opener, Sealer, SealError
from hexgen.daemon.wire import FrameError

log = logging.getLogger("hexgen.worker")

USER_TIMEOUT_S = 20.0


def _held(sock: socket.socket) -> socket.socket:
    sock.setblocking(True)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(USER_TIMEOUT_S * 1000))
    return sock


class LinkWriter:
    """The sending end of a worker's link: each part's frame goes as one sealed record."""

    def __init__(self, sock: socket.socket, key: bytes, route: Route) -> None:
        self.sock = _held(sock)
        self.route = route
        self._sealer = Sealer(key)
        self._plain = bytearray()

    def write(self, head: bytes, data: memoryview) -> None:
        """Seal the frame ``head`` + ``data`` and send it; raises OSError when the link broke."""
        size = len(head) + len(data)
        if len(self._plain) < size:
            self._plain = bytearray(size)
        plain = memoryview(self._plain)[:size]
        plain[: len(head)] = head
        plain[len(head) :] = data
        self.sock.sendall(self._sealer.seal(plain))

    def close(self) -> None:
        self.sock.close()


def serve_link(
    sock: socket.socket,
    key: bytes,
    route: Route,
    file: Callable[[KvPart], None],
    lose: Callable[[list[Key], str], None],
) -> None:
    """File every part the link brings until it ends, then ``lose`` the messages it began but did not finish
    (their parts travel in order on it). A record that does not open, or a part of another route, ends it."""
    opener = Opener(key)
    begun: set[Key] = set()
    why = "the link it came on ended"
    _held(sock)
    try:
        while (plain := _read_record(sock, opener)) is not None:
            part = from_daemon(plain)
            if not isinstance(part, KvPart) or part.route != route:
                raise SealError(f"a link for {route} brought something else")
            file(part)
            if part.part + 1 < part.parts:
                begun.add(part.key)
            else:
                begun.discard(part.key)
    except (OSError, SealError, FrameError) as exc:
        why = f"the link it came on broke: {exc or type(exc).__name__}"
        log.info("the KV link of %s ended: %s", route, why)
    finally:
        sock.close()
        if begun:
            lose(sorted(begun), why)


def _read_record(sock: socket.socket, opener: Opener) -> memoryview | None:
    head = bytearray(LENGTH_BYTES)
    got = _read_into(sock, memoryview(head))
    if got == 0:
        return None
    if got < LENGTH_BYTES:
        raise SealError("the link ended inside a record's length")
    sealed = opener.sealed_buffer(opener.length(head))
    if _read_into(sock, sealed) < len(sealed):
        raise SealError("the link ended inside a record")
    return opener.open(sealed)


def _read_into(sock: socket.socket, view: memoryview) -> int:
    got = 0
    while got < len(view):
        count = sock.recv_into(view[got:])
        if count == 0:
            break
        got += count
    return got
