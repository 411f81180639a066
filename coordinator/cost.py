"""The HexGen-2 cost model: replica memory, prefill and decode stage times, TP/PP and KV-transfer costs.

All times are seconds, sizes bytes, rates requests per second. Prefill is compute-bound (with the
weights read once per batch as a floor); decode is memory-bound (weights plus the KV read per step)
with a compute floor. A TP stage runs at its slowest GPU and pays two ring all-reduces per layer over
its slowest link; a pipeline boundary pays one activation send at its link's bandwidth, with a world's
latency, or in a bridged group (one spanning a worldless host pair, ``Cluster.worldless``) that of a
message the daemons carry. Where the cluster holds a host pair's measured one-way latency
(``Cluster.latency``, half its probes' RTT), a boundary, an all-reduce step and a KV hand-off across that
pair pay it in place of the constants (a bridged boundary on top of the daemons' own latency). Weights
count the bytes they take as loaded: quantized linear weights (``ModelSpec.quantize``) their codes, scales
and offsets, in memory and in what a decode step reads.

The model counts what the simulator (and an engine) runs: a request's per-batch prefill costs (weight
read, all-reduce and send latencies) are shared by the requests of its batch; prefill makes its first
token, so decode runs o - 1 iterations of it; and a resident decode batch attends over the context
averaged over those iterations, which long outputs pull above p + o/2 (see ``LengthStats``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from hexgen.coordinator.cluster import Cluster
from hexgen.coordinator.plan import Stage
from hexgen.coordinator.specs import ModelSpec
from hexgen.coordinator.workload import Workload

GB = 1e9
TFLOP = 1e12


@dataclass(frozen=True)
class CostParams:
    """The cost model's assumptions.

    The efficiencies are shares of a GPU's spec-sheet peak: FLOP/s a prefill reaches and HBM bandwidth a
    decode step reaches. No GPU run of hexgen's engine exists yet to fit them, so they stay assumptions in
    the range serving engines publish (prefill MFU about 0.5-0.6; batch-1 decode at 0.75-0.85 of the
    HBM roofline); ``bench/calibrate.py`` fits both from measured engine runs on a device, and its CPU fit
    is in ``bench/results/``.
    """

    compute_efficiency: float = 0.55
    memory_efficiency: float = 0.75
    memory_utilization: float = 0.90
    reserve_gb: float = 1.0
    concurrent_requests: int = 32
    max_decode_batch: int = 256
    prefill_batch_tokens: int = 2048
    intra_host_latency_s: float = 10e-6
    inter_host_latency_s: float = 50e-6
    # A step of a bridged group (its stages share no world) sends the messages a world's step sends (the
    # driver's header and sampled tokens, the hidden states), but each goes worker -> daemon -> KV link ->
    # daemon -> worker, through Python: in the NAT lab a two-stage replica's decode step took 2.6-4 ms longer
    # bridged (17-19 ms, hole-punched or relayed) than in one gloo world on a LAN (14.5-15 ms), medians of 12
    # requests in each of two runs on a 2-core VM (bench/nat_pipeline.py). The link's own latency is not in
    # it: a world's messages pay that too.
    bridge_latency_s: float = 4e-3


@dataclass(frozen=True)
class LengthStats:
    """The moments of the request lengths that the cost model needs.

    ``steps`` and ``decode_context`` describe decode as it runs: a request of output length o takes
    o - 1 decode iterations (prefill makes its first token), attending over p + 1, ..., p + o - 1
    tokens. Averaged over the iterations of all requests (what a resident batch sees), the context is
    E[(o - 1) p + o (o - 1) / 2] / E[o - 1], which long outputs pull above p + o / 2 when lengths vary.
    Left out (None), they take the values of identical requests: o - 1 and p + o / 2.
    """

    prompt: float
    prompt_sq: float
    output: float
    steps: float | None = None
    decode_context: float | None = None

    @property
    def decode_steps(self) -> float:
        """Mean decode iterations per request, E[o - 1]."""
        return max(0.0, self.output - 1) if self.steps is None else self.steps

    @property
    def context(self) -> float:
        """Mean KV length of a resident sequence over the decode iterations of all requests."""
        return self.prompt + self.output / 2 if self.decode_context is None else self.decode_context

    @property
    def total(self) -> float:
        return self.prompt + self.output

    @staticmethod
    def of(workload: Workload) -> LengthStats:
        """The workload's moments. O(R) for R requests."""
        steps = attended = 0.0
        for r in workload.requests:
            o = max(1, r.output_tokens)
            steps += o - 1
            attended += (o - 1) * r.prompt_tokens + o * (o - 1) / 2
        n = len(workload.requests)
        context = attended / steps if steps > 0 else None
        return LengthStats(workload.mean_prompt, workload.mean_prompt_sq, workload.mean_output, steps / n, context)


