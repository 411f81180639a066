"""Reachability (AutoNAT v1): whether other hosts can dial this daemon, asked of its members, answered for them.

The wire is AutoNAT v1's (``/libp2p/autonat/1.0.0``, its protobuf, varint-framed). The server is hexgen's own:
py-libp2p 0.8.1's ``AutoNATService`` dials back with ``host.connect``, which returns at once when a connection
to the peer exists, and the request always arrives over one, so it answers OK to every peer (measured in the
NAT lab: a host behind a masquerading router with no forwarded port, advertising the router's address, got
OK). Here the dial-back is a fresh TCP connection to the requester's observed IP (never another address, so
a request cannot aim the server at a third host) on each TCP port the requester advertises; a port counts as
reachable when a libp2p listener opens multistream-select there. Requests over a relayed link are refused.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import multiaddr
import psutil
import trio
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from hexgen.daemon.host import Host, Stream, stream_peer

log = logging.getLogger("hexgen.nat")

AUTONAT_PROTOCOL = AUTONAT_PROTOCOL_ID
MAX_MESSAGE_BYTES = 4096
MAX_DIAL_BACKS = 4  # ports dialled back per request
DIAL_BACK_S = 3.0
ASK_S = 3 * DIAL_BACK_S + 2.0
SERVERS_PER_ROUND = 3
RECHECK_S = 120.0  # once known; while unknown, every RETRY_S
RETRY_S = 3.0
MULTISTREAM = b"\x13/multistream/1.0.0\n"
UNKNOWN, PUBLIC, PRIVATE = "unknown", "public", "private"


def dial_back_ports(addrs: list[bytes], limit: int = MAX_DIAL_BACKS) -> list[int]:
    """The TCP ports of the advertised multiaddrs ``addrs`` (relayed ones and anything unparsable left out),
    in order, each once, at most ``limit``. O(len(addrs))."""
    ports: list[int] = []
    for raw in addrs:
        try:
            addr = multiaddr.Multiaddr(raw)
            if "/p2p-circuit" in str(addr):
                continue
            port = int(addr.value_for_protocol("tcp"))
        except Exception:  # noqa: BLE001 - any address that does not parse is skipped, as the spec says
            continue
        if 0 < port < 65536 and port not in ports:
            ports.append(port)
    return ports[:limit]


def choose_servers(reachability: dict[str, str], links: dict[str, str]) -> list[str]:
    """Whom to ask, from members' advertised ``reachability`` and this node's ``links`` to them: members it is
    connected to directly (a relayed request is refused), those that say they are public first, in random
    order within each group (no one server decides alone round after round). O(members)."""
    direct = [p for p in reachability if links.get(p) == "direct"]
    random.shuffle(direct)
    return sorted(direct, key=lambda p: reachability[p] != PUBLIC)


def lan_neighbour(ip: str, interfaces: Mapping[str, Sequence[Any]] | None = None) -> bool:
    """Whether ``ip`` (not loopback) lies on the subnet of one of this host's own IPv4 interfaces (a LAN
    neighbour). ``interfaces``: ``psutil.net_if_addrs()`` (the default). O(addresses)."""
    try:
        address = ipaddress.IPv4Address(ip)
    except ValueError:
        return False
    if address.is_loopback:
        return False
    table = psutil.net_if_addrs() if interfaces is None else interfaces
    for entries in table.values():
        for entry in entries:
            if entry.family != socket.AF_INET or not entry.netmask:
                continue
            try:
                subnet = ipaddress.IPv4Network(f"{entry.address}/{entry.netmask}", strict=False)
            except ValueError:
                continue
            if not subnet.network_address.is_loopback and address in subnet:
                return True
    return False


def beyond_lan_first(answers: Sequence[tuple[bool | None, bool]]) -> list[bool | None]:
    """The answers to judge reachability by, from ``(answer, server on this host's LAN)`` pairs: those of
    servers beyond the LAN when any of them answered (a LAN neighbour dials back without crossing the NAT in
    front of both: two hosts behind one home router would each find the other public), else all.
    O(len(answers))."""
    beyond: list[bool | None] = [answer for answer, on_lan in answers if not on_lan and answer is not None]
    return beyond or [answer for answer, _ in answers]


def verdict(answers: list[bool | None]) -> str:
    """This node's reachability from its servers' answers (True: dialled back, False: could not, None: no
    answer or refused). One dial-back is proof of reachability; "private" needs a failure and no success.
    O(len(answers))."""
    if any(a is True for a in answers):
        return PUBLIC
    return PRIVATE if any(a is False for a in answers) else UNKNOWN


async def listener_answers(ip: str, port: int, seconds: float = DIAL_BACK_S) -> bool:
    """Whether a libp2p listener answers a new TCP connection to ``ip:port`` within ``seconds`` (it opens
    multistream-select with its header)."""
    with trio.move_on_after(seconds):
        try:
            stream = await trio.open_tcp_stream(ip, port)
        except OSError:
            return False
        async with stream:
            got = b""
            while len(got) < len(MULTISTREAM):
                chunk = await stream.receive_some(len(MULTISTREAM) - len(got))
                if not chunk:
                    return False
                got += chunk
            return got == MULTISTREAM
    return False


def _response(status: int, text: str = "", addr: bytes | None = None) -> Message:
    reply = Message(type=Message.DIAL_RESPONSE)
    reply.dialResponse.status = status  # type: ignore[assignment]  # the stubs type it as an enum NewType
    reply.dialResponse.statusText = text
    if addr is not None:
        reply.dialResponse.addr = addr
    return reply


class Reachability:
    """Serves AutoNAT v1 for peers, and keeps ``status`` (unknown / public / private) for this node from its
    members' answers; ``servers()`` names who to ask, ``on_change`` runs when the status changes."""

    def __init__(self, host: Host, servers: Callable[[], list[str]], on_change: Callable[[], None]) -> None:
        self.host = host
        self.servers = servers
        self.on_change = on_change
        self.status = UNKNOWN

    async def serve(self, stream: Stream) -> None:
        try:
            with trio.fail_after(ASK_S):
                request = Message()
                request.ParseFromString(await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE_BYTES))
                reply = await self._answer(stream, request)
                await stream.write(encode_varint_prefixed(reply.SerializeToString()))
        except Exception as exc:  # noqa: BLE001 - a garbled or slow request costs its stream only
            log.debug("autonat request from %s failed: %s", stream_peer(stream), exc)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    async def _answer(self, stream: Stream, request: Message) -> Message:
        if request.type != Message.DIAL:
            return _response(Message.E_BAD_REQUEST, "not a dial request")
        if self.host.link_kinds().get(stream_peer(stream)) == "relayed":
            return _response(Message.E_DIAL_REFUSED, "not over a relayed link")
        remote = stream.get_remote_address()
        ports = dial_back_ports(list(request.dial.peer.addrs))
        if remote is None or not ports:
            return _response(Message.E_DIAL_REFUSED, "no TCP address to dial back")
        ip = remote[0]
        for port in ports:
            if await listener_answers(ip, port):
                return _response(Message.OK, addr=multiaddr.Multiaddr(f"/ip4/{ip}/tcp/{port}").to_bytes())
        return _response(Message.E_DIAL_ERROR, "no dial back succeeded")

    async def ask(self, server: str) -> bool | None:
        """Ask ``server`` to dial this node back at its direct addresses; None for no answer or a refusal."""
        request = Message(type=Message.DIAL)
        request.dial.peer.id = ID.from_base58(self.host.peer_id).to_bytes()
        for addr in self.host.addrs:
            if "/p2p-circuit" not in addr:
                request.dial.peer.addrs.append(multiaddr.Multiaddr(addr).to_bytes())
        try:
            with trio.fail_after(ASK_S):
                stream = await self.host.open_stream(server, AUTONAT_PROTOCOL)
                await stream.write(encode_varint_prefixed(request.SerializeToString()))
                reply = Message()
                reply.ParseFromString(await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE_BYTES))
        except Exception as exc:  # noqa: BLE001 - a server that fails or is slow gives no answer
            log.debug("autonat server %s: %s", server, exc)
            return None
        status = reply.dialResponse.status
        return True if status == Message.OK else False if status == Message.E_DIAL_ERROR else None

    async def check(self) -> str:
        """One round: up to SERVERS_PER_ROUND servers asked side by side; updates and returns ``status``."""
        servers = self.servers()[:SERVERS_PER_ROUND]
        answers: list[tuple[bool | None, bool]] = []

        async def one(server: str) -> None:
            answers.append((await self.ask(server), self._on_lan(server)))

        async with trio.open_nursery() as nursery:
            for server in servers:
                nursery.start_soon(one, server)
        found = verdict(beyond_lan_first(answers))
        if found != UNKNOWN and found != self.status:
            log.info("reachability: %s (%d of %d servers answered)", found, len(answers), len(servers))
            self.status = found
            self.on_change()
        return found

    def _on_lan(self, server: str) -> bool:
        """Whether this host reaches ``server`` at an address on one of its own subnets."""
        return any(lan_neighbour(ip) for ip in self.host.remote_ips(server))

    async def run(self) -> None:
        while True:
            found = await self.check()
            await trio.sleep(RETRY_S if found == UNKNOWN else RECHECK_S * random.uniform(0.8, 1.2))
