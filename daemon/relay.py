"""Circuit relay v2 in a daemon: the hop with hexgen's limits and a membership gate, the stop side and hole
punching (DCUtR) every daemon runs, and the client calls (reserve a slot, dial through a relay) that py-libp2p
0.8.1 leaves to its transport.

The library's ``CircuitV2Protocol`` does the hop and stop work. Its own client (``CircuitV2Transport`` with
``RelayDiscovery``) dials relays it discovers and reserves on its own; a daemon reserves only on the relays
it is told of, and the swarm's ordinary dial does not handle ``/p2p-circuit`` addresses, so both client
calls are written here on the protocol's messages.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeer
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from hexgen.daemon.host import DialError, Host, Stream, stream_peer

log = logging.getLogger("hexgen.relay")

CIRCUIT = "/p2p-circuit"
# A relayed link carries a daemon's control plane (heartbeats, adverts, plans, token streams: about a KiB/s)
# and the KV hand-offs between homes with no direct link (``daemon.kv_relay``; a 2,048-token Llama-3-8B KV is
# 256 MiB). A circuit is cut after 30 min or 4 GiB, whichever first, and the daemons dial a new one (a hand-off
# it cut fails and is re-submitted); go-libp2p's 2 min / 128 KiB are sized for hole punching alone.
CIRCUIT_DURATION_S = 30 * 60
CIRCUIT_BYTES = 4 * 1024 * 1024 * 1024
CIRCUITS_PER_RESERVATION = 16
MAX_RESERVATIONS = 64
RESERVATION_TTL_S = 15 * 60
HEXGEN_RELAY_LIMITS = RelayLimits(
    duration=CIRCUIT_DURATION_S,
    data=CIRCUIT_BYTES,
    max_circuit_conns=CIRCUITS_PER_RESERVATION,
    max_reservations=MAX_RESERVATIONS,
    reservation_ttl=RESERVATION_TTL_S,
)
# How long a relay waits for an unknown peer's signed advert (with its certificate) to arrive before it
# refuses the peer: a daemon reserves right after it connects, and its advert follows within a gossip hop.
MEMBERSHIP_WAIT_S = 5.0
HOP_REPLY_TIMEOUT_S = 10.0
PUMP_CHUNK = 64 * 1024
PUMP_WRITE_S = 15.0  # a circuit whose far end takes no bytes for this long is cut
DIRECT_DIAL_S = 1.5
# each dial of a hole punch: TCP retransmits a lost SYN after 1 s, and the simultaneous open needs no more
PUNCH_DIAL_S = 3  # a peer that also advertises relayed addresses gets this long on its direct ones
RESERVE_RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)


class RelayError(DialError):
    """A relay refused a reservation or a circuit, or did not answer; the message says which and why."""


def is_circuit(addr: str) -> bool:
    return CIRCUIT in addr


def circuit_address(relay_addr: str, peer_id: str) -> str:
    """The address of ``peer_id`` through the relay at ``relay_addr`` (ending ``/p2p/RELAY_ID``)."""
    return f"{relay_addr}{CIRCUIT}/p2p/{peer_id}"


def split_circuit(addr: str) -> tuple[str, str, str]:
    """(relay address with its ``/p2p/ID``, relay id, target id) of a circuit address; ``RelayError`` for
    anything else. O(len(addr))."""
    relay_part, sep, target_part = addr.partition(CIRCUIT)
    relay_id, target = relay_part.rpartition("/p2p/")[2], target_part.removeprefix("/p2p/")
    if not sep or "/p2p/" not in relay_part or not relay_id or not target or "/" in target:
        raise RelayError(f"{addr!r} is not RELAY_ADDR/p2p/RELAY_ID/p2p-circuit/p2p/PEER_ID")
    return relay_part, relay_id, target


@dataclass(frozen=True)
class RelayGate:
    """Who may use this node's hop: ``admits(peer)`` now, and ``changed()`` to wait on while unsure."""

    admits: Callable[[str], bool]
    changed: Callable[[float], Awaitable[None]]


async def _hop_status(stream: Stream, code: StatusCode) -> None:
    with contextlib.suppress(Exception):
        await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS, status=to_proto_status(code)))
        await stream.close()