@dataclass(frozen=True)
class StageHardware:
    """What a stage of TP GPUs can do: its slowest member's figures and its slowest internal link; for a stage
    spanning hosts, ``latency_s`` is the slowest measured one-way latency between them (None: none measured)."""

    tp: int
    tflops: float
    hbm_gbps: float
    memory_gb: float
    link_gbps: float
    spans_hosts: bool
    latency_s: float | None = None


def stage_hardware(cluster: Cluster, gpus: Sequence[int]) -> StageHardware:
    """The hardware summary of a TP stage over ``gpus``. O(t^2) for t GPUs.

    A ring all-reduce step waits for its slowest edge, so a stage spanning hosts takes the slowest measured
    latency among its host pairs; a pair no probe measured is taken to be no slower than the measured ones,
    and with none measured ``latency_s`` is None (``CostParams.inter_host_latency_s`` then).
    """
    members = [cluster.gpus[i] for i in gpus]
    link = min((cluster.link(a, b) for a in gpus for b in gpus if a != b), default=math.inf)
    hosts = sorted({g.host for g in members})
    measured = [
        seconds for i, a in enumerate(hosts) for b in hosts[i + 1 :] if (seconds := cluster.latency(a, b)) is not None
    ]
    return StageHardware(
        tp=len(members),
        tflops=min(g.tflops for g in members),
        hbm_gbps=min(g.hbm_gbps for g in members),
        memory_gb=min(g.memory_gb for g in members),
        link_gbps=link,
        spans_hosts=len(hosts) > 1,
        latency_s=max(measured, default=None),
    )


class BoundaryLink(NamedTuple):
    """A pipeline boundary as a stage's send sees it: GB/s, whether both stages share a host, whether the
    daemons bridge it (the group spans a worldless pair, so each stage is a world of its own), and the pair's
    measured one-way latency in seconds (None: not measured). Part of the layout search's memo key, so groups
    whose boundaries differ only in latency are searched apart."""

    gbps: float
    same_host: bool
    bridged: bool = False
    latency_s: float | None = None


@dataclass(frozen=True)
class StageCost:
    """A stage's linear cost: ``per_layer * layers + fixed`` seconds, at most ``max_layers`` layers."""

    per_layer: float
    fixed: float
    max_layers: int


