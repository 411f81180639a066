"""Exhaustive search over every assignment of a small cluster, the yardstick for the planner's optimality.

Every set partition of the GPUs is tried; each block that can hold a replica takes every role, and a
block that cannot stays unused (a feasible block is never worse with a role than without one: it can
carry zero flow). Layouts per block come from the same per-group search the planner uses, so the gap
measures the partition, labeling and refinement. O(Bell(n) * 3^k) max-flows, pruned by a flow bound;
meant for n <= 8.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from hexgen.coordinator.evaluate import Evaluation, Evaluator, GroupSpec
from hexgen.coordinator.plan import ROLES, Role


def set_partitions(items: list[int]) -> Iterator[list[list[int]]]:
    """All set partitions of ``items`` (Bell(n) of them), each block in ascending order."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for smaller in set_partitions(rest):
        yield [[first], *smaller]
        for i in range(len(smaller)):
            yield [*smaller[:i], [first, *smaller[i]], *smaller[i + 1 :]]


def exhaustive_best(evaluator: Evaluator, max_gpus: int = 8, roles: tuple[Role, ...] = ROLES) -> Evaluation | None:
    """The best assignment of the whole (small) cluster with groups of ``roles``, or None if no block can
    hold a replica."""
    n = len(evaluator.cluster)
    if n > max_gpus:
        raise ValueError(f"exhaustive search is for at most {max_gpus} GPUs, got {n}")
    roles_of: dict[tuple[int, ...], list[Role]] = {}

    def feasible_roles(block: tuple[int, ...]) -> list[Role]:
        if block not in roles_of:
            roles_of[block] = [r for r in roles if evaluator.layout(GroupSpec(block, r)) is not None]
        return roles_of[block]

    best: Evaluation | None = None
    for blocks in set_partitions(list(range(n))):
        usable = [tuple(b) for b in blocks if feasible_roles(tuple(b))]
        if not usable:
            continue
        for labels in itertools.product(*(feasible_roles(b) for b in usable)):
            groups = [GroupSpec(b, r) for b, r in zip(usable, labels, strict=True)]
            if best is not None and evaluator.upper_bound(groups) <= best.value:
                continue
            ev = evaluator.evaluate(groups)
            if best is None or ev.key() > best.key():
                best = ev
    return best
