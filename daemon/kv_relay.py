"""The daemons' KV relay: the KV parts of a "libp2p" exchange, and the messages between the stages of a
bridged replica (``deployment.Deployment.part_peer``), from a local worker to the worker of the rank they
name, on this daemon or over a carrier to the daemon hosting that rank.

Used where some pair of the epoch's hosts has no direct TCP link (relayed, or hole-punched: the coordinator
sets the plan's ``exchange``). One carrier per destination daemon takes every part to it in order, written by
one task from a bounded queue: a slow link holds back the workers writing to it (their KV sockets fill), never
this daemon's memory. The carrier is a sealed KV link (``daemon.kv_link``: hole-punched, or spliced by a
relay) where one can be set up, else a ``/hexgen/kv/1`` stream (Noise, yamux). An arriving part is delivered
only when this daemon's deployment is on the part's exchange, hosts its destination rank, and places its
source rank on the daemon that sent it; anything else is dropped, and its receiver gives up on that message
and fails only that sequence. When a carrier breaks, both ends name the messages it left unfinished (lost
notices): the receiving daemon those it began, the sending daemon those it still held, so their receivers
fail them at once.

A route of a local worker's (its messages to one rank on another daemon) that goes on a sealed link is given a
link of its own: this daemon offers one naming the route, the receiving daemon checks it as it checks a part,
and both hand their ends to their workers (``KvLinkGrant``, the socket passed along), which from then on
seal, send, open and file that route's parts themselves. Every byte otherwise crosses two more processes
than a gloo hand-off's, and the daemons' CPU, not the link, bounds the hand-off.
"""

from __future__ import annotations

import array
import collections
import contextlib
import logging
import math
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from hexgen.daemon.cluster_view import LinkMeasurement
from hexgen.daemon.deployment import Deployment
from hexgen.daemon.exact_reads import read_frame_exactly
from hexgen.daemon.host import Host, ProtocolId, Stream, stream_peer
from hexgen.daemon.kv_frames import (
    Frame,
    Key,
    KvLinkEnded,
    KvLinkGrant,
    KvLost,
    KvPart,
    Route,
    from_daemon,
    from_worker,
    lost_frames,
)
from hexgen.daemon.kv_link import NO_ROUTES, KvLink, LinkError, LinkOffer, SpliceRoutes, accept_link, open_link
from hexgen.daemon.path_probes import ProbeError, answer_path_probe, run_path_probe
from hexgen.daemon.sealed import SealedStream, SealError
from hexgen.daemon.supervisor import Supervisor
from hexgen.daemon.wire import FrameError, FrameReader, MalformedFrame
from hexgen.daemon.worker_link import LocalWorker

log = logging.getLogger("hexgen.daemon")

KV_PROTOCOL = ProtocolId("/hexgen/kv/1")
QUEUE_PARTS = 64  # per destination daemon: 32 MiB of parts waiting for its stream
KV_READ = 1 << 20  # bytes a reader asks its socket for at a time: a part is 512 KiB
MAX_LINKS_PER_PEER = 4  # incoming KV links one daemon may hold open here (it needs one; a new one may overlap)
LINK_RETRY_S = 30.0  # after a link to a daemon could not be set up, its KV goes on streams this long
ROUTE_LINKS = 2  # links one sending daemon may hand a worker here per route (it asks once; a retry may overlap)
NOTICE_S = 5.0  # to tell local workers which messages a broken carrier lost, even while this daemon stops
_BROKEN = (OSError, FrameError, trio.BrokenResourceError, trio.ClosedResourceError)


def accepts(deployment: Deployment | None, route: Route, sender: str, here: str) -> str | None:
    """Why a part (or a lost notice, or a link) of ``route`` that daemon ``sender`` sent to daemon ``here`` is
    not delivered, or None when it is: the deployment must relay KV, carry the route's prefix (its exchange, or
    a bridged replica), place rank ``src`` on ``sender`` and ``dst`` here. O(replicas)."""
    prefix, src, dst = route
    if deployment is None or deployment.exchange != "libp2p" or not deployment.carries(prefix):
        return f"a KV part for {prefix!r}, which this daemon's deployment does not relay"
    if deployment.part_peer(prefix, src) != sender:
        return f"a KV part from rank {src} of {prefix!r}, which peer {sender} does not host"
    if deployment.part_peer(prefix, dst) != here:
        return f"a KV part for rank {dst} of {prefix!r}, which this daemon does not host"
    return None


