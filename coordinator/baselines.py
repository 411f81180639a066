"""Baselines in the planner's cost model, each with its own search (no strawmen), chosen by ``select`` like HexGen-2.

- DistServe: disaggregated prefill and decode on homogeneous groups, as DistServe builds them: one
  parallel configuration (TP within a host, PP stages with layers split evenly) per phase, every group
  of one GPU type, and its own placement search over the two configurations and the replica counts
  (prefill groups carved from the fastest GPUs first, decode groups from the rest).
- HexGen: heterogeneity-aware groups with asymmetric TP and uneven layer splits, but every group
  colocates prefill and decode (their interference is modelled as time-sharing); partition and
  refinement searched like HexGen-2's, restricted to colocated groups.
- Naive: equal GPU counts per group in host order, half prefill and half decode, each group's layout
  searched; the best group count is searched.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable

from hexgen.coordinator.cluster import Cluster
from hexgen.coordinator.cost import CostParams
from hexgen.coordinator.evaluate import Evaluation, Evaluator, GroupSpec, PlanError
from hexgen.coordinator.partition import partition
from hexgen.coordinator.plan import Plan, Role
from hexgen.coordinator.search import SearchBudget, k_candidates, refine
from hexgen.coordinator.select import select
from hexgen.coordinator.specs import ModelSpec
from hexgen.coordinator.workload import Workload

Config = tuple[int, int]  # (TP, PP) of a DistServe group
Block = tuple[int, ...]  # TP GPUs on one host


def _blocks(cluster: Cluster, gpus: set[int], tp: int) -> dict[str, list[Block]]:
    """Blocks of ``tp`` GPUs, each on one host, from ``gpus``, by GPU type (hosts in name order). O(n)."""
    by_type: dict[str, list[Block]] = {}
    for host in sorted(cluster.hosts):
        free = [g for g in cluster.hosts[host] if g in gpus]
        for i in range(0, len(free) - tp + 1, tp):
            by_type.setdefault(cluster.gpus[free[i]].type, []).append(tuple(free[i : i + tp]))
    return by_type


def _carve(cluster: Cluster, gpus: set[int], config: Config, limit: int, types: list[str]) -> list[tuple[int, ...]]:
    """Up to ``limit`` homogeneous groups of ``config`` from ``gpus``, taking GPU types in ``types`` order."""
    tp, pp = config
    blocks = _blocks(cluster, gpus, tp)
    groups: list[tuple[int, ...]] = []
    for t in types:
        mine = blocks.get(t, [])
        for i in range(0, len(mine) - pp + 1, pp):
            if len(groups) == limit:
                return groups
            groups.append(tuple(sorted(g for block in mine[i : i + pp] for g in block)))
    return groups


def _configs(evaluator: Evaluator, role: Role) -> list[Config]:
    """DistServe's per-phase search: for each group size (TP x PP GPUs), the (TP, PP) configuration with the
    best requests/s per GPU on some GPU type; best first. O(types * configs) layouts."""
    cluster = evaluator.cluster
    heads = evaluator.model.heads
    scored: dict[Config, float] = {}
    for tp, pp in itertools.product((1, 2, 4, 8), (1, 2, 4, 8)):
        if heads % tp:
            continue
        for blocks in _blocks(cluster, {g.id for g in cluster.gpus}, tp).values():
            if len(blocks) < pp:
                continue
            gpus = tuple(sorted(g for block in blocks[:pp] for g in block))
            lay = evaluator.layout(GroupSpec(gpus, role, tp))
            if lay is not None:
                scored[tp, pp] = max(scored.get((tp, pp), 0.0), lay.rate / len(gpus))
    best: dict[int, Config] = {}
    for config, rate in scored.items():
        size = config[0] * config[1]
        if size not in best or rate > scored[best[size]]:
            best[size] = config
    return sorted(best.values(), key=lambda c: (-scored[c], c))


def distserve_candidates(evaluator: Evaluator) -> list[Evaluation]:
    """Every DistServe placement: a prefill and a decode configuration (each the best of its group size), k
    prefill groups carved from the fastest GPU types, and as many decode groups as the rest holds.
    O(C^2 * n) evaluations for C group sizes."""
    cluster = evaluator.cluster
    flops: dict[str, float] = {}
    for g in cluster.gpus:
        flops[g.type] = g.tflops
    fastest = sorted(flops, key=lambda t: (-flops[t], t))
    everything = {g.id for g in cluster.gpus}
    found = []
    for pre, dec in itertools.product(_configs(evaluator, "prefill"), _configs(evaluator, "decode")):
        if pre[0] * pre[1] + dec[0] * dec[1] > len(cluster):
            continue
        for k in range(1, len(cluster) // (pre[0] * pre[1]) + 1):
            prefill = _carve(cluster, everything, pre, k, fastest)
            if len(prefill) < k:
                break
            rest = everything - {g for grp in prefill for g in grp}
            decode = _carve(cluster, rest, dec, len(cluster), fastest[::-1])
            if not decode:
                break
            groups = [GroupSpec(g, "prefill", pre[0]) for g in prefill] + [
                GroupSpec(g, "decode", dec[0]) for g in decode
            ]
            found.append(evaluator.evaluate(groups))
    return found


def hexgen_candidates(evaluator: Evaluator, seed: int = 0) -> list[Evaluation]:
    """Colocated heterogeneous plans: partition for each K, then refinement within colocated roles."""
    budget = SearchBudget()
    all_gpus = [g.id for g in evaluator.cluster.gpus]
    seeds = []
    for k in k_candidates(evaluator.max_replicas(), budget.k_values):
        groups = partition(evaluator.cluster, all_gpus, k, evaluator.replica_bytes(), evaluator.usable)
        seeds.append(evaluator.evaluate([GroupSpec(tuple(g), "colocated") for g in groups]))
    seeds.sort(key=lambda e: e.key(), reverse=True)
    rng = random.Random(seed)
    return [refine(evaluator, s, budget, rng, roles=("colocated",)) for s in seeds[: budget.seeds_refined]]


def naive_candidates(evaluator: Evaluator) -> list[Evaluation]:
    """Equal-count groups in host order, half prefill and half decode, for every group count."""
    order = [g.id for g in sorted(evaluator.cluster.gpus, key=lambda g: (g.host, g.id))]
    n = len(order)
    candidates = []
    for k in range(2, n + 1):
        size = n // k
        chunks = [tuple(order[i * size : (i + 1) * size]) for i in range(k)]
        groups = [GroupSpec(c, "prefill" if i < k // 2 else "decode") for i, c in enumerate(chunks)]
        candidates.append(evaluator.evaluate(groups))
    return candidates


SEARCHES: dict[str, Callable[[Evaluator, int], list[Evaluation]]] = {
    "distserve": lambda ev, seed: distserve_candidates(ev),
    "hexgen": hexgen_candidates,
    "naive": lambda ev, seed: naive_candidates(ev),
}


def baseline(
    name: str,
    cluster: Cluster,
    model: ModelSpec,
    workload: Workload,
    *,
    params: CostParams | None = None,
    seed: int = 0,
    holdout: Workload | None = None,
) -> Plan:
    """The ``name`` baseline's plan (one of SEARCHES), chosen by ``select`` like HexGen-2's; raises PlanError
    when it finds none."""
    evaluator = Evaluator(cluster, model, workload, params)
    evaluator.check_fits()
    found = [ev for ev in SEARCHES[name](evaluator, seed) if ev.value > 0]
    if not found:
        raise PlanError(f"the {name} baseline finds no feasible plan for {model.name} on {cluster.name}")
    budget = SearchBudget()
    best, meta = select(
        evaluator, found, tie_band=budget.tie_band, holdout=holdout, holdout_requests=budget.holdout_requests, seed=seed
    )
    return evaluator.to_plan(best, planner=name, evaluations=evaluator.evaluations, **meta)


distserve = functools.partial(baseline, "distserve")
hexgen = functools.partial(baseline, "hexgen")
naive = functools.partial(baseline, "naive")
