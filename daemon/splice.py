"""TCP splices on a relay: two daemons that cannot reach each other both dial the relay's splice port, name
the same one-use token, and the relay joins their connections byte for byte (no libp2p, no re-encryption).

A token is registered over ``/hexgen/splice/1`` by a peer the relay's gate admits (members only, in a private
swarm), so the relay carries traffic for members only; it lives TOKEN_TTL_S, pairs exactly two connections,
and is then spent. What crosses a splice is sealed end to end (``daemon.sealed``): the relay sees ciphertext.
This is what KV hand-offs between homes travel on (``daemon.kv_link``): a splice forwards at the speed of the
relay's sockets, where a circuit relay v2 circuit (two Noise + yamux legs in Python) is CPU-bound far below it.

Connection: the dialler sends HELLO + token (36 bytes); once its partner arrives the relay answers each
PAIRED, a length byte and the partner's address as the relay sees it (``"IP PORT"``: what a hole punch
dials), and forwards; an unknown, spent or expired token, or silence, gets the connection closed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from hexgen.daemon.host import Host, ListenError, ProtocolId, Stream, stream_peer
from hexgen.daemon.rpc import call
from hexgen.daemon.wire import FrameError, FrameReader, validate, write_frame

log = logging.getLogger("hexgen.relay")

SPLICE_PROTOCOL = ProtocolId("/hexgen/splice/1")
HELLO = b"HXS1"
PAIRED = b"\x01"
TOKEN_BYTES = 32
TOKEN_TTL_S = 30.0
HELLO_TIMEOUT_S = 5.0
MAX_TOKENS = 256  # registered and not yet paired
MAX_SPLICES = 64
SPLICE_CHUNK = 256 * 1024
REGISTER_TIMEOUT_S = 5.0
_CLOSED = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class SpliceError(Exception):
    """A splice that could not be set up; the message says why."""


@dataclass
class _Waiting:
    stream: trio.SocketStream
    paired: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class Splicer:
    """The relay's splice service: ``serve_register`` answers token registrations from peers ``admits``
    accepts; ``run`` listens on ``port`` (0: any free one, set once listening) and joins paired connections.
    Time is trio's clock."""

    admits: Callable[[str], bool]
    host: str = "0.0.0.0"
    port: int = 0
    tokens: dict[bytes, float] = field(default_factory=dict)  # token -> expiry
    waiting: dict[bytes, _Waiting] = field(default_factory=dict)
    splices: int = 0
    refused: int = 0
    listening: trio.Event = field(default_factory=trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and splice; ``ListenError`` when the port cannot be listened on."""
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as exc:
            raise ListenError(f"cannot splice on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = listeners[0].socket.getsockname()[1]
        self.listening.set()
        log.info("splicing TCP connections for members on port %d", self.port)
        task_status.started(self.port)
        await trio.serve_listeners(self._serve_connection, listeners)

    def register(self, peer: str, token: bytes) -> str | None:
        """Record ``token`` for ``peer``; why not, or None. O(tokens) when the table is full."""
        now = trio.current_time()
        if not self.admits(peer):
            self.refused += 1
            return "not a member of this swarm"
        if len(token) != TOKEN_BYTES:
            return f"a splice token is {TOKEN_BYTES} bytes"
        if len(self.tokens) >= MAX_TOKENS:
            self.tokens = {t: expiry for t, expiry in self.tokens.items() if expiry > now}
            if len(self.tokens) >= MAX_TOKENS:
                return "too many splices waiting"
        if not self.listening.is_set():
            return "not splicing yet"
        self.tokens[token] = now + TOKEN_TTL_S
        return None

    async def serve_register(self, stream: Stream) -> None:
        """One registration: ``{"token": bytes}`` in, ``{"port": int}`` or ``{"error": str}`` out."""
        peer = stream_peer(stream)
        try:
            with trio.fail_after(REGISTER_TIMEOUT_S):
                request = validate(await FrameReader(stream).read(), {"token": bytes})
                why = self.register(peer, request["token"])
                await write_frame(stream, {"port": self.port} if why is None else {"error": why})
        except FrameError as exc:
            with contextlib.suppress(Exception):
                await write_frame(stream, {"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - one peer's broken stream ends only its registration
            log.debug("a splice registration of %s ended: %s", peer, exc)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                with trio.move_on_after(HELLO_TIMEOUT_S):
                    token = await self._hello(stream)
                if token is None:
                    return
                partner = self.waiting.pop(token, None)
                if partner is None:
                    await self._wait_for_partner(token, stream)
                else:
                    await self._splice(partner, stream)
        except _CLOSED as exc:
            log.debug("a splice connection ended: %s", exc)

    async def _hello(self, stream: trio.SocketStream) -> bytes | None:
        """The connection's token, if it is registered and unexpired (it is then spent for a third party)."""
        hello = await receive_exactly(stream, len(HELLO) + TOKEN_BYTES)
        token = hello[len(HELLO) :]
        if len(token) != TOKEN_BYTES or not hello.startswith(HELLO):
            return None
        if token in self.waiting:
            return token
        expiry = self.tokens.pop(token, None)
        return token if expiry is not None and expiry > trio.current_time() else None

    async def _wait_for_partner(self, token: bytes, stream: trio.SocketStream) -> None:
        me = _Waiting(stream)
        self.waiting[token] = me
        try:
            with trio.move_on_after(TOKEN_TTL_S):
                await me.paired.wait()
            if me.paired.is_set():
                await me.done.wait()
        finally:
            if self.waiting.get(token) is me:
                del self.waiting[token]

    async def _splice(self, first: _Waiting, second: trio.SocketStream) -> None:
        """Forward both ways until either side ends, then close both."""
        first.paired.set()
        if self.splices >= MAX_SPLICES:
            first.done.set()
            return
        self.splices += 1
        try:
            await first.stream.send_all(_paired(second))
            await second.send_all(_paired(first.stream))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_forward, first.stream, second, nursery.cancel_scope)
                nursery.start_soon(_forward, second, first.stream, nursery.cancel_scope)
        finally:
            self.splices -= 1
            first.done.set()


