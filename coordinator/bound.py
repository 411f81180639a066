"""An upper bound on a prefill/decode plan's throughput: the flow relaxed to per-GPU-type rates under host NICs.

The relaxation lets every host give any fraction of its GPUs to prefill and the rest to decode, each GPU
serving at the best per-GPU rate a group of its type reaches, and lets any prefill host hand requests to
any decode host. What it keeps is what no plan escapes: each GPU serves one role, a request is prefilled
and decoded once, and a prompt's KV cache that changes host crosses the sender's NIC egress and the
receiver's ingress. Pipeline and TP traffic are left out (a real plan adds them), so the bound is loose
where those dominate. It assumes no group beats the best per-GPU rate of its types' own groups, which the
tests check against exhaustive search on small clusters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_array

from hexgen.coordinator.evaluate import Evaluator, GroupSpec
from hexgen.coordinator.plan import Role

MAX_WHOLE_HOSTS = 32  # beyond this many hosts the whole-GPU program can take minutes: the LP alone


@dataclass(frozen=True)
class FlowBound:
    """Requests/s no prefill/decode plan exceeds, and the per-GPU rates (requests/s) it assumed per type."""

    value: float
    per_gpu: dict[str, tuple[float, float]]  # GPU type -> (prefill, decode)
    integral: bool = False  # whole GPUs per role (the tighter bound) rather than the LP relaxation

    def gap(self, throughput: float) -> float:
        """How far ``throughput`` is below the bound, as a share of the bound (0: at the bound)."""
        return max(0.0, 1.0 - throughput / self.value) if self.value > 0 else 0.0


def group_sizes(count: int) -> list[int]:
    """Group sizes tried per GPU type: 1-8, then powers of two up to ``count``. O(log count)."""
    sizes = list(range(1, min(count, 8) + 1))
    size = 16
    while size <= count:
        sizes.append(size)
        size *= 2
    return sizes


def best_rate_per_gpu(evaluator: Evaluator, gpus: Iterable[int], role: Role) -> float:
    """The best requests/s per GPU of a group of the first s of ``gpus`` (kept in host order, so a group
    fills a host before it spans the next), over the sizes of ``group_sizes``. O(log n) layout searches."""
    ordered = list(gpus)
    best = 0.0
    for size in group_sizes(len(ordered)):
        layout = evaluator.layout(GroupSpec(tuple(ordered[:size]), role))
        if layout is not None:
            best = max(best, layout.rate / size)
    return best


def flow_upper_bound(evaluator: Evaluator, time_limit_s: float = 30.0) -> FlowBound:
    """The LP relaxation of a plan's flow for ``evaluator``'s cluster, model and workload.

    Variables: per host h, the GPUs x_h on prefill and y_h on decode (x_h + y_h <= GPUs of h), and the
    requests/s f_hk prefilled on h and decoded on k. Maximise sum f subject to sum_k f_hk <= r_p(h) x_h,
    sum_h f_hk <= r_d(k) y_k, and for h != k the KV bytes of f_hk within h's egress and k's ingress.
    O(H^2) variables for H hosts. Solved by HiGHS twice: as an LP, and with whole GPUs per role (tighter);
    the second is used when it proves optimal within ``time_limit_s`` (``integral``), else the LP. The
    second is tried only up to ``MAX_WHOLE_HOSTS`` hosts.
    """
    cluster = evaluator.cluster
    by_type: dict[str, list[int]] = {}
    for gpu in cluster.gpus:
        by_type.setdefault(gpu.type, []).append(gpu.id)
    per_gpu = {
        t: (best_rate_per_gpu(evaluator, ids, "prefill"), best_rate_per_gpu(evaluator, ids, "decode"))
        for t, ids in by_type.items()
    }
    hosts = list(cluster.hosts)
    n = len(hosts)
    kv = evaluator.cost.prompt_kv_bytes()
    flow_count = n * n
    # columns: f_hk (h * n + k), then x_h, then y_h
    x_col, y_col = flow_count, flow_count + n
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    limits: list[float] = []

    def row(entries: list[tuple[int, float]], limit: float) -> None:
        index = len(limits)
        for col, val in entries:
            rows.append(index)
            cols.append(col)
            vals.append(val)
        limits.append(limit)

    for h, host in enumerate(hosts):
        kind = cluster.gpus[cluster.hosts[host][0]].type
        prefill_rate, decode_rate = per_gpu[kind]
        row([(h * n + k, 1.0) for k in range(n)] + [(x_col + h, -prefill_rate)], 0.0)
        row([(k * n + h, 1.0) for k in range(n)] + [(y_col + h, -decode_rate)], 0.0)
        row([(x_col + h, 1.0), (y_col + h, 1.0)], float(len(cluster.hosts[host])))
        if kv > 0:
            out_cap = evaluator.nic_capacity.get((host, "out"), float("inf"))
            in_cap = evaluator.nic_capacity.get((host, "in"), float("inf"))
            if out_cap < float("inf"):
                row([(h * n + k, kv) for k in range(n) if k != h], out_cap)
            if in_cap < float("inf"):
                row([(k * n + h, kv) for k in range(n) if k != h], in_cap)
    objective = np.zeros(flow_count + 2 * n)
    objective[:flow_count] = -1.0
    matrix = coo_array((vals, (rows, cols)), shape=(len(limits), flow_count + 2 * n)).tocsr()
    limit_array = np.array(limits)
    relaxed = linprog(objective, A_ub=matrix, b_ub=limit_array, bounds=(0, None), method="highs")
    value = float(-relaxed.fun) if relaxed.status == 0 else 0.0
    if n > MAX_WHOLE_HOSTS:
        return FlowBound(value, per_gpu)
    integrality = np.zeros(flow_count + 2 * n)
    integrality[flow_count:] = 1
    whole = linprog(
        objective,
        A_ub=matrix,
        b_ub=limit_array,
        bounds=(0, None),
        method="highs",
        integrality=integrality,
        options={"time_limit": time_limit_s},
    )
    if whole.status == 0:
        value = min(value, float(-whole.fun))
    return FlowBound(value, per_gpu, integral=whole.status == 0)
