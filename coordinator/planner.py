"""The HexGen-2 planner: partition GPUs into replicas, label them prefill or decode, refine by the min cut.

``plan`` is the paper's algorithm and nothing else: a pure function of (cluster, model, workload, params,
seed) that searches the number of replicas K, partitions the bandwidth graph into K memory-balanced
groups (spectral bisection plus Kernighan-Lin), labels each group prefill or decode by a sweep over the
groups' prefill to decode strength, then improves the assignment by local moves guided by the
max-flow's min cut: flip a group's role, move or swap GPUs between the groups on either side of the
bottleneck, split or merge groups. Its own partitions are its only seeds. ``plan_colocate`` is a
variant that may also make colocated groups (prefill and decode time-sharing one replica);
``plan_live`` is the better of the two, what the daemon serves. Every finalist is chosen by
``select.select``, the rule the baselines use too. ``replan`` starts from a previous plan after GPUs
join or leave and moves few GPUs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from collections.abc import Sequence

import numpy as np

from hexgen.coordinator.cluster import Cluster
from hexgen.coordinator.cost import CostParams
from hexgen.coordinator.evaluate import Evaluation, Evaluator, GroupSpec, PlanError, canonical
from hexgen.coordinator.partition import partition
from hexgen.coordinator.plan import ROLES, Plan, Role
from hexgen.coordinator.search import SearchBudget, k_candidates, refine
from hexgen.coordinator.select import select
from hexgen.coordinator.specs import ModelSpec
from hexgen.coordinator.workload import Workload

DISAGGREGATED: tuple[Role, ...] = ("prefill", "decode")


def label_roles(
    evaluator: Evaluator, groups: Sequence[Sequence[int]], roles: tuple[Role, ...] = DISAGGREGATED
) -> Evaluation:
    """The best role labeling of fixed groups over a sweep of prefill-strength orderings.

    Groups are sorted by prefill rate over decode rate; the first j become prefill and the rest
    decode, for every j; with "colocated" among ``roles`` all-colocated is tried too and a group that
    fits neither role alone is colocated. O(K) max-flows.
    """
    feasible = []
    for gpus in groups:
        key = tuple(sorted(gpus))
        p = evaluator.layout(GroupSpec(key, "prefill"))
        d = evaluator.layout(GroupSpec(key, "decode"))
        if p is not None and d is not None:
            feasible.append((p.rate / d.rate, key))
    rest = []
    if "colocated" in roles:
        labelled = {k for _, k in feasible}
        rest = [GroupSpec(tuple(sorted(g)), "colocated") for g in groups if tuple(sorted(g)) not in labelled]
    feasible.sort(key=lambda x: (-x[0], x[1]))
    options = [[GroupSpec(k, "colocated") for _, k in feasible]] if "colocated" in roles else []
    for j in range(1, len(feasible)):
        options.append([GroupSpec(k, "prefill" if i < j else "decode") for i, (_, k) in enumerate(feasible)])
    if not options:
        return evaluator.evaluate([GroupSpec(tuple(sorted(g)), "prefill") for g in groups])
    return max((evaluator.evaluate(option + rest) for option in options), key=lambda e: e.key())


def finalists(
    evaluator: Evaluator, budget: SearchBudget, rng: random.Random, roles: tuple[Role, ...] = DISAGGREGATED
) -> list[Evaluation]:
    """The refined best seeds: its own partition for each candidate K, labelled with ``roles``, then refined.

    A cluster of more than ``budget.cells_above`` GPUs is searched in two levels instead: the partition
    first cuts it into cells of about ``budget.cell_gpus`` GPUs, each cell is planned on its own as above
    (a small search space, cheap to score), and the union of the cells' plans is refined whole, so groups
    and hand-offs may still cross cells.
    """
    if len(evaluator.cluster) > budget.cells_above:
        start = evaluator.evaluate(_cells_union(evaluator, budget, rng, roles))
        whole = dataclasses.replace(
            budget, first_improvement=True, refine_steps=budget.max_evaluations(len(evaluator.cluster))
        )
        return [refine(evaluator, start, whole, rng, roles)]
    all_gpus = [g.id for g in evaluator.cluster.gpus]
    seeds = []
    orders: dict[tuple[int, ...], np.ndarray] = {}
    for k in k_candidates(evaluator.max_replicas(), budget.k_values):
        groups = partition(evaluator.cluster, all_gpus, k, evaluator.replica_bytes(), evaluator.usable, orders)
        seeds.append(label_roles(evaluator, groups, roles))
    seeds.sort(key=lambda e: e.key(), reverse=True)
    return [refine(evaluator, start, budget, rng, roles) for start in seeds[: budget.seeds_refined]]


def _cells_union(
    evaluator: Evaluator, budget: SearchBudget, rng: random.Random, roles: tuple[Role, ...]
) -> list[GroupSpec]:
    """The groups of every cell's best finalist, in the whole cluster's GPU ids; a cell that cannot hold a
    replica leaves its GPUs unassigned for the whole refinement to use. Beyond ``budget.steepest_cells`` cells,
    each cell takes first-improving moves (see ``refine``). O(cells * a cell's search)."""
    cluster = evaluator.cluster
    count = math.ceil(len(cluster) / budget.cell_gpus)
    cells = partition(cluster, [g.id for g in cluster.gpus], count, evaluator.replica_bytes(), evaluator.usable)
    budget = dataclasses.replace(budget, first_improvement=count > budget.steepest_cells)
    groups: list[GroupSpec] = []
    for cell in cells:
        sub, remap = cluster.subset(cell)
        inner = Evaluator(sub, evaluator.model, evaluator.workload, evaluator.cost.params)
        if inner.max_replicas() < 1:
            continue
        found = [e for e in finalists(inner, budget, rng, roles) if e.value > 0]
        if found:
            back = {new: old for old, new in remap.items()}
            best = max(found, key=lambda e: e.key())
            groups += [GroupSpec(tuple(back[g] for g in spec.gpus), spec.role) for spec in best.assignment]
    return groups


def plan(
    cluster: Cluster,
    model: ModelSpec,
    workload: Workload,
    *,
    colocate: bool = False,
    params: CostParams | None = None,
    seed: int = 0,
    budget: SearchBudget | None = None,
    holdout: Workload | None = None,
) -> Plan:
    """The HexGen-2 plan (prefill and decode groups only) for serving ``model`` on ``cluster`` under ``workload``;
    with ``colocate`` its variant that may also make colocated groups (``hexgen2_colocate``).

    ``holdout``: an offline sample of the workload for the simulator tie-break (see ``select``); none
    without it. Raises PlanError when no replica fits. Deterministic for a given seed.
    """
    budget = budget or SearchBudget()
    started = time.perf_counter()
    evaluator = Evaluator(cluster, model, workload, params)
    evaluator.check_fits()
    found = finalists(evaluator, budget, random.Random(seed), ROLES if colocate else DISAGGREGATED)
    if not found or max(e.value for e in found) <= 0:
        raise PlanError(f"no group of the cluster can serve {model.name}")
    best, meta = select(
        evaluator,
        found,
        tie_band=budget.tie_band,
        holdout=holdout,
        holdout_requests=budget.holdout_requests,
        seed=seed,
    )
    name = "hexgen2_colocate" if colocate else "hexgen2"
    return evaluator.to_plan(
        best, planner=name, evaluations=evaluator.evaluations, seconds=time.perf_counter() - started, **meta
    )


plan_colocate = functools.partial(plan, colocate=True)


def plan_live(cluster: Cluster, model: ModelSpec, workload: Workload, params: CostParams | None = None) -> Plan:
    """The better predicted of ``plan`` and ``plan_colocate`` (``plan`` on a tie): what a swarm serves.

    A swarm too small for a prefill and a decode group (one GPU) gets the colocated plan; PlanError only
    when neither variant finds one.
    """
    try:
        first = plan(cluster, model, workload, params=params)
    except PlanError:
        return plan(cluster, model, workload, colocate=True, params=params)
    other = plan(cluster, model, workload, colocate=True, params=params)
    return other if other.throughput > first.throughput * (1 + 1e-9) else first


def replan(
    previous: Plan,
    previous_cluster: Cluster,
    cluster: Cluster,
    model: ModelSpec,
    workload: Workload,
    *,
    params: CostParams | None = None,
    seed: int = 0,
    budget: SearchBudget | None = None,
) -> Plan:
    """Re-plan after GPUs joined or left, starting from ``previous``; moves few GPUs.

    GPUs are matched between the clusters by (host, position on the host). Groups that lost a GPU
    keep the rest; new GPUs start unassigned; then a short refinement runs. ``meta["moved_gpus"]``
    counts surviving GPUs whose group or role changed.
    """
    budget = budget or SearchBudget(refine_steps=10, candidates_per_step=120, min_gain=0.02, resamples=0)
    started = time.perf_counter()
    evaluator = Evaluator(cluster, model, workload, params)
    evaluator.check_fits()
    old_to_new = _match_gpus(previous_cluster, cluster)
    groups = []
    for group in previous.groups:
        kept = tuple(old_to_new[g] for g in group.gpus if g in old_to_new)
        if kept:
            groups.append(GroupSpec(kept, group.role))
    start = evaluator.evaluate(groups)
    rng = random.Random(seed)
    roles = ROLES if any(g.role == "colocated" for g in previous.groups) else DISAGGREGATED
    best = refine(evaluator, start, budget, rng, roles)
    if best.value <= 0:
        return plan_live(cluster, model, workload, params)
    survivors = set(old_to_new.values())
    moved = _moved(canonical(groups), best.assignment, survivors)
    return evaluator.to_plan(
        best,
        planner="hexgen2-replan",
        moved_gpus=moved,
        evaluations=evaluator.evaluations,
        seconds=time.perf_counter() - started,
    )


def _moved(before: Sequence[GroupSpec], after: Sequence[GroupSpec], survivors: set[int]) -> int:
    """Surviving GPUs whose role, or whose surviving group-mates, changed."""

    def places(assignment: Sequence[GroupSpec]) -> dict[int, tuple[Role, frozenset[int]]]:
        return {
            g: (spec.role, frozenset(spec.gpus) & survivors) for spec in assignment for g in spec.gpus if g in survivors
        }

    old, new = places(before), places(after)
    return sum(1 for g in survivors if old.get(g) != new.get(g))


def _match_gpus(old: Cluster, new: Cluster) -> dict[int, int]:
    def keys(cluster: Cluster) -> dict[tuple[str, int], int]:
        return {(host, i): gid for host, ids in cluster.hosts.items() for i, gid in enumerate(ids)}

    old_keys, new_keys = keys(old), keys(new)
    return {old_keys[k]: new_keys[k] for k in old_keys if k in new_keys}
