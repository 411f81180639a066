"""Baselines in the planner's cost model, each with its own best search (no strawmen).

- DistServe-style: disaggregated prefill and decode on uniform groups (one group size, one TP degree,
  layers split evenly), as a planner that assumes homogeneous GPUs builds them; the best size, TP
  degree and prefill/decode split are searched.
- HexGen-style: heterogeneity-aware groups with asymmetric TP and uneven layer splits, but every group
  colocates prefill and decode (their interference is modelled as time-sharing); partition and
  refinement searched like HexGen-2's, restricted to colocated groups.
- Naive: equal GPU counts per group in host order, half prefill and half decode, each group's layout
  searched; the best group count is searched.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from hexgen.coordinator.cluster import Cluster
from hexgen.coordinator.cost import CostParams
from hexgen.coordinator.evaluate import Evaluation, Evaluator, GroupSpec, PlanError
from hexgen.coordinator.partition import partition
from hexgen.coordinator.plan import Plan
from hexgen.coordinator.search import SearchBudget, k_candidates, refine
from hexgen.coordinator.specs import ModelSpec
from hexgen.coordinator.workload import Workload


def _ordered(evaluator: Evaluator) -> list[int]:
    return [g.id for g in sorted(evaluator.cluster.gpus, key=lambda g: (g.host, g.id))]


def _best(candidates: list[Evaluation]) -> Evaluation | None:
    best = None
    for ev in candidates:
        if ev.value > 0 and (best is None or ev.key() > best.key()):
            best = ev
    return best


def _sweep(evaluator: Evaluator, chunks: list[tuple[int, ...]], uniform_tp: int) -> list[Evaluation]:
    """Every split of the chunks into prefill and decode, ordered by prefill-to-decode strength."""
    scored = []
    for chunk in chunks:
        p = evaluator.layout(GroupSpec(chunk, "prefill", uniform_tp))
        d = evaluator.layout(GroupSpec(chunk, "decode", uniform_tp))
        if p is not None and d is not None:
            scored.append((p.rate / d.rate, chunk))
    scored.sort(key=lambda x: (-x[0], x[1]))
    out = []
    for j in range(1, len(scored)):
        out.append(
            evaluator.evaluate(
                [GroupSpec(c, "prefill" if i < j else "decode", uniform_tp) for i, (_, c) in enumerate(scored)]
            )
        )
    return out


def distserve_search(evaluator: Evaluator) -> Evaluation | None:
    """Best uniform disaggregated plan over group size, TP degree and prefill/decode split."""
    order = _ordered(evaluator)
    n = len(order)
    replica = evaluator.replica_bytes()
    candidates = []
    for size in range(1, n + 1):
        if min(sum(evaluator.usable[g] for g in order[i : i + size]) for i in range(0, n - size + 1, size)) < replica:
            continue
        chunks = [tuple(order[i : i + size]) for i in range(0, n - size + 1, size)]
        if len(chunks) < 2:
            continue
        for tp in (1, 2, 4, 8):
            if size % tp == 0:
                candidates.extend(_sweep(evaluator, chunks, tp))
    return _best(candidates)


def hexgen_search(evaluator: Evaluator, seed: int = 0) -> Evaluation | None:
    """Best colocated heterogeneous plan: partition for each K, then refinement within colocated roles."""
    budget = SearchBudget()
    all_gpus = [g.id for g in evaluator.cluster.gpus]
    seeds = []
    for k in k_candidates(evaluator.max_replicas(), budget.k_values):
        groups = partition(evaluator.cluster, all_gpus, k, evaluator.replica_bytes(), evaluator.usable)
        seeds.append(evaluator.evaluate([GroupSpec(tuple(g), "colocated") for g in groups]))
    seeds.sort(key=lambda e: e.key(), reverse=True)
    rng = random.Random(seed)
    refined = [refine(evaluator, s, budget, rng, roles=("colocated",)) for s in seeds[: budget.seeds_refined]]
    return _best(refined)


def naive_search(evaluator: Evaluator) -> Evaluation | None:
    """Equal-count groups in host order, half prefill and half decode, best group count."""
    order = _ordered(evaluator)
    n = len(order)
    candidates = []
    for k in range(2, n + 1):
        size = n // k
        chunks = [tuple(order[i * size : (i + 1) * size]) for i in range(k)]
        groups = [GroupSpec(c, "prefill" if i < k // 2 else "decode") for i, c in enumerate(chunks)]
        candidates.append(evaluator.evaluate(groups))
    return _best(candidates)


Search = Callable[[Evaluator], Evaluation | None]


def _run(
    name: str, search: Search, cluster: Cluster, model: ModelSpec, workload: Workload, params: CostParams | None
) -> Plan:
    evaluator = Evaluator(cluster, model, workload, params)
    evaluator.check_fits()
    found = search(evaluator)
    if found is None:
        raise PlanError(f"the {name} baseline finds no feasible plan for {model.name} on {cluster.name}")
    return evaluator.to_plan(found, planner=name, evaluations=evaluator.evaluations)


def distserve(
    cluster: Cluster, model: ModelSpec, workload: Workload, *, params: CostParams | None = None, seed: int = 0
) -> Plan:
    """The DistServe-style baseline plan; raises PlanError when it finds none."""
    return _run("distserve", distserve_search, cluster, model, workload, params)


def hexgen(
    cluster: Cluster, model: ModelSpec, workload: Workload, *, params: CostParams | None = None, seed: int = 0
) -> Plan:
    """The HexGen-style (colocated) baseline plan; raises PlanError when it finds none."""
    return _run("hexgen", lambda ev: hexgen_search(ev, seed), cluster, model, workload, params)


def naive(
    cluster: Cluster, model: ModelSpec, workload: Workload, *, params: CostParams | None = None, seed: int = 0
) -> Plan:
    """The naive even-split baseline plan; raises PlanError when it finds none."""
    return _run("naive", naive_search, cluster, model, workload, params)