def sends_kv(deployment: Deployment | None, sender: str) -> str | None:
    """Why daemon ``sender`` may not send this daemon KV parts, or None when it hosts a rank of the deployed
    relayed exchange. O(ranks)."""
    if deployment is None or deployment.exchange != "libp2p":
        return "this daemon's deployment relays no KV"
    if all(deployment.rank_peer(rank) != sender for rank in range(deployment.world_size)):
        return f"{sender} hosts no rank of this daemon's relayed exchange"
    return None


@dataclass(frozen=True)
class Carrier:
    """How parts reach one daemon: a "direct" (hole-punched) connection set up through ``relay``, a "splice"
    through it, or a libp2p "stream"; ``write`` a frame, ``close`` it."""

    kind: str
    relay: str | None
    write: Callable[[Frame], Awaitable[None]]
    close: Callable[[], Awaitable[None]]

    @property
    def what(self) -> str:
        return "libp2p stream" if self.kind == "stream" else f"{self.kind} link (relay {self.relay})"

    def to_dict(self) -> dict[str, str | None]:
        return {"carrier": self.kind, "relay": self.relay}


@dataclass
class KvRelay:
    """This daemon's part of the relay: ``pump`` each local worker's KV socket, ``serve`` arriving streams and
    links, and ``run`` the writers to other daemons. ``routes`` says where splices can be had (None: none)."""

    host: Host
    peer_id: str
    supervisor: Supervisor
    routes: SpliceRoutes | None = None
    member: Callable[[str], bool] = lambda peer: True  # whether a peer may probe a path here (a private swarm's)
    outbound: dict[str, trio.MemorySendChannel[Frame]] = field(default_factory=dict)
    carriers: dict[str, Carrier] = field(default_factory=dict)  # destination daemon -> what carries its parts
    _link_retry: dict[str, float] = field(default_factory=dict)
    _punch_retry: dict[str, float] = field(default_factory=dict)
    _links_from: dict[str, int] = field(default_factory=dict)  # open incoming links per sending daemon
    _route_retry: dict[Route, float] = field(default_factory=dict)  # when a local route may ask for a link again
    _routes_in: collections.Counter[tuple[str, Route]] = field(default_factory=collections.Counter)
    _granted: dict[Route, tuple[str, str]] = field(default_factory=dict)  # a local route's own link: peer, kind
    _probes_from: set[str] = field(default_factory=set)  # peers whose probe of a link is under way here
    _nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await trio.sleep_forever()

    async def pump(self, worker: LocalWorker) -> None:
        """Route every part ``worker`` writes until its KV socket ends. Never raises."""
        if worker.kv is None:
            return
        try:
            while (frame := await read_frame_exactly(worker.kv.stream)) is not None:
                try:
                    sent = from_worker(frame)
                except MalformedFrame as exc:  # consumed whole: the socket is still in step
                    log.warning("dropped a bad KV part of worker of rank %d: %s", worker.rank, exc)
                    continue
                if isinstance(sent, KvLinkEnded):
                    self._route_link_ended(sent.route)
                else:
                    await self._route(sent, frame, worker)
        except _BROKEN as exc:
            log.info("the KV socket of worker of rank %d ended: %s", worker.rank, exc)

    async def _route(self, part: KvPart, frame: Frame, worker: LocalWorker) -> None:
        deployment = self.supervisor.deployment
        peer = None if deployment is None else deployment.part_peer(part.prefix, part.dst)
        if peer is None:
            log.debug("dropped a KV part for %s rank %d: not in the deployed plan", part.prefix, part.dst)
        elif peer == self.peer_id:
            await self._deliver(part.prefix, part.dst, frame)
        else:
            self._link_route(worker, part.route, peer)
            try:
                await self._queue(peer).send(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):  # its carrier broke meanwhile
                log.debug("dropped a KV part for %s: its carrier broke", peer)
                await self._tell_lost(peer, [frame])

    def _queue(self, peer: str) -> trio.MemorySendChannel[Frame]:
        queue = self.outbound.get(peer)
        if queue is None:
            if self._nursery is None:
                raise trio.ClosedResourceError("the KV relay is not running")
            queue, parts = trio.open_memory_channel[Frame](QUEUE_PARTS)
            self.outbound[peer] = queue
            self._nursery.start_soon(self._write, peer, queue, parts)
        return queue

    async def _write(
        self, peer: str, queue: trio.MemorySendChannel[Frame], parts: trio.MemoryReceiveChannel[Frame]
    ) -> None:
        """Write the parts queued for ``peer`` on one carrier; when it breaks, the queue closes, the next part
        opens another, and ``peer`` is told which messages lost parts here (``_tell_lost``)."""
        carrier: Carrier | None = None
        unsent: list[Frame] = []
        try:
            async with parts:
                try:
                    carrier = await self._carrier(peer)
                    self.carriers[peer] = carrier
                    async for frame in parts:
                        unsent = [frame]
                        await carrier.write(frame)
                        unsent = []
                except Exception as exc:  # noqa: BLE001 - whatever breaks a carrier to one daemon ends only it
                    log.warning("the KV %s to %s broke: %s", carrier.what if carrier else "carrier", peer, exc)
                    if self.outbound.get(peer) is queue:  # parts routed from now on open the next carrier
                        del self.outbound[peer]
                    unsent += _drain(parts)
        finally:
            if self.outbound.get(peer) is queue:
                del self.outbound[peer]
            if self.carriers.get(peer) is carrier:
                self.carriers.pop(peer, None)
            if carrier is not None:
                with contextlib.suppress(Exception), trio.CancelScope(shield=True):
                    await carrier.close()
        await self._tell_lost(peer, unsent)

    async def _tell_lost(self, peer: str, frames: list[Frame]) -> None:
        """Send ``peer``, on the next carrier, a notice of the messages whose parts are among ``frames`` (not
        sent): their receivers fail them at once instead of waiting for parts that will never come. A part
        of such a message that still reaches ``peer`` changes nothing: its message stays lost."""
        keys = sorted({part.key for part in map(_part_of, frames) if part is not None})
        for notice in lost_frames(keys):
            try:
                await self._queue(peer).send(notice.frame())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("could not tell %s of %d lost KV messages", peer, len(notice.messages))

    async def _carrier(self, peer: str) -> Carrier:
        """A sealed link to ``peer`` where one can be had: hole-punched, or spliced by a relay (no link is tried
        for LINK_RETRY_S after one failed, no punch after one failed); else a ``/hexgen/kv/1`` stream."""
        now = trio.current_time()
        if self.routes is not None and now >= self._link_retry.get(peer, -math.inf):
            punch = now >= self._punch_retry.get(peer, -math.inf)
            try:
                link = await open_link(self.host, peer, self.routes, punch)
            except LinkError as exc:
                self._link_retry[peer] = trio.current_time() + LINK_RETRY_S
                log.warning("KV to %s goes on a libp2p stream: no splice: %s", peer, exc)
            else:
                self._punched(peer, punch, link)
                kind = "direct" if link.direct else "splice"
                log.info("KV to %s goes on a sealed %s link (relay %s)", peer, kind, link.relay)
                sealed = link.sealed()
                return Carrier(kind, link.relay, sealed.write, sealed.aclose)
        stream = await self.host.open_stream(peer, KV_PROTOCOL)

        async def write(frame: Frame) -> None:
            await stream.write(bytes(frame))  # libp2p takes bytes alone

        return Carrier("stream", None, write, stream.close)

    def _link_route(self, worker: LocalWorker, route: Route, peer: str) -> None:
        """Have a link of its own set up for ``worker``'s route to ``peer``, where links can be had and none was
        asked for (or one failed over LINK_RETRY_S ago)."""
        now = trio.current_time()
        if self.routes is None or self._nursery is None or now < self._route_retry.get(route, -math.inf):
            return
        deployment = self.supervisor.deployment
        for routes in (self._route_retry, self._granted):
            for old in [r for r in routes if deployment is None or not deployment.carries(r[0])]:
                del routes[old]
        self._route_retry[route] = math.inf
        self._nursery.start_soon(self._open_route, worker, route, peer)

    def _route_link_ended(self, route: Route) -> None:
        """A local worker's own link for ``route`` ended: its messages come through here again, and after
        LINK_RETRY_S one of them asks for another link."""
        if self._granted.pop(route, None) is not None:
            self._route_retry[route] = trio.current_time() + LINK_RETRY_S
            log.info(
                "the link of its own of %s ended: its KV goes through the daemons, another link in %g s",
                route,
                LINK_RETRY_S,
            )

    async def _open_route(self, worker: LocalWorker, route: Route, peer: str) -> None:
        assert self.routes is not None  # _link_route said so
        punch = trio.current_time() >= self._punch_retry.get(peer, -math.inf)
        try:
            link = await open_link(self.host, peer, self.routes, punch, route)
        except LinkError as exc:
            self._route_retry[route] = trio.current_time() + LINK_RETRY_S
            log.info("the KV of %s stays with the daemons: no link of its own: %s", route, exc)
            return
        self._punched(peer, punch, link)
        if await self._grant(worker, link, sends=True):
            self._granted[route] = (peer, "direct" if link.direct else "splice")
            log.info("the KV of %s goes on a %s link of its own", route, "direct" if link.direct else "splice")

    def worker_links(self, peer: str) -> dict[str, int]:
        """How many of the routes from local workers to ``peer``'s that the deployment carries hold a link of
        their own, by kind. O(routes)."""
        deployment = self.supervisor.deployment
        kinds = collections.Counter(
            kind
            for route, (to, kind) in self._granted.items()
            if to == peer and deployment is not None and deployment.carries(route[0])
        )
        return dict(kinds)

    async def probe_link(self, peer: str) -> LinkMeasurement:
        """Measure the path a KV link to ``peer`` takes (hole-punched where a punch works, else spliced by a
        relay): what the KV of worldless pairs crosses. Raises LinkError or ProbeError (or the link's errors)."""
        if self.routes is None:
            raise LinkError("this daemon sets up no KV links")
        punch = trio.current_time() >= self._punch_retry.get(peer, -math.inf)
        link = await open_link(self.host, peer, self.routes, punch, probe=True)
        self._punched(peer, punch, link)
        async with link.socket:
            return await run_path_probe(link.socket, link.key, self.peer_id, peer, "kv-link")

    async def _answer_probe(self, link: KvLink, sender: str) -> None:
        try:
            async with link.socket:
                await answer_path_probe(link.socket, link.key)
        except (ProbeError, SealError, *_BROKEN) as exc:
            log.info("a probe of the link from %s ended: %s", sender, str(exc) or type(exc).__name__)
        finally:
            self._probes_from.discard(sender)

    def _refuse_probe(self, sender: str) -> str | None:
        """Why ``sender`` may not probe a link to this daemon now, or None (counted until it ends)."""
        if not self.member(sender):
            return f"{sender} is not a member of this swarm"
        if sender in self._probes_from:
            return f"a probe from {sender} is under way"
        self._probes_from.add(sender)
        return None

    def _punched(self, peer: str, punch: bool, link: KvLink) -> None:
        """After a punch to ``peer`` failed, links to it are spliced for LINK_RETRY_S without trying again."""
        if punch and not link.direct:
            self._punch_retry[peer] = trio.current_time() + LINK_RETRY_S

    async def _grant(self, worker: LocalWorker, link: KvLink, sends: bool) -> bool:
        """Hand ``link`` to ``worker`` (its socket passed on the KV socket, then closed here); whether it took it."""
        assert link.route is not None
        grant = KvLinkGrant(link.route, link.key, sends).frame()
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [link.socket.socket.fileno()]))]
        try:
            if worker.kv is None or worker.error is not None:
                raise trio.ClosedResourceError("the worker is gone")
            async with worker.kv_lock:
                sent = await worker.kv.stream.socket.sendmsg([grant], fds)
                await worker.kv.write(grant[sent:])
        except _BROKEN as exc:
            log.info("could not hand rank %d its KV link for %s: %s", worker.rank, link.route, exc)
            return False
        finally:
            await link.socket.aclose()
        return True

    async def serve(self, stream: Stream) -> None:
        """Deliver the parts another daemon sends on ``stream`` until it ends; a bad frame resets it."""
        sender = stream_peer(stream)
        if not await self._serve_parts(FrameReader(stream, KV_READ).read_frame, sender, "stream"):
            with contextlib.suppress(Exception):
                await stream.reset()

    async def serve_link(self, stream: Stream) -> None:
        """Take a link another daemon offers on ``stream``: deliver what arrives on it in the background, hand it
        to the worker of its route, or answer the probe it carries."""
        sender = stream_peer(stream)
        admitted: list[LinkOffer] = []  # the offer, once counted against the sender's limits

        def refusal(offer: LinkOffer) -> str | None:
            if self.routes is None or self._nursery is None:
                return "this daemon takes no KV links"
            if offer.route is not None:
                return self._refuse_route(offer.route, sender)
            why = self._refuse_probe(sender) if offer.probe else self._refuse_carrier(sender)
            if why is None:
                admitted.append(offer)
            return why

        try:
            link = await accept_link(stream, refusal, self.routes or NO_ROUTES)
        except LinkError as exc:
            log.warning("no KV link from %s: %s", sender, exc)
            for offer in admitted:
                if offer.probe:
                    self._probes_from.discard(sender)
                else:
                    self._link_ended(sender)
            return
        if link.probe:
            await self._answer_probe(link, sender)
        elif link.route is not None:
            await self._hand_in(link, sender)
        else:
            kind = "direct" if link.direct else "splice"
            log.info("KV from %s arrives on a sealed %s link (relay %s)", sender, kind, link.relay)
            assert self._nursery is not None  # refusal() said so
            self._nursery.start_soon(self._serve_link, link.sealed(), sender)

    def _refuse_carrier(self, sender: str) -> str | None:
        """Why ``sender`` may not carry KV parts here on a link, or None (counted until it ends)."""
        if self._links_from.get(sender, 0) >= MAX_LINKS_PER_PEER:
            return f"{sender} has {MAX_LINKS_PER_PEER} KV links to this daemon already"
        why = sends_kv(self.supervisor.deployment, sender)
        if why is None:
            self._links_from[sender] = self._links_from.get(sender, 0) + 1
        return why

    async def _serve_link(self, link: SealedStream, sender: str) -> None:
        try:
            await self._serve_parts(link.read_record, sender, "link")  # a record is one frame
        finally:
            self._link_ended(sender)
            with contextlib.suppress(Exception), trio.CancelScope(shield=True):
                await link.aclose()

    async def _hand_in(self, link: KvLink, sender: str) -> None:
        """Hand the receiving end of a route's own link to the worker it is for."""
        assert link.route is not None
        worker = self._worker_for(link.route[0], link.route[2])
        if worker is None:
            log.info("closed the KV link of %s from %s: its worker left meanwhile", link.route, sender)
            await link.socket.aclose()
        elif await self._grant(worker, link, sends=False):
            kind = "direct" if link.direct else "splice"
            log.info("KV of %s from %s arrives on a %s link of its own", link.route, sender, kind)

    def _refuse_route(self, route: Route, sender: str) -> str | None:
        """Why ``sender`` may not have a link of its own for ``route`` to a worker here, or None (counted)."""
        deployment = self.supervisor.deployment
        why = accepts(deployment, route, sender, self.peer_id)
        if why is None and self._worker_for(route[0], route[2]) is None:
            why = f"no worker of rank {route[2]} of {route[0]!r} is here"
        if why is None and self._routes_in[sender, route] >= ROUTE_LINKS:
            why = f"{sender} has {ROUTE_LINKS} links for {route} already"
        if why is None:
            for old in [k for k in self._routes_in if deployment is None or not deployment.carries(k[1][0])]:
                del self._routes_in[old]
            self._routes_in[sender, route] += 1
        return why

    def _link_ended(self, sender: str) -> None:
        self._links_from[sender] -= 1
        if not self._links_from[sender]:
            del self._links_from[sender]

    async def _serve_parts(self, next_frame: Callable[[], Awaitable[Frame | None]], sender: str, what: str) -> bool:
        """Deliver the parts in the frames ``next_frame`` reads from daemon ``sender`` (None at the end); False
        when it read a bad one. A message it brought some parts of but not the last never completes (its
        parts travel in order on one carrier): its receiver is told at once, not after a timeout."""
        started: dict[Key, int] = {}  # message -> its receiving rank
        try:
            while (frame := await next_frame()) is not None:
                part = from_daemon(frame)
                if isinstance(part, KvLost):
                    await self._pass_lost(part, sender)
                    continue
                if isinstance(part, KvLinkGrant):
                    raise MalformedFrame("a link grant, which only a worker's own daemon sends it")
                why = accepts(self.supervisor.deployment, part.route, sender, self.peer_id)
                if why is not None:
                    log.debug("dropped %s", why)
                    continue
                if part.part + 1 < part.parts:
                    started[part.key] = part.dst
                else:
                    started.pop(part.key, None)
                await self._deliver(part.prefix, part.dst, frame)
        except (FrameError, SealError) as exc:
            log.warning("cut the KV %s of %s: %s", what, sender, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - a carrier that breaks (reset, peer gone) ends only itself
            log.info("the KV %s of %s ended: %s", what, sender, exc)
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + NOTICE_S):
                await self._lost(started)
        return True

    async def _pass_lost(self, notice: KvLost, sender: str) -> None:
        """Tell the local receivers of the messages a notice from daemon ``sender`` names (those sent from
        ranks it hosts to ranks here) that they will not be whole."""
        deployment = self.supervisor.deployment
        started: dict[Key, int] = {}
        for key in notice.keys:
            if accepts(deployment, key[:3], sender, self.peer_id) is None:
                started[key] = key[2]
            else:
                log.debug("ignored %s's notice of a lost KV message %s", sender, key)
        await self._lost(started)

    async def _lost(self, started: dict[Key, int]) -> None:
        """Tell the receiving ranks of the messages ``started`` that they will not be whole."""
        for dst in set(started.values()):
            for notice in lost_frames([key for key, rank in started.items() if rank == dst]):
                await self._deliver(notice.prefix, dst, notice.frame())

    async def _deliver(self, prefix: str, dst: int, frame: Frame) -> None:
        """Write ``frame`` to the KV socket of this daemon's worker of rank ``dst`` under ``prefix``: an
        exchange rank, or a layout rank of the bridged replica whose bridge it is."""
        worker = self._worker_for(prefix, dst)
        if worker is None or worker.kv is None:
            log.debug("dropped a KV frame for rank %d: no worker of it here", dst)
            return
        try:
            async with worker.kv_lock:
                await worker.kv.write(frame)
        except _BROKEN as exc:
            log.info("dropped a KV frame for rank %d: %s", dst, exc)

    def _worker_for(self, prefix: str, dst: int) -> LocalWorker | None:
        """This daemon's live worker of rank ``dst`` under ``prefix``: an exchange rank, or a layout rank of
        the bridged replica whose bridge it is. O(workers)."""
        deployment = self.supervisor.deployment
        exchange = deployment is not None and prefix == deployment.exchange_prefix
        for worker in list(self.supervisor.workers.values()):
            found = worker.rank == dst if exchange else (worker.bridge == prefix and worker.layout_rank == dst)
            if found and worker.kv is not None and worker.error is None:
                return worker
        return None


def _part_of(frame: Frame) -> KvPart | None:
    """The part a frame queued here carries; None for a notice (a lost notice is never itself noticed)."""
    try:
        return KvPart.from_frame(frame)
    except MalformedFrame:
        return None


def _drain(parts: trio.MemoryReceiveChannel[Frame]) -> list[Frame]:
    """Whatever is queued on ``parts`` now, taken."""
    out = []
    with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
        while True:
            out.append(parts.receive_nowait())
    return out