class Circuits(CircuitV2Protocol):
    """The library's relay, with each circuit's bytes pumped here. Its own pump, once either direction of a
    circuit ends, closes the streams it files under that direction's peer id, which belong to the newest
    circuit of that peer: in the NAT lab the end of one circuit (a hole punch's, a client's) cut the other
    circuits of the same daemon. This pump closes only its own circuit's streams."""

    async def _relay_data(
        self,
        src_stream: Stream,
        dst_stream: Stream,
        peer_id: ID,
        deadline: float | None = None,
        circuit_data_limit: list[int] | None = None,
    ) -> None:
        clean = False
        try:
            with trio.move_on_at(math.inf if deadline is None else trio.current_time() + deadline - time.monotonic()):
                clean = await _pump(src_stream, dst_stream, circuit_data_limit)
        except Exception as exc:  # noqa: BLE001 - a reset or a failed write ends this circuit, and only it
            log.debug("circuit of %s ended: %s", peer_id, str(exc) or type(exc).__name__)
        finally:
            if clean:  # the source finished: pass the end on, and the other direction goes on until its end
                with contextlib.suppress(Exception):
                    await dst_stream.close()
            else:  # a limit, a deadline or an error: the whole circuit goes
                for stream in (src_stream, dst_stream):
                    with contextlib.suppress(Exception):
                        await stream.reset()


async def _pump(source: Stream, sink: Stream, budget: list[int] | None) -> bool:
    """Copy ``source`` to ``sink`` until the source ends (True) or the shared byte ``budget`` of the circuit
    runs out (False)."""
    while True:
        data = await source.read(PUMP_CHUNK)
        if not data:
            return True
        if budget is not None:
            if len(data) > budget[0]:
                log.info("a circuit reached its %d bytes: cut", CIRCUIT_BYTES)
                return False
            budget[0] -= len(data)
        with trio.fail_after(PUMP_WRITE_S):
            await sink.write(data)


class HolePunching(DCUtRProtocol):
    """The library's DCUtR (it hole-punches every relayed connection of this host, as initiator or responder,
    and closes the relayed one once a direct one holds), recording in ``Host.punched`` the peers it succeeded
    with: a link to them shows as "hole-punched"."""

    def __init__(self, host: Host) -> None:
        super().__init__(host.libp2p, dial_timeout=PUNCH_DIAL_S)
        self.hexgen_host = host

    async def initiate_hole_punch(self, peer_id: ID) -> bool:
        punched = await super().initiate_hole_punch(peer_id)
        if not punched:
            log.info("hole punch to %s failed: the link stays relayed", peer_id)
        return punched

    def _schedule_relay_close(self, peer_id: ID) -> None:
        # called once a hole-punched connection is verified, and only then
        self.hexgen_host.punched.add(str(peer_id))
        log.info("hole-punched a direct connection to %s", peer_id)
        super()._schedule_relay_close(peer_id)


class Relaying:
    """The circuit relay v2 protocol on a daemon's host: the stop side always (relayed connections reach
    this node), the hop side when ``hop`` (this node relays for members that ``gate`` admits)."""

    def __init__(self, host: Host, gate: RelayGate, *, hop: bool) -> None:
        self.host = host
        self.gate = gate
        self.hop = hop
        self.protocol = Circuits(host.libp2p, limits=HEXGEN_RELAY_LIMITS, allow_hop=hop)
        self.refused = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Relaying]:
        async with background_trio_service(self.protocol), background_trio_service(HolePunching(self.host)):
            await self.protocol.event_started.wait()
            if self.hop:  # replaces the library's own handler: the gate comes first, the host's stream limits too
                self.host.handle(HOP_PROTOCOL, self.serve_hop)
            yield self

    async def serve_hop(self, stream: Stream) -> None:
        """The library's hop handler, for peers the gate admits (waiting up to MEMBERSHIP_WAIT_S for a newcomer's
        advert); any other peer gets PERMISSION_DENIED before a byte of its request is read."""
        peer = stream_peer(stream)
        with trio.move_on_after(MEMBERSHIP_WAIT_S):
            while not self.gate.admits(peer):
                await self.gate.changed(MEMBERSHIP_WAIT_S)
        if not self.gate.admits(peer):
            self.refused += 1
            log.warning("refused %s the relay: not a member of this swarm", peer)
            await _hop_status(stream, StatusCode.PERMISSION_DENIED)
            return
        await self.protocol._handle_hop_stream(stream)


