"""The planner's local search: its budget, the candidate replica counts, and refinement by min-cut-guided moves.

The planner and the HexGen-style baseline both search with these, so neither imports the other.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

from hexgen.coordinator.evaluate import Evaluation, Evaluator, GroupSpec
from hexgen.coordinator.plan import ROLES, Role

Split = tuple[tuple[int, ...], tuple[int, ...]]

# a sampled step stops at the first move gaining this much; smaller gains are taken only as the best found
FIRST_GAIN = 1e-3


@dataclass(frozen=True)
class SearchBudget:
    """Bounds on the search, in evaluations so the result does not depend on the machine's speed."""

    refine_steps: int = 60
    candidates_per_step: int = 160
    seeds_refined: int = 3
    k_values: int = 10
    min_gain: float = 0.0  # relative throughput gain a step must bring; a re-plan asks for more, to move less
    # finalists within this share of the best predicted throughput count as tied and are compared by
    # replaying a held-out offline sample (at most ``holdout_requests`` of it) in the simulator; 0 turns it off
    tie_band: float = 0.05
    holdout_requests: int = 2000
    # a step whose sample of a larger neighbourhood found no better assignment draws up to this many more
    # samples before the search stops: a wide neighbourhood is not judged on a few percent of it
    resamples: int = 3
    # the search stops once the assignments the evaluator scored times the cluster's GPUs reach this, so a
    # large cluster (whose every score costs more) plans in bounded time; a count, not the clock, keeps the
    # result independent of the machine
    gpu_evaluations: int = 300_000
    # a cluster of more than ``cells_above`` GPUs is first planned cell by cell (cells of about ``cell_gpus``
    # GPUs from the planner's own partition), then refined whole from the union of the cells' plans
    cells_above: int = 48
    cell_gpus: int = 32
    # up to this many cells each take best moves; more take first-improving ones, which keeps 256 GPUs within
    # a minute on two cores (measured: 60 s and a 17.5 % gap to the bound with best moves, 39 s and 18.3 %)
    steepest_cells: int = 4
    # a sampled step takes the first move that gains FIRST_GAIN instead of the best of its sample: many cheap
    # steps where a wide neighbourhood and a small budget allow only a few whole ones (the whole-cluster
    # refinement after the cells)
    first_improvement: bool = False

    def max_evaluations(self, gpus: int) -> int:
        return max(1, self.gpu_evaluations // max(1, gpus))


def k_candidates(k_max: int, count: int) -> list[int]:
    """At most ``count`` replica counts in [1, k_max]: all of them when few, else 1, k_max - 1, k_max and a
    geometric ladder between."""
    if k_max <= count:
        return list(range(1, k_max + 1))
    picks = {1, k_max, k_max - 1}
    step = k_max ** (1 / (count - 2))
    value = 1.0
    while len(picks) < count and value < k_max:
        value *= step
        picks.add(max(1, min(k_max, round(value))))
    return sorted(picks)


class Moves:
    """Candidate neighbours of an assignment, guided by the bottleneck of its max-flow."""

    def __init__(self, evaluator: Evaluator, rng: random.Random, limit: int, roles: tuple[Role, ...] = ROLES):
        self.ev = evaluator
        self.rng = rng
        self.limit = limit
        self.roles = roles

    def neighbours(self, current: Evaluation, draw: int = 0) -> list[list[GroupSpec]]:
        """Role flips of every group and the unused pool as a new group, then (sampled down to the limit) GPU moves and swaps from unsaturated
        groups or the unused pool into saturated or infeasible ones, merges into those, and two-way splits.

        ``draw`` > 0 asks for a further sample of the moves alone (none when the first draw held them all).
        """
        groups = list(current.assignment)
        used = {g for spec in groups for g in spec.gpus}
        pool = tuple(g.id for g in self.ev.cluster.gpus if g.id not in used)
        saturated = set(current.flow.saturated)
        infeasible = {i for i, lay in enumerate(current.layouts) if lay is None}
        receivers = sorted(saturated | infeasible) or list(range(len(groups)))
        donors = [i for i in range(len(groups)) if i not in saturated] or list(range(len(groups)))
        out = self._flips(groups)
        if pool:
            out.extend([*groups, GroupSpec(pool, role)] for role in self.roles)
            for left, right in self._splits(pool):
                out.append([*groups, GroupSpec(left, "prefill"), GroupSpec(right, "decode")])
                out.append([*groups, GroupSpec(left, "decode"), GroupSpec(right, "prefill")])
        moves = self._transfers(groups, receivers, donors, pool)
        moves += self._merges(groups, sorted(infeasible | saturated))
        moves += self._split_moves(groups)
        room = max(0, self.limit - len(out))
        if len(moves) <= room:
            return [] if draw else out + moves
        if draw:
            return self.rng.sample(moves, min(len(moves), self.limit))
        return out + self.rng.sample(moves, room)

    def _flips(self, groups: list[GroupSpec]) -> list[list[GroupSpec]]:
        """Each group given each other role."""
        return [
            self._replace(groups, {i: GroupSpec(spec.gpus, role)})
            for i, spec in enumerate(groups)
            for role in self.roles
            if role != spec.role
        ]

    def _transfers(
        self, groups: list[GroupSpec], receivers: list[int], donors: list[int], pool: tuple[int, ...]
    ) -> list[list[GroupSpec]]:
        """Units moved from each donor (-1: the pool) to each receiver, and single GPUs of differing types
        swapped between them."""
        moves: list[list[GroupSpec]] = []
        for r in receivers:
            for d in [*donors, -1]:
                if d == r:
                    continue
                source = pool if d == -1 else groups[d].gpus
                moves.extend(self._move(groups, d, r, unit) for unit in self._units(source))
                if d != -1:
                    moves.extend(self._swaps(groups, r, d))
        return moves

    def _swaps(self, groups: list[GroupSpec], r: int, d: int) -> list[list[GroupSpec]]:
        cluster = self.ev.cluster
        return [
            self._swap(groups, r, d, a[0], b[0])
            for a in self._units(groups[r].gpus, singles_only=True)
            for b in self._units(groups[d].gpus, singles_only=True)
            if cluster.gpus[a[0]].type != cluster.gpus[b[0]].type
        ]

    def _merges(self, groups: list[GroupSpec], targets: list[int]) -> list[list[GroupSpec]]:
        """Each target group merged with every other group, in each role."""
        moves: list[list[GroupSpec]] = []
        for i in targets:
            for j in range(len(groups)):
                if j != i:
                    merged = tuple(sorted(groups[i].gpus + groups[j].gpus))
                    for role in self.roles:
                        moves.append(self._replace(groups, {i: GroupSpec(merged, role), j: GroupSpec((), role)}))
        return moves

    def _split_moves(self, groups: list[GroupSpec]) -> list[list[GroupSpec]]:
        """Each group split in two, the halves prefill and decode, decode and prefill, or both its role."""
        moves: list[list[GroupSpec]] = []
        for i, spec in enumerate(groups):
            for left, right in self._splits(spec.gpus):
                pairs: tuple[tuple[Role, Role], ...] = (
                    ("prefill", "decode"),
                    ("decode", "prefill"),
                    (spec.role, spec.role),
                )
                for ra, rb in pairs:
                    if ra not in self.roles or rb not in self.roles:
                        continue
                    moves.append(self._replace(groups, {i: GroupSpec(left, ra)}, extra=[GroupSpec(right, rb)]))
        return moves

    def _by_host(self, gpus: Sequence[int]) -> dict[str, list[int]]:
        by_host: dict[str, list[int]] = {}
        for g in gpus:
            by_host.setdefault(self.ev.cluster.gpus[g].host, []).append(g)
        return by_host

    def _units(self, gpus: Sequence[int], singles_only: bool = False) -> list[tuple[int, ...]]:
        """One GPU per host (GPUs of a host in a group are interchangeable) and each host's slice."""
        units: list[tuple[int, ...]] = []
        for members in self._by_host(gpus).values():
            units.append((members[-1],))
            if not singles_only and len(members) > 1:
                units.append(tuple(members))
                if len(members) >= 4:
                    units.append(tuple(members[len(members) // 2 :]))
        return units

    def _splits(self, gpus: Sequence[int]) -> list[Split]:
        """Two-way splits of a group: every split of its hosts (up to 4 hosts), else halves; and every host's
        GPUs halved, so that two halves can hand KV over inside their hosts instead of through NICs."""
        by_host = self._by_host(gpus)
        hosts = sorted(by_host)
        within = tuple(g for h in hosts for g in by_host[h][: len(by_host[h]) // 2])
        out = [(within, tuple(g for g in gpus if g not in within))] if within and len(hosts) > 1 else []
        if len(hosts) > 1:
            if len(hosts) > 4:
                sides = [hosts[: len(hosts) // 2]]
            else:
                rest = hosts[1:]
                sides = [[hosts[0], *c] for k in range(len(rest)) for c in itertools.combinations(rest, k)]
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

    @staticmethod
    def _move(groups: list[GroupSpec], donor: int, receiver: int, unit: tuple[int, ...]) -> list[GroupSpec]:
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
    """Local search from ``start``; stops when no candidate improves or the budget ends.

    Only ``roles`` are used for groups. Each step scores at most ``candidates_per_step`` neighbours
    (O(c) layout look-ups and max-flows). A neighbourhood that fits in one step is searched for its best
    move; a larger one is sampled (with ``budget.first_improvement``, the first move gaining FIRST_GAIN is
    taken), and a step that finds nothing better samples it again, up to ``resamples`` times.
    """
    moves = Moves(evaluator, rng, budget.candidates_per_step, roles)
    limit = budget.max_evaluations(len(evaluator.cluster))
    current = evaluator.evaluate(as_searched(start.assignment))
    if start.key() > current.key():
        current = start
    for _ in range(budget.refine_steps):
        best = current
        for draw in range(budget.resamples + 1):
            candidates = moves.neighbours(current, draw)
            first = budget.first_improvement and (draw > 0 or len(candidates) >= moves.limit)
            enough = current.value * (1 + max(budget.min_gain, FIRST_GAIN)) if first else float("inf")
            best = _best_of(evaluator, candidates, best, limit, enough)
            if best is not current or evaluator.evaluations >= limit:
                break
        if best is current or best.value < current.value * (1 + budget.min_gain):
            break
        current = best
    return current


def _best_of(
    evaluator: Evaluator, candidates: list[list[GroupSpec]], best: Evaluation, limit: int, enough: float
) -> Evaluation:
    """The best of ``best`` and the candidates the cheap bound does not rule out, until ``limit`` evaluations
    or one whose value exceeds ``enough``."""
    for candidate in candidates:
        if evaluator.evaluations >= limit:
            break
        if evaluator.upper_bound(candidate) <= best.value * (1 + 1e-9):
            continue
        ev = evaluator.evaluate(candidate)
        if ev.key() > best.key():
            best = ev
            if best.value > enough:
                break
    return best


def as_searched(assignment: Sequence[GroupSpec]) -> list[GroupSpec]:
    """The same groups with their layouts searched instead of fixed (a superset of fixed layouts)."""
    return [GroupSpec(g.gpus, g.role) for g in assignment]
