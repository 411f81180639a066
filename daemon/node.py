"""The daemon: one trio process per host that joins the swarm, keeps the peer table, takes part in the
election and, while it holds the lease, plans for the swarm and publishes signed plans.

Tasks (all in one nursery): the gossip reader, the advert announcer, the connector that keeps a link to
every known peer, the disconnect watcher, the election ticker, the planner (coordinator only), the plan
fetcher and the ``/hexgen/status/1`` and ``/hexgen/plan/1`` handlers. Control messages travel as msgpack
lists of signed envelopes on one GossipSub topic. Gossip may drop a message, so adverts are re-sent
slowly and the lease often; a plan goes out once, and a node whose adopted epoch is behind the one the
lease names fetches the signed plan from the coordinator directly. A directly connected peer stays a
member while its connection is healthy (libp2p's health monitor pings it), so the slow adverts are
needed only for liveness of peers reached through gossip alone.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from hexgen.coordinator import planner
from hexgen.coordinator.evaluate import PlanError
from hexgen.coordinator.fallback import colocated_plan, needs_pair
from hexgen.coordinator.pinned import PinnedGroup, PinnedPlanError, pinned_plan
from hexgen.coordinator.plan import Plan, layer_range
from hexgen.coordinator.specs import ModelSpec, resolve_model
from hexgen.coordinator.workload import synthetic
from hexgen.daemon.cluster_view import LinkMeasurement, PeerHardware, build_cluster_from_peers, probe_plan
from hexgen.daemon.deployment import DeploymentError, deployment_from_plan
from hexgen.daemon.election import Election, Lease, LeaseRejected
from hexgen.daemon.envelope import Envelope, EnvelopeRejected, ReplayGuard, from_wire, seal, to_wire, verify
from hexgen.daemon.failure import BlockedLinks, FailureReport, WorldFailure, advert_ips, blocked_pair
from hexgen.daemon.hardware import HardwareError, HardwareProfile
from hexgen.daemon.host import Host, HostConfig, open_host
from hexgen.daemon.identity import Certificate, CertificateError, verify_certificate
from hexgen.daemon.membership import PeerTable
from hexgen.daemon.metrics import Metrics
from hexgen.daemon.model_files import is_checkpoint_dir, model_fingerprint
from hexgen.daemon.probe import PROBE_PROTOCOL, probe, serve_probe
from hexgen.daemon.rate_limit import RateLimiter
from hexgen.daemon.router import GENERATE_PROTOCOL, REPLICA_PROTOCOL, Router
from hexgen.daemon.spot_check import Verdict
from hexgen.daemon.supervisor import SECRET_BYTES, Supervisor
from hexgen.daemon.swarm_view import assignments
from hexgen.daemon.wire import FrameError, FrameReader, write_frame
from hexgen.engine.tokenizer import Tokenizer

log = logging.getLogger("hexgen.daemon")

STATUS_PROTOCOL = TProtocol("/hexgen/status/1")
PLAN_PROTOCOL = TProtocol("/hexgen/plan/1")
SYNC_PROTOCOL = TProtocol("/hexgen/sync/1")
RENDEZVOUS_PROTOCOL = TProtocol("/hexgen/rendezvous/1")
HEARTBEAT_PROTOCOL = TProtocol("/hexgen/heartbeat/1")
CONTROL_TOPIC = "hexgen/control/1"
MAX_GOSSIP_BYTES = 256 << 10
RPC_TIMEOUT_S = 5.0
# How long a store's daemon waits for the plan that puts an asker in one of its worlds (plans reach daemons
# a moment apart); the asker asks again until its world's start times out.
GRANT_WAIT_S = 3.0
MAX_PREFIX_CHARS = 256
MAX_ADVERTISED_LINKS = 32
PLAN_FETCH_GAP_S = 0.5
NEWCOMER_S = 3.0  # a node announces itself on every new connection for this long after it starts
UNKNOWN_PEER_SYNC_AFTER_S = 0.2  # its own advert, by gossip, usually comes first
# Worker failures a membership gets re-plans for; after them the swarm serves the colocated fallback plan.
MAX_FAILURE_REPLANS = 3
BLOCKED_LINK_GB_S = 1e-6  # what the planner is told a link that cannot carry a world moves
MAX_SYNC_ADVERTS = 1024
MAX_EVENTS = 200
MAX_ACCUSED = 64
HEARTBEAT_WARMUP_PINGS = 3
MAX_REQUESTS_PER_PEER = 128  # generate streams one client peer may have open at once (yamux caps 256)
RATE_BURST_S = 5.0  # a rate-limited peer may send this many seconds' worth of requests at once


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
    daemon with this key."""
    mine = {_transport(a) for a in own} - {None}
    ports = {t[1] for t in mine if t is not None}
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


@dataclass(frozen=True)
class NodeConfig:
    model: str = "llama-2-7b"
    host: HostConfig = field(default_factory=HostConfig)
    bootstrap: tuple[str, ...] = ()
    host_name: str = ""
    advert_interval_s: float = 15.0  # while the advert's content changes
    advert_refresh_s: float = 45.0  # while it does not
    # for peers with no direct connection; a connected peer is watched by the connection's health pings
    peer_timeout_s: float = 100.0
    lease_ttl_s: float = 12.0
    plan_debounce_s: float = 0.15
    tick_s: float = 0.5
    # A node that dialled bootstrap peers listens this long for a live lease before claiming one itself.
    startup_grace_s: float = 2.0
    probe_interval_s: float = 30.0
    probes_per_round: int = 2
    # The coordinator pings each member over a long-lived stream; a peer silent for hung_after_s is dropped
    # (a stopped process keeps its TCP connections open, so only silence shows it).
    heartbeat_interval_s: float = 0.6
    hung_after_s: float = 1.9
    heartbeat_warmup_s: float = 5.0
    worker_device: str = "cpu"
    worker_threads: int = 1
    verify_fraction: float = 0.0  # of this entry's finished requests, spot-checked on other replicas
    tamper_tokens: bool = False  # tests only: answer replica hops with wrong tokens
    pinned: tuple[PinnedGroup, ...] | None = None
    http_host: str = "127.0.0.1"
    http_port: int | None = None  # the OpenAI-compatible gateway, /status and /metrics; None: no HTTP
    api_key: str | None = None  # required as a bearer token on /v1/* when set
    max_request_rate: float = 0.0  # generate requests per second one client peer may send (0: no limit)
    request_timeout_s: float = 30.0  # a request no replica takes (no token) for this long gets an error
    # for a world's ranks to connect once all of them started; None: the backend's (engine.bounds)
    connect_timeout_s: float | None = None
    # Members lost without a goodbye are dialled again, first after redial_first_s, the gap doubling up to
    # redial_max_gap_s, for redial_for_s: a partition that outlasts TCP's retransmissions closes its
    # connections, and only a dial brings the sides back together.
    redial_first_s: float = 1.0
    redial_max_gap_s: float = 20.0
    redial_for_s: float = 1800.0


@dataclass
class LostPeer:
    """A member (or, keyed by address, a bootstrap peer) this node dials again until it answers."""

    since: float
    gap: float
    next_try: float
    dialling: bool = False


@dataclass
class AdoptedPlan:
    term: int
    epoch: int
    coordinator: str
    members: list[str]
    body: dict[str, Any]


