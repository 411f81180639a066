"""Staying connected: bootstrap dials, redials with backoff, syncs of members' adverts, one key per daemon."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import trio

from hexgen.daemon.adverts import Adverts
from hexgen.daemon.certificates import CertificateError
from hexgen.daemon.envelope import Envelope, EnvelopeRejected, from_wire, to_wire, verify
from hexgen.daemon.host import DialError, Host, Stream, peer_of_address
from hexgen.daemon.messages import Advert
from hexgen.daemon.relay import connect_address, connect_peer, is_circuit
from hexgen.daemon.rpc import RPC_TIMEOUT_S, SYNC_PROTOCOL, call, serve_rpc
from hexgen.daemon.swarm_state import SwarmState

log = logging.getLogger("hexgen.daemon")

NEWCOMER_S = 3.0  # a node announces itself on every new connection for this long after it starts
UNKNOWN_PEER_SYNC_AFTER_S = 0.2  # its own advert, by gossip, usually comes first
MAX_SYNC_ADVERTS = 1024
BOOTSTRAP_DELAYS_S = (0.0, 0.2, 0.5, 1.0, 2.0)
RELAYED_DIAL_S = 6.0  # a member that advertises relayed addresses: its direct ones first, then the relay


class DuplicateKeyError(RuntimeError):
    """Another running daemon holds this node's key: two processes with one peer id split the swarm."""


def _transport(addr: str) -> tuple[str, str] | None:
    """(IP or name, TCP port) of ``/ip4|ip6|dns*/HOST/tcp/PORT[/p2p/ID]``; None for anything else."""
    parts = addr.split("/")
    if len(parts) < 5 or parts[3] != "tcp":
        return None
    return parts[2], parts[4]


def _is_loopback_or_any(host: str) -> bool:
    return host in ("localhost", "0.0.0.0", "::") or host.startswith("127.") or host == "::1"


def foreign_addresses(addrs: list[str], own: list[str], *, any_on_own_port: bool = False) -> list[str]:
    """``addrs`` less any that reach this node itself: its own listen addresses, and loopback ones on its
    port (another host's advert naming 127.0.0.1 would reach this node, not that host); with
    ``any_on_own_port``, every address on its port (this host may be known by names it does not list: a NAT
    or DNS address). Dialling this node's id at one of them connects to itself, which reads as a second
    daemon with this key. O(len(addrs) + len(own))."""
    mine = {t for t in map(_transport, own) if t is not None}
    ports = {t[1] for t in mine}
    out = []
    for addr in addrs:
        at = _transport(addr)
        if at is None or at in mine or (at[1] in ports and (any_on_own_port or _is_loopback_or_any(at[0]))):
            continue
        out.append(addr)
    return out


def is_own_address(addr: str, peer_id: str, own: list[str]) -> bool:
    """A bootstrap address that is this node: one of its own, or one naming its id on its port (this host
    under another name: a NAT or DNS address). One naming its id on another port cannot be this node (it
    listens on none): that dial is kept, and connecting proves another daemon runs with this key."""
    if addr in own:
        return True
    if not addr.rstrip("/").endswith(f"/p2p/{peer_id}"):
        return False
    at = _transport(addr)
    return at is None or at[1] in {t[1] for t in map(_transport, own) if t is not None}


@dataclass
class LostPeer:
    """A member (or, keyed by address, a bootstrap peer) this node dials again until it answers."""

    since: float
    gap: float
    next_try: float
    dialling: bool = False


