"""The libp2p host of a daemon: Noise-only security, yamux, one connection per peer, GossipSub.

The rest of the daemon speaks libp2p through this module's names only (``Stream``, ``ProtocolId``,
``Host``, ``DialError``, peer-id helpers); keys come from ``node_key``. It works around py-libp2p 0.8.1
pitfalls: pubsub services start before any dial (start-up hang), ``max_connections_per_peer=1`` (250 ms
dial delay), Noise only (plaintext is otherwise accepted), a 2 s gossip heartbeat with spam protection off
(silent drops). Concurrent pubsub writes on one stream can interleave (yamux splits a write that exceeds
the send window into frames taken under separate locks), and the reader's protobuf DecodeError on such a
garbled RPC escapes the stream handler and stops the whole host: writes are serialized per stream, and a
stream that still fails to parse is reset alone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.connection_types import ConnectionType
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from multiaddr.exceptions import Error as MultiaddrError

from hexgen.daemon.node_key import KeyPair, new_key_pair

GOSSIP_PROTOCOL = TProtocol("/meshsub/1.1.0")

# The rest of the daemon speaks libp2p through these names only.
Stream = INetStream
ProtocolId = TProtocol


def stream_peer(stream: Stream) -> str:
    """The base58 peer id at the other end of ``stream``."""
    return str(stream.muxed_conn.peer_id)


def peer_id_from_bytes(raw: bytes) -> str:
    """The base58 form of a peer id in its binary form (a gossip message's ``from_id``)."""
    return str(ID(raw).to_base58())


class DialError(Exception):
    """A peer could not be dialled; the message is the one-line reason libp2p gave (or its error's name)."""


class AddressError(ValueError):
    """Text that is not a dialable multiaddr ending in ``/p2p/PEER_ID``."""


def peer_of_address(addr: str) -> str:
    """The peer id that a ``/ip4/.../tcp/.../p2p/ID`` multiaddr names; ``AddressError`` for anything else."""
    try:
        return str(multiaddr.Multiaddr(addr).value_for_protocol("p2p"))
    except (MultiaddrError, ValueError, TypeError):
        raise AddressError(f"{addr!r} is not a multiaddr ending in /p2p/PEER_ID") from None


def adopt_libp2p_loggers() -> None:
    """Let py-libp2p's loggers log through the root's handlers. Its import cuts them off from the root (no
    handler, no propagation), so its records reached stderr raw through logging's last-resort handler,
    several lines each; once imported (as here) it does not undo this."""
    logger = logging.getLogger("libp2p")
    logger.handlers.clear()
    logger.propagate = True


log = logging.getLogger("hexgen.host")
UNSPECIFIED = ("0.0.0.0", "::")
# Far above what a daemon entry multiplexes to one replica peer; bounds what a flooding peer can hold open.
MAX_STREAMS_PER_PEER = 1024


@dataclass(frozen=True)
class HostConfig:
    listen_host: str = "127.0.0.1"
    port: int = 0
    # A killed peer shows as a TCP close within ~0.2 s; the ping only catches hung peers, so it can be slow.
    health_check_s: float = 10.0
    # The address other hosts reach this one at (an IP or DNS name), when it differs from listen_host:
    # behind NAT with a forwarded port, or to pick one interface of several.
    advertise_host: str = ""


def interface_ips() -> list[str]:
    """This machine's non-loopback IPv4 addresses (psutil's view of the interfaces): the one the default route
    leaves from first (peers dial the first address, and workers bind to its interface), then the rest sorted,
    so a bridge such as docker0 never comes first by the order of its digits."""
    import psutil

    from hexgen.daemon.interfaces import default_route_source

    found = {
        a.address
        for addresses in psutil.net_if_addrs().values()
        for a in addresses
        if a.family.name == "AF_INET" and not ipaddress.ip_address(a.address).is_loopback
    }
    first = default_route_source()
    return sorted(found, key=lambda ip: (ip != first, ip))


def reachable_hosts(config: HostConfig) -> list[str]:
    """The hosts peers should dial: the advertised one, else the listen address, else (listening on every
    interface) each interface's address, loopback last."""
    if config.advertise_host:
        return [config.advertise_host]
    if config.listen_host not in UNSPECIFIED:
        return [config.listen_host]
    return [*interface_ips(), "127.0.0.1"]


def _host_part(host: str) -> str:
    try:
        return f"/ip{ipaddress.ip_address(host).version}/{host}"
    except ValueError:
        return f"/dns/{host}"


class _ConnectionEvents(INotifee):
    """Forwards connect/disconnect notifications into trio channels (never blocks the swarm)."""

    def __init__(self, on_connect: trio.MemorySendChannel[str], on_disconnect: trio.MemorySendChannel[str]) -> None:
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self.on_connect.send_nowait(str(conn.muxed_conn.peer_id))

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self.on_disconnect.send_nowait(str(conn.muxed_conn.peer_id))

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass


class SerialPubsub(Pubsub):
    """Pubsub whose RPC writes on one stream never interleave."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._write_locks: weakref.WeakKeyDictionary[INetStream, trio.Lock] = weakref.WeakKeyDictionary()

    async def write_msg(self, stream: INetStream, rpc_msg: Any) -> bool:
        lock = self._write_locks.setdefault(stream, trio.Lock())
        async with lock:
            return await super().write_msg(stream, rpc_msg)

    async def guarded_stream_handler(self, stream: INetStream) -> None:
        """The pubsub reader, but a garbled RPC costs this stream only, never the host."""
        try:
            await self.stream_handler(stream)
        except Exception as exc:  # noqa: BLE001 - any failure of one peer's gossip stream must not stop the host
            peer_id = stream.muxed_conn.peer_id
            log.warning("reset the gossip stream of %s: %s: %s", peer_id, type(exc).__name__, exc)
            with contextlib.suppress(Exception):
                await stream.reset()
            self._handle_dead_peer(peer_id)


@dataclass
class Host:
    """A running libp2p host with its pubsub; ``connects``/``disconnects`` stream peer ids."""

    libp2p: IHost
    pubsub: Pubsub
    connects: trio.MemoryReceiveChannel[str]
    disconnects: trio.MemoryReceiveChannel[str]
    hosts: tuple[str, ...] = ("127.0.0.1",)  # what peers dial (see reachable_hosts)
    _streams: dict[str, int] = field(default_factory=dict)  # open handled streams per peer
    circuits: list[str] = field(default_factory=list)  # this node's addresses through relays it holds a slot on
    punched: set[str] = field(default_factory=set)  # peers a hole punch (DCUtR) connected directly

    @property
    def peer_id(self) -> str:
        return str(self.libp2p.get_id())

    @property
    def addrs(self) -> list[str]:
        """The multiaddrs peers dial: the listen addresses, with an unspecified or overridden host replaced
        by each reachable one; then the relayed addresses."""
        out: list[str] = []
        for addr in self.libp2p.get_addrs():
            text = str(addr)
            listen_ip = addr.value_for_protocol("ip4") if "/ip4/" in text else None
            if listen_ip is not None and [listen_ip] != list(self.hosts):
                tail = text.split("/", 3)[3]  # "tcp/PORT/p2p/ID"
                out.extend(f"{_host_part(h)}/{tail}" for h in self.hosts)
            else:
                out.append(text)
        return [*out, *self.circuits]

    def connected_peers(self) -> set[str]:
        return {str(p) for p in self.libp2p.get_network().connections}

    def link_kinds(self) -> dict[str, str]:
        """How this host is connected to each peer: "relayed" when every connection runs through a relay
        (a circuit), "hole-punched" when a hole punch made the direct one, else "direct". O(connections)."""
        out = {}
        for peer, conns in self.libp2p.get_network().connections.items():
            relayed = all(c.get_connection_type() == ConnectionType.RELAYED for c in conns)
            kind = "hole-punched" if str(peer) in self.punched else "direct"
            out[str(peer)] = "relayed" if relayed else kind
        self.punched &= out.keys()  # a peer that left and comes back is connected anew
        return out

    def remote_ips(self, peer_id: str) -> list[str]:
        """The IP addresses this host's direct connections to ``peer_id`` reach it at (none for a relayed
        one). O(connections to the peer)."""
        ips = []
        for peer, conns in self.libp2p.get_network().connections.items():
            if str(peer) != peer_id:
                continue
            for conn in conns:
                if conn.get_connection_type() == ConnectionType.RELAYED:
                    continue
                with contextlib.suppress(Exception):  # a connection closing under us has no address
                    remote = conn.muxed_conn.get_remote_address()  # type: ignore[attr-defined]  # yamux's, not in IMuxedConn
                    if remote is not None:
                        ips.append(str(remote[0]))
        return ips

    async def connect(self, addr: str) -> str:
        """Dial a ``/ip4/.../tcp/.../p2p/ID`` multiaddr; returns the peer id. Raises ``DialError``."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            await self.libp2p.connect(info)
        except Exception as exc:  # every layer of a dial (address, transport, Noise, yamux) has its own errors
            raise DialError(str(exc) or type(exc).__name__) from exc
        return str(info.peer_id)

    async def connect_peer(self, peer_id: str, addrs: list[str]) -> None:
        """Dial ``peer_id`` at exactly ``addrs`` (its latest advert's): a restarted peer listens on a new
        port, and libp2p would otherwise dial the old address it remembers and then refuse to dial the peer
        at all for a minute (its negative cache)."""
        try:
            info = PeerInfo(ID.from_base58(peer_id), [multiaddr.Multiaddr(a) for a in addrs])
            if peer_id not in self.connected_peers():
                self.forget_addresses(peer_id)
            await self.libp2p.connect(info)
        except Exception as exc:  # as in connect
            raise DialError(str(exc) or type(exc).__name__) from exc

    def forget_addresses(self, peer_id: str) -> None:
        """Drop the addresses remembered for ``peer_id`` and its failed-dial block: py-libp2p dials only the
        first address it knows of a peer, and refuses a peer whose dial failed for 60 s (its negative cache),
        so a restarted peer on a new port is otherwise unreachable for a minute."""
        peer = ID.from_base58(peer_id)
        self.libp2p.get_peerstore().clear_addrs(peer)
        # unblock_peer is the Swarm's, which INetworkService does not declare
        self.libp2p.get_network().unblock_peer(peer)  # type: ignore[attr-defined]

    def speaks(self, peer_id: str, protocol: str) -> bool | None:
        """Whether ``peer_id`` serves ``protocol``, as identify (run on every new connection) told; None
        before identify answered."""
        try:
            known = self.libp2p.get_peerstore().get_protocols(ID.from_base58(peer_id))
        except (KeyError, ValueError):  # a peer the peerstore does not know (PeerStoreError), bad base58
            return None
        return protocol in known if known else None

    async def open_stream(self, peer_id: str, protocol: TProtocol) -> INetStream:
        return await self.libp2p.new_stream(ID.from_base58(peer_id), [protocol])

    def handle(
        self, protocol: TProtocol, handler: Callable[[INetStream], Awaitable[None]], per_peer: int | None = None
    ) -> None:
        """Serve ``protocol``; a peer gets at most MAX_STREAMS_PER_PEER streams open at once over every
        handled protocol, and ``per_peer`` on this one: a stream past either limit is reset unread."""
        open_here: dict[str, int] = {}

        async def limited(stream: INetStream) -> None:
            peer = str(stream.muxed_conn.peer_id)
            if self._streams.get(peer, 0) >= MAX_STREAMS_PER_PEER or open_here.get(peer, 0) >= (per_peer or 1 << 62):
                log.warning("reset a %s stream of %s: too many streams open", protocol, peer)
                with contextlib.suppress(Exception):
                    await stream.reset()
                return
            for counts in (self._streams, open_here):
                counts[peer] = counts.get(peer, 0) + 1
            try:
                await handler(stream)
            finally:
                for counts in (self._streams, open_here):
                    counts[peer] -= 1
                    if not counts[peer]:
                        del counts[peer]

        self.libp2p.set_stream_handler(protocol, limited)

    async def disconnect(self, peer_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.libp2p.disconnect(ID.from_base58(peer_id))


class ListenError(RuntimeError):
    """The listen address cannot be served; the message is the one-line reason."""


def check_listen_port(host: str, port: int) -> None:
    """Raise ListenError when another socket listens on ``host:port``. py-libp2p 0.8 binds with SO_REUSEPORT,
    so its own bind would succeed there and the kernel would split that daemon's connections between both;
    a probe bind without SO_REUSEPORT fails instead. SO_REUSEADDR keeps a closed daemon's TIME_WAIT
    connections from counting as a listener."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def new_identity() -> KeyPair:
    """A fresh Ed25519 key pair, for a host that needs no lasting identity (a client, a test)."""
    return new_key_pair()


def _no_auto_connect(host: IHost) -> None:
    """libp2p's auto-connector dials every peer it ever learned an address of, clients that left included,
    for as long as the process runs. A daemon redials the members it lost itself, so the swarm's
    dial rounds (periodic, and on every disconnect) do nothing; set before the swarm starts them."""

    async def nothing() -> None:
        return None

    # auto_connector is the Swarm's, which INetworkService does not declare
    host.get_network().auto_connector.maybe_connect = nothing  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def open_host(key_pair: KeyPair, config: HostConfig = HostConfig()) -> AsyncIterator[Host]:
    """Start a host listening on ``config``'s address with pubsub ready; stops it on exit."""
    config = config or HostConfig()
    check_listen_port(config.listen_host, config.port)
    # py-libp2p's yamux credits the sender after every read by default: one extra encrypted frame for each
    # small message, a third of an idle daemon's CPU at 16 peers. Go-yamux semantics (credit once half the
    # window is consumed) keep the same flow control; the library reads this knob at every read.
    os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_pair().private_key)
    connection_config = ConnectionConfig(
        max_connections_per_peer=1,
        enable_health_monitoring=True,
        health_initial_delay=config.health_check_s,
        health_check_interval=config.health_check_s,
        ping_timeout=config.health_check_s,
    )
    listen = [multiaddr.Multiaddr(f"/ip4/{config.listen_host}/tcp/{config.port}")]
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=listen,
        connection_config=connection_config,
    )
    gossipsub = GossipSub(
        protocols=[GOSSIP_PROTOCOL],
        degree=3,
        degree_low=2,
        degree_high=6,
        heartbeat_initial_delay=0.1,
        heartbeat_interval=2,
        spam_protection_enabled=False,
        eclipse_protection_enabled=False,
    )
    pubsub = SerialPubsub(host, gossipsub, strict_signing=True)
    host.set_stream_handler(GOSSIP_PROTOCOL, pubsub.guarded_stream_handler)
    send_connect, recv_connect = trio.open_memory_channel[str](1024)
    send_disconnect, recv_disconnect = trio.open_memory_channel[str](1024)
    host.get_network().register_notifee(_ConnectionEvents(send_connect, send_disconnect))
    _no_auto_connect(host)
    async with host.run(listen_addrs=listen), background_trio_service(pubsub), background_trio_service(gossipsub):
        await pubsub.wait_until_ready()
        yield Host(host, pubsub, recv_connect, recv_disconnect, tuple(reachable_hosts(config)))
