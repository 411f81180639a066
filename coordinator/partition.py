"""Graph partition of the GPUs into model replicas: spectral bisection refined by Kernighan-Lin moves.

GPUs are nodes and bandwidth is edge weight, so a cut through slow links is cheap; a worldless host pair
(``Cluster.worldless``) weighs almost nothing whatever its bandwidth, since a group across it must be bridged
by the daemons: the cut goes through it wherever the memory bounds allow, and a group that needs both sides to
hold a replica still gets them (the bounds come first). Recursive
bisection splits a GPU set into two parts that must hold k1 and k2 replicas' worth of memory, at the
sweep point of the Fiedler vector with the smallest ratio cut; a Kernighan-Lin pass then swaps or
moves GPUs across the cut while it lowers the cut weight and keeps both sides' memory within bounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hexgen.coordinator.cluster import Cluster

WORLDLESS_WEIGHT = 1e-6  # GB/s: small enough that a cut through every worldless pair is the cheapest


def fiedler_order(weights: np.ndarray) -> np.ndarray:
    """Node indices sorted by the Fiedler vector of the weighted graph Laplacian. O(n^3)."""
    n = len(weights)
    if n <= 2:
        return np.arange(n)
    laplacian = np.diag(weights.sum(axis=1)) - weights
    _, vectors = np.linalg.eigh(laplacian)
    fiedler = vectors[:, 1]
    # eigenvector signs are arbitrary: orient it so the result does not depend on the LAPACK build
    if fiedler[np.argmax(np.abs(fiedler) > 1e-9)] < 0:
        fiedler = -fiedler
    return np.lexsort((np.arange(n), np.round(fiedler, 9)))


def bisect(
    weights: np.ndarray,
    memory: np.ndarray,
    left_share: float,
    min_left: float,
    min_right: float,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """Split nodes in two; returns a boolean mask of the left part.

    The left part should hold ``left_share`` of the memory, and must hold at least ``min_left`` (the
    right at least ``min_right``) when any split allows it. Spectral sweep (along ``order``, else the
    Fiedler order of ``weights``) then Kernighan-Lin. O(n^3) for the eigenvectors plus O(n^2) per KL pass.
    """
    n = len(weights)
    order = fiedler_order(weights) if order is None else order
    total = memory.sum()
    best_i, best_score = None, np.inf
    prefix = np.cumsum(memory[order])
    # cut(first i | rest) for every i, incrementally
    cut = 0.0
    in_left = np.zeros(n, dtype=bool)
    for i in range(1, n):
        node = order[i - 1]
        cut += weights[node, ~in_left].sum() - weights[node, in_left].sum()
        in_left[node] = True
        left_mem = prefix[i - 1]
        right_mem = total - left_mem
        if left_mem < min_left or right_mem < min_right:
            continue
        balance = abs(left_mem / total - left_share)
        score = cut / (i * (n - i)) * (1.0 + 4.0 * balance)
        if score < best_score - 1e-12:
            best_i, best_score = i, score
    if best_i is None:
        target = left_share * total
        best_i = int(np.clip(np.searchsorted(prefix, target) + 1, 1, n - 1))
    mask = np.zeros(n, dtype=bool)
    mask[order[:best_i]] = True
    return kernighan_lin(weights, memory, mask, min_left, min_right)


def kernighan_lin(
    weights: np.ndarray, memory: np.ndarray, mask: np.ndarray, min_left: float, min_right: float, passes: int = 8
) -> np.ndarray:
    """Greedy KL refinement: apply the best cut-reducing swap or move that keeps memory bounds.

    Each pass evaluates all single moves and all pair swaps in O(n^2) with numpy and applies the best
    one; stops when nothing improves or after ``passes * n`` steps.
    """
    mask = mask.copy()
    n = len(weights)
    for _ in range(passes * n):
        left_mem = memory[mask].sum()
        right_mem = memory[~mask].sum()
        external = np.where(mask, weights[:, ~mask].sum(axis=1), weights[:, mask].sum(axis=1))
        internal = np.where(mask, weights[:, mask].sum(axis=1), weights[:, ~mask].sum(axis=1))
        gain = external - internal  # cut reduction if the node alone switches sides
        best_gain = 1e-9
        best_action: tuple[int, ...] | None = None
        movable = np.where(
            mask,
            (left_mem - memory >= min_left) & (mask.sum() > 1),
            (right_mem - memory >= min_right) & ((~mask).sum() > 1),
        )
        if movable.any():
            i = int(np.argmax(np.where(movable, gain, -np.inf)))
            if gain[i] > best_gain:
                best_gain, best_action = gain[i], (i,)
        left = np.flatnonzero(mask)
        right = np.flatnonzero(~mask)
        if len(left) and len(right):
            pair_gain = gain[left][:, None] + gain[right][None, :] - 2 * weights[np.ix_(left, right)]
            new_left = left_mem - memory[left][:, None] + memory[right][None, :]
            new_right = right_mem + memory[left][:, None] - memory[right][None, :]
            ok = (new_left >= min_left) & (new_right >= min_right)
            pair_gain = np.where(ok, pair_gain, -np.inf)
            a, b = np.unravel_index(int(np.argmax(pair_gain)), pair_gain.shape)
            if pair_gain[a, b] > best_gain:
                best_gain, best_action = pair_gain[a, b], (int(left[a]), int(right[b]))
        if best_action is None:
            break
        for i in best_action:
            mask[i] = not mask[i]
    return mask


def partition(
    cluster: Cluster,
    gpus: Sequence[int],
    k: int,
    replica_bytes: float,
    usable: Sequence[float],
    orders: dict[tuple[int, ...], np.ndarray] | None = None,
) -> list[list[int]]:
    """Split ``gpus`` into ``k`` groups by recursive spectral bisection with KL refinement.

    ``usable[g]`` is the bytes GPU g can devote to a replica; each group is kept at or above
    ``replica_bytes`` where the memory allows. ``orders`` memoizes each GPU set's Fiedler order across
    calls (partitions of one cluster for several k share their first cuts). Returns groups as sorted GPU
    id lists, deterministic. O(k n^3) worst case for n GPUs.
    """
    ids = sorted(gpus)
    if k <= 1 or len(ids) <= 1:
        return [ids]
    k = min(k, len(ids))
    weights = np.array([[cluster.bandwidth[a][b] for b in ids] for a in ids], dtype=float)
    if cluster.worldless:
        _damp_worldless(weights, cluster, ids)
    memory = np.array([usable[g] for g in ids], dtype=float)
    orders = {} if orders is None else orders
    key = tuple(ids)
    if key not in orders:
        orders[key] = fiedler_order(weights)
    k_left = k // 2
    mask = bisect(weights, memory, k_left / k, k_left * replica_bytes, (k - k_left) * replica_bytes, orders[key])
    left = [g for g, m in zip(ids, mask, strict=True) if m]
    right = [g for g, m in zip(ids, mask, strict=True) if not m]
    return partition(cluster, left, k_left, replica_bytes, usable, orders) + partition(
        cluster, right, k - k_left, replica_bytes, usable, orders
    )


def _damp_worldless(weights: np.ndarray, cluster: Cluster, ids: Sequence[int]) -> None:
    """Lower, in place, the weight between GPUs ``ids`` on the two hosts of a worldless pair to
    ``WORLDLESS_WEIGHT``. O(n^2)."""
    hosts = [cluster.gpus[g].host for g in ids]
    for i, a in enumerate(hosts):
        for j, b in enumerate(hosts):
            if frozenset((a, b)) in cluster.worldless:
                weights[i, j] = min(weights[i, j], WORLDLESS_WEIGHT)
