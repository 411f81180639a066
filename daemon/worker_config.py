"""How a rank of a deployment becomes its worker's ``configure`` frame, and a replica's move to a later
epoch its ``exchange`` frame: pure functions of the plan and this daemon's worker settings.

The supervisor configures its workers with these, and so do the tests and benchmarks that drive worker
processes without a daemon (``hexgen.testing.replica_driver``), so both run the workers the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from hexgen.daemon.deployment import Deployment, Replica, bridge_prefix, rank_world
from hexgen.daemon.worker_frames import ConfigureFrame
from hexgen.daemon.worker_setup import CacheSetup, ExchangeSetup, ReplicaSetup
from hexgen.engine.bounds import connect_timeout_for

GPU_KV_BLOCK_SIZE = 256  # what flash-attn's paged KV needs; the SDPA path takes any size (engine.kv_format)


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker of one daemon shares: the checkpoint, the device kind (``cpu`` or ``cuda``, a
    rank's GPU comes from the plan), torch threads, the backend of CPU worlds, the connect bound (None: the
    backend's own, engine.bounds), the address the daemon advertises (its interface carries the worlds),
    and the dtype and KV cache settings (None: pages of GPU_KV_BLOCK_SIZE on GPUs, so replicas on any GPU
    host, flash-attn or not, can hand KV over; the engine's defaults on CPUs), and the prompt tokens a step
    prefills at most (None: engine.replica.PREFILL_CHUNK for the replica's role; 0: whole prompts)."""

    model_dir: str
    device: str = "cpu"
    threads: int = 1
    backend: str = "gloo"
    connect_timeout_s: float | None = None
    advertised: str | None = None
    dtype: str = "auto"
    cache: CacheSetup | None = None
    prefill_chunk: int | None = None

    @property
    def world_backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else self.backend

    @property
    def connect_s(self) -> float:
        return self.connect_timeout_s if self.connect_timeout_s is not None else connect_timeout_for(self.world_backend)

    def replica(self, replica: Replica, first_rank: int | None = None) -> ReplicaSetup:
        """``replica`` as its workers build it, numbered from ``first_rank`` (None: its exchange rank), its weights
        quantized as the plan says."""
        cache = self.cache
        if cache is None:
            cache = CacheSetup(block_size=GPU_KV_BLOCK_SIZE) if self.device.startswith("cuda") else CacheSetup()
        return ReplicaSetup(
            self.model_dir,
            replica.layout,
            first_rank=replica.first_rank if first_rank is None else first_rank,
            mode=replica.role,
            device=self.device,
            dtype=self.dtype,
            cache=cache,
            quantize=replica.quantize,
            prefill_chunk=self.prefill_chunk,
        )

    def exchange(self, deployment: Deployment, replica: Replica, secret: bytes) -> ExchangeSetup:
        """The epoch's exchange group as ``replica``'s workers join it."""
        return ExchangeSetup(
            deployment.rendezvous,
            deployment.exchange_prefix,
            secret,
            replica.first_rank,
            deployment.world_size,
            tuple(self.replica(r) for r in deployment.replicas),
            self.connect_s,
            deployment.exchange,
            deployment.gloo,
        )

    def configure(
        self,
        deployment: Deployment,
        replica: Replica,
        layout_rank: int,
        formed: int,
        secret: bytes,
        exchange_secret: bytes | None,
    ) -> ConfigureFrame:
        """The first frame of the worker of ``layout_rank`` of ``replica``: its world is the replica's own (a
        bridged replica's: its stage's, ``deployment.rank_world``), met at that world's store under the prefix
        of the epoch ``formed`` (when the plan first placed the replica here), and it joins the epoch's
        exchange group when the deployment has one (``exchange_secret``)."""
        gpu = replica.placement[layout_rank][1]
        exchange = None if exchange_secret is None else self.exchange(deployment, replica, exchange_secret)
        world = rank_world(deployment, replica, layout_rank, formed)
        return ConfigureFrame(
            rank=world.rank,
            world_size=world.size,
            replica=self.replica(replica, first_rank=0),
            store=world.store,
            prefix=world.prefix,
            secret=secret,
            advertised=self.advertised,
            exchange=exchange,
            device=self.device if self.device == "cpu" else f"{self.device}:{gpu}",
            threads=self.threads,
            backend=self.world_backend,
            progress=True,  # load progress frames move the start deadline (daemon.worker_link)
            connect_timeout_s=self.connect_s,
            bridge=bridge_prefix(deployment.term, formed, replica) if replica.bridged else "",
            layout_rank=layout_rank if replica.bridged else None,
        )
