"""KV links: the connection one daemon sends KV parts to another on when their hosts have no direct TCP link,
a TCP splice through a relay both can reach (``daemon.splice``), sealed (``daemon.sealed``) with a key sent
over their libp2p connection, so neither the relay nor the network reads or alters the KV.

The sender registers a one-use token at a relay, offers ``LinkOffer`` (token, key, relay, port, punch) to
the receiver over ``/hexgen/kvlink/1``; the receiver accepts or says why not; both dial the relay's splice
port and the relay pairs them, telling each where it sees the other. With ``punch`` both then dial each
other there from their splice's port (a TCP simultaneous open through endpoint-independent NATs) and, when
both ends connected, leave the relay for that direct connection. Where no relay can splice, the sender
falls back to the ``/hexgen/kv/1`` stream. An offer that names a ``route`` (prefix, source rank, destination
rank) is for one worker's messages to one other worker: both daemons hand their ends of that link to those
workers (``daemon.kv_relay``); one marked ``probe`` carries a probe of the path (``daemon.path_probes``).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from hexgen.daemon.host import Host, ProtocolId, Stream
from hexgen.daemon.kv_frames import Route, route_of
from hexgen.daemon.sealed import KEY_BYTES, SealedStream, new_key
from hexgen.daemon.splice import TOKEN_BYTES, Spliced, SpliceError, dial, receive_exactly, register, reusable_socket
from hexgen.daemon.wire import FrameError, FrameReader, MalformedFrame, optional, validate, write_frame

LINK_PROTOCOL = ProtocolId("/hexgen/kvlink/1")
LINK_SETUP_S = 10.0
MAX_PEER_ID = 128
PUNCH_S = 3.0  # both ends dial for this long; a SYN lost in the kernel is retransmitted after 1 s
PUNCH_RETRY_S = 0.05  # a SYN that reaches the other NAT before its host's SYN left is refused: dial again
VERDICT_S = 5.0
DIRECT, SPLICED = b"D", b"S"
_BROKEN = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


class LinkError(Exception):
    """No KV link could be set up; the message says why, for each relay tried."""


@dataclass(frozen=True)
class LinkOffer:
    """A sender's offer: dial port ``port`` of relay ``relay`` (a peer id) naming ``token``, then try a hole
    punch if ``punch``; what arrives is sealed under ``key``, and is the messages of ``route`` alone where it
    names one."""

    token: bytes
    key: bytes
    relay: str
    port: int
    punch: bool
    route: Route | None = None
    probe: bool = False  # for a probe of the path (``daemon.path_probes``), not for KV

    def to_wire(self) -> dict[str, Any]:
        wire = {"token": self.token, "key": self.key, "relay": self.relay, "port": self.port, "punch": self.punch}
        if self.probe:
            wire["probe"] = True
        return wire if self.route is None else wire | {"route": list(self.route)}

    @staticmethod
    def from_wire(raw: Any) -> LinkOffer:
        """Raises ``MalformedFrame`` for anything but a well-formed offer."""
        schema = {"token": bytes, "key": bytes, "relay": str, "port": int, "punch": bool}
        msg = validate(raw, schema | {"route": optional(list), "probe": optional(bool)})
        if len(msg["token"]) != TOKEN_BYTES or len(msg["key"]) != KEY_BYTES:
            raise MalformedFrame(f"a link offer's token and key are {TOKEN_BYTES} and {KEY_BYTES} bytes")
        if not 0 < msg["port"] < 65536 or not 0 < len(msg["relay"]) <= MAX_PEER_ID:
            raise MalformedFrame("a link offer names a port in 1-65535 and a relay's peer id")
        route, probe = msg.get("route"), bool(msg.get("probe"))
        if probe and route is not None:
            raise MalformedFrame("a link offer is for a probe or for a route, not both")
        return LinkOffer(
            msg["token"], msg["key"], msg["relay"], msg["port"], msg["punch"], route and route_of(route), probe
        )


@dataclass(frozen=True)
class SpliceRoutes:
    """Where splices can be had: ``relays()`` the peer ids of relays this daemon may use, best first, and
    ``ips(relay)`` the IP addresses it reaches one at."""

    relays: Callable[[], Sequence[str]]
    ips: Callable[[str], Sequence[str]]


NO_ROUTES = SpliceRoutes(tuple, lambda relay: ())


def address_ip(addr: str) -> str | None:
    """The IP address a ``/ip4/...`` or ``/ip6/...`` multiaddr starts with, or None. O(len(addr))."""
    parts = addr.split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else None


@dataclass
class KvLink:
    """A connection to one daemon, whose records are sealed under ``key``: ``direct`` (hole-punched) or
    spliced by ``relay``; for the messages of ``route`` alone where it names one."""

    socket: trio.SocketStream
    key: bytes
    relay: str
    direct: bool
    route: Route | None = None
    probe: bool = False

    def sealed(self) -> SealedStream:
        return SealedStream(self.socket, self.key)


async def open_link(
    host: Host, peer: str, routes: SpliceRoutes, punch: bool, route: Route | None = None, probe: bool = False
) -> KvLink:
    """A link to ``peer`` (for the messages of ``route``, where given, or for a probe of the path) through the
    first relay in ``routes`` that splices one within LINK_SETUP_S, made direct by a hole punch if ``punch`` and
    it succeeds. Raises ``LinkError`` naming why each relay failed."""
    failures = []
    for relay in routes.relays():
        try:
            with trio.fail_after(LINK_SETUP_S + PUNCH_S):
                return await _open_via(host, peer, relay, routes.ips(relay), punch, route, probe)
        except (LinkError, SpliceError, FrameError, trio.TooSlowError) as exc:
            failures.append(f"via {relay}: {str(exc) or type(exc).__name__}")
        except Exception as exc:  # noqa: BLE001 - the libp2p stream to the peer broke: no link this way
            failures.append(f"via {relay}: the offer to {peer} failed: {str(exc) or type(exc).__name__}")
    raise LinkError("; ".join(failures) or "no relay that could splice is known")


async def _open_via(
    host: Host, peer: str, relay: str, ips: Sequence[str], punch: bool, route: Route | None, probe: bool
) -> KvLink:
    if not ips:
        raise LinkError(f"no address of relay {relay} is known")
    token = secrets.token_bytes(TOKEN_BYTES)
    offer = LinkOffer(token, new_key(), relay, await register(host, relay, token), punch, route, probe)
    stream = await host.open_stream(peer, LINK_PROTOCOL)
    try:
        await write_frame(stream, offer.to_wire())
        reply = await FrameReader(stream).read()
    finally:
        with contextlib.suppress(Exception):
            await stream.close()
    if not isinstance(reply, dict) or reply.get("ok") is not True:
        why = reply.get("error") if isinstance(reply, dict) else "no answer"
        raise LinkError(f"{peer} declined the link: {why}")
    return await _finish(await dial(ips[0], offer.port, offer.token), offer)


async def accept_link(stream: Stream, admits: Callable[[LinkOffer], str | None], routes: SpliceRoutes) -> KvLink:
    """The receiving end of an offer read from ``stream``: ``admits(offer)`` says why the sender may not send
    that KV here (or None). Answers the sender, then dials the relay. Returns the link; raises ``LinkError``."""
    try:
        with trio.fail_after(LINK_SETUP_S):
            offer = LinkOffer.from_wire(await FrameReader(stream).read())
    except Exception as exc:  # a bad frame, silence, or a stream that broke: no link
        await _answer(stream, {"error": f"a bad link offer: {str(exc) or type(exc).__name__}"})
        raise LinkError(f"a bad link offer: {str(exc) or type(exc).__name__}") from exc
    why = admits(offer)
    ips = list(routes.ips(offer.relay))
    if why is None and not ips:
        why = f"no address of relay {offer.relay} is known here"
    await _answer(stream, {"error": why} if why else {"ok": True})
    if why:
        raise LinkError(why)
    try:
        with trio.fail_after(LINK_SETUP_S):
            spliced = await dial(ips[0], offer.port, offer.token)
    except (SpliceError, trio.TooSlowError) as exc:
        raise LinkError(f"no splice at relay {offer.relay}: {str(exc) or type(exc).__name__}") from exc
    return await _finish(spliced, offer)


async def _finish(spliced: Spliced, offer: LinkOffer) -> KvLink:
    """The link over the splice, or over a hole-punched connection where the offer asks for a punch and both
    ends made one (each tells the other on the splice). Raises ``LinkError`` when the splice breaks."""
    direct = None
    if offer.punch and spliced.partner is not None:
        direct = await punch(spliced.local_port, spliced.partner)
    try:
        with trio.fail_after(VERDICT_S):
            await spliced.stream.send_all(DIRECT if direct is not None else SPLICED)
            theirs = await receive_exactly(spliced.stream, 1)
        if not theirs:
            raise trio.BrokenResourceError("the other end left it")
    except _BROKEN as exc:
        for stream in (direct, spliced.stream):
            if stream is not None:
                await trio.aclose_forcefully(stream)
        raise LinkError(f"the splice at relay {offer.relay} broke: {str(exc) or type(exc).__name__}") from exc
    if direct is not None and theirs == DIRECT:
        await trio.aclose_forcefully(spliced.stream)
        return KvLink(direct, offer.key, offer.relay, True, offer.route, offer.probe)
    if direct is not None:
        await trio.aclose_forcefully(direct)
    return KvLink(spliced.stream, offer.key, offer.relay, False, offer.route, offer.probe)


async def punch(local_port: int, partner: tuple[str, int], seconds: float = PUNCH_S) -> trio.SocketStream | None:
    """A TCP connection from ``local_port`` to ``partner`` by a simultaneous open: both ends dial the address
    the relay saw the other at, from the port their splice leaves from, so each NAT holds a mapping that lets
    the other's SYN in (endpoint-independent NATs; a symmetric NAT maps the punch to another port and it
    fails). Dialled again every PUNCH_RETRY_S until ``seconds`` pass; None when it never connected."""
    with trio.move_on_after(seconds):
        while True:
            try:
                sock = reusable_socket(local_port)
            except OSError:
                return None
            try:
                await sock.connect(partner)
            except OSError:
                sock.close()
            except BaseException:
                sock.close()
                raise
            else:
                return trio.SocketStream(sock)
            await trio.sleep(PUNCH_RETRY_S)
    return None


async def _answer(stream: Stream, reply: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):
        await write_frame(stream, reply)
        await stream.close()
