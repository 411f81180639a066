"""Per-group parallel plans: asymmetric tensor parallelism per stage and uneven layer splits.

A group's GPUs are cut, host by host, into tensor-parallel blocks (TP never crosses a host); the
blocks form the pipeline's stages in a fixed host order, and layers are split unevenly so the
slowest stage is as fast as memory allows. Decode layouts also choose how many sequences to keep
resident. No stage may span a worldless host pair (``Cluster.worldless``), but a group may: it is bridged, its
stage boundaries carried by the daemons at the pair's bandwidth and the daemons' latency per step
(``CostParams.bridge_latency_s``, on top of the pair's measured one, ``Cluster.latency``), so it is chosen only
where that costs less than it adds.
Results are memoized on the group's hardware signature, so groups of identical hosts cost one search.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from hexgen.coordinator.cost import BoundaryLink, CostModel, StageCost, StageHardware, split_layers, stage_hardware
from hexgen.coordinator.plan import Role, Stage

MAX_TP_COMBINATIONS = 64
# A host's part of a group as the search sees it: GPU type, count, memory GB, TFLOPS, HBM GB/s, intra-host GB/s.
HostSignature = tuple[str, int, float, float, float, float]
_MemoKey = tuple[Role, tuple[HostSignature, ...], tuple[BoundaryLink, ...]]

_BATCH_STEPS = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
# decode iterations per request below which decode capacity stops mattering (outputs of one token)
_MIN_DECODE_STEPS = 1e-3


@dataclass(frozen=True)
class Layout:
    """A group's best layout for a role: stages, requests/s, resident decode batch."""

    stages: tuple[Stage, ...]
    rate: float
    batch: int


@dataclass(frozen=True)
class _Template:
    blocks: tuple[tuple[int, int], ...]  # (host index, tp) per stage, in pipeline order
    layers: tuple[int, ...]
    rate: float
    batch: int


def _powers_of_two(limit: int, heads: int) -> list[int]:
    return [t for t in (1, 2, 4, 8, 16) if t <= limit and heads % t == 0]