class Connectivity:
    """Keeps a connection to every member, and learns members from peers' signed adverts in one round trip."""

    def __init__(self, state: SwarmState, host: Host, adverts: Adverts, started_at: float) -> None:
        self.state = state
        self.host = host
        self.adverts = adverts
        self.started_at = started_at  # adverts of this id issued earlier are a previous run's
        self._synced_at: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for addr in self.state.config.bootstrap:
                nursery.start_soon(self.dial_bootstrap, addr)
            nursery.start_soon(self.keep_connected)
            nursery.start_soon(self.redial)
            nursery.start_soon(self.watch_connects)
            nursery.start_soon(self.watch_disconnects)

    def soon(self, peer: str, *, only_self: bool = False) -> None:
        """Sync from ``peer`` in the background (at most once per heartbeat warm-up)."""
        if self._nursery is not None:
            self._nursery.start_soon(self.sync_once_in_a_while, peer, only_self)

    async def dial_bootstrap(self, addr: str) -> None:
        if is_own_address(addr, self.state.peer_id, self.host.addrs):
            log.info("not dialling %s: it is this node", addr)  # one bootstrap list for every host names it too
            return
        last: Exception | None = None
        for delay in BOOTSTRAP_DELAYS_S:
            await trio.sleep(delay)
            try:
                peer_id = await connect_address(self.host, addr)
            except DialError as exc:  # retried
                last = exc
                continue
            await self.sync_from(peer_id)
            return
        log.warning("bootstrap %s unreachable: %s", addr, last)

    async def discovered(self, addrs: list[str]) -> None:
        """A daemon heard of on the LAN (mDNS, all ``addrs`` of one peer): dialled at the first address that
        answers, then synced, unless already connected. In a private swarm its advert still needs a
        certificate: a connection alone admits no one."""
        peer = peer_of_address(addrs[0])
        if peer in self.host.connected_peers() or peer == self.state.peer_id:
            return
        for addr in addrs:
            try:
                with trio.fail_after(RPC_TIMEOUT_S):
                    await self.host.connect(addr)
            except (DialError, trio.TooSlowError) as exc:
                log.debug("LAN peer %s at %s: %s", peer, addr, exc)
                continue
            log.info("found %s on the LAN", peer)
            await self.sync_from(peer)
            return

    async def keep_connected(self) -> None:
        state = self.state
        while True:
            connected = self.host.connected_peers()
            for record in list(state.table.peers.values()):
                if record.peer_id in connected or state.leaving:
                    continue
                with trio.move_on_after(RELAYED_DIAL_S if any(map(is_circuit, record.addrs)) else 2.0):
                    await self._connect(record.peer_id, record.addrs)
                # A peer that cannot be dialled is dropped at once (gossip replays recent adverts of dead
                # nodes, and a missed disconnect event must not keep a dead peer, or its lease, alive); if
                # it lives, its next advert brings it back.
                if record.peer_id not in self.host.connected_peers():
                    state.lose(record.peer_id, f"peer {record.peer_id} is unreachable")
            await state.changed.wait(1.0)

    async def _connect(self, peer: str, addrs: list[str]) -> bool:
        try:
            await connect_peer(self.host, peer, addrs)
        except DialError as exc:
            log.debug("dialling %s failed: %s", peer, exc)
            return False
        return True

    async def redial(self) -> None:
        """Dial again, with backoff, every member whose advert this node holds but that is neither in the peer
        table nor connected (it vanished without leaving: a crash, or a partition whose connections timed
        out); and the bootstrap peers whenever this node is connected to nobody. A member given up on after
        ``redial_for_s`` is forgotten. One pass a second; dials run side by side."""
        lost: dict[str, LostPeer] = {}
        async with trio.open_nursery() as nursery:
            while not self.state.leaving:
                for key, addrs, entry in self.due(lost):
                    nursery.start_soon(self.redial_one, key, addrs, entry)
                await trio.sleep(1.0)

    def due(self, lost: dict[str, LostPeer]) -> list[tuple[str, list[str] | None, LostPeer]]:
        """The redials to start now: (member id and its addresses, or a bootstrap address and None)."""
        state, config = self.state, self.state.config
        now, connected = state.clock(), self.host.connected_peers()
        targets: dict[str, list[str] | None] = {
            peer: list(advert.addrs)
            for peer, (_, advert) in state.adverts.items()
            if peer != state.peer_id and peer not in state.table.peers and peer not in connected
        }
        if not connected:
            targets.update(dict.fromkeys(config.bootstrap))
        for key in [k for k in lost if k not in targets]:
            del lost[key]
        out = []
        for key, addrs in targets.items():
            entry = lost.setdefault(key, LostPeer(now, config.redial_first_s, now + config.redial_first_s))
            if addrs is not None and now - entry.since > config.redial_for_s:
                del lost[key], state.adverts[key]
            elif now >= entry.next_try and not entry.dialling:
                entry.gap = min(2 * entry.gap, config.redial_max_gap_s)
                entry.next_try = now + entry.gap
                entry.dialling = True
                out.append((key, addrs, entry))
        return out

    async def redial_one(self, key: str, addrs: list[str] | None, entry: LostPeer) -> None:
        """One dial of a lost member (``addrs``) or a bootstrap address (``key`` when ``addrs`` is None); on
        success a sync brings its view, and the members it knows, at once."""
        peer: str | None = key if addrs is not None else None
        try:
            with trio.move_on_after(RPC_TIMEOUT_S):
                if addrs is None:
                    peer = await connect_address(self.host, key)
                else:
                    await connect_peer(self.host, key, addrs)
        except DialError as exc:  # retried
            log.debug("dialling %s again failed: %s", key, exc)
        finally:
            entry.dialling = False
        if peer is not None and peer in self.host.connected_peers():
            log.info("reconnected to %s", peer)
            await self.sync_from(peer)

    async def watch_connects(self) -> None:
        """A joining node announces itself on its first connections, so every member sees it in one gossip
        hop. Members do not answer each newcomer with adverts of their own (that was a storm of N adverts,
        each verified by N nodes, on every join: the newcomer has them all from its bootstrap sync); they ask an
        unknown peer for its own advert alone if it has not come by gossip soon after (gossip reaches a member
        outside the newcomer's mesh only at a later heartbeat; a peer back from a partition announces nothing)."""
        joined = trio.current_time()
        async with trio.open_nursery() as nursery:
            async for peer_id in self.host.connects:
                if peer_id == self.state.peer_id:  # no dial of this node goes to its own addresses
                    raise self.duplicate_key("a connection with a peer of this id")
                if trio.current_time() - joined < NEWCOMER_S:
                    self.adverts.announce_soon()
                elif peer_id not in self.state.table.peers:
                    nursery.start_soon(self.learn_unknown, peer_id)

    async def learn_unknown(self, peer_id: str) -> None:
        await trio.sleep(UNKNOWN_PEER_SYNC_AFTER_S)
        if self.host.speaks(peer_id, SYNC_PROTOCOL) is False:
            return  # a client (hexgen-client, a watcher): it has no advert, and asking logs a libp2p error
        if peer_id not in self.state.table.peers and peer_id in self.host.connected_peers():
            await self.sync_once_in_a_while(peer_id, only_self=True)

    async def watch_disconnects(self) -> None:
        async with trio.open_nursery() as nursery:
            async for peer_id in self.host.disconnects:
                if peer_id in self.host.connected_peers():
                    continue
                record = self.state.table.peers.get(peer_id)
                if record is not None and any(map(is_circuit, record.addrs)) and not self.state.leaving:
                    nursery.start_soon(self.redial_relayed, peer_id, record.addrs)
                else:
                    self.state.lose(peer_id, f"peer {peer_id} disconnected")

    async def redial_relayed(self, peer_id: str, addrs: list[str]) -> None:
        """A member reached through a relay lost its connection: a relay cuts every circuit at its limits
        (relay.CIRCUIT_DURATION_S, CIRCUIT_BYTES), so it is dialled again at once, and lost only if that
        fails (a peer that died is then lost RELAYED_DIAL_S later than a directly connected one)."""
        with trio.move_on_after(RELAYED_DIAL_S):
            await self._connect(peer_id, addrs)
        if peer_id not in self.host.connected_peers():
            self.state.lose(peer_id, f"peer {peer_id} disconnected")

    def duplicate_key(self, seen: str) -> DuplicateKeyError:
        return DuplicateKeyError(
            f"another daemon runs with this node's key (peer id {self.state.peer_id}; seen: {seen}): "
            "give each daemon its own --key-file"
        )

    def own_advert(self, env: Envelope) -> None:
        """An advert of this node's id at other addresses. One issued before this process started may be a
        previous run's (a restart with the same key, perhaps under a name of this host it no longer lists):
        dialled only where this node cannot be, off its own port. It may also be a daemon with this key
        that started first, which only such an advert (synced from a peer) shows."""
        if self._nursery is None:
            return
        try:
            advert = Advert.from_wire(env.body)
        except ValueError:
            return
        earlier = env.issued < self.started_at
        addrs = foreign_addresses(list(advert.addrs), self.host.addrs, any_on_own_port=earlier)
        if addrs:
            self._nursery.start_soon(self.dial_own_id, addrs)

    async def dial_own_id(self, addrs: list[str]) -> None:
        """A peer holds a fresh advert of this node's id at other addresses: a daemon that uses this key now
        (the dial connects, and watch_connects stops this one) or one that just stopped (the dial fails).
        ``addrs`` never includes this node's own (foreign_addresses): a dial of itself would look the same."""
        addrs = foreign_addresses(addrs, self.host.addrs)
        if addrs:
            with trio.move_on_after(RPC_TIMEOUT_S):
                await self._connect(self.state.peer_id, addrs)

    async def sync_once_in_a_while(self, peer: str, only_self: bool = False) -> None:
        """``sync_from(peer)``, at most once per heartbeat warm-up per peer (the peer chose to call)."""
        now = self.state.clock()
        if now - self._synced_at.get(peer, -math.inf) < self.state.config.heartbeat_warmup_s:
            return
        if len(self._synced_at) >= MAX_SYNC_ADVERTS:
            self._synced_at.clear()
        self._synced_at[peer] = now
        await self.sync_from(peer, only_self)

    async def sync_from(self, peer_id: str, only_self: bool = False) -> None:
        """Learn the members a peer knows from their own signed adverts, in one round trip, instead of
        waiting for each to re-announce (``only_self``: the peer's own advert alone)."""
        request = self.state.credentials()
        if only_self:
            request["self"] = True
        try:
            with trio.fail_after(RPC_TIMEOUT_S):
                reply = await call(self.host, peer_id, SYNC_PROTOCOL, request)
            adverts = reply.get("adverts")
            if not isinstance(adverts, list):
                raise ValueError(reply.get("error") or "a sync reply lists adverts")
        except Exception as exc:  # noqa: BLE001 - unreachable or slow: the periodic adverts still come
            log.debug("sync from %s failed: %s", peer_id, exc)
            return
        now = self.state.clock()
        for item in adverts[:MAX_SYNC_ADVERTS]:
            try:
                env = verify(from_wire(item), kind="advert", now=now)
                if env.signer != self.state.peer_id:
                    self.adverts.apply(env, now)
                else:
                    self.own_advert(env)
            except EnvelopeRejected as exc:
                self.state.reject(exc.reason, f"synced advert: {exc} (from {peer_id})")
            except (KeyError, TypeError, ValueError, CertificateError) as exc:
                self.state.reject("malformed", f"synced advert: {exc} (from {peer_id})")

    async def serve_sync(self, stream: Stream) -> None:
        state = self.state

        def answer(request: dict[str, object]) -> dict[str, object]:
            own = self.adverts.seal_own()
            if request.get("self") is True:  # a peer that only wants to know this node
                return {"adverts": [to_wire(own)]}
            live = [env for peer, (env, _) in state.adverts.items() if peer in state.table.peers]
            return {"adverts": [to_wire(env) for env in [own, *live][:MAX_SYNC_ADVERTS]]}

        await serve_rpc(stream, "sync", answer, state.may_ask, state.reject)
