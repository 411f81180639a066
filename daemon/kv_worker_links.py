"""A worker's own KV links: sealed TCP connections (``daemon.kv_link``) that its daemon set up with another
daemon and handed over (``KvLinkGrant``), so the messages of one route go from worker to worker as sealed
records, with neither daemon reading, sealing or writing their bytes. A part is two records, its frame's head
and its data, so the data is sealed from the sender's tensor and opened into the receiver's message in place.

Blocking sockets in the worker's threads: the sending end in the thread that sends (a full link holds it back
as a full daemon socket would), the receiving end in a thread of its own per link. An unacknowledged write
fails the link after USER_TIMEOUT_S instead of waiting on a connection that silently died.
"""

from __future__ import annotations

import logging
import socket
from typing import Protocol

from hexgen.daemon.kv_frames import Key, KvPart, Route
from hexgen.daemon.sealed import LENGTH_BYTES, TAG_BYTES, Opener, Sealer, SealError
from hexgen.daemon.wire import FrameError

log = logging.getLogger("hexgen.worker")

USER_TIMEOUT_S = 20.0


def _held(sock: socket.socket) -> socket.socket:
    sock.setblocking(True)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(USER_TIMEOUT_S * 1000))
    return sock


class Filing(Protocol):
    """Where a link's parts go (a worker's ``KvChannel``)."""

    def place(self, part: KvPart) -> memoryview | None:
        """Where ``part``'s data belongs, claimed for this link until ``placed``; None: it is not wanted."""

    def placed(self, part: KvPart) -> None:
        """``part``'s data is in place."""

    def lose(self, keys: list[Key], why: str) -> None:
        """These messages will never be whole."""


class LinkWriter:
    """The sending end of a worker's link: each part goes as two sealed records, its frame's head and its data,
    so the data is sealed from where it lies and opened into where it belongs, with no copy on either side."""

    def __init__(self, sock: socket.socket, key: bytes, route: Route) -> None:
        self.sock = _held(sock)
        self.route = route
        self._sealer = Sealer(key)

    def write(self, head: bytes, data: memoryview) -> None:
        """Seal and send the frame ``head`` + ``data``; raises OSError when the link broke."""
        sealed_head = bytes(self._sealer.seal(head))
        _send_all(self.sock, [memoryview(sealed_head), self._sealer.seal(data)])

    def close(self) -> None:
        self.sock.close()


def _send_all(sock: socket.socket, buffers: list[memoryview]) -> None:
    while buffers:
        sent = sock.sendmsg(buffers)
        while buffers and sent >= len(buffers[0]):
            sent -= len(buffers[0])
            buffers.pop(0)
        if buffers:
            buffers[0] = buffers[0][sent:]


def serve_link(sock: socket.socket, key: bytes, route: Route, filing: Filing) -> None:
    """Place every part the link brings until it ends, then ``lose`` the messages it began but did not finish
    (their parts travel in order on it). A record that does not open, or a part of another route, ends it."""
    opener = Opener(key)
    begun: set[Key] = set()
    why = "the link it came on ended"
    _held(sock)
    try:
        while (found := _next_part(sock, opener, route)) is not None:
            part, sealed = found
            begun.add(part.key)
            slot = filing.place(part)
            if slot is None:
                opener.open(sealed)  # not wanted, yet it must open: the next record's nonce follows it
            else:
                opener.open_into(sealed, slot)
                filing.placed(part)
            if part.part + 1 == part.parts:
                begun.discard(part.key)
    except (OSError, SealError, FrameError) as exc:
        why = f"the link it came on broke: {str(exc) or type(exc).__name__}"
        log.info("the KV link of %s ended: %s", route, why)
    finally:
        sock.close()
        if begun:
            filing.lose(sorted(begun), why)


def _next_part(sock: socket.socket, opener: Opener, route: Route) -> tuple[KvPart, memoryview] | None:
    """The next part on the link, its head opened and checked, with its data record as it came (sealed; valid
    until the next record is read); the part's ``data`` is that record less its tag, not yet opened. None where
    the link ended between parts."""
    sealed = _read_sealed(sock, opener)
    if sealed is None:
        return None
    head = bytes(opener.open(sealed))
    sealed = _read_sealed(sock, opener)
    if sealed is None:
        raise SealError("the link ended between a part's head and its data")
    part = KvPart.from_head(head, sealed[: len(sealed) - TAG_BYTES])
    if part.route != route:
        raise SealError(f"a link for {route} brought a part of {part.route}")
    return part, sealed


def _read_sealed(sock: socket.socket, opener: Opener) -> memoryview | None:
    head = bytearray(LENGTH_BYTES)
    got = _read_into(sock, memoryview(head))
    if got == 0:
        return None
    if got < LENGTH_BYTES:
        raise SealError("the link ended inside a record's length")
    sealed = opener.sealed_buffer(opener.length(head))
    if _read_into(sock, sealed) < len(sealed):
        raise SealError("the link ended inside a record")
    return sealed


def _read_into(sock: socket.socket, view: memoryview) -> int:
    got = 0
    while got < len(view):
        count = sock.recv_into(view[got:])
        if count == 0:
            break
        got += count
    return got