async def _hop_request(host: Host, relay_id: str, message: HopMessage) -> tuple[Stream, HopMessage]:
    """Send one hop message to a connected relay; (the stream, the relay's STATUS reply). ``RelayError`` when
    the relay refuses, fails or stays silent for HOP_REPLY_TIMEOUT_S."""
    try:
        stream = await host.open_stream(relay_id, HOP_PROTOCOL)
    except Exception as exc:  # any failure to open the stream means the relay cannot be used
        raise RelayError(f"relay {relay_id}: cannot open a hop stream: {str(exc) or type(exc).__name__}") from exc
    try:
        with trio.fail_after(HOP_REPLY_TIMEOUT_S):
            await write_delimited_msg(stream, message)
            reply = await read_delimited_msg(stream, HopMessage)
    except Exception as exc:  # silence, a reset or a garbled reply: the relay cannot be used
        with contextlib.suppress(Exception):
            await stream.reset()
        raise RelayError(f"relay {relay_id}: no answer: {str(exc) or type(exc).__name__}") from exc
    status = reply.status if reply.HasField("status") else StatusCode.UNUSED
    if status != StatusCode.OK:
        with contextlib.suppress(Exception):
            await stream.reset()
        name = StatusCode(status).name if status in StatusCode._value2member_map_ else str(status)
        raise RelayError(f"relay {relay_id} refused: {name}")
    return stream, reply


async def reserve(host: Host, relay_addr: str) -> float:
    """Connect to the relay at ``relay_addr`` and reserve a slot for this node; returns the slot's expiry
    (Unix seconds). Raises ``DialError`` (``RelayError`` when the relay refuses)."""
    relay_id = await host.connect(relay_addr)
    request = HopMessage(type=HopMessage.RESERVE)
    stream, reply = await _hop_request(host, relay_id, request)
    with contextlib.suppress(Exception):
        await stream.close()
    return float(reply.reservation.expire) if reply.HasField("reservation") else math.inf


async def dial_circuit(host: Host, addr: str) -> str:
    """Connect to a peer through the relay that ``addr`` names (connecting to the relay first); returns the
    peer id. Raises ``DialError``."""
    relay_addr, relay_id, target = split_circuit(addr)
    if target in host.connected_peers():
        return target
    if relay_id == host.peer_id:  # the peer's slot is here: dialling it would connect this node to itself
        raise RelayError(f"{addr!r} is relayed by this node, which cannot dial a peer through itself")
    await host.connect(relay_addr)
    try:
        target_id = ID.from_base58(target)
    except ValueError:
        raise RelayError(f"{addr!r}: {target!r} is not a peer id") from None
    request = HopMessage(type=HopMessage.CONNECT, peer=CircuitPeer(id=target_id.to_bytes()))
    stream, _ = await _hop_request(host, relay_id, request)
    circuit = [multiaddr.Multiaddr(addr)]
    raw = RawConnection(stream, True, ConnectionType.RELAYED, circuit)
    try:
        conn = await host.libp2p.upgrade_outbound_connection(raw, target_id)
        # as the library's stop side tags the other end: the generic upgrade leaves the kind UNKNOWN
        conn.set_transport_info(circuit, ConnectionType.RELAYED)  # type: ignore[attr-defined]
    except Exception as exc:  # Noise or yamux over the circuit failed: the dial failed
        with contextlib.suppress(Exception):
            await stream.reset()
        raise RelayError(f"{addr}: {str(exc) or type(exc).__name__}") from exc
    return target


async def connect_peer(host: Host, peer_id: str, addrs: list[str]) -> None:
    """Dial ``peer_id`` at its direct addresses first, then through each relay it advertised, until one
    works. Raises ``DialError`` with the last reason."""
    direct = [a for a in addrs if not is_circuit(a)]
    last: DialError = DialError(f"{peer_id} advertises no address")
    # bounded: a dial of an address behind NAT may get no answer at all, and the swarm makes every later dial
    # of that peer wait for it ("Waiting for in-flight dial")
    with trio.move_on_after(DIRECT_DIAL_S if len(direct) < len(addrs) else math.inf):
        try:
            if direct:
                await host.connect_peer(peer_id, direct)
                return
        except DialError as exc:
            last = exc
    for addr in addrs:
        if not is_circuit(addr) or peer_id in host.connected_peers():
            continue
        try:
            await dial_circuit(host, addr)
            return
        except DialError as exc:
            last = exc
    if peer_id not in host.connected_peers():
        raise last


async def connect_address(host: Host, addr: str) -> str:
    """``Host.connect``, or ``dial_circuit`` for a relayed address; returns the peer id."""
    return await (dial_circuit(host, addr) if is_circuit(addr) else host.connect(addr))
