"""KV links: the connection one daemon sends KV parts to another on when their hosts have no direct TCP link,
a TCP splice through a relay both can reach (``daemon.splice``), sealed (``daemon.sealed``) with a key sent
over their libp2p connection, so neither the relay nor the network reads or alters the KV.

The sender registers a one-use token at a relay, offers ``LinkOffer`` (token, key, relay, port) to the
receiver over ``/hexgen/kvlink/1``; the receiver accepts or says why not; both dial the relay's splice port
and the relay pairs them. Where no relay can splice, the sender falls back to the ``/hexgen/kv/1`` stream.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from hexgen.daemon.host import Host, ProtocolId, Stream
from hexgen.daemon.sealed import KEY_BYTES, SealedStream, new_key
from hexgen.daemon.splice import TOKEN_BYTES, SpliceError, dial, register
from hexgen.daemon.wire import FrameError, FrameReader, MalformedFrame, validate, write_frame

LINK_PROTOCOL = ProtocolId("/hexgen/kvlink/1")
LINK_SETUP_S = 10.0
MAX_PEER_ID = 128


class LinkError(Exception):
    """No KV link could be set up; the message says why, for each relay tried."""


@dataclass(frozen=True)
class LinkOffer:
    """A sender's offer: dial port ``port`` of relay ``relay`` (a peer id) naming ``token``; what arrives
    there is sealed under ``key``."""

    token: bytes
    key: bytes
    relay: str
    port: int

    def to_wire(self) -> dict[str, Any]:
        return {"token": self.token, "key": self.key, "relay": self.relay, "port": self.port}

    @staticmethod
    def from_wire(raw: Any) -> LinkOffer:
        """Raises ``MalformedFrame`` for anything but a well-formed offer."""
        msg = validate(raw, {"token": bytes, "key": bytes, "relay": str, "port": int})
        if len(msg["token"]) != TOKEN_BYTES or len(msg["key"]) != KEY_BYTES:
            raise MalformedFrame(f"a link offer's token and key are {TOKEN_BYTES} and {KEY_BYTES} bytes")
        if not 0 < msg["port"] < 65536 or not 0 < len(msg["relay"]) <= MAX_PEER_ID:
            raise MalformedFrame("a link offer names a port in 1-65535 and a relay's peer id")
        return LinkOffer(msg["token"], msg["key"], msg["relay"], msg["port"])


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
    """A sealed spliced connection to one daemon, through ``relay``."""

    stream: SealedStream
    relay: str


async def open_link(host: Host, peer: str, routes: SpliceRoutes) -> KvLink:
    """A link to ``peer`` through the first relay in ``routes`` that splices one within LINK_SETUP_S. Raises
    ``LinkError`` naming why each relay failed."""
    failures = []
    for relay in routes.relays():
        try:
            with trio.fail_after(LINK_SETUP_S):
                return await _open_via(host, peer, relay, routes.ips(relay))
        except (LinkError, SpliceError, FrameError, trio.TooSlowError) as exc:
            failures.append(f"via {relay}: {exc or type(exc).__name__}")
        except Exception as exc:  # noqa: BLE001 - the libp2p stream to the peer broke: no link this way
            failures.append(f"via {relay}: the offer to {peer} failed: {exc or type(exc).__name__}")
    raise LinkError("; ".join(failures) or "no relay that could splice is known")


async def _open_via(host: Host, peer: str, relay: str, ips: Sequence[str]) -> KvLink:
    if not ips:
        raise LinkError(f"no address of relay {relay} is known")
    token = secrets.token_bytes(TOKEN_BYTES)
    offer = LinkOffer(token, new_key(), relay, await register(host, relay, token))
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
    return KvLink(SealedStream(await dial(ips[0], offer.port, offer.token), offer.key), relay)


async def accept_link(stream: Stream, admits: Callable[[], str | None], routes: SpliceRoutes) -> KvLink:
    """The receiving end of an offer read from ``stream``: ``admits()`` says why the sender may not send KV
    here (or None). Answers the sender, then dials the relay. Returns the link; raises ``LinkError``."""
    try:
        with trio.fail_after(LINK_SETUP_S):
            offer = LinkOffer.from_wire(await FrameReader(stream).read())
    except (FrameError, trio.TooSlowError) as exc:
        await _answer(stream, {"error": f"a bad link offer: {exc or type(exc).__name__}"})
        raise LinkError(f"a bad link offer: {exc or type(exc).__name__}") from exc
    why = admits()
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
        raise LinkError(f"no splice at relay {offer.relay}: {exc or type(exc).__name__}") from exc
    return KvLink(SealedStream(spliced, offer.key), offer.relay)


async def _answer(stream: Stream, reply: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):
        await write_frame(stream, reply)
        await stream.close()
