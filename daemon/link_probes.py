"""Link probes: each round, this node measures its share of a bounded, rotating set of peer pairs."""

from __future__ import annotations

import logging

import trio

from hexgen.daemon.cluster_view import probe_plan
from hexgen.daemon.host import Host, Stream, stream_peer
from hexgen.daemon.probe import PROBE_PROTOCOL, probe, serve_probe
from hexgen.daemon.swarm_state import SwarmState

log = logging.getLogger("hexgen.daemon")


class LinkProbes:
    """Measured links go to ``state.measured`` (newest last), which this node's adverts carry."""

    def __init__(self, state: SwarmState, host: Host) -> None:
        self.state = state
        self.host = host

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
        try:
            measured = await probe(lambda: self.host.open_stream(peer, PROBE_PROTOCOL), self.state.peer_id, peer)
        except Exception as exc:  # noqa: BLE001 - a failed probe leaves the declared bandwidth in place
            log.debug("probe of %s failed: %s", peer, exc)
            return
        self.state.measured.pop(peer, None)
        self.state.measured[peer] = measured

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
