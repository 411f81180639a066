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

import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from hexgen.coordinator import baselines
from hexgen.coordinator.cluster import Cluster
from hexgen.coordinator.cost import CostParams
from hexgen.coordinator.evaluate import Evaluation, Evaluator, GroupSpec, PlanError, canonical
from hexgen.coordinator.partition import partition
from hexgen.coordinator.plan import ROLES, Plan, Role
from hexgen.coordinator.simulator import simulate
from hexgen.coordinator.specs import ModelSpec
from hexgen.coordinator.workload import Workload

__all__ = ["PlanError", "SearchBudget", "label_roles", "plan", "refine", "replan"]


@dataclass(frozen=True)
class SearchBudget:
    """Bounds on the search, in evaluations so the result does not depend on the machine's speed."""

    refine_steps: int = 60
    candidates_per_step: int = 160
    seeds_refined: int = 3
    k_values: int = 10
    min_gain: float = 0.0  # relative throughput gain a step must bring; a re-plan asks for more, to move less
    # finalists within this share of the best predicted throughput (or, online, sustaining the arrival rate)
    # count as tied and are compared by replaying the workload (at most ``tie_requests`` of it) in the
    # simulator; 0 turns it off
    tie_band: float = 0.05
    tie_requests: int = 20000


def _k_candidates(k_max: int, count: int) -> list[int]:
    if k_max <= count:
        return list(range(1, k_max + 1))
    picks = {1, k_max, k_max - 1}
    step = k_max ** (1 / (count - 2))
    value = 1.0
    while len(picks) < count and value < k_max:
        value *= step
        picks.add(max(1, min(k_max, round(value))))
    return sorted(picks)


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


