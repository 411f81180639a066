"""The daemons' KV relay: the KV parts of a "libp2p" exchange, from a local worker to the worker of the rank
they name, on this daemon or over ``/hexgen/kv/1`` (Noise, yamux) to the daemon hosting that rank.

Used where some pair of the epoch's hosts has no direct TCP link (relayed, or hole-punched: the coordinator
sets the plan's ``exchange``). One stream per destination daemon carries every part to it in order, written by
one task from a bounded queue: a slow link holds back the workers writing to it (their KV sockets fill), never
this daemon's memory. An arriving part is delivered only when this daemon's deployment is on the part's
exchange, hosts its destination rank, and places its source rank on the daemon that sent it; anything else is
dropped, and its receiver gives up on that message and fails only that sequence.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import trio

from hexgen.daemon.deployment import Deployment
from hexgen.daemon.host import Host, ProtocolId, Stream, stream_peer
from hexgen.daemon.kv_frames import KvPart
from hexgen.daemon.supervisor import Supervisor
from hexgen.daemon.wire import FrameError, FrameReader, MalformedFrame, encode_frame
from hexgen.daemon.worker_link import LocalWorker

log = logging.getLogger("hexgen.daemon")

KV_PROTOCOL = ProtocolId("/hexgen/kv/1")
QUEUE_PARTS = 64  # per destination daemon: 32 MiB of parts waiting for its stream
_BROKEN = (OSError, FrameError, trio.BrokenResourceError, trio.ClosedResourceError)


def accepts(deployment: Deployment | None, part: KvPart, sender: str, here: str) -> str | None:
    """Why a part that daemon ``sender`` sent to daemon ``here`` is not delivered, or None when it is: the
    deployment must relay KV, be on the part's exchange, place rank ``src`` on ``sender`` and ``dst`` here.
    O(replicas)."""
    if deployment is None or deployment.exchange != "libp2p" or part.prefix != deployment.exchange_prefix:
        return f"a KV part for exchange {part.prefix!r}, which is not this daemon's relayed exchange"
    if deployment.rank_peer(part.src) != sender:
        return f"a KV part from exchange rank {part.src}, which peer {sender} does not host"
    if deployment.rank_peer(part.dst) != here:
        return f"a KV part for exchange rank {part.dst}, which this daemon does not host"
    return None


@dataclass
class KvRelay:
    """This daemon's part of the relay: ``pump`` each local worker's KV socket, ``serve`` arriving streams, and
    ``run`` the writers of streams to other daemons."""

    host: Host
    peer_id: str
    supervisor: Supervisor
    outbound: dict[str, trio.MemorySendChannel[bytes]] = field(default_factory=dict)
    _nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await trio.sleep_forever()

    async def pump(self, worker: LocalWorker) -> None:
        """Route every part ``worker`` writes until its KV socket ends. Never raises."""
        if worker.kv is None:
            return
        reader = FrameReader(worker.kv)
        try:
            while (raw := await reader.read()) is not None:
                try:
                    part = KvPart.from_wire(raw)
                except MalformedFrame as exc:  # consumed whole: the socket is still in step
                    log.warning("dropped a bad KV part of worker of rank %d: %s", worker.rank, exc)
                    continue
                await self._route(part)
        except _BROKEN as exc:
            log.info("the KV socket of worker of rank %d ended: %s", worker.rank, exc)

    async def _route(self, part: KvPart) -> None:
        deployment = self.supervisor.deployment
        peer = (
            None if deployment is None or part.prefix != deployment.exchange_prefix else deployment.rank_peer(part.dst)
        )
        if peer is None:
            log.debug("dropped a KV part for exchange %s rank %d: not in the deployed plan", part.prefix, part.dst)
        elif peer == self.peer_id:
            await self._deliver(part)
        else:
            try:
                await self._queue(peer).send(encode_frame(part.to_wire()))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("dropped a KV part for %s: its stream broke", peer)

    def _queue(self, peer: str) -> trio.MemorySendChannel[bytes]:
        queue = self.outbound.get(peer)
        if queue is None:
            if self._nursery is None:
                raise trio.ClosedResourceError("the KV relay is not running")
            queue, parts = trio.open_memory_channel[bytes](QUEUE_PARTS)
            self.outbound[peer] = queue
            self._nursery.start_soon(self._write, peer, queue, parts)
        return queue

    async def _write(
        self, peer: str, queue: trio.MemorySendChannel[bytes], parts: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        """Write the parts queued for ``peer`` on one stream; when it breaks, the queue closes (its parts are
        lost) and the next part opens another."""
        stream: Stream | None = None
        try:
            async with parts:
                stream = await self.host.open_stream(peer, KV_PROTOCOL)
                async for data in parts:
                    await stream.write(data)
        except Exception as exc:  # noqa: BLE001 - whatever breaks a stream to one daemon ends only that stream
            log.warning("the KV stream to %s broke: %s", peer, exc)
        finally:
            if self.outbound.get(peer) is queue:
                del self.outbound[peer]
            if stream is not None:
                with contextlib.suppress(Exception), trio.CancelScope(shield=True):
                    await stream.close()

    async def serve(self, stream: Stream) -> None:
        """Deliver the parts another daemon sends until its stream ends; a bad frame resets the stream."""
        sender = stream_peer(stream)
        reader = FrameReader(stream)
        try:
            while (raw := await reader.read()) is not None:
                part = KvPart.from_wire(raw)
                why = accepts(self.supervisor.deployment, part, sender, self.peer_id)
                if why is None:
                    await self._deliver(part)
                else:
                    log.debug("dropped %s", why)
        except FrameError as exc:
            log.warning("reset the KV stream of %s: %s", sender, exc)
            with contextlib.suppress(Exception):
                await stream.reset()
        except Exception as exc:  # noqa: BLE001 - a stream that breaks (reset, peer gone) ends only itself
            log.info("the KV stream of %s ended: %s", sender, exc)

    async def _deliver(self, part: KvPart) -> None:
        for worker in list(self.supervisor.workers.values()):
            if worker.rank == part.dst and worker.kv is not None and worker.error is None:
                try:
                    async with worker.kv_lock:
                        await worker.kv.write(encode_frame(part.to_wire()))
                except _BROKEN as exc:
                    log.info("dropped a KV part for rank %d: %s", part.dst, exc)
                return
        log.debug("dropped a KV part for rank %d: no worker of it here", part.dst)
