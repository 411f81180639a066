"""Link probes: each round, this node measures its share of a bounded, rotating set of peer pairs, each over
the path its bytes take (``daemon.path_probes``): a TCP connection to a peer linked directly, a KV link to one
that is not; a libp2p stream where that path cannot be had."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import trio

from hexgen.daemon.cluster_view import LinkMeasurement, probe_plan
from hexgen.daemon.host import Host, Stream, stream_peer
from hexgen.daemon.pair_links import NO_WORLDS
from hexgen.daemon.probe import PROBE_PROTOCOL, probe, serve_probe, tcp_probe
from hexgen.daemon.swarm_state import SwarmState

log = logging.getLogger("hexgen.daemon")

PATH_RETRY_S = 30.0  # a path that could not be probed (a peer behind a NAT it dialled out of) waits this long


class LinkProbes:
    """Measured links go to ``state.measured`` (newest last), which this node's adverts carry."""

    def __init__(
        self, state: SwarmState, host: Host, probe_link: Callable[[str], Awaitable[LinkMeasurement]] | None = None
    ) -> None:
        self.state = state
        self.host = host
        self.probe_link = probe_link  # a KV link's path to a peer (``KvRelay.probe_link``; None: no KV links)
        self._path_retry: dict[str, float] = {}  # peer -> when its path may be probed again after a failure

    async def run(self) -> None:
        state = self.state
        round_index = 0
        while True:
            await trio.sleep(state.config.probe_interval_s)
            pairs = probe_plan(state.table.live_ids(), state.config.probes_per_round, round_index=round_index)
            round_index += 1
            for a, b in pairs:
                peer = b if a == state.peer_id else a if b == state.peer_id else None
                if peer is not None and peer in state.table.peers:
                    await self.measure(peer)

    async def measure(self, peer: str) -> None:
        measured = await self._path(peer)
        if measured is None:
            try:
                measured = await probe(self._stream(peer), self.state.peer_id, peer)
            except Exception as exc:  # noqa: BLE001 - a failed probe leaves the declared bandwidth in place
                log.debug("probe of %s failed: %s", peer, exc)
                return
        self.state.measured.pop(peer, None)
        self.state.measured[peer] = measured

    async def _path(self, peer: str) -> LinkMeasurement | None:
        """The path ``peer``'s bytes take, measured; None where it could not be, or failed less than
        PATH_RETRY_S ago (said why in the log, once)."""
        if trio.current_time() < self._path_retry.get(peer, -math.inf):
            return None
        kind = self.host.link_kinds().get(peer)
        ips = [ip for ip in self.host.remote_ips(peer) if ":" not in ip]  # IPv4: what the listener takes
        try:
            if kind == "direct" and ips:
                return await tcp_probe(self._stream(peer), ips[0], self.state.peer_id, peer)
            if kind in NO_WORLDS and self.probe_link is not None:
                return await self.probe_link(peer)
        except Exception as exc:  # noqa: BLE001 - every layer of the path has its errors; the stream probe stays
            why = str(exc) or type(exc).__name__
            log.info("the %s path to %s could not be probed (again in %g s): %s", kind, peer, PATH_RETRY_S, why)
            self._path_retry[peer] = trio.current_time() + PATH_RETRY_S
        return None

    def _stream(self, peer: str) -> Callable[[], Awaitable[Stream]]:
        return lambda: self.host.open_stream(peer, PROBE_PROTOCOL)

    async def serve(self, stream: Stream) -> None:
        peer = stream_peer(stream)
        if not self.state.may_ask(peer, None):
            self.state.reject("not-member", f"probe from non-member {peer}")
            with trio.CancelScope(shield=True):
                try:
                    await stream.reset()
                except Exception as exc:  # noqa: BLE001 - the stream may be gone already
                    log.debug("resetting a probe stream failed: %s", exc)
            return
        await serve_probe(stream)