class _Moves:
    """Candidate neighbours of an assignment, guided by the bottleneck of its max-flow."""

    def __init__(self, evaluator: Evaluator, rng: random.Random, limit: int, roles: tuple[Role, ...] = ROLES):
        self.ev = evaluator
        self.rng = rng
        self.limit = limit
        self.roles = roles

    def neighbours(self, current: Evaluation) -> list[list[GroupSpec]]:
        groups = list(current.assignment)
        cluster = self.ev.cluster
        used = {g for spec in groups for g in spec.gpus}
        pool = tuple(g.id for g in cluster.gpus if g.id not in used)
        saturated = {i for i in current.flow.saturated}
        infeasible = {i for i, lay in enumerate(current.layouts) if lay is None}
        receivers = sorted(saturated | infeasible) or list(range(len(groups)))
        donors = [i for i in range(len(groups)) if i not in saturated]
        out: list[list[GroupSpec]] = []
        for i, spec in enumerate(groups):
            for role in self.roles:
                if role != spec.role:
                    out.append(self._replace(groups, {i: GroupSpec(spec.gpus, role)}))
        moves: list[list[GroupSpec]] = []
        for r in receivers:
            for d in [*donors, -1]:
                if d == r:
                    continue
                source = pool if d == -1 else groups[d].gpus
                for unit in self._units(source):
                    moves.append(self._move(groups, d, r, unit))
                if d != -1:
                    for a in self._units(groups[r].gpus, singles_only=True):
                        for b in self._units(groups[d].gpus, singles_only=True):
                            if cluster.gpus[a[0]].type != cluster.gpus[b[0]].type:
                                moves.append(self._swap(groups, r, d, a[0], b[0]))
        for i in sorted(infeasible | saturated):
            for j in range(len(groups)):
                if j != i:
                    merged = tuple(sorted(groups[i].gpus + groups[j].gpus))
                    for role in self.roles:
                        moves.append(self._replace(groups, {i: GroupSpec(merged, role), j: GroupSpec((), role)}))
        for i, spec in enumerate(groups):
            for left, right in self._splits(spec.gpus):
                for ra, rb in (("prefill", "decode"), ("decode", "prefill"), (spec.role, spec.role)):
                    moves.append(self._replace(groups, {i: GroupSpec(left, ra)}, extra=[GroupSpec(right, rb)]))
        if pool:
            moves.extend([*groups, GroupSpec(pool, role)] for role in self.roles)
        moves = [m for m in moves if all(g.role in self.roles for g in m if g.gpus)]
        if len(moves) > self.limit - len(out):
            moves = self.rng.sample(moves, max(0, self.limit - len(out)))
        return out + moves

    def _units(self, gpus: Sequence[int], singles_only: bool = False) -> list[tuple[int, ...]]:
        """One GPU per host (GPUs of a host in a group are interchangeable) and each host's slice."""
        by_host: dict[str, list[int]] = {}
        for g in gpus:
            by_host.setdefault(self.ev.cluster.gpus[g].host, []).append(g)
        units = []
        for members in by_host.values():
            units.append((members[-1],))
            if not singles_only and len(members) > 1:
                units.append(tuple(members))
                if len(members) >= 4:
                    units.append(tuple(members[len(members) // 2 :]))
        return units

    def _splits(self, gpus: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Two-way splits of a group: every split of its hosts (up to 4 hosts), else halves."""
        by_host: dict[str, list[int]] = {}
        for g in gpus:
            by_host.setdefault(self.ev.cluster.gpus[g].host, []).append(g)
        hosts = sorted(by_host)
        if len(hosts) > 1:
            if len(hosts) > 4:
                sides = [hosts[: len(hosts) // 2]]
            else:
                rest = hosts[1:]
                sides = [[hosts[0], *c] for k in range(len(rest)) for c in itertools.combinations(rest, k)]
            out = []
            for side in sides:
                left = tuple(g for h in side for g in by_host[h])
                out.append((left, tuple(g for g in gpus if g not in left)))
            return out
        if len(gpus) >= 2:
            half = len(gpus) // 2
            return [(tuple(gpus[:half]), tuple(gpus[half:]))]
        return []

    @staticmethod
    def _replace(
        groups: list[GroupSpec], changes: dict[int, GroupSpec], extra: Sequence[GroupSpec] = ()
    ) -> list[GroupSpec]:
        return [changes.get(i, g) for i, g in enumerate(groups)] + list(extra)

    def _move(self, groups: list[GroupSpec], donor: int, receiver: int, unit: tuple[int, ...]) -> list[GroupSpec]:
        out = list(groups)
        if donor >= 0:
            d = out[donor]
            out[donor] = GroupSpec(tuple(g for g in d.gpus if g not in unit), d.role)
        r = out[receiver]
        out[receiver] = GroupSpec(tuple(sorted(r.gpus + unit)), r.role)
        return out

    @staticmethod
    def _swap(groups: list[GroupSpec], i: int, j: int, a: int, b: int) -> list[GroupSpec]:
        out = list(groups)
        gi, gj = out[i], out[j]
        out[i] = GroupSpec(tuple(sorted([g for g in gi.gpus if g != a] + [b])), gi.role)
        out[j] = GroupSpec(tuple(sorted([g for g in gj.gpus if g != b] + [a])), gj.role)
        return out


def refine(
    evaluator: Evaluator,
    start: Evaluation,
    budget: SearchBudget,
    rng: random.Random,
    roles: tuple[Role, ...] = ROLES,
) -> Evaluation:
    """Best-improvement local search from ``start``; stops when no candidate improves or the budget ends.

    Only ``roles`` are used for groups. Each step scores at most ``candidates_per_step`` neighbours
    (O(c) layout look-ups and max-flows).
    """
    moves = _Moves(evaluator, rng, budget.candidates_per_step, roles)
    current = evaluator.evaluate(_as_searched(start.assignment))
    if start.key() > current.key():
        current = start
    for _ in range(budget.refine_steps):
        best = current
        for candidate in moves.neighbours(current):
            if evaluator.upper_bound(candidate) <= best.value * (1 + 1e-9):
                continue
            ev = evaluator.evaluate(candidate)
            if ev.key() > best.key():
                best = ev
        if best is current or best.value < current.value * (1 + budget.min_gain):
            break
        current = best
    return current


def _as_searched(assignment: Sequence[GroupSpec]) -> list[GroupSpec]:
    """The same groups with their layouts searched instead of fixed (a superset of fixed layouts)."""
    return [GroupSpec(g.gpus, g.role) for g in assignment]


def _seeds(evaluator: Evaluator, budget: SearchBudget) -> list[Evaluation]:
    all_gpus = [g.id for g in evaluator.cluster.gpus]
    seeds = []
    for k in _k_candidates(evaluator.max_replicas(), budget.k_values):
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