def _paired(partner: trio.SocketStream) -> bytes:
    ip, port = partner.socket.getpeername()[:2]
    seen = f"{ip} {port}".encode()
    return PAIRED + bytes([len(seen)]) + seen


async def _forward(source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
    """Copy ``source`` to ``sink`` until it ends, then end the splice: in the kernel through a pipe where the
    system splices (Linux), else through one buffer (no allocation per chunk)."""
    try:
        if hasattr(os, "splice"):
            await _forward_in_kernel(source, sink)
        else:
            await _forward_copying(source, sink)
    except _CLOSED:
        pass
    scope.cancel()


async def _forward_copying(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    buffer = bytearray(SPLICE_CHUNK)
    with memoryview(buffer) as view:
        while count := await source.socket.recv_into(view):
            await sink.send_all(view[:count])


async def _forward_in_kernel(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    """``os.splice`` socket -> pipe -> socket: the relay never copies the bytes into its own memory, which
    halves what a relayed KV link costs its CPU."""
    into, out = (source.socket.fileno(), sink.socket.fileno())
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # a pipe holds 64 KiB unless grown: four times the splices per record
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, SPLICE_CHUNK)
    try:
        while True:
            await trio.lowlevel.wait_readable(into)
            try:
                held = os.splice(into, write_end, SPLICE_CHUNK, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                continue
            if held == 0:
                return
            while held:
                await trio.lowlevel.wait_writable(out)
                try:
                    held -= os.splice(read_end, out, held, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
                except BlockingIOError:
                    continue
    finally:
        os.close(read_end)
        os.close(write_end)


async def register(host: Host, relay_id: str, token: bytes) -> int:
    """Register ``token`` at the relay ``relay_id`` (connected); its splice port. Raises ``SpliceError``."""
    try:
        with trio.fail_after(REGISTER_TIMEOUT_S):
            reply = await call(host, relay_id, SPLICE_PROTOCOL, {"token": token})
    except Exception as exc:  # the relay cannot splice: unreachable, silent, or too old to speak the protocol
        raise SpliceError(f"relay {relay_id} did not register a splice: {str(exc) or type(exc).__name__}") from exc
    port = reply.get("port")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise SpliceError(f"relay {relay_id} refused a splice: {reply.get('error', reply)}")
    return port


@dataclass
class Spliced:
    """This end of a splice: the connection through the relay, the local port it leaves from (bound so that a
    hole punch can leave from it too), and the partner's address as the relay saw it."""

    stream: trio.SocketStream
    local_port: int
    partner: tuple[str, int] | None


def reusable_socket(port: int = 0) -> trio.socket.SocketType:
    """A TCP socket bound to ``port`` on every interface, which another such socket may bind as well."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("0.0.0.0", port))
    except OSError:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


async def dial(ip: str, port: int, token: bytes) -> Spliced:
    """Connect to a relay's splice port and wait until the partner naming ``token`` arrives (at most
    TOKEN_TTL_S). Raises ``SpliceError``."""
    try:
        sock = reusable_socket()
    except OSError as exc:
        raise SpliceError(f"no socket for a splice: {exc.strerror or exc}") from exc
    stream = trio.SocketStream(sock)
    try:
        with trio.fail_after(HELLO_TIMEOUT_S):
            await sock.connect((ip, port))
        with trio.fail_after(TOKEN_TTL_S):
            await stream.send_all(HELLO + token)
            answer = await receive_exactly(stream, 2)
            paired = len(answer) == 2 and answer[:1] == PAIRED
            seen = await receive_exactly(stream, answer[1]) if paired else b""
    except (*_CLOSED, trio.TooSlowError) as exc:
        await trio.aclose_forcefully(stream)
        raise SpliceError(f"no splice at {ip}:{port}: {str(exc) or type(exc).__name__}") from exc
    if not paired:
        await trio.aclose_forcefully(stream)
        raise SpliceError(f"the relay at {ip}:{port} closed the splice without pairing it")
    return Spliced(stream, sock.getsockname()[1], _address(seen))


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    """``size`` bytes, or fewer when the stream ends first."""
    data = b""
    while len(data) < size and (chunk := await stream.receive_some(size - len(data))):
        data += chunk
    return data


def _address(seen: bytes) -> tuple[str, int] | None:
    """``"IP PORT"`` as the relay wrote it, or None when it is not that."""
    ip, _, port = seen.decode("ascii", "replace").partition(" ")
    return (ip, int(port)) if port.isdigit() and 0 < int(port) < 65536 and ip else None
