"""The HexGen-2 planner: partition GPUs into replicas, label them prefill or decode, refine by the min cut.

``plan`` is a pure function of (cluster, model, workload, params, seed). It searches the number of
replicas K, partitions the bandwidth graph into K memory-balanced groups (spectral bisection plus
Kernighan-Lin), labels each group prefill, decode or colocated by a sweep over the groups' prefill to
decode strength, then improves the assignment by local moves guided by the max-flow's min cut: flip
a group's role, move or swap GPUs between the groups on either side of the bottleneck, split or
merge groups. The baselines' plans are seeds too, so the search space contains theirs. The max-flow
value is a steady-state rate and cannot see ramp-up, drain or queueing, so the finalists are compared
in the simulator on the workload itself (see ``_tie_break``): for an offline batch those within
``SearchBudget.tie_band`` of the best predicted throughput, for an online trace every finalist that
sustains its arrival rate. ``replan`` starts from a previous plan after GPUs join or leave and moves
few GPUs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from hexgen.coordinator import baselines
from hexgen.coordinator.cluster import Cluster
from hexgen.coordinator.cost import CostParams
from hexgen.coordinator.evaluate import Evaluation, Evaluator, GroupSpec, PlanError, canonical
from hexgen.coordinator.partition import partition
from hexgen.coordinator.plan import Plan, Role
from hexgen.coordinator.search import SearchBudget, k_candidates, refine
from hexgen.coordinator.simulator import simulate
from hexgen.coordinator.specs import ModelSpec
from hexgen.coordinator.workload import Workload


def label_roles(evaluator: Evaluator, groups: Sequence[Sequence[int]]) -> Evaluation:
    """The best role labeling of fixed groups over a sweep of prefill-strength orderings.

    Groups are sorted by prefill rate over decode rate; the first j become prefill and the rest
    decode, for every j, and all-colocated is tried too. O(K) max-flows.
    """
    feasible = []
    for gpus in groups:
        key = tuple(sorted(gpus))
        p = evaluator.layout(GroupSpec(key, "prefill"))
        d = evaluator.layout(GroupSpec(key, "decode"))
        if p is not None and d is not None:
            feasible.append((p.rate / d.rate, key))
    rest = [
        GroupSpec(tuple(sorted(g)), "colocated") for g in groups if tuple(sorted(g)) not in {k for _, k in feasible}
    ]
    feasible.sort(key=lambda x: (-x[0], x[1]))
    options = [[GroupSpec(k, "colocated") for _, k in feasible]]
    for j in range(1, len(feasible)):
        options.append([GroupSpec(k, "prefill" if i < j else "decode") for i, (_, k) in enumerate(feasible)])
    best = None
    for option in options:
        ev = evaluator.evaluate(option + rest)
        if best is None or ev.key() > best.key():
            best = ev
    assert best is not None
    return best


def _seeds(evaluator: Evaluator, budget: SearchBudget) -> list[Evaluation]:
    all_gpus = [g.id for g in evaluator.cluster.gpus]
    seeds = []
    for k in k_candidates(evaluator.max_replicas(), budget.k_values):
        groups = partition(evaluator.cluster, all_gpus, k, evaluator.replica_bytes(), evaluator.usable)
        seeds.append(label_roles(evaluator, groups))
    return seeds


def plan(
    cluster: Cluster,
    model: ModelSpec,
    workload: Workload,
    *,
    params: CostParams | None = None,
    seed: int = 0,
    budget: SearchBudget | None = None,
) -> Plan:
    """The HexGen-2 plan for serving ``model`` on ``cluster`` under ``workload``.

    Raises PlanError when no replica fits. Deterministic for a given seed.
    """
    budget = budget or SearchBudget()
    started = time.perf_counter()
    evaluator = Evaluator(cluster, model, workload, params)
    evaluator.check_fits()
    rng = random.Random(seed)
    seeds = _seeds(evaluator, budget)
    seeds.sort(key=lambda e: e.key(), reverse=True)
    starts = seeds[: budget.seeds_refined]
    found_by_baselines = []
    for baseline in (baselines.distserve_search, baselines.hexgen_search, baselines.naive_search):
        found = baseline(evaluator)
        if found is not None:
            starts.append(found)
            found_by_baselines.append(found)
    finalists = [refine(evaluator, start, budget, rng) for start in starts]
    best = max(finalists, key=lambda e: e.key(), default=None)
    if best is None or best.value <= 0:
        raise PlanError(f"no group of the cluster can serve {model.name}")
    meta: dict[str, object] = {}
    if budget.tie_band > 0:
        best, meta = _tie_break(evaluator, [*finalists, *found_by_baselines], budget, seed)
    return evaluator.to_plan(
        best, planner="hexgen2", evaluations=evaluator.evaluations, seconds=time.perf_counter() - started, **meta
    )


def _is_offline_batch(workload: Workload) -> bool:
    """True when every request arrives at once: the batch is done when its last request is."""
    first = workload.requests[0].arrival_s
    return all(r.arrival_s == first for r in workload.requests)


def _tie_break(
    evaluator: Evaluator, candidates: Sequence[Evaluation], budget: SearchBudget, seed: int
) -> tuple[Evaluation, dict[str, object]]:
    """Among finalists the predicted rate cannot tell apart, the one the simulator serves the workload best with.

    The max-flow value is a steady-state rate, and the simulator runs a plan at that rate once its
    groups are busy. An offline batch also pays a ramp-up (decode groups wait for their first KV cache
    and fill at the prefill rate), a drain (the requests a prefill group finishes last still need their
    whole decode, and the longest outputs left in a group finish at single-sequence speed) and the
    imbalance of a static split. These depend on the particular requests, not on their moments: on the
    Azure samples they move a plan's batch throughput by several per cent either way. So for a batch
    the finalists within ``tie_band`` of the best predicted throughput are taken as tied. For an online
    trace every plan whose predicted rate sustains the arrival rate serves the same requests at the
    same pace; what differs is queueing and the drain after the last arrival, so every finalist whose
    rate reaches the offered rate is tied as well. The tie goes to the one that finishes the workload
    soonest in the simulator (the whole workload up to ``tie_requests`` requests, else an even stride
    of it), then to the lower mean latency, then to the higher predicted throughput. The finalists are
    every refined start and the baselines' own plans, so no tied baseline serves the workload better.
    Deterministic for a seed; one simulation per tied finalist, O(R log R + I * S) each.
    """
    unique: dict[tuple[GroupSpec, ...], Evaluation] = {}
    for ev in sorted(candidates, key=lambda e: e.key(), reverse=True):
        unique.setdefault(ev.assignment, ev)
    ordered = list(unique.values())
    top = ordered[0]
    workload = evaluator.workload
    floor = top.value * (1 - budget.tie_band)
    if not _is_offline_batch(workload) and workload.duration_s > 0:
        floor = min(floor, (len(workload.requests) - 1) / workload.duration_s)
    tied = [ev for ev in ordered if ev.value >= floor]
    if len(tied) < 2:
        return top, {}
    if len(workload.requests) > budget.tie_requests:
        stride = len(workload.requests) / budget.tie_requests
        sample = tuple(workload.requests[int(i * stride)] for i in range(budget.tie_requests))
        workload = Workload(workload.name, sample)
    chosen, chosen_score = top, (-1.0, 0.0)
    for ev in tied:
        result = simulate(evaluator.to_plan(ev), evaluator.cost, workload, seed=seed)
        score = (result.tokens_per_s, -result.latency_mean_s)
        if score > chosen_score:
            chosen, chosen_score = ev, score
    meta: dict[str, object] = {
        "tie_break": {
            "tied": len(tied),
            "simulated_tokens_per_s": chosen_score[0],
            "best_predicted_tokens_per_s": top.value * evaluator.workload.mean_output,
        }
    }
    return chosen, meta


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
    budget = budget or SearchBudget(refine_steps=10, candidates_per_step=120, min_gain=0.02)
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
    best = refine(evaluator, start, budget, rng)
    if best.value <= 0:
        return plan(cluster, model, workload, params=params, seed=seed)
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