def _blocks(count: int, tp: int) -> list[int]:
    """Cut ``count`` GPUs into blocks of ``tp``, the remainder into smaller powers of two."""
    sizes = [tp] * (count // tp)
    rest = count % tp
    t = tp // 2
    while rest:
        if rest >= t:
            sizes.append(t)
            rest -= t
        t //= 2
    return sizes


class LayoutSearch:
    """Finds and memoizes the best layout of GPU groups for a role under one cost model."""

    def __init__(self, cost: CostModel):
        self.cost = cost
        self._memo: dict[_MemoKey, _Template | None] = {}
        self._layouts: dict[tuple[tuple[int, ...], Role], Layout | None] = {}
        self.evaluations = 0

    def best(self, gpus: Sequence[int], role: Role) -> Layout | None:
        """The best layout of ``gpus`` for ``role``, or None if no layout holds a replica. Its stages never
        span a worldless host pair (TP stays on one host); its boundaries may, bridged.

        O(C * B * (S + L log S)) for C TP combinations (capped at MAX_TP_COMBINATIONS), B batch sizes,
        S stages and L layers; memoized on the hardware signature.
        """
        key = (tuple(sorted(gpus)), role)
        if key not in self._layouts:
            self._layouts[key] = self._best(key[0], role)
        return self._layouts[key]

    def _best(self, gpus: tuple[int, ...], role: Role) -> Layout | None:
        cluster = self.cost.cluster
        by_host: dict[str, list[int]] = {}
        for g in gpus:
            by_host.setdefault(cluster.gpus[g].host, []).append(g)
        hosts = sorted(by_host, key=lambda h: (-cluster.gpus[by_host[h][0]].tflops, h))
        signature = tuple(self._host_signature(by_host[h]) for h in hosts)
        bridged = cluster.spans_worldless(gpus)
        links = tuple(self.cost.boundary(a, b, bridged) for a, b in itertools.pairwise(hosts))
        key: _MemoKey = (role, signature, links)
        if key not in self._memo:
            self._memo[key] = self._search([by_host[h] for h in hosts], role, bridged)
        template = self._memo[key]
        if template is None:
            return None
        stages = []
        used = [0] * len(hosts)
        start = 0
        for (host, tp), n_layers in zip(template.blocks, template.layers, strict=True):
            members = tuple(by_host[hosts[host]][used[host] : used[host] + tp])
            used[host] += tp
            stages.append(Stage(members, (start, start + n_layers)))
            start += n_layers
        return Layout(tuple(stages), template.rate, template.batch)

    def uniform(self, gpus: Sequence[int], role: Role, tp: int) -> Layout | None:
        """A homogeneity-assuming layout: stages of ``tp`` consecutive GPUs, layers split evenly.

        This is the layout space of DistServe-style planners; used by the baselines. None where a stage would
        span a worldless pair. O(B * S).
        """
        cluster = self.cost.cluster
        ordered = sorted(gpus, key=lambda g: (cluster.gpus[g].host, g))
        if tp < 1 or len(ordered) % tp or self.cost.model.heads % tp:
            return None
        chunks = [ordered[i : i + tp] for i in range(0, len(ordered), tp)]
        if not cluster.allows_stages(chunks):
            return None
        n = len(chunks)
        total = self.cost.model.layers
        if n > total:
            return None
        layers = tuple(total // n + (1 if i < total % n else 0) for i in range(n))
        hw = [stage_hardware(cluster, c) for c in chunks]
        bridged = cluster.spans_worldless(ordered)
        links = [
            self.cost.boundary(cluster.gpus[a[0]].host, cluster.gpus[b[0]].host, bridged)
            for a, b in itertools.pairwise(chunks)
        ]
        found = self._evaluate(hw, links, role, layers)
        self.evaluations += 1
        if found is None:
            return None
        stages = []
        start = 0
        for chunk, k in zip(chunks, layers, strict=True):
            stages.append(Stage(tuple(chunk), (start, start + k)))
            start += k
        return Layout(tuple(stages), found[1], found[2])

    def _host_signature(self, gpus: list[int]) -> HostSignature:
        g = self.cost.cluster.gpus[gpus[0]]
        intra = self.cost.cluster.host_bandwidth[g.host, g.host]
        return (g.type, len(gpus), g.memory_gb, g.tflops, g.hbm_gbps, intra)

    def _tp_choices(self, host_gpus: list[list[int]]) -> list[tuple[int, ...]]:
        heads = self.cost.model.heads
        options = [_powers_of_two(len(h), heads) for h in host_gpus]
        total = 1
        for o in options:
            total *= len(o)
        if total <= MAX_TP_COMBINATIONS:
            return list(itertools.product(*options))
        uniform = sorted(set().union(*map(set, options)))
        return [tuple(max(t for t in o if t <= u) for o in options) for u in uniform]

    def _search(self, host_gpus: list[list[int]], role: Role, bridged: bool) -> _Template | None:
        """The best template over the TP choices of hosts ``host_gpus`` (in pipeline order); ``bridged``: the
        group spans a worldless pair. O(C * B * (S + L log S))."""
        best: _Template | None = None
        for tps in self._tp_choices(host_gpus):
            blocks: list[tuple[int, int]] = []
            stage_hw: list[StageHardware] = []
            for host, (members, tp) in enumerate(zip(host_gpus, tps, strict=True)):
                offset = 0
                for size in _blocks(len(members), tp):
                    blocks.append((host, size))
                    stage_hw.append(stage_hardware(self.cost.cluster, members[offset : offset + size]))
                    offset += size
            if len(blocks) > self.cost.model.layers:
                continue
            links = self._boundary_links(host_gpus, blocks, bridged)
            found = self._evaluate(stage_hw, links, role)
            self.evaluations += 1
            if found is not None and (best is None or found[1] > best.rate):
                best = _Template(tuple(blocks), found[0], found[1], found[2])
        return best

    def _boundary_links(
        self, host_gpus: list[list[int]], blocks: list[tuple[int, int]], bridged: bool
    ) -> list[BoundaryLink]:
        """The boundary after each block but the last (``CostModel.boundary``). O(S)."""
        gpus = self.cost.cluster.gpus
        return [
            self.cost.boundary(gpus[host_gpus[ha][0]].host, gpus[host_gpus[hb][0]].host, bridged)
            for (ha, _), (hb, _) in itertools.pairwise(blocks)
        ]

    def _evaluate(
        self,
        hw: list[StageHardware],
        links: list[BoundaryLink],
        role: Role,
        fixed_layers: tuple[int, ...] | None = None,
    ) -> tuple[tuple[int, ...], float, int] | None:
        """(layers per stage, requests/s, batch) of the best split for these stages, or None.

        With ``fixed_layers`` the split is given and only checked for memory.
        """
        cost = self.cost
        n = len(hw)
        nexts: list[BoundaryLink | None] = [*links, None]
        total_layers = cost.model.layers
        if role == "prefill":
            costs = [cost.prefill_stage(h, i == 0, i == n - 1, nexts[i]) for i, h in enumerate(hw)]
            split = split_layers(total_layers, costs) if fixed_layers is None else _apply(fixed_layers, costs)
            if split is None:
                return None
            return split[0], 1.0 / split[1], cost.params.concurrent_requests
        best: tuple[tuple[int, ...], float, int] | None = None
        cap = max(cost.params.max_decode_batch, cost.params.concurrent_requests)
        # throughput grows with the resident batch until memory runs out: scan down from the largest
        # batch that fits and stop once a smaller batch stops paying off
        for batch in sorted((b for b in _BATCH_STEPS if b <= cap), reverse=True):
            room = sum(cost.max_layers(h, batch, i == 0, i == n - 1) for i, h in enumerate(hw))
            if room < total_layers:
                continue
            micro = batch / n
            costs = [cost.decode_stage(h, batch, micro, i == 0, i == n - 1, nexts[i]) for i, h in enumerate(hw)]
            split = split_layers(total_layers, costs) if fixed_layers is None else _apply(fixed_layers, costs)
            if split is None:
                continue
            layers, step = split
            tokens_per_s = batch / (n * step)
            # prefill makes a request's first token, so decode runs o - 1 iterations of it
            rate = tokens_per_s / max(cost.stats.decode_steps, _MIN_DECODE_STEPS)
            if role == "colocated":
                rate = self._colocated_rate(hw, nexts, layers, rate, batch)
            if best is not None and rate <= best[1]:
                break
            best = (layers, rate, batch)
        return best

    def _colocated_rate(
        self,
        hw: list[StageHardware],
        nexts: list[BoundaryLink | None],
        layers: tuple[int, ...],
        decode_rate: float,
        batch: int,
    ) -> float:
        """Prefill and decode time-share the group: each request costs its prefill plus its decode share.

        A prefill batch stalls decoding for its slowest stage's time. A full colocated group can only
        admit the sequences that the last decode iteration finished, about lambda = batch / (o - 1) of
        them, so its prefill batches hold E[N | N >= 1] = lambda / (1 - exp(-lambda)) requests (N
        Poisson), at most a token budget's worth; the per-batch costs are shared by that many.
        """
        n = len(hw)
        cost = self.cost
        lam = batch / max(cost.stats.decode_steps, _MIN_DECODE_STEPS)
        per_batch = lam / -math.expm1(-lam)
        share = max(1.0, min(per_batch, cost.prefill_batch_requests()))
        costs: list[StageCost] = [
            cost.prefill_stage(h, i == 0, i == n - 1, nexts[i], per_request=share) for i, h in enumerate(hw)
        ]
        prefill_time = max(c.fixed + c.per_layer * k for c, k in zip(costs, layers, strict=True))
        return 1.0 / (prefill_time + 1.0 / decode_rate)


def _apply(layers: tuple[int, ...], costs: list[StageCost]) -> tuple[tuple[int, ...], float] | None:
    if any(k > c.max_layers for k, c in zip(layers, costs, strict=True)):
        return None
    return layers, max(c.fixed + c.per_layer * k for c, k in zip(costs, layers, strict=True))