class CostModel:
    """Cost functions for one (cluster, model, workload) triple, with the tunable constants."""

    def __init__(self, cluster: Cluster, model: ModelSpec, stats: LengthStats, params: CostParams | None = None):
        self.cluster = cluster
        self.model = model
        self.stats = stats
        self.params = params or CostParams()
        self._contexts: dict[tuple[Stage, ...], list[tuple[StageHardware, bool, BoundaryLink | None, int]]] = {}
        # per (prefill, decode) layouts: (GB/s, share, same host, one-way latency) of each KV route
        self._routes: dict[tuple[tuple[Stage, ...], tuple[Stage, ...]], list[tuple[float, float, bool, float]]] = {}

    # memory
    def replica_bytes(self) -> float:
        """Parameters plus ``concurrent_requests`` requests' KV cache at the mean total length."""
        return self.model.weight_bytes + self.params.concurrent_requests * self.kv_bytes_per_request()

    def kv_bytes_per_request(self) -> float:
        return self.model.kv_bytes_per_token * self.stats.total

    def prompt_kv_bytes(self) -> float:
        """What a prefill group ships to a decode group per request: the prompt's KV cache."""
        return self.model.kv_bytes_per_token * self.stats.prompt

    def usable_bytes(self, hw: StageHardware) -> float:
        return hw.memory_gb * GB * self.params.memory_utilization - self.params.reserve_gb * GB

    def usable_bytes_of(self, gpu_id: int) -> float:
        g = self.cluster.gpus[gpu_id]
        return g.memory_gb * GB * self.params.memory_utilization - self.params.reserve_gb * GB

    def _kv_shards(self, tp: int) -> int:
        return min(tp, self.model.kv_heads)

    def _extra_bytes(self, tp: int, first: bool, last: bool) -> float:
        m = self.model
        extra = 0.0
        if first:
            extra += m.embedding_params * m.bytes_per_param
        if last and (not first or not m.tied_embeddings):
            extra += (m.head_params or m.embedding_params) * m.bytes_per_param
        return extra / tp

    def stage_weight_bytes(self, num_layers: int, tp: int, first: bool, last: bool) -> float:
        """Weight bytes each of a stage's ``tp`` GPUs holds: its share of ``num_layers`` layers (quantized as
        the model spec says) and of the embedding (first stage) and head (last). O(1)."""
        return num_layers * self.model.layer_bytes / tp + self._extra_bytes(tp, first, last)

    def max_layers(self, hw: StageHardware, sequences: float, first: bool, last: bool) -> int:
        """How many layers fit on each GPU of the stage with ``sequences`` requests' KV resident."""
        m = self.model
        per_layer = m.layer_bytes / hw.tp + sequences * self.stats.total * m.kv_bytes_per_token_layer / self._kv_shards(
            hw.tp
        )
        room = self.usable_bytes(hw) - self._extra_bytes(hw.tp, first, last)
        return max(0, int(room // per_layer))

    # communication
    def allreduce_time(self, nbytes: float, hw: StageHardware) -> float:
        """Seconds of one ring all-reduce of ``nbytes`` over a TP stage: 2 (t - 1) steps, each paying a
        latency (the slowest measured one between the stage's hosts where known, else the constant) and its
        share of the bytes over the slowest link. O(1)."""
        if hw.tp == 1:
            return 0.0
        if not hw.spans_hosts:
            latency = self.params.intra_host_latency_s
        else:
            latency = self.params.inter_host_latency_s if hw.latency_s is None else hw.latency_s
        steps = 2 * (hw.tp - 1)
        return steps * latency + steps / hw.tp * nbytes / (hw.link_gbps * GB)

    def send_time(
        self, nbytes: float, link_gbps: float, same_host: bool, bridged: bool = False, latency_s: float | None = None
    ) -> float:
        """Seconds to send ``nbytes`` over a pipeline boundary (the fields of ``BoundaryLink``). O(1).

        The network's one-way latency is the measured ``latency_s`` where known, else the intra- or inter-host
        constant. A bridged boundary pays ``bridge_latency_s`` (the daemons carrying the message through
        Python) on top of a measured latency; unmeasured, ``bridge_latency_s`` alone, as it was fitted on a
        LAN whose own latency is within it.
        """
        if latency_s is None:
            if bridged:
                latency = self.params.bridge_latency_s
            else:
                latency = self.params.intra_host_latency_s if same_host else self.params.inter_host_latency_s
        else:
            latency = latency_s + (self.params.bridge_latency_s if bridged else 0.0)
        return latency + nbytes / (link_gbps * GB)

    def link_latency(self, a: str, b: str) -> float:
        """One-way seconds of a message from host ``a`` to host ``b`` in a world: the pair's measured latency
        (``Cluster.latency``) where known, else the intra- or inter-host constant. O(1)."""
        if a == b:
            return self.params.intra_host_latency_s
        measured = self.cluster.latency(a, b)
        return self.params.inter_host_latency_s if measured is None else measured

    def boundary(self, a: str, b: str, bridged: bool) -> BoundaryLink:
        """The boundary from a stage on host ``a`` to one on host ``b`` of a group, ``bridged`` when the group
        spans a worldless pair: the pair's bandwidth (for a worldless pair, what its probes measured), NIC-capped
        (``Cluster.host_bandwidth``), and its measured one-way latency (``Cluster.latency``, None if unmeasured).
        O(1)."""
        return BoundaryLink(self.cluster.host_bandwidth[a, b], a == b, bridged, self.cluster.latency(a, b))

    # prefill
    def prefill_batch_requests(self) -> float:
        """Mean requests in a prefill batch of a busy prefill group: ``prefill_batch_tokens`` of prompts."""
        return max(1.0, self.params.prefill_batch_tokens / self.stats.prompt) if self.stats.prompt > 0 else 1.0

    def prefill_stage(
        self,
        hw: StageHardware,
        first: bool,
        last: bool,
        next_link: BoundaryLink | None,
        batch: tuple[float, float, float] | None = None,
        per_request: float | None = None,
    ) -> StageCost:
        """Prefill cost of a stage, pipelined over batches.

        ``batch`` is (prompt tokens, sum of squared prompt lengths, requests) of one batch. Without it the
        cost is one mean request's share of a batch of ``per_request`` mean requests (default
        ``prefill_batch_requests``): the weight read, the all-reduce and send latencies are paid once a
        batch, as the simulator and an engine pay them.
        """
        s = self.stats
        share = 1.0
        if batch is None:
            share = per_request if per_request is not None else self.prefill_batch_requests()
            batch = (s.prompt * share, s.prompt_sq * share, share)
        per_layer, fixed = self._prefill_terms(hw, last, next_link, *batch)
        rows = self.max_layers(hw, self.params.concurrent_requests, first, last)
        return StageCost(per_layer / share, fixed / share, rows)

    def _prefill_terms(
        self,
        hw: StageHardware,
        last: bool,
        next_link: BoundaryLink | None,
        tokens: float,
        tokens_sq: float,
        requests: float,
    ) -> tuple[float, float]:
        """(seconds per layer, fixed seconds) of one prefill batch on a stage."""
        m, p = self.model, self.params
        flops = 2 * m.active_layer_params * tokens + 2 * tokens_sq * m.hidden
        compute = flops / hw.tp / (hw.tflops * TFLOP * p.compute_efficiency)
        memory = m.layer_bytes / hw.tp / (hw.hbm_gbps * GB * p.memory_efficiency)
        activation = tokens * m.hidden * m.bytes_per_param
        per_layer = max(compute, memory) + 2 * self.allreduce_time(activation, hw)
        fixed = 0.0
        if last:
            fixed += 2 * m.vocab * m.hidden * requests / hw.tp / (hw.tflops * TFLOP * p.compute_efficiency)
        if next_link is not None:
            fixed += self.send_time(activation, *next_link)
        return per_layer, fixed

    # decode
    def decode_stage(
        self,
        hw: StageHardware,
        batch: int,
        micro: float,
        first: bool,
        last: bool,
        next_link: BoundaryLink | None,
        context: float | None = None,
    ) -> StageCost:
        """One decode step of a micro-batch of ``micro`` sequences on a stage holding ``batch`` sequences.

        ``context`` is the mean KV length the micro-batch attends over (default: the workload's).
        """
        context = self.stats.context if context is None else context
        per_layer, fixed = self._decode_terms(hw, micro, last, next_link, context)
        return StageCost(per_layer, fixed, self.max_layers(hw, batch, first, last))

    def _decode_terms(
        self, hw: StageHardware, micro: float, last: bool, next_link: BoundaryLink | None, context: float
    ) -> tuple[float, float]:
        """(seconds per layer, fixed seconds) of one decode step of a micro-batch on a stage."""
        m, p = self.model, self.params
        kv_read = micro * context * m.kv_bytes_per_token_layer / self._kv_shards(hw.tp)
        memory = (m.layer_bytes / hw.tp + kv_read) / (hw.hbm_gbps * GB * p.memory_efficiency)
        flops = (2 * m.active_layer_params + 4 * context * m.hidden) * micro / hw.tp
        compute = flops / (hw.tflops * TFLOP * p.compute_efficiency)
        activation = micro * m.hidden * m.bytes_per_param
        per_layer = max(memory, compute) + 2 * self.allreduce_time(activation, hw)
        fixed = 0.0
        if last:
            head_bytes = m.vocab * m.hidden * m.bytes_per_param / hw.tp
            head_flops = 2 * m.vocab * m.hidden * micro / hw.tp
            fixed += max(
                head_bytes / (hw.hbm_gbps * GB * p.memory_efficiency),
                head_flops / (hw.tflops * TFLOP * p.compute_efficiency),
            )
        if next_link is not None:
            fixed += self.send_time(activation, *next_link)
        return per_layer, fixed

    # whole layouts, for the simulator
    def _stage_context(self, stages: Sequence[Stage]) -> list[tuple[StageHardware, bool, BoundaryLink | None, int]]:
        """(hardware, last, next link, layers) per stage; memoized, the simulator asks once per step."""
        key = tuple(stages)
        found = self._contexts.get(key)
        if found is not None:
            return found
        c = self.cluster
        bridged = c.spans_worldless(g for st in stages for g in st.gpus)
        out = []
        for i, st in enumerate(stages):
            hw = stage_hardware(c, st.gpus)
            nxt = None
            if i + 1 < len(stages):
                nxt = self.boundary(c.gpus[st.gpus[0]].host, c.gpus[stages[i + 1].gpus[0]].host, bridged)
            out.append((hw, i == len(stages) - 1, nxt, st.num_layers))
        self._contexts[key] = out
        return out

    def prefill_stage_times(
        self, stages: Sequence[Stage], tokens: float, tokens_sq: float, requests: int
    ) -> list[float]:
        """Seconds each stage spends on one prefill batch (pipelined: the batch visits them in order)."""
        times = []
        for hw, last, nxt, layers in self._stage_context(stages):
            per_layer, fixed = self._prefill_terms(hw, last, nxt, tokens, tokens_sq, requests)
            times.append(fixed + per_layer * layers)
        return times

    def decode_stage_times(self, stages: Sequence[Stage], batch: int, micro: float, context: float) -> list[float]:
        """Seconds each stage spends on one decode step of a micro-batch of ``micro`` sequences.

        ``batch`` (the resident cap) only bounds memory, which the layout search has checked.
        """
        times = []
        for hw, last, nxt, layers in self._stage_context(stages):
            per_layer, fixed = self._decode_terms(hw, micro, last, nxt, context)
            times.append(fixed + per_layer * layers)
        return times

    # KV transfer
    def kv_routes(self, prefill: Sequence[Stage], decode: Sequence[Stage]) -> list[tuple[float, float, bool]]:
        """(GB/s, share of a request's KV, same host) for each host pair that carries part of the KV.

        A prefill host sends the KV of the layers it holds to the decode hosts that hold those layers,
        so a host pair carries the share of layers both ends hold; host pairs move in parallel, and
        inside one host min(sending GPUs, receiving GPUs) links do. What group pairs that share a host's
        NIC take from each other is charged by the flow (``flow.NicLimits``) and the simulator, not here.
        O(S_p * S_d).
        """
        return [(bw, share, ha == hb) for ha, hb, bw, share in self._kv_host_routes(prefill, decode)]

    def _kv_host_routes(self, prefill: Sequence[Stage], decode: Sequence[Stage]) -> list[tuple[str, str, float, float]]:
        """``kv_routes`` with each route's (sending host, receiving host) in place of whether they are one.
        O(S_p * S_d)."""
        cluster = self.cluster

        def by_host(stages: Sequence[Stage]) -> dict[str, tuple[list[tuple[int, int]], int]]:
            out: dict[str, tuple[list[tuple[int, int]], int]] = {}
            for st in stages:
                host = cluster.gpus[st.gpus[0]].host
                ranges, gpus = out.get(host, ([], 0))
                out[host] = ([*ranges, st.layers], gpus + st.tp)
            return out

        routes = []
        senders, receivers = by_host(prefill), by_host(decode)
        for ha, (ranges_a, gpus_a) in senders.items():
            for hb, (ranges_b, gpus_b) in receivers.items():
                shared = sum(max(0, min(a[1], b[1]) - max(a[0], b[0])) for a in ranges_a for b in ranges_b)
                if shared:
                    bw = cluster.host_bandwidth[ha, hb] * (min(gpus_a, gpus_b) if ha == hb else 1)
                    routes.append((ha, hb, bw, shared / self.model.layers))
        return routes

    def kv_transfer_rate(self, prefill: Sequence[Stage], decode: Sequence[Stage]) -> float:
        """Requests/s whose prompt KV can move from a prefill layout to a decode layout (busiest host pair)."""
        nbytes = self.prompt_kv_bytes()
        routes = self.kv_routes(prefill, decode)
        if nbytes <= 0 or not routes:
            return math.inf
        return min(bw * GB / (share * nbytes) for bw, share, _ in routes)

    def kv_transfer_time(
        self, prompt_tokens: int, prefill: Sequence[Stage], decode: Sequence[Stage], same_host_only: bool = False
    ) -> float:
        """Seconds to move one prompt's KV: host pairs in parallel, the slowest one decides. Each route pays
        its pair's one-way latency once a hand-off (``link_latency``: measured where known) and its bytes.

        ``same_host_only`` times just the routes inside a host (the simulator queues the rest on NICs).
        O(S_p * S_d) the first time for a pair of layouts, O(routes) after.
        """
        nbytes = self.model.kv_bytes_per_token * prompt_tokens
        key = (tuple(prefill), tuple(decode))
        routes = self._routes.get(key)
        if routes is None:
            routes = self._routes[key] = [
                (bw, share, ha == hb, self.link_latency(ha, hb))
                for ha, hb, bw, share in self._kv_host_routes(prefill, decode)
            ]
        return max(
            (latency + share * nbytes / (bw * GB) for bw, share, same, latency in routes if same or not same_host_only),
            default=0.0,
        )


def split_layers(total: int, costs: Sequence[StageCost]) -> tuple[tuple[int, ...], float] | None:
    """Assign ``total`` layers to stages minimizing the slowest stage's time.

    Each stage gets at least one layer and at most its ``max_layers``; stage time is
    ``per_layer * layers + fixed``. Greedy on a heap is exact for this min-max problem with linear
    costs. Returns (layers per stage, bottleneck seconds), or None when they do not fit.
    O(total log S) for S stages.
    """
    import heapq

    if len(costs) > total or any(c.max_layers < 1 for c in costs):
        return None
    if sum(min(c.max_layers, total) for c in costs) < total:
        return None
    layers = [1] * len(costs)
    heap = [(c.fixed + 2 * c.per_layer, i) for i, c in enumerate(costs) if c.max_layers > 1]
    heapq.heapify(heap)
    for _ in range(total - len(costs)):
        _, i = heapq.heappop(heap)
        layers[i] += 1
        if layers[i] < costs[i].max_layers:
            heapq.heappush(heap, (costs[i].fixed + (layers[i] + 1) * costs[i].per_layer, i))
    bottleneck = max(c.fixed + n * c.per_layer for c, n in zip(costs, layers, strict=True))
    return tuple(layers), bottleneck
