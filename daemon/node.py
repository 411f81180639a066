"""The daemon's wiring: builds the control-plane parts around one shared ``SwarmState`` and runs them.

Each part is its own module with one job: ``adverts`` (this node's advert, the members'), ``connectivity``
(dials, redials, syncs), ``liveness`` (heartbeats), ``coordination`` (election ticks, planning),
``adoption`` (which plan is followed, fetched or pushed), ``reports`` (worker failures, spot-check
suspects), ``gossip`` (the control topic), ``link_probes``, ``serving`` (workers and requests of a daemon
that holds a checkpoint) and ``status``. docs/architecture.md tells how they fit together.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import trio
from trio import TaskStatus

from hexgen.coordinator.specs import ModelSpec, resolve_model
from hexgen.daemon.adoption import Adoption
from hexgen.daemon.adverts import Adverts, reachability_of
from hexgen.daemon.certificates import Certificate
from hexgen.daemon.config import NodeConfig
from hexgen.daemon.connectivity import Connectivity
from hexgen.daemon.coordination import Coordination
from hexgen.daemon.election import Election
from hexgen.daemon.envelope import Envelope, seal
from hexgen.daemon.generate_protocol import GENERATE_PROTOCOL
from hexgen.daemon.gossip import GossipIntake, Publisher, Routes, topic_for
from hexgen.daemon.hardware_profile import HardwareProfile
from hexgen.daemon.hop import REPLICA_PROTOCOL
from hexgen.daemon.host import Host, ListenError, Stream, check_listen_port, open_host, peer_of_address
from hexgen.daemon.kv_link import LINK_PROTOCOL, SpliceRoutes, address_ip
from hexgen.daemon.kv_relay import KV_PROTOCOL
from hexgen.daemon.link_probes import LinkProbes
from hexgen.daemon.liveness import Liveness
from hexgen.daemon.mdns import LanDiscovery
from hexgen.daemon.membership import PeerTable
from hexgen.daemon.messages import Advert
from hexgen.daemon.metrics import Metrics
from hexgen.daemon.model_files import is_checkpoint_dir, model_fingerprint
from hexgen.daemon.nat_check import AUTONAT_PROTOCOL, PRIVATE, Reachability, choose_servers
from hexgen.daemon.node_key import peer_id_of
from hexgen.daemon.probe import PROBE_PROTOCOL
from hexgen.daemon.relay import RelayGate, Relaying
from hexgen.daemon.relay_slots import RelaySlots, swarm_relays
from hexgen.daemon.reports import Reports
from hexgen.daemon.router import Router
from hexgen.daemon.rpc import (
    HEARTBEAT_PROTOCOL,
    PLAN_PROTOCOL,
    RENDEZVOUS_PROTOCOL,
    STATUS_PROTOCOL,
    SYNC_PROTOCOL,
    serve_rpc,
)
from hexgen.daemon.serving import Serving
from hexgen.daemon.splice import SPLICE_PROTOCOL, Splicer
from hexgen.daemon.status import StatusView
from hexgen.daemon.supervisor import Supervisor
from hexgen.daemon.swarm_state import AdoptedPlan, SelfInfo, SwarmState
from hexgen.daemon.swarm_view import assignments
from hexgen.engine.quant_bytes import scheme_of

log = logging.getLogger("hexgen.daemon")

MAX_REQUESTS_PER_PEER = 128  # generate streams one client peer may have open at once (yamux caps 256)
LEAVE_TTL_S = 10.0
MAX_SPLICE_RELAYS = 3  # relays a KV link is tried through, one after another

OnPlan = Callable[[AdoptedPlan, list[dict[str, Any]]], None]  # (plan, this node's roles in it)


class Node:
    """One daemon; ``run`` drives it until cancelled or ``leave`` is called. The parts that need the host
    (connectivity, liveness, probes, serving, status) exist once ``run`` has opened it."""

    def __init__(
        self,
        config: NodeConfig,
        key_pair: Any,
        hardware: HardwareProfile,
        certificate: Certificate | None = None,
        clock: Callable[[], float] = time.time,
        on_plan: OnPlan | None = None,
    ) -> None:
        self.config = config
        self.key_pair = key_pair
        self.clock = clock
        # as coordinator, its plans' replicas load the weights quantized as it was told
        self.model: ModelSpec = dataclasses.replace(resolve_model(config.model), quantize=scheme_of(config.quantize))
        peer_id = peer_id_of(key_pair)
        model_hash = model_fingerprint(config.model) if is_checkpoint_dir(config.model) else None
        host_name = config.host_name or f"{socket.gethostname()}-{peer_id[-6:]}"
        if config.relay_only:  # it relays; its GPUs, if any, serve nothing
            hardware = dataclasses.replace(hardware, gpus=())
        self.state = SwarmState.create(SelfInfo(peer_id, host_name, hardware, certificate, model_hash), config, clock)
        self._started_at = clock()
        self._on_plan = on_plan
        self.adverts = Adverts(self.state, key_pair, self.load, self._rendezvous)
        self.adoption = Adoption(self.state, self._plan_adopted, self._sync_member)
        self.coordination = Coordination(self.state, key_pair, self.model, self.adoption)
        self.coordination.reachability = lambda: self.adverts.reachability
        self.reports = Reports(self.state, key_pair, self.coordination, self._publish)
        self.gossip = GossipIntake(
            self.state,
            Routes(
                advert=self.adverts.apply,
                lease=self.adoption.apply_lease,
                plan=self.adoption.apply_plan,
                failure=self.reports.apply_failure,
                suspect=self.reports.apply_suspect,
                own_advert=self._own_advert,
            ),
        )
        self.host: Host | None = None
        self.http_url: str | None = None
        self.connectivity: Connectivity | None = None
        self.serving: Serving | None = None
        self.view: StatusView | None = None
        self._publisher: Publisher | None = None

    # ----------------------------------------------------------------- what other parts of the process read

    @property
    def peer_id(self) -> str:
        return self.state.peer_id

    @property
    def host_name(self) -> str:
        return self.state.me.host_name

    @property
    def plan(self) -> AdoptedPlan | None:
        return self.state.plan

    @property
    def table(self) -> PeerTable:
        return self.state.table

    @property
    def election(self) -> Election:
        return self.state.election

    @property
    def router(self) -> Router | None:
        return None if self.serving is None else self.serving.router

    @property
    def supervisor(self) -> Supervisor | None:
        return None if self.serving is None else self.serving.supervisor

    def load(self) -> dict[str, Any]:
        return {} if self.serving is None else self.serving.load()

    def roles(self) -> list[dict[str, Any]]:
        return [] if self.view is None else self.view.roles()

    def status(self, brief: bool = False) -> dict[str, Any]:
        view = self.view or StatusView(self.state, list, None)
        return view.status(brief)

    # ----------------------------------------------------------------- running

    async def run(self, *, task_status: TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        if self.config.relay and self.config.splice_port:  # before anything starts, as the libp2p port is
            try:
                check_listen_port(self.config.host.listen_host, self.config.splice_port)
            except ListenError as exc:
                raise ListenError(f"the splice port: {exc}") from None
        async with open_host(self.key_pair, self.config.host) as host, self._relaying(host).running():
            self.host = host
            self.state.own_addrs = host.addrs
            state = self.state
            state.claim_after = self.clock() + (self.config.startup_grace_s if self.config.bootstrap else 0.0)
            self._publisher = Publisher(
                host, topic_for(state.me.certificate.swarm_id if state.me.certificate is not None else None)
            )
            subscription = await host.pubsub.subscribe(self._publisher.topic)
            metrics = Metrics(self)
            if state.me.model_hash is not None:
                self.serving = Serving(state, host, self.reports, metrics, self.model.max_context)
                self.serving.kv_relay.routes = self._splice_routes(host)
            connectivity = self.connectivity = Connectivity(state, host, self.adverts, self._started_at)
            liveness = Liveness(state, host, connectivity)
            probes = LinkProbes(state, host, None if self.serving is None else self.serving.kv_relay.probe_link)
            reach = self._reachability(host)
            self.adverts.link_kinds = host.link_kinds
            self.view = StatusView(state, lambda: host.addrs, self.serving, host.link_kinds, lambda: reach.status)
            self._register(host, connectivity, liveness, probes)
            host.handle(AUTONAT_PROTOCOL, reach.serve, per_peer=2)
            async with trio.open_nursery() as nursery:
                if self.config.http_port is not None:  # first: a port that cannot be served stops the start
                    from hexgen.daemon.http_api import serve_http  # starlette and hypercorn load only when asked for

                    self.http_url = await nursery.start(serve_http, self, metrics)
                if self.serving is not None:
                    self.serving.router.background = nursery
                    nursery.start_soon(self.serving.supervisor.run)
                    nursery.start_soon(self.serving.kv_relay.run)
                    nursery.start_soon(self.serving.deploy)
                nursery.start_soon(self.gossip.read, subscription)
                nursery.start_soon(connectivity.run)
                nursery.start_soon(self.adverts.announce, self._publisher)
                nursery.start_soon(self.coordination.ticks, host.connected_peers)
                nursery.start_soon(self.coordination.run, self._publisher, self._pusher(nursery, host))
                nursery.start_soon(probes.run)
                nursery.start_soon(self.adoption.fetch_plans, host)
                nursery.start_soon(liveness.run)
                nursery.start_soon(reach.run)
                if self.config.mdns:
                    nursery.start_soon(LanDiscovery(self.peer_id, lambda: host.addrs, connectivity.discovered).run)
                nursery.start_soon(self._relay_slots(host, reach).run)
                if self.config.relay:
                    await self._splice(host, nursery)
                task_status.started(self)

    def _relaying(self, host: Host) -> Relaying:
        """Relayed connections reach every node; with ``relay`` it relays for whom may ask it (members only
        in a private swarm)."""
        gate = RelayGate(lambda peer: self.state.may_ask(peer, None), self.state.changed.wait)
        return Relaying(host, gate, hop=self.config.relay)

    def _reachability(self, host: Host) -> Reachability:
        """AutoNAT with the members this node is connected to directly as servers, the public ones first."""
        state = self.state

        def servers() -> list[str]:
            said = {p: reachability_of(env) for p, (env, _) in state.adverts.items() if p in state.table.peers}
            return choose_servers(said, host.link_kinds())

        def changed() -> None:
            self.adverts.reachability = reach.status
            self.adverts.announce_soon()

        reach = Reachability(host, servers, changed)
        return reach

    def _relay_slots(self, host: Host, reach: Reachability) -> RelaySlots:
        """Slots on each ``--relay-peer`` and, while AutoNAT finds this node private and it relays for no one,
        on up to MAX_LEARNED_RELAYS public relays among the members."""
        state, configured = self.state, self.config.relay_peers
        skip = {peer_of_address(r) for r in configured}
        slots: RelaySlots

        def relays() -> tuple[str, ...]:
            if self.config.relay or reach.status != PRIVATE:
                return configured
            keeping = {peer_of_address(r) for r in slots.held}
            return configured + swarm_relays(self._members_reach(), skip, keeping)

        slots = RelaySlots(host, relays, state.changed.wait, self._circuits_changed)
        return slots

    def _members_reach(self) -> dict[str, tuple[Advert, str]]:
        """Each member's advert and the reachability it advertises."""
        state = self.state
        return {
            p: (advert, reachability_of(env)) for p, (env, advert) in state.adverts.items() if p in state.table.peers
        }

    def _splice_routes(self, host: Host) -> SpliceRoutes:
        """KV splices on the swarm's public relays, those this node is connected to first; a relay is dialled
        where this node's connection reaches it, else at its advertised address."""

        def relays() -> dict[str, str]:
            found = swarm_relays(self._members_reach(), (), host.connected_peers(), cap=MAX_SPLICE_RELAYS)
            return {peer_of_address(addr): addr for addr in found}

        def ips(relay: str) -> list[str]:
            advertised = address_ip(relays().get(relay, ""))
            return host.remote_ips(relay) or ([advertised] if advertised else [])

        return SpliceRoutes(lambda: list(relays()), ips)

    async def _splice(self, host: Host, nursery: trio.Nursery) -> None:
        """Splice KV connections for members, on ``splice_port`` of this relay's listen address."""
        splicer = Splicer(
            lambda peer: self.state.may_ask(peer, None), self.config.host.listen_host, self.config.splice_port
        )
        await nursery.start(splicer.run)
        host.handle(SPLICE_PROTOCOL, splicer.serve_register)

    def _circuits_changed(self) -> None:
        if self.host is not None:
            self.state.own_addrs = self.host.addrs
            self.adverts.announce_soon()

    def _register(self, host: Host, connectivity: Connectivity, liveness: Liveness, probes: LinkProbes) -> None:
        assert self.view is not None
        host.handle(STATUS_PROTOCOL, self.view.serve)
        host.handle(PLAN_PROTOCOL, self.adoption.serve)
        host.handle(SYNC_PROTOCOL, connectivity.serve_sync)
        host.handle(PROBE_PROTOCOL, probes.serve)
        host.handle(HEARTBEAT_PROTOCOL, liveness.serve)
        if self.serving is None:
            host.handle(RENDEZVOUS_PROTOCOL, self._no_worlds)
            return
        host.handle(RENDEZVOUS_PROTOCOL, self.serving.serve_rendezvous)
        host.handle(GENERATE_PROTOCOL, self.serving.router.serve_generate, per_peer=MAX_REQUESTS_PER_PEER)
        host.handle(REPLICA_PROTOCOL, self.serving.router.serve_replica)
        host.handle(KV_PROTOCOL, self.serving.kv_relay.serve)
        host.handle(LINK_PROTOCOL, self.serving.kv_relay.serve_link)

    async def _no_worlds(self, stream: Stream) -> None:
        def answer(request: dict[str, Any]) -> dict[str, Any]:
            return {"error": "this daemon hosts no worlds"}

        await serve_rpc(stream, "rendezvous", answer, self.state.may_ask, self.state.reject)

    def _pusher(self, nursery: trio.Nursery, host: Host) -> Callable[[Envelope, Envelope], None]:
        def push(lease: Envelope, plan: Envelope) -> None:
            nursery.start_soon(self.adoption.push, host, lease, plan)

        return push

    async def leave(self) -> None:
        """Tell the swarm this node is leaving, then drop every connection (peers see it at once)."""
        self.state.leaving = True
        if self.host is None:
            return
        await self._publish([seal("leave", {}, self.key_pair, LEAVE_TTL_S)])
        with trio.move_on_after(0.3):
            await trio.sleep(0.2)  # let the gossip frame leave the socket before closing it
        for peer in list(self.host.connected_peers()):
            await self.host.disconnect(peer)

    def handle_gossip(self, sender: str, data: bytes) -> None:
        """Verify and apply one gossip message from ``sender`` (see ``GossipIntake.take``)."""
        self.gossip.take(sender, data)

    async def _publish(self, envelopes: list[Envelope]) -> None:
        if self._publisher is not None:
            await self._publisher(envelopes)

    def _rendezvous(self) -> tuple[str, int] | None:
        return None if self.serving is None else self.serving.rendezvous

    def _plan_adopted(self, plan: AdoptedPlan) -> None:
        if self._on_plan is not None:
            self._on_plan(plan, self.roles_in(plan))

    def roles_in(self, plan: AdoptedPlan) -> list[dict[str, Any]]:
        return assignments(plan.body).get(self.peer_id, [])

    def _sync_member(self, peer: str) -> None:
        if self.connectivity is not None:
            self.connectivity.soon(peer)

    def _own_advert(self, env: Envelope) -> None:
        if self.connectivity is not None:
            self.connectivity.own_advert(env)