class Node:
    """The swarm-facing state of one daemon; ``run`` drives it until cancelled or ``leave`` is called."""

    def __init__(
        self,
        config: NodeConfig,
        key_pair: Any,
        hardware: HardwareProfile,
        certificate: Certificate | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.key_pair = key_pair
        self.peer_id = ID.from_pubkey(key_pair.public_key).to_base58()
        self.hardware = hardware
        self.certificate = certificate
        self.clock = clock
        self._started_at = clock()  # adverts of this id issued earlier are a previous run's (_own_advert)
        self.model: ModelSpec = resolve_model(config.model)
        self.host_name = config.host_name or f"{socket.gethostname()}-{self.peer_id[-6:]}"
        self.table = PeerTable(self.peer_id, config.peer_timeout_s)
        self.election = Election(self.peer_id)
        self.replay = ReplayGuard(window_s=60.0, max_entries=100_000)
        self.rejections: Counter[str] = Counter()
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.on_plan: Callable[[AdoptedPlan, list[dict[str, Any]]], None] | None = None  # (plan, this node's roles)
        self.http_url: str | None = None
        self._nursery: trio.Nursery | None = None
        # members dropped for missed heartbeats (and when), still watched for a resume while connected
        self._silent: dict[str, float] = {}
        self._synced_at: dict[str, float] = {}
        self.flagged: dict[str, dict[str, Any]] = {}  # peers caught by spot-checks: who flagged them and why
        self.plan: AdoptedPlan | None = None
        self.topic = CONTROL_TOPIC + (f"/{certificate.swarm_id}" if certificate else "")
        self.host: Host | None = None
        self._changed = trio.Event()
        self._published: tuple[Envelope, Envelope] | None = None
        self._planned_for: tuple[Any, ...] = ()
        self._failures_seen: dict[int, int] = {}  # table version -> failure re-plans made for it
        self._failure_replans = 0
        self._failure_replans_published = 0
        self.blocked = BlockedLinks()  # peer pairs whose link cannot carry a world (every node keeps them)
        self._previous: tuple[Plan, Any] | None = None
        self._leaving = False
        self._claim_after = float("inf")
        self.links: dict[str, LinkMeasurement] = {}
        self._advert_freshness = config.advert_refresh_s + config.advert_interval_s + 1.0
        self._announce_now = trio.Event()
        self._want_plan = trio.Event()
        self._adverts: dict[str, Envelope] = {}  # the latest advert of each member, handed to newcomers
        self.model_hash: str | None = None
        self.supervisor: Supervisor | None = None
        self.router: Router | None = None
        self.rendezvous: tuple[str, int] | None = None
        if is_checkpoint_dir(config.model):
            self.model_hash = model_fingerprint(config.model)
            self.supervisor = Supervisor(
                self.peer_id,
                config.model,
                device=config.worker_device,
                threads=config.worker_threads,
                connect_timeout_s=config.connect_timeout_s,
            )

    # ----------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_host(self.key_pair, self.config.host) as host:
            self.host = host
            self._claim_after = self.clock() + (self.config.startup_grace_s if self.config.bootstrap else 0.0)
            host.handle(STATUS_PROTOCOL, self._serve_status)
            host.handle(PLAN_PROTOCOL, self._serve_plan)
            host.handle(SYNC_PROTOCOL, self._serve_sync)
            host.handle(PROBE_PROTOCOL, self._serve_probe)
            host.handle(HEARTBEAT_PROTOCOL, self._serve_heartbeat)
            host.handle(RENDEZVOUS_PROTOCOL, self._serve_rendezvous)
            subscription = await host.pubsub.subscribe(self.topic)
            metrics = Metrics(self)
            if self.supervisor is not None:
                # the store binds where libp2p listens; peers reach it where they reach this host
                self.rendezvous = (host.hosts[0], _free_port(self.config.host.listen_host))
                self.supervisor.store_address = self.rendezvous
                self.supervisor.store_listen = self.config.host.listen_host
                self.supervisor.on_failure = self._report_failure
                self.supervisor.fetch_secret = self._fetch_secret
                self.router = Router(
                    host,
                    self.peer_id,
                    self.supervisor,
                    Tokenizer.from_dir(self.config.model),
                    self.model.max_context,
                    self._may_ask,
                    metrics=metrics,
                    verify_fraction=self.config.verify_fraction,
                    tamper_tokens=self.config.tamper_tokens,
                    on_verdict=self._report_verdict,
                    limiter=RateLimiter(self.config.max_request_rate, RATE_BURST_S * self.config.max_request_rate),
                    request_timeout_s=self.config.request_timeout_s,
                    plan_error=self._plan_error,
                )
                host.handle(GENERATE_PROTOCOL, self.router.serve_generate, per_peer=MAX_REQUESTS_PER_PEER)
                host.handle(REPLICA_PROTOCOL, self.router.serve_replica)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.config.http_port is not None:  # first: a port that cannot be served stops the start
                    from hexgen.daemon.http_api import serve_http  # starlette and hypercorn load only when asked for

                    self.http_url = await nursery.start(serve_http, self, metrics)
                if self.router is not None:
                    self.router.background = nursery
                if self.supervisor is not None:
                    nursery.start_soon(self.supervisor.run)
                    nursery.start_soon(self._deploy)
                nursery.start_soon(self._read_gossip, subscription)
                nursery.start_soon(self._watch_disconnects)
                nursery.start_soon(self._watch_connects)
                for addr in self.config.bootstrap:
                    nursery.start_soon(self._dial, addr)
                nursery.start_soon(self._announce)
                nursery.start_soon(self._keep_connected)
                nursery.start_soon(self._redial)
                nursery.start_soon(self._tick)
                nursery.start_soon(self._coordinate)
                nursery.start_soon(self._probe_links)
                nursery.start_soon(self._fetch_plans)
                nursery.start_soon(self._watch_members)
                task_status.started(self)

    async def leave(self) -> None:
        """Tell the swarm this node is leaving, then drop every connection (peers see it at once)."""
        self._leaving = True
        if self.host is None:
            return
        with contextlib.suppress(Exception):
            await self._publish([seal("leave", {}, self.key_pair, 10.0)])
        with trio.move_on_after(0.3):
            await trio.sleep(0.2)  # let the gossip frame leave the socket before closing it
        for peer in list(self.host.connected_peers()):
            await self.host.disconnect(peer)

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._changed.wait()

    async def _dial(self, addr: str) -> None:
        assert self.host is not None
        if is_own_address(addr, self.peer_id, self.host.addrs):  # one bootstrap list for every host names this one too
            log.info("not dialling %s: it is this node", addr)
            return
        for delay in (0.0, 0.2, 0.5, 1.0, 2.0):
            await trio.sleep(delay)
            try:
                peer_id = await self.host.connect(addr)
            except Exception as exc:
                last = exc
                continue
            await self._sync_from(peer_id)
            return
        log.warning("bootstrap %s unreachable: %s", addr, last)

    async def _publish(self, envelopes: list[Envelope]) -> None:
        assert self.host is not None
        data = msgpack.packb([to_wire(e) for e in envelopes], use_bin_type=True)
        await self.host.pubsub.publish(self.topic, data)

    # ----------------------------------------------------------------- gossip

    def _event(self, kind: str, text: str, **fields: Any) -> None:
        """Log a swarm event and keep it for the status view (joins, leaves, elections, plans, failures)."""
        self.events.append({"t": round(self.clock(), 3), "kind": kind, "text": text, **fields})
        log.log(logging.WARNING if kind == "failure" else logging.INFO, text, extra={"event": kind, **fields})

    def _reject(self, reason: str, message: str) -> None:
        self.rejections[reason] += 1
        log.warning("rejected: %s (%s)", message, reason)

    async def _read_gossip(self, subscription: Any) -> None:
        while True:
            msg = await subscription.get()
            sender = ID(msg.from_id).to_base58()
            if sender == self.peer_id:
                self._check_own_gossip(msg.data)
                continue
            self.handle_gossip(sender, msg.data)

    def _check_own_gossip(self, data: bytes) -> None:
        """Gossip signed with this node's key comes back to it; an advert in it with other addresses than
        this node's was sent by another process holding the same key, now or before (gossip replays)."""
        with contextlib.suppress(Exception):  # this node's own gossip parses; anything else is not an advert
            for item in msgpack.unpackb(data, raw=False, strict_map_key=False)[:8]:
                env = from_wire(item)
                if env.kind == "advert" and env.signer == self.peer_id:
                    self._own_advert(env)

    def _own_advert(self, env: Envelope) -> None:
        """An advert of this node's id at other addresses. One issued before this process started may be a
        previous run's (a restart with the same key, perhaps under a name of this host it no longer lists):
        dialled only where this node cannot be, off its own port. It may also be a daemon with this key
        that started first, which only such an advert (synced from a peer) shows."""
        assert self.host is not None
        if self._nursery is None:
            return
        earlier = env.issued < self._started_at
        addrs = foreign_addresses(list(env.body["addrs"]), self.host.addrs, any_on_own_port=earlier)
        if addrs:
            self._nursery.start_soon(self._dial_own_id, addrs)

    async def _dial_own_id(self, addrs: list[str]) -> None:
        """A peer holds a fresh advert of this node's id at other addresses: a daemon that uses this key now
        (the dial connects, and _watch_connects stops this one) or one that just stopped (the dial fails).
        ``addrs`` never includes this node's own (foreign_addresses): a dial of itself would look the same."""
        assert self.host is not None
        addrs = foreign_addresses(addrs, self.host.addrs)
        if not addrs:
            return
        with contextlib.suppress(Exception), trio.move_on_after(RPC_TIMEOUT_S):
            await self.host.connect_peer(self.peer_id, addrs)

    def _duplicate_key(self, seen: str) -> DuplicateKeyError:
        return DuplicateKeyError(
            f"another daemon runs with this node's key (peer id {self.peer_id}; seen: {seen}): "
            "give each daemon its own --key-file"
        )

    def handle_gossip(self, sender: str, data: bytes) -> None:
        """Verify and apply one gossip message (a list of envelopes); bad parts are rejected and counted."""
        if len(data) > MAX_GOSSIP_BYTES:
            self._reject("oversized", f"gossip from {sender} of {len(data)} bytes")
            return
        try:
            items = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception:
            self._reject("malformed", f"gossip from {sender} is not msgpack")
            return
        if not isinstance(items, list) or len(items) > 8:
            self._reject("malformed", f"gossip from {sender} is not a short list of envelopes")
            return
        now = self.clock()
        for item in items:
            try:
                env = verify(
                    from_wire(item),
                    kind={"advert", "lease", "plan", "leave", "failure", "suspect"},
                    now=now,
                    sender=sender,
                    replay=self.replay,
                )
                self._apply(env, now)
            except EnvelopeRejected as exc:
                self._reject(exc.reason, f"{exc} (from {sender})")
            except LeaseRejected as exc:
                self._reject(exc.reason, f"{exc} (from {sender})")
            except (KeyError, TypeError, ValueError, HardwareError, CertificateError) as exc:
                self._reject("malformed", f"{type(exc).__name__}: {exc} (from {sender})")

    def _is_member(self, peer_id: str) -> bool:
        return peer_id == self.peer_id or peer_id in self.table.peers

    def _apply(self, env: Envelope, now: float) -> None:
        if env.kind == "advert":
            self._apply_advert(env, now)
        elif not self._is_member(env.signer):
            self._reject("not-member", f"{env.kind} from {env.signer}, which is not a live member")
        elif env.kind == "leave":
            self._adverts.pop(env.signer, None)  # gone for good: not dialled again
            if self.table.drop(env.signer, now):
                self._event("leave", f"peer {env.signer} left", peer=env.signer)
                self._peer_gone(env.signer)
        elif env.kind == "lease":
            self._apply_lease(env, now)
        elif env.kind == "plan":
            self._apply_plan(env)
        elif env.kind == "failure":
            self._apply_failure(env.signer, env.body)
        elif env.kind == "suspect":
            self._apply_suspect(env.signer, env.body)

    def _apply_suspect(self, reporter: str, body: Any) -> None:
        """A member's spot-check caught ``peers`` returning tokens two other routes disagree with: flag them
        (status shows them) and, as coordinator, plan without their GPUs from now on."""
        peers, reason = (body.get("peers"), body.get("reason")) if isinstance(body, dict) else (None, None)
        if (
            not isinstance(peers, list)
            or not 0 < len(peers) <= MAX_ACCUSED
            or not all(isinstance(p, str) and len(p) <= 128 for p in peers)
            or not isinstance(reason, str)
        ):
            raise ValueError("a suspect report names 1 to 64 peers and a reason")
        for peer in peers:
            if peer in self.flagged:
                continue
            self.flagged[peer] = {"by": reporter, "reason": reason[:300], "t": round(self.clock(), 3)}
            self._event("suspect", f"peer {peer} flagged by {reporter}'s spot-check: {reason[:300]}", peer=peer)
        self._poke()

    async def _report_verdict(self, verdict: Verdict) -> None:
        if verdict.outcome != "accused":
            return
        body = {"peers": sorted(verdict.accused), "reason": verdict.detail}
        self._apply_suspect(self.peer_id, body)
        with contextlib.suppress(Exception):
            await self._publish([seal("suspect", body, self.key_pair, 60.0)])

    def _apply_failure(self, reporter: str, body: Any) -> None:
        """A member's worker failed: a world that could not connect blocks the pair of peers it names (on
        every node, whatever the epoch: a late report still says the link is bad), and the coordinator
        rebuilds the world in a new epoch, a few times per membership; after that it serves the colocated
        fallback plan (``_compute_plan``), so the swarm never stays on a plan that cannot serve."""
        report = FailureReport.from_body(body)
        self._event(
            "failure",
            f"peer {reporter} reports a failed worker in epoch {report.epoch}: {report.error}",
            peer=reporter,
            epoch=report.epoch,
        )
        addresses = self._peer_addresses()
        pair = blocked_pair(reporter, report, addresses)
        if pair is not None and report.cause is not None:
            reason = self._blocked_reason(pair, reporter, report.cause)
            if self.blocked.block(pair, reason, addresses, self.clock()):
                self._event("blocked", reason, peer=pair[0], other=pair[1])
                self._poke()
        plan = self.plan
        if not self.election.is_coordinator(self.clock()) or plan is None:
            return
        if (report.term, report.epoch) != (plan.term, plan.epoch):
            return
        made = self._failures_seen.get(self.table.version, 0)
        if made > MAX_FAILURE_REPLANS:
            log.warning("not rebuilding the world again: %d failure re-plans for this membership", made)
            return
        self._failures_seen[self.table.version] = made + 1
        self._failure_replans += 1
        self._poke()

    def _blocked_reason(self, pair: tuple[str, str], reporter: str, cause: WorldFailure) -> str:
        other = pair[1] if pair[0] == reporter else pair[0]
        where = f" at {cause.remote}" if cause.remote else ""
        return (
            f"peers {self._peer_name(pair[0])} and {self._peer_name(pair[1])} cannot form a world: "
            f"the {cause.world} of {self._peer_name(reporter)} could not connect to "
            f"{self._peer_name(other)}{where}"
        )

    def _peer_name(self, peer: str) -> str:
        record = self.table.peers.get(peer)
        host = self.host_name if peer == self.peer_id else record.host_name if record is not None else "?"
        return f"{host} ({peer[-8:]})"

    def _peer_addresses(self) -> dict[str, list[str]]:
        """Each known peer's IP addresses, from its advert (this node's from its host)."""
        addresses = {peer: advert_ips(record.addrs) for peer, record in self.table.peers.items()}
        if self.host is not None:
            addresses[self.peer_id] = advert_ips(self.host.addrs)
        return addresses

    async def _report_failure(
        self, epoch: int, rank: int, error: str, cause: WorldFailure | None = None, peers: list[str] | None = None
    ) -> None:
        plan = self.plan
        if plan is None or plan.epoch != epoch:
            return
        body = FailureReport(plan.term, epoch, rank, error[:500], tuple(peers or ()), cause).to_body()
        self._apply_failure(self.peer_id, body)
        with contextlib.suppress(Exception):
            await self._publish([seal("failure", body, self.key_pair, 60.0)])

    def _apply_advert(self, env: Envelope, now: float) -> None:
        if now - env.issued > self._advert_freshness:
            # Gossip replays cached messages to newcomers: an old advert says nothing about liveness.
            log.debug("ignored an advert of %s issued %.1f s ago", env.signer, now - env.issued)
            return
        body = env.body
        if not isinstance(body, dict) or not isinstance(body.get("addrs"), list) or len(body["addrs"]) > 16:
            raise ValueError("advert body needs a short list of addrs")
        HardwareProfile.from_dict(body["hardware"])
        if self.certificate is not None:
            cert = body.get("cert")
            if not isinstance(cert, bytes):
                self._reject("not-member", f"advert of {env.signer} carries no swarm certificate")
                return
            try:
                verify_certificate(cert, self.certificate.swarm_public_key, env.signer, now)
            except CertificateError as exc:
                self._reject("not-member", f"advert of {env.signer}: {exc}")
                return
        if body.get("model_hash") != self.model_hash:
            self._reject("model-mismatch", f"advert of {env.signer} serves another model ({body.get('model')})")
            return
        if self.table.apply_advert(env.signer, body, env.issued, now):
            self._event("join", f"peer {env.signer} joined ({body.get('host')})", peer=env.signer)
            self._poke()
        for pair in self.blocked.refresh(self._peer_addresses(), self.clock()):
            self._event("unblocked", f"peers {pair[0]} and {pair[1]} may form worlds again (new addresses or expired)")
            self._poke()
        if self.table.peers.get(env.signer) is not None and self.table.peers[env.signer].advert_issued == env.issued:
            self._adverts[env.signer] = env

    def _apply_lease(self, env: Envelope, now: float) -> None:
        body = env.body
        if not isinstance(body, dict) or body.get("holder") != env.signer or not isinstance(body.get("term"), int):
            raise ValueError("lease body must name its signer as holder and carry an integer term")
        lease = Lease(env.signer, body["term"], env.expires)
        was_coordinator = self.election.coordinator == self.peer_id
        if self.election.accept(lease, self.table.live_ids(), now):
            self._event(
                "coordinator", f"coordinator is {lease.holder} (term {lease.term})", peer=lease.holder, term=lease.term
            )
            if was_coordinator:
                self._published = None
            self._poke()
        epoch = body.get("epoch")
        if isinstance(epoch, int) and self._plan_behind(env.signer, lease.term, epoch):
            self._want_plan.set()

    def _adopt(self, plan: AdoptedPlan) -> None:
        self.plan = plan
        if self.on_plan is not None:
            self.on_plan(plan, self.roles(plan.body))

    def _plan_behind(self, coordinator: str, term: int, epoch: int) -> bool:
        """True when the current coordinator's lease names a plan this node has not adopted."""
        if coordinator != self.election.coordinator or term != self.election.term or epoch <= 0:
            return False
        plan = self.plan
        return plan is None or plan.coordinator != coordinator or plan.term != term or plan.epoch < epoch

    def _apply_plan(self, env: Envelope) -> None:
        body = env.body
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("term"), int)
            or not isinstance(body.get("epoch"), int)
        ):
            raise ValueError("plan body needs integer term and epoch")
        if body["term"] < self.election.term:
            self._reject("stale-term", f"plan for term {body['term']} while the term is {self.election.term}")
            return
        if env.signer != self.election.coordinator or body["term"] != self.election.term:
            coordinator = self.election.coordinator
            self._reject("not-coordinator", f"plan from {env.signer}, but the coordinator is {coordinator}")
            return
        same_author = self.plan is not None and self.plan.coordinator == env.signer and self.plan.term == body["term"]
        if same_author and body["epoch"] <= self.plan.epoch:
            return  # a re-announcement of a plan we have
        # Otherwise the holder changed (two claims for one term were settled): its plan wins whatever its epoch.
        members = body.get("members")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ValueError("plan members must be a list of peer ids")
        self._adopt(AdoptedPlan(body["term"], body["epoch"], env.signer, members, body))
        if self._nursery is not None:
            # The coordinator knows members this node does not (dropped while cut off from them, and back
            # through the coordinator): ask each for its advert, fresh, rather than wait for its next one.
            for member in sorted(set(members) - set(self.table.live_ids())):
                self._nursery.start_soon(self._sync_once_in_a_while, member)
        self._event(
            "plan",
            f"adopted plan epoch {body['epoch']} of term {body['term']} ({len(members)} members){self._role_text(body)}",
            epoch=body["epoch"],
            term=body["term"],
        )
        self._poke()

    # ----------------------------------------------------------------- membership

    def advert_body(self) -> dict[str, Any]:
        assert self.host is not None
        body: dict[str, Any] = {
            "addrs": self.host.addrs,
            "hardware": self.hardware.to_dict(),
            "host": self.host_name,
            "model": self.config.model,
            "load": self.load(),
            "links": [m.to_dict() for m in list(self.links.values())[-MAX_ADVERTISED_LINKS:]],
        }
        if self.certificate is not None:
            body["cert"] = self.certificate.to_bytes()
        if self.model_hash is not None and self.rendezvous is not None:
            body["model_hash"] = self.model_hash
            body["rendezvous"] = list(self.rendezvous)
        return body

    def _lease_envelope(self) -> Envelope:
        assert self.election.lease is not None and self._published is not None
        body = self.election.lease.to_body() | {"epoch": self._published[1].body["epoch"]}
        return seal("lease", body, self.key_pair, self.config.lease_ttl_s)

    async def _announce(self) -> None:
        """An advert at once (at most every 0.3 s) when a new connection appears, so a newcomer is seen in
        one gossip hop; every ``advert_interval_s`` when its content (load, links) changed, else every
        ``advert_refresh_s``; while coordinator, the lease every third of its lifetime, naming the plan's
        epoch. Unchanged adverts are rare because directly connected peers are watched by the connection
        itself: an idle swarm's gossip is mostly these re-announcements."""
        last_advert = last_check = -math.inf
        last_body: dict[str, Any] | None = None
        lease_every = self.config.lease_ttl_s / 3
        while not self._leaving:
            outgoing = []
            now = trio.current_time()
            if self._announce_now.is_set() or now - last_check >= self.config.advert_interval_s:
                last_check = now
                body = self.advert_body()
                stale = now - last_advert >= self.config.advert_refresh_s
                if self._announce_now.is_set() or body != last_body or stale:
                    outgoing.append(seal("advert", body, self.key_pair, self._advert_freshness))
                    last_advert, last_body = now, body
            if self._published is not None and self.election.is_coordinator(self.clock()):
                outgoing.append(self._lease_envelope())
            self._announce_now = trio.Event()
            if outgoing:
                with contextlib.suppress(Exception):
                    await self._publish(outgoing)
            await trio.sleep(0.3)
            wait = min(lease_every, last_check + self.config.advert_interval_s - trio.current_time())
            with trio.move_on_after(max(0.0, wait - 0.3)):
                await self._announce_now.wait()

    async def _fetch_plans(self) -> None:
        """Fetch the signed plan from the coordinator whenever its lease names an epoch not adopted here."""
        assert self.host is not None
        while True:
            await self._want_plan.wait()
            self._want_plan = trio.Event()
            coordinator = self.election.coordinator
            if coordinator is None or coordinator == self.peer_id:
                continue
            request = self._credentials()
            try:
                with trio.fail_after(RPC_TIMEOUT_S):
                    reply = await call(self.host, coordinator, PLAN_PROTOCOL, request)
                if reply.get("error"):
                    raise ValueError(reply["error"])
                env = verify(from_wire(reply.get("plan")), kind="plan", now=self.clock(), sender=coordinator)
                self._apply_plan(env)
            except EnvelopeRejected as exc:
                self._reject(exc.reason, f"fetched plan: {exc} (from {coordinator})")
            except (KeyError, TypeError, ValueError) as exc:
                self._reject("malformed", f"fetched plan: {exc} (from {coordinator})")
            except Exception as exc:  # unreachable or slow: the next lease asks again
                log.debug("fetching the plan from %s failed: %s", coordinator, exc)
            await trio.sleep(PLAN_FETCH_GAP_S)

    async def _keep_connected(self) -> None:
        assert self.host is not None
        while True:
            connected = self.host.connected_peers()
            for record in list(self.table.peers.values()):
                if record.peer_id in connected or self._leaving:
                    continue
                with contextlib.suppress(Exception), trio.move_on_after(2.0):
                    await self.host.connect_peer(record.peer_id, record.addrs)
                # A peer that cannot be dialled is dropped at once (gossip replays recent adverts of dead
                # nodes, and a missed disconnect event must not keep a dead peer, or its lease, alive); if
                # it lives, its next advert brings it back.
                if record.peer_id not in self.host.connected_peers() and self.table.drop(record.peer_id, self.clock()):
                    self._event("leave", f"peer {record.peer_id} is unreachable", peer=record.peer_id)
                    self._peer_gone(record.peer_id)
            await self._wait_change(1.0)

    async def _redial(self) -> None:
        """Dial again, with backoff, every member whose advert this node holds but that is neither in the peer
        table nor connected (it vanished without leaving: a crash, or a partition whose connections timed
        out); and the bootstrap peers whenever this node is connected to nobody. A member given up on after
        ``redial_for_s`` is forgotten. One pass a second; dials run side by side."""
        assert self.host is not None
        config = self.config
        lost: dict[str, LostPeer] = {}
        async with trio.open_nursery() as nursery:
            while not self._leaving:
                now, connected = self.clock(), self.host.connected_peers()
                targets: dict[str, list[str] | None] = {
                    peer: list(env.body["addrs"])
                    for peer, env in self._adverts.items()
                    if peer != self.peer_id and peer not in self.table.peers and peer not in connected
                }
                if not connected:
                    targets.update(dict.fromkeys(config.bootstrap))
                for key in [k for k in lost if k not in targets]:
                    del lost[key]
                for key, addrs in targets.items():
                    entry = lost.setdefault(key, LostPeer(now, config.redial_first_s, now + config.redial_first_s))
                    if addrs is not None and now - entry.since > config.redial_for_s:
                        del lost[key], self._adverts[key]
                    elif now >= entry.next_try and not entry.dialling:
                        entry.gap = min(2 * entry.gap, config.redial_max_gap_s)
                        entry.next_try = now + entry.gap
                        entry.dialling = True
                        nursery.start_soon(self._redial_one, key, addrs, entry)
                await trio.sleep(1.0)

    async def _redial_one(self, key: str, addrs: list[str] | None, entry: LostPeer) -> None:
        """One dial of a lost member (``addrs``) or a bootstrap address (``key`` when ``addrs`` is None); on
        success a sync brings its view, and the members it knows, at once."""
        assert self.host is not None
        peer: str | None = key if addrs is not None else None
        try:
            with trio.move_on_after(RPC_TIMEOUT_S):
                if addrs is None:
                    peer = await self.host.connect(key)
                else:
                    await self.host.connect_peer(key, addrs)
        except Exception as exc:
            log.debug("dialling %s again failed: %s", key, exc)
        finally:
            entry.dialling = False
        if peer is not None and peer in self.host.connected_peers():
            log.info("reconnected to %s", peer)
            await self._sync_from(peer)

    async def _watch_connects(self) -> None:
        """A joining node announces itself on its first connections, so every member sees it in one gossip
        hop. Members do not answer each newcomer with adverts of their own (that was a storm of N adverts,
        each verified by N nodes, on every join: the newcomer has them all from its bootstrap sync); they ask an
        unknown peer for its own advert alone if it has not come by gossip soon after (gossip reaches a member
        outside the newcomer's mesh only at a later heartbeat; a peer back from a partition announces nothing)."""
        assert self.host is not None
        joined = trio.current_time()
        async with trio.open_nursery() as nursery:
            async for peer_id in self.host.connects:
                if peer_id == self.peer_id:  # no dial of this node goes to its own addresses
                    raise self._duplicate_key("a connection with a peer of this id")
                if trio.current_time() - joined < NEWCOMER_S:
                    self._announce_now.set()
                elif peer_id not in self.table.peers:
                    nursery.start_soon(self._learn_unknown, peer_id)

    async def _learn_unknown(self, peer_id: str) -> None:
        await trio.sleep(UNKNOWN_PEER_SYNC_AFTER_S)
        assert self.host is not None
        if self.host.speaks(peer_id, SYNC_PROTOCOL) is False:
            return  # a client (hexgen-client, a watcher): it has no advert, and asking logs a libp2p error
        if peer_id not in self.table.peers and peer_id in self.host.connected_peers():
            await self._sync_once_in_a_while(peer_id, only_self=True)

    async def _watch_disconnects(self) -> None:
        assert self.host is not None
        async for peer_id in self.host.disconnects:
            if peer_id in self.host.connected_peers():
                continue
            if self.table.drop(peer_id, self.clock()):
                self._event("leave", f"peer {peer_id} disconnected", peer=peer_id)
                self._peer_gone(peer_id)

    async def _watch_members(self) -> None:
        """While coordinator, keep one heartbeat stream to each connected member."""
        assert self.host is not None
        watching: dict[str, trio.CancelScope] = {}
        async with trio.open_nursery() as nursery:
            while True:
                wanted: set[str] = set()
                if self.election.is_coordinator(self.clock()) and not self._leaving:
                    self._forget_silent()
                    wanted = (set(self.table.peers) | set(self._silent)) & self.host.connected_peers()
                for peer in wanted - watching.keys():
                    watching[peer] = trio.CancelScope()
                    nursery.start_soon(self._heartbeat, peer, watching)
                for peer in watching.keys() - wanted:
                    watching.pop(peer).cancel()
                await self._wait_change(self.config.tick_s)

    async def _heartbeat(self, peer: str, watching: dict[str, trio.CancelScope]) -> None:
        """Ping ``peer`` every heartbeat interval; drop it when an echo is late. If it answers again later
        (a process that was stopped and resumed), ask it for a fresh advert so it rejoins at once.

        The first echoes on a stream get ``heartbeat_warmup_s``: a peer that has just started or just
        got a new coordinator is busy dialling and syncing with everyone, and is slow without being hung.
        """
        assert self.host is not None
        scope = watching[peer]
        with scope:
            stream = None
            with trio.move_on_after(self.config.heartbeat_warmup_s):
                try:
                    stream = await self.host.open_stream(peer, HEARTBEAT_PROTOCOL)
                except Exception:  # unreachable: the connector drops it
                    watching.pop(peer, None)
                    return
            if stream is None:
                # The connection stays up but carries nothing (a partition keeps TCP open for minutes, and the
                # connector never drops a connected peer): as silent as a late echo. Still watched while
                # silent, so the first stream that opens after the partition heals brings it back.
                self._drop_silent(peer, f"peer {peer} opens no heartbeat stream")
                if watching.get(peer) is scope:
                    del watching[peer]
                return
            try:
                for answered in itertools.count():
                    await stream.write(b"\x01")
                    warm = answered >= HEARTBEAT_WARMUP_PINGS
                    limit = self.config.hung_after_s if warm else self.config.heartbeat_warmup_s
                    echo = await _read_within(stream, limit)
                    if echo is None:
                        self._drop_silent(peer, f"peer {peer} stopped answering heartbeats")
                        echo = await _read_within(stream, self.config.peer_timeout_s)  # it may resume
                    if not echo:
                        break
                    if peer in self._silent:
                        await self._sync_once_in_a_while(peer)  # its fresh advert brings it back at once
                        if self._is_member(peer):
                            # Only now: a peer neither silent nor a member is no longer watched, and
                            # _watch_members would cancel this task, the sync with it, at the next change.
                            del self._silent[peer]
                    await trio.sleep(self.config.heartbeat_interval_s)
            except Exception as exc:
                log.debug("heartbeat stream to %s ended: %s", peer, exc)
            finally:
                if watching.get(peer) is scope:
                    del watching[peer]
                with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await stream.reset()

    async def _serve_heartbeat(self, stream: INetStream) -> None:
        """Echo the coordinator's pings; when they stop, the coordinator is hung: drop it (an election follows)."""
        peer = str(stream.muxed_conn.peer_id)
        try:
            if not self._is_member(peer):
                # A coordinator this node dropped as silent (or has not learnt of yet) is pinging: its
                # fresh advert brings it back now rather than at its next announcement.
                await self._sync_once_in_a_while(peer)
                return
            for pings in itertools.count():
                limit = self.config.hung_after_s + self.config.heartbeat_interval_s
                ping = await _read_within(
                    stream, limit if pings >= HEARTBEAT_WARMUP_PINGS else self.config.heartbeat_warmup_s
                )
                if ping is None:
                    if peer == self.election.coordinator:
                        self._drop_silent(peer, f"coordinator {peer} stopped its heartbeats")
                    return
                if not ping:
                    return
                await stream.write(ping)
        except Exception as exc:
            log.debug("heartbeat stream from %s ended: %s", peer, exc)
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await stream.reset()

    async def _sync_once_in_a_while(self, peer: str, only_self: bool = False) -> None:
        """``_sync_from(peer)``, at most once per heartbeat warm-up per peer (the peer chose to call)."""
        now = self.clock()
        if now - self._synced_at.get(peer, -math.inf) < self.config.heartbeat_warmup_s:
            return
        if len(self._synced_at) >= MAX_SYNC_ADVERTS:
            self._synced_at.clear()
        self._synced_at[peer] = now
        await self._sync_from(peer, only_self)

    def _forget_silent(self) -> None:
        """Stop watching silent peers that stayed silent for the peer timeout."""
        cutoff = self.clock() - self.config.peer_timeout_s
        for peer in [p for p, since in self._silent.items() if since < cutoff]:
            del self._silent[peer]

    def _drop_silent(self, peer: str, text: str) -> bool:
        """Drop a member that went silent, and keep watching it (``_silent``) so it is back as soon as it answers."""
        if not self.table.drop(peer, self.clock()):
            return False
        self._silent[peer] = self.clock()
        self._event("leave", f"{text} (hung?)", peer=peer)
        self._peer_gone(peer, silent=True)
        return True

    def _peer_gone(self, peer_id: str, silent: bool = False) -> None:
        """Forget ``peer_id`` as lease holder. A coordinator that went silent (hung, or cut off by a partition)
        may have taken part of the swarm with it, unlike one whose connection closed or that said it leaves."""
        lost_coordinator = peer_id == self.election.coordinator and peer_id != self.peer_id
        self.election.forget_holder(peer_id)
        if silent and lost_coordinator and self._nursery is not None and not self._leaving:
            # Only the coordinator watches members, so a peer cut off together with it (a partition) stays in
            # this table, and may be the candidate every node here would wait for. Ask each peer once, and
            # elect only among those that answer.
            self._claim_after = max(self._claim_after, self.clock() + self.config.hung_after_s + self.config.tick_s)
            self._nursery.start_soon(self._sweep)
        self._poke()

    async def _sweep(self) -> None:
        """Drop every peer that does not echo one heartbeat ping within ``hung_after_s``."""

        async def ask(peer: str) -> None:
            answered = await self._answers(peer, self.config.hung_after_s)
            if not answered:
                self._drop_silent(peer, f"peer {peer} did not answer once the coordinator was gone")

        async with trio.open_nursery() as nursery:
            for peer in list(self.table.peers):
                nursery.start_soon(ask, peer)
        self._poke()

    async def _answers(self, peer: str, seconds: float) -> bool:
        """False only when ``peer`` neither echoes a ping nor closes the stream within ``seconds`` (a peer
        that is not connected is the connector's business)."""
        assert self.host is not None
        with trio.move_on_after(seconds):
            try:
                stream = await self.host.open_stream(peer, HEARTBEAT_PROTOCOL)
            except Exception:
                return True
            try:
                await stream.write(b"\x01")
                await stream.read(1)
            except Exception:
                pass
            finally:
                with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await stream.reset()
            return True
        return False

    async def _probe_links(self) -> None:
        """Each round, probe this node's share of a bounded, rotating set of peer pairs."""
        assert self.host is not None
        host = self.host
        round_index = 0
        while True:
            await trio.sleep(self.config.probe_interval_s)
            pairs = probe_plan(self.table.live_ids(), self.config.probes_per_round, round_index=round_index)
            round_index += 1
            for a, b in pairs:
                peer = b if a == self.peer_id else a if b == self.peer_id else None
                if peer is None or peer not in self.table.peers:
                    continue
                try:
                    measured = await probe(lambda p=peer: host.open_stream(p, PROBE_PROTOCOL), self.peer_id, peer)
                except Exception as exc:  # a failed probe leaves the declared bandwidth in place
                    log.debug("probe of %s failed: %s", peer, exc)
                    continue
                self.links.pop(peer, None)
                self.links[peer] = measured

    async def _serve_probe(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        if not self._may_ask(peer, None):
            self._reject("not-member", f"probe from non-member {peer}")
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        await serve_probe(stream)

    def _links(self) -> list[LinkMeasurement]:
        links = list(self.links.values())
        for record in self.table.peers.values():
            for raw in record.links:
                with contextlib.suppress(HardwareError):
                    links.append(LinkMeasurement.from_dict(raw))
        return links

    # ----------------------------------------------------------------- election and planning

    async def _tick(self) -> None:
        while True:
            now = self.clock()
            assert self.host is not None
            for peer_id in self.table.expire(now, keep=self.host.connected_peers()):
                self._event("leave", f"peer {peer_id} timed out", peer=peer_id)
                self._peer_gone(peer_id)
            live = self.table.live_ids()
            if not self._leaving and now >= self._claim_after and self.election.should_claim(live, now):
                lease = self.election.claim(now, self.config.lease_ttl_s)
                self._event("election", f"claiming the coordinator lease for term {lease.term}", term=lease.term)
                self._poke()
            elif self.election.is_coordinator(now):
                self.election.claim(now, self.config.lease_ttl_s)
            await self._wait_change(self.config.tick_s)

    async def _coordinate(self) -> None:
        while True:
            now = self.clock()
            if self.election.is_coordinator(now) and not self._leaving:
                key = self._planning_key()
                if key != self._planned_for:
                    await trio.sleep(self.config.plan_debounce_s)
                    key = self._planning_key()
                    await self._plan_and_publish()
                    self._planned_for = key
            await self._wait_change(self.config.tick_s)

    def _planning_key(self) -> tuple[Any, ...]:
        """What a plan depends on besides the clock: a change of any of it makes the coordinator re-plan."""
        blocked = tuple(link.pair for link in self.blocked.links.values())
        return (self.election.term, self.table.version, self._failure_replans, len(self.flagged), blocked)

    def _peer_hardware(self) -> list[PeerHardware]:
        """The hardware the plan may use: every live member's, except peers flagged by spot-checks."""
        peers = [] if self.peer_id in self.flagged else [PeerHardware(self.peer_id, self.host_name, self.hardware)]
        for record in self.table.peers.values():
            if record.peer_id in self.flagged:
                continue
            peers.append(PeerHardware(record.peer_id, record.host_name, HardwareProfile.from_dict(record.hardware)))
        return peers

    async def _plan_and_publish(self) -> None:
        members = self.table.live_ids()
        peers = self._peer_hardware()
        previous = self._previous
        term = self.election.term
        body = await trio.to_thread.run_sync(self._compute_plan, peers, self._links(), previous)
        if not self.election.is_coordinator(self.clock()) or self.election.term != term:
            # Another holder's lease was accepted while the planner ran: publishing now would sign a plan
            # under its term (a second plan for a (term, epoch) it may have published already).
            log.info("dropped a plan made for term %d: no longer the coordinator", term)
            return
        epoch = (self.plan.epoch if self.plan else 0) + 1
        body |= {
            "term": self.election.term,
            "epoch": epoch,
            "members": members,
            # What the plan was made from, so a successor coordinator can re-plan incrementally from it.
            "peers": [{"peer_id": p.peer_id, "host": p.host_name, "hardware": p.profile.to_dict()} for p in peers],
            # a worker failed: rebuild every replica, unchanged ones too (their worlds may be broken)
            "restart": self._failure_replans != self._failure_replans_published,
        }
        self._failure_replans_published = self._failure_replans
        lease = seal("lease", self.election.lease.to_body(), self.key_pair, self.config.lease_ttl_s)
        plan = seal("plan", body, self.key_pair, 3600.0)
        self._published = (lease, plan)
        self._adopt(AdoptedPlan(self.election.term, epoch, self.peer_id, members, body))
        self._event(
            "plan",
            f"published plan epoch {epoch} of term {self.election.term} ({len(members)} members){self._role_text(body)}",
            epoch=epoch,
            term=self.election.term,
        )
        with contextlib.suppress(Exception):
            await self._publish([lease, plan])
        if self._nursery is not None:
            self._nursery.start_soon(self._push_plan, lease, plan)
        self._poke()

    def _compute_plan(
        self, peers: list[PeerHardware], links: list[LinkMeasurement], previous: tuple[Plan, Any] | None
    ) -> dict[str, Any]:
        """The planner's result as a plan body; runs in a worker thread."""
        workload = synthetic("default", min(512, self.model.max_context // 2), 128, count=64)
        if previous is None:
            previous = self._inherited_plan(links)
        blocked = self.blocked.among(p.peer_id for p in peers)
        # the planner is told a blocked pair's link carries (almost) nothing, so it plans around it
        links = links + [LinkMeasurement(*link.pair, BLOCKED_LINK_GB_S, 0.0) for link in blocked]
        try:
            cluster, gpu_map = build_cluster_from_peers(peers, links)
        except Exception as exc:
            return {"plan": None, "error": f"cannot build the cluster: {exc}", "gpus": {}}
        gpus = {str(k): list(v) for k, v in gpu_map.items()}
        gpu_peer = {k: peer for k, (peer, _) in gpu_map.items()}
        pairs = {link.pair: link.reason for link in blocked}
        failures = self._failures_seen.get(self.table.version, 0)
        why = f"{failures} worker failures in this membership" if failures >= MAX_FAILURE_REPLANS else None
        note = None  # why the plan is not the one asked for, when a blocked pair is why
        try:
            result = None if why else self._pinned_plan(peers, gpu_map)
            if result is not None and (pair := needs_pair(result, gpu_peer, pairs)) is not None:
                note = f"not serving the pinned plan: {pairs[pair]}"
                log.info("%s", note)
                result = None
            if result is None and why is None and previous is not None:
                result = planner.replan(previous[0], previous[1], cluster, self.model, workload)
            elif result is None and why is None:
                result = planner.plan(cluster, self.model, workload)
            if result is not None and (pair := needs_pair(result, gpu_peer, pairs)) is not None:
                why = pairs[pair]
            error = note
            if why is not None:
                # never a plan that cannot serve: one replica per host, and the reason for all to see
                result = colocated_plan(cluster, self.model, workload)
                error = f"{why}; serving colocated replicas that each fit on one host"
        except (PlanError, ValueError) as exc:
            self._previous = None
            error = str(exc) if why is None else f"{why}; and no host can serve alone: {exc}"
            return {"plan": None, "error": error, "gpus": gpus}
        assert result is not None
        self._previous = None if why is not None else (result, cluster)
        return {
            "plan": result.to_dict(),
            "error": error,
            "throughput": result.throughput if math.isfinite(result.throughput) else 0.0,
            "gpus": gpus,
            "blocked": [{"peers": list(link.pair), "reason": link.reason} for link in blocked],
        }

    def _pinned_plan(self, peers: list[PeerHardware], gpu_map: dict[int, tuple[str, int]]) -> Plan | None:
        """The operator's pinned layout, when every GPU it names is in the swarm."""
        if self.config.pinned is None:
            return None
        host_of = {p.peer_id: p.host_name for p in peers}
        index = {(host_of[peer], local): i for i, (peer, local) in gpu_map.items()}
        try:
            return pinned_plan(self.config.pinned, index)
        except PinnedPlanError as exc:
            log.info("not serving the pinned plan yet: %s", exc)
            return None

    def _inherited_plan(self, links: list[LinkMeasurement]) -> tuple[Plan, Any] | None:
        """The adopted plan of a previous coordinator and the cluster it was made for, if it says so."""
        body = self.plan.body if self.plan else None
        if not body or not body.get("plan") or not isinstance(body.get("peers"), list):
            return None
        try:
            peers = [
                PeerHardware(p["peer_id"], p["host"], HardwareProfile.from_dict(p["hardware"])) for p in body["peers"]
            ]
            cluster, _ = build_cluster_from_peers(peers, links)
            return Plan.from_dict(body["plan"]), cluster
        except Exception as exc:  # an unusable inheritance only costs a full plan
            log.info("planning from scratch: the adopted plan cannot be reused (%s)", exc)
            return None

    # ----------------------------------------------------------------- serving

    async def _deploy(self) -> None:
        """Keep the supervisor on the adopted plan's world (the rendezvous comes from the members' adverts)."""
        assert self.supervisor is not None
        failed_for: tuple[int, int] | None = None
        while True:
            plan = self.plan
            if plan is not None:
                rendezvous = {
                    peer: (str(env.body["rendezvous"][0]), int(env.body["rendezvous"][1]))
                    for peer, env in self._adverts.items()
                    if isinstance(env.body.get("rendezvous"), list) and len(env.body["rendezvous"]) == 2
                }
                if self.rendezvous is not None:
                    rendezvous[self.peer_id] = self.rendezvous
                try:
                    self.supervisor.want(deployment_from_plan(plan.body, rendezvous))
                    failed_for = None
                except DeploymentError as exc:
                    if failed_for != (plan.term, plan.epoch):
                        log.warning("cannot deploy plan epoch %d: %s", plan.epoch, exc)
                        failed_for = (plan.term, plan.epoch)
                    self.supervisor.want(None)
            await self._wait_change(1.0)

    # ----------------------------------------------------------------- status

    def roles(self, body: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """This node's GPUs in a plan body (the adopted one by default): group, role and stage of each."""
        body = body if body is not None else (self.plan.body if self.plan else None)
        return assignments(body).get(self.peer_id, [])

    def _role_text(self, body: dict[str, Any]) -> str:
        roles = self.roles(body)
        if not roles:
            return ": no GPU of this node serves in it"
        return ": " + ", ".join(
            f"GPU {r['gpu']} {r['role']} in group {r['group']} stage {r['stage']} (layers {layer_range(*r['layers'])})"
            for r in roles
        )

    def _plan_error(self) -> str | None:
        """Why the adopted plan is not the swarm's best (or why there is none), in the coordinator's words."""
        error = self.plan.body.get("error") if self.plan is not None else None
        return error if isinstance(error, str) and error else None

    def load(self) -> dict[str, Any]:
        """This node's serving load: requests in flight on its workers, tokens/s they produced lately."""
        if self.router is None or self.supervisor is None:
            return {}
        return {
            "in_flight": len(self.supervisor.listeners),
            "tokens_per_s": round(self.router.meter.rate(trio.current_time()), 2),
            "requests": self.router.served,
        }

    def status(self, brief: bool = False) -> dict[str, Any]:
        """This node's view; ``brief`` keeps only who is in the swarm, who coordinates and which plan is
        adopted (no plan body, peer records, links, serving state or events): what a watcher polling many
        daemons needs, at a small fraction of the bytes."""
        if brief:
            return self._brief_status()
        now = self.clock()
        return {
            "peer_id": self.peer_id,
            "addrs": self.host.addrs if self.host else [],
            "host": self.host_name,
            "hardware": self.hardware.to_dict(),
            "model": self.config.model,
            "load": self.load(),
            "roles": self.roles(),
            "swarm": self.certificate.swarm_id if self.certificate else "open",
            "coordinator": self.election.coordinator,
            "term": self.election.term,
            "is_coordinator": self.election.is_coordinator(now),
            "members": self.table.live_ids(),
            "peers": [
                {
                    "peer_id": r.peer_id,
                    "host": r.host_name,
                    "addrs": r.addrs,
                    "hardware": r.hardware,
                    "load": r.load,
                    "last_seen_s": round(now - r.last_seen, 3),
                }
                for r in sorted(self.table.peers.values(), key=lambda r: r.peer_id)
            ],
            "plan": None
            if self.plan is None
            else {
                "term": self.plan.term,
                "epoch": self.plan.epoch,
                "coordinator": self.plan.coordinator,
                "members": self.plan.members,
                "body": self.plan.body,
            },
            "rejections": dict(self.rejections),
            "flagged": dict(self.flagged),
            "blocked": [{"peers": list(link.pair), "reason": link.reason} for link in self.blocked.links.values()],
            "spot_checks": {} if self.router is None else dict(self.router.checks),
            "links": [m.to_dict() for m in self._links()],
            "serving": None if self.supervisor is None else self.supervisor.status(),
            "events": list(self.events),
        }

    def _credentials(self) -> dict[str, Any]:
        """What a request to another daemon carries to show this node is a member of a private swarm."""
        return {"cert": self.certificate.to_bytes()} if self.certificate is not None else {}

    def _may_ask(self, peer: str, cert: Any) -> bool:
        """In a private swarm only members (or a client presenting its own certificate) get answers."""
        if self.certificate is None or self._is_member(peer):
            return True
        if isinstance(cert, bytes):
            try:
                verify_certificate(cert, self.certificate.swarm_public_key, peer, self.clock())
                return True
            except CertificateError:
                pass
        return False

    def _brief_status(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "peer_id": self.peer_id,
            "coordinator": self.election.coordinator,
            "term": self.election.term,
            "is_coordinator": self.election.is_coordinator(self.clock()),
            "members": self.table.live_ids(),
            "plan": None
            if plan is None
            else {"term": plan.term, "epoch": plan.epoch, "coordinator": plan.coordinator, "members": plan.members},
        }

    async def _serve_status(self, stream: INetStream) -> None:
        await self._serve_rpc(stream, "status", lambda request: self.status(brief=request.get("brief") is True))

    async def _serve_sync(self, stream: INetStream) -> None:
        def answer(request: dict[str, Any]) -> dict[str, Any]:
            own = seal("advert", self.advert_body(), self.key_pair, self._advert_freshness)
            if request.get("self") is True:  # a peer that only wants to know this node
                return {"adverts": [to_wire(own)]}
            live = [env for peer, env in self._adverts.items() if peer in self.table.peers]
            return {"adverts": [to_wire(env) for env in [own, *live][:MAX_SYNC_ADVERTS]]}

        await self._serve_rpc(stream, "sync", answer)

    async def _sync_from(self, peer_id: str, only_self: bool = False) -> None:
        """Learn the members a bootstrap peer knows from their own signed adverts, in one round trip,
        instead of waiting for each to re-announce (``only_self``: the peer's own advert alone)."""
        assert self.host is not None
        request = self._credentials()
        if only_self:
            request["self"] = True
        try:
            with trio.fail_after(RPC_TIMEOUT_S):
                reply = await call(self.host, peer_id, SYNC_PROTOCOL, request)
            adverts = reply.get("adverts")
            if not isinstance(adverts, list):
                raise ValueError(reply.get("error") or "a sync reply lists adverts")
        except Exception as exc:  # the periodic adverts still bring every member, only later
            log.debug("sync from %s failed: %s", peer_id, exc)
            return
        now = self.clock()
        for item in adverts[:MAX_SYNC_ADVERTS]:
            try:
                env = verify(from_wire(item), kind="advert", now=now)
                if env.signer != self.peer_id:
                    self._apply_advert(env, now)
                else:
                    self._own_advert(env)
            except EnvelopeRejected as exc:
                self._reject(exc.reason, f"synced advert: {exc} (from {peer_id})")
            except (KeyError, TypeError, ValueError, HardwareError, CertificateError) as exc:
                self._reject("malformed", f"synced advert: {exc} (from {peer_id})")

    async def _serve_plan(self, stream: INetStream) -> None:
        """Answers a fetch with the published plan, and takes a plan the coordinator pushes (``push``: its
        lease and plan envelopes), verified exactly as if they came by gossip."""
        sender = str(stream.muxed_conn.peer_id)

        def answer(request: dict[str, Any]) -> dict[str, Any]:
            if "push" in request:
                return self._take_push(sender, request["push"])
            if self._published is None or not self.election.is_coordinator(self.clock()):
                return {"error": "this node is not the coordinator"}
            return {"plan": to_wire(self._published[1])}

        await self._serve_rpc(stream, "plan", answer)

    def _take_push(self, sender: str, items: Any) -> dict[str, Any]:
        if not isinstance(items, list) or len(items) != 2:
            self._reject("malformed", f"plan push from {sender} is not [lease, plan]")
            return {"error": "a push is [lease, plan]"}
        now = self.clock()
        try:
            for item, kind in zip(items, ("lease", "plan"), strict=True):
                env = verify(from_wire(item), kind=kind, now=now, sender=sender)
                if not self._is_member(env.signer):
                    raise EnvelopeRejected("not-member", f"{sender} is not a live member")
                if kind == "lease":
                    self._apply_lease(env, now)
                else:
                    self._apply_plan(env)
        except EnvelopeRejected as exc:
            self._reject(exc.reason, f"plan push: {exc} (from {sender})")
            return {"error": str(exc)}
        except (KeyError, TypeError, ValueError) as exc:
            self._reject("malformed", f"plan push: {exc} (from {sender})")
            return {"error": str(exc)}
        return {"ok": True}

    async def _push_plan(self, lease: Envelope, plan: Envelope) -> None:
        """Hand a new plan to every connected member directly. Gossip reaches a member outside the
        publisher's mesh only through the next heartbeat's IHAVE, seconds later on a busy swarm."""
        assert self.host is not None
        request = self._credentials() | {"push": [to_wire(lease), to_wire(plan)]}
        connected = self.host.connected_peers()

        async def push(peer: str) -> None:
            with trio.move_on_after(RPC_TIMEOUT_S), contextlib.suppress(Exception):
                await call(self.host, peer, PLAN_PROTOCOL, request)

        async with trio.open_nursery() as nursery:
            for peer in self.table.peers:
                if peer in connected:
                    nursery.start_soon(push, peer)

    async def _serve_rendezvous(self, stream: INetStream) -> None:
        """Hands the store secret of a world this daemon hosts to a peer of that world, and to nobody else."""
        asker = str(stream.muxed_conn.peer_id)

        async def answer(request: dict[str, Any]) -> dict[str, Any]:
            prefix = request.get("prefix")
            if not isinstance(prefix, str) or not 0 < len(prefix) <= MAX_PREFIX_CHARS:
                return {"error": f"a rendezvous request names a world prefix of 1 to {MAX_PREFIX_CHARS} characters"}
            if self.supervisor is None:
                return {"error": "this daemon hosts no worlds"}
            try:
                return {"secret": await self.supervisor.grant(asker, prefix, GRANT_WAIT_S)}
            except PermissionError as exc:
                self._reject("not-in-world", f"rendezvous request: {exc}")
                return {"error": str(exc)}

        await self._serve_rpc(stream, "rendezvous", answer)

    async def _fetch_secret(self, head: str, prefix: str) -> bytes:
        """Ask the daemon of ``head`` for the store secret of the world under ``prefix``."""
        assert self.host is not None
        with trio.fail_after(RPC_TIMEOUT_S):
            reply = await call(self.host, head, RENDEZVOUS_PROTOCOL, self._credentials() | {"prefix": prefix})
        secret = reply.get("secret")
        if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
            raise ValueError(reply.get("error") or "the rendezvous reply holds no secret")
        return secret

    async def _serve_rpc(
        self,
        stream: INetStream,
        name: str,
        answer: Callable[[dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]],
    ) -> None:
        """One request frame in, one reply frame out; members only in a private swarm; bad frames answered."""
        peer = str(stream.muxed_conn.peer_id)
        reader = FrameReader(stream)
        try:
            with trio.fail_after(RPC_TIMEOUT_S):
                request = await reader.read()
                if not isinstance(request, dict):
                    await write_frame(stream, {"error": f"a {name} request is a map"})
                elif not self._may_ask(peer, request.get("cert")):
                    self._reject("not-member", f"{name} request from non-member {peer}")
                    await write_frame(stream, {"error": "not a member of this swarm"})
                else:
                    reply = answer(request)
                    await write_frame(stream, await reply if inspect.isawaitable(reply) else reply)
        except FrameError as exc:
            self._reject("malformed", f"{name} request from {peer}: {exc}")
            with contextlib.suppress(Exception):
                await write_frame(stream, {"error": str(exc)})
        except (trio.TooSlowError, Exception) as exc:
            log.debug("%s stream from %s ended: %s", name, peer, exc)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()


async def call(host: Host, peer_id: str, protocol: TProtocol, request: dict[str, Any]) -> dict[str, Any]:
    """One request/reply exchange with a daemon (already connected or dialable) over ``protocol``."""
    stream = await host.open_stream(peer_id, protocol)
    try:
        await write_frame(stream, request)
        reply = await FrameReader(stream).read()
    finally:
        with contextlib.suppress(Exception):
            await stream.close()
    if not isinstance(reply, dict):
        raise FrameError("the reply is not a map")
    return reply


async def query_status(host: Host, peer_id: str, request: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ask a daemon (already connected or dialable) for its status."""
    return await call(host, peer_id, STATUS_PROTOCOL, request or {})


async def _read_within(stream: INetStream, seconds: float) -> bytes | None:
    """One byte from ``stream`` (b"" at its end), or None when none came within ``seconds``. A deadline seen
    late, by a process that was itself stopped or starved of CPU, gets a grace read twice as long as it was
    late (at least 0.1 s): the byte may be waiting already, behind the frames that piled up meanwhile."""
    started = trio.current_time()
    with trio.move_on_after(seconds):
        return bytes(await stream.read(1))
    late = trio.current_time() - started - seconds
    with trio.move_on_after(min(seconds, max(0.1, 2 * late))):
        return bytes(await stream.read(1))
    return None


def _free_port(host: str) -> int:
    """A port free now on ``host``, for the store of worlds whose rank 0 runs here."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def default_key_file() -> Path:
    from hexgen.daemon.identity import default_data_dir

    return default_data_dir() / "node.key"
