"""Heartbeats: the coordinator pings each member and drops the silent ones; members drop a silent coordinator.

A stopped process keeps its TCP connections open, so only silence shows it. A member dropped as silent is
still watched (``silent``), and its first echo after the silence brings it back at once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging

import trio

from hexgen.daemon.connectivity import Connectivity
from hexgen.daemon.host import Host, Stream, stream_peer
from hexgen.daemon.rpc import HEARTBEAT_PROTOCOL, read_within
from hexgen.daemon.swarm_state import SwarmState

log = logging.getLogger("hexgen.daemon")

HEARTBEAT_WARMUP_PINGS = 3
PING = b"\x01"


class Liveness:
    """Silent-peer detection. ``silent`` maps a member dropped for silence to when it was dropped."""

    def __init__(self, state: SwarmState, host: Host, connectivity: Connectivity) -> None:
        self.state = state
        self.host = host
        self.connectivity = connectivity
        self.silent: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        """While coordinator, keep one heartbeat stream to each connected member."""
        state = self.state
        watching: dict[str, trio.CancelScope] = {}
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                wanted: set[str] = set()
                if state.is_coordinator() and not state.leaving:
                    self.forget_silent()
                    wanted = (set(state.table.peers) | set(self.silent)) & self.host.connected_peers()
                for peer in wanted - watching.keys():
                    watching[peer] = trio.CancelScope()
                    nursery.start_soon(self.heartbeat, peer, watching)
                for peer in watching.keys() - wanted:
                    watching.pop(peer).cancel()
                await state.changed.wait(state.config.tick_s)

    def forget_silent(self) -> None:
        """Stop watching silent peers that stayed silent for the peer timeout."""
        cutoff = self.state.clock() - self.state.config.peer_timeout_s
        for peer in [p for p, since in self.silent.items() if since < cutoff]:
            del self.silent[peer]

    def drop_silent(self, peer: str, text: str) -> bool:
        """Drop a member that went silent, and keep watching it so it is back as soon as it answers. A
        coordinator that went silent (hung, or cut off by a partition) may have taken part of the swarm with
        it: only the coordinator watches members, so a peer cut off with it stays in this table and may be
        the candidate every node here would wait for. Each peer is then asked once, and the election waits
        for the answers."""
        state = self.state
        lost_coordinator = peer == state.election.coordinator and peer != state.peer_id
        if not state.lose(peer, f"{text} (hung?)"):
            return False
        self.silent[peer] = state.clock()
        if lost_coordinator and self._nursery is not None and not state.leaving:
            config = state.config
            state.claim_after = max(state.claim_after, state.clock() + config.hung_after_s + config.tick_s)
            self._nursery.start_soon(self.sweep)
        return True

    async def _open(self, peer: str) -> Stream | None:
        try:
            return await self.host.open_stream(peer, HEARTBEAT_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - libp2p's stream errors have no common base
            log.debug("no heartbeat stream to %s: %s", peer, exc)
            return None

    async def heartbeat(self, peer: str, watching: dict[str, trio.CancelScope]) -> None:
        """Ping ``peer`` every heartbeat interval; drop it when an echo is late. If it answers again later
        (a process that was stopped and resumed), ask it for a fresh advert so it rejoins at once.

        The first echoes on a stream get ``heartbeat_warmup_s``: a peer that has just started or just
        got a new coordinator is busy dialling and syncing with everyone, and is slow without being hung.
        """
        config = self.state.config
        scope = watching[peer]
        with scope:
            opened = False
            stream = None
            with trio.move_on_after(config.heartbeat_warmup_s):
                stream = await self._open(peer)
                opened = True
            try:
                if stream is not None:
                    await self._ping_until_silent(peer, stream)
                elif not opened:
                    # The connection stays up but carries nothing (a partition keeps TCP open for minutes, and
                    # the connector never drops a connected peer): as silent as a late echo. Still watched
                    # while silent, so the first stream that opens after the partition heals brings it back.
                    self.drop_silent(peer, f"peer {peer} opens no heartbeat stream")
            finally:
                if watching.get(peer) is scope:
                    del watching[peer]
                if stream is not None:
                    await _reset(stream)

    async def _ping_until_silent(self, peer: str, stream: Stream) -> None:
        config = self.state.config
        try:
            for answered in itertools.count():
                await stream.write(PING)
                warm = answered >= HEARTBEAT_WARMUP_PINGS
                echo = await read_within(stream, config.hung_after_s if warm else config.heartbeat_warmup_s)
                if echo is None:
                    self.drop_silent(peer, f"peer {peer} stopped answering heartbeats")
                    echo = await read_within(stream, config.peer_timeout_s)  # it may resume
                if not echo:
                    return
                if peer in self.silent:
                    await self.connectivity.sync_once_in_a_while(peer)  # its fresh advert brings it back
                    if self.state.is_member(peer):
                        # Only now: a peer neither silent nor a member is no longer watched, and run()
                        # would cancel this task, the sync with it, at the next change.
                        del self.silent[peer]
                await trio.sleep(config.heartbeat_interval_s)
        except Exception as exc:  # noqa: BLE001 - the peer reset or closed the stream
            log.debug("heartbeat stream to %s ended: %s", peer, exc)

    async def serve(self, stream: Stream) -> None:
        """Echo the coordinator's pings; when they stop, the coordinator is hung: drop it (an election follows)."""
        state, config = self.state, self.state.config
        peer = stream_peer(stream)
        try:
            if not state.is_member(peer):
                # A coordinator this node dropped as silent (or has not learnt of yet) is pinging: its
                # fresh advert brings it back now rather than at its next announcement.
                await self.connectivity.sync_once_in_a_while(peer)
                return
            for pings in itertools.count():
                limit = config.hung_after_s + config.heartbeat_interval_s
                ping = await read_within(
                    stream, limit if pings >= HEARTBEAT_WARMUP_PINGS else config.heartbeat_warmup_s
                )
                if ping is None:
                    if peer == state.election.coordinator:
                        self.drop_silent(peer, f"coordinator {peer} stopped its heartbeats")
                    return
                if not ping:
                    return
                await stream.write(ping)
        except Exception as exc:  # noqa: BLE001 - the peer reset or closed the stream
            log.debug("heartbeat stream from %s ended: %s", peer, exc)
        finally:
            await _reset(stream)

    async def sweep(self) -> None:
        """Drop every peer that does not echo one heartbeat ping within ``hung_after_s``."""

        async def ask(peer: str) -> None:
            if not await self.answers(peer, self.state.config.hung_after_s):
                self.drop_silent(peer, f"peer {peer} did not answer once the coordinator was gone")

        async with trio.open_nursery() as nursery:
            for peer in list(self.state.table.peers):
                nursery.start_soon(ask, peer)
        self.state.poke()

    async def answers(self, peer: str, seconds: float) -> bool:
        """False only when ``peer`` neither echoes a ping nor closes the stream within ``seconds`` (a peer
        that is not connected is the connector's business)."""
        with trio.move_on_after(seconds) as scope:
            stream = await self._open(peer)
            if stream is not None:
                try:
                    await stream.write(PING)
                    await stream.read(1)
                except Exception as exc:  # noqa: BLE001 - a closed stream is an answer too
                    log.debug("heartbeat probe of %s ended: %s", peer, exc)
                finally:
                    await _reset(stream)
        return not scope.cancelled_caught


async def _reset(stream: Stream) -> None:
    with trio.CancelScope(shield=True), contextlib.suppress(Exception):
        await stream.reset()
