"""Max-flow over the plan's dispatch network (source -> prefill -> decode -> sink), under host NIC limits.

The network has one node per group. Prefill groups get an edge from the source (capacity: prefill
requests/s), decode groups an edge to the sink (decode requests/s), and every prefill group an edge to
every decode group (requests/s whose KV the link between them carries). Colocated groups sit on a
source -> group -> sink path with their combined capacity. The flow value is the predicted throughput;
edge flows are the dispatch weights; the min cut names the bottleneck.

Every request also puts bytes on host NICs (KV hand-off, activations between hosts), shared by all the
groups on a host. When the max-flow's traffic fits every NIC it is also the best flow under them;
otherwise a linear program over the same edges with one row per NIC port finds the best flow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
from networkx.algorithms.flow import preflow_push
from scipy.optimize import linprog
from scipy.sparse import csr_matrix

from hexgen.coordinator.plan import SINK, SOURCE, Flow, Role

SCALE = 1e6  # capacities become integers in micro-requests/s: exact integer max-flow


@dataclass(frozen=True)
class FlowNode:
    id: int
    role: Role
    capacity: float


@dataclass(frozen=True)
class FlowResult:
    value: float
    flows: tuple[Flow, ...]
    bottleneck: str
    saturated: frozenset[int]  # groups with a cut edge: more capacity there would raise the flow
    nic_use: float = 0.0  # the busiest NIC port's load over its capacity at this flow


Port = tuple[str, str]  # (host, "out" or "in")
PortBytes = Mapping[Port, float]


class PortColumns:
    """The NIC ports of a program (sorted) and, per combination of ``PortBytes`` maps, their entries as
    (port index, GB per request) arrays; memoized by the maps' identities, so callers that memoize their
    maps (the evaluator does) build each column once across programs."""

    def __init__(self, capacity: Mapping[Port, float]):
        self.ports = sorted(capacity)
        self.index = {port: i for i, port in enumerate(self.ports)}
        self.limits = np.array([capacity[p] / 1e9 for p in self.ports])
        self._columns: dict[tuple[int, ...], tuple[tuple[PortBytes, ...], np.ndarray, np.ndarray]] = {}

    def column(self, *parts: PortBytes) -> tuple[np.ndarray, np.ndarray]:
        key = tuple(id(part) for part in parts)
        found = self._columns.get(key)
        if found is None:
            summed: dict[int, float] = {}
            for part in parts:
                for port, nbytes in part.items():
                    i = self.index.get(port)
                    if i is not None:
                        summed[i] = summed.get(i, 0.0) + nbytes / 1e9
            rows = np.fromiter(summed, dtype=np.int64, count=len(summed))
            values = np.fromiter(summed.values(), dtype=float, count=len(summed))
            self._columns[key] = found = (parts, rows, values)  # the parts stay alive: ids are never reused
        return found[1], found[2]


@dataclass(frozen=True)
class NicLimits:
    """What each request puts on NIC ports (bytes per request of each node and of each prefill -> decode
    pair) and what each port carries (bytes/s). ``columns`` may be shared by the limits of one cluster."""

    node_bytes: Mapping[int, PortBytes]
    pair_bytes: Callable[[int, int], PortBytes]
    capacity: Mapping[Port, float] = field(default_factory=dict)
    columns: PortColumns | None = None

    def port_columns(self) -> PortColumns:
        return self.columns if self.columns is not None else PortColumns(self.capacity)

    def loads(self, flows: Sequence[Flow]) -> dict[Port, float]:
        """Bytes/s per port of these flows (a node's traffic at its inflow). O(F * ports)."""
        loads: dict[Port, float] = {}
        for f in flows:
            parts = [self.node_bytes.get(f.dst, {})] if isinstance(f.dst, int) else []
            if isinstance(f.src, int) and isinstance(f.dst, int):
                parts.append(self.pair_bytes(f.src, f.dst))
            for part in parts:
                for port, nbytes in part.items():
                    loads[port] = loads.get(port, 0.0) + f.rate * nbytes
        return loads

    def use(self, loads: Mapping[Port, float]) -> float:
        return max((load / self.capacity[p] for p, load in loads.items() if p in self.capacity), default=0.0)


def max_flow(
    nodes: Sequence[FlowNode],
    link_rate: Callable[[int, int], float],
    nics: NicLimits | None = None,
) -> FlowResult:
    """Maximum requests/s through the groups; ``link_rate(prefill_id, decode_id)`` caps KV transfer, and
    ``nics`` (when given) caps each host's NIC ports.

    Without NIC limits: networkx's preflow-push, O(V^2 sqrt(E)) for V groups and E = P*D links, and the
    bottleneck is the kind of min-cut edge with the largest total capacity: "prefill", "decode", "link"
    or "colocated". With them: a linear program (HiGHS) with E + C variables and V + ports rows, and the
    bottleneck is "network" when a NIC port is full, else the kind of the first full row or bound
    ("none" when nothing can flow).
    """
    if nics is None or not nics.capacity or not _crosses_hosts(nodes, nics):
        return _graph_flow(nodes, link_rate)
    return _nic_flow(nodes, link_rate, nics)


def _crosses_hosts(nodes: Sequence[FlowNode], nics: NicLimits) -> bool:
    """Whether any group or prefill -> decode pair puts bytes on a NIC. O(P * D)."""
    if any(nics.node_bytes.get(n.id) for n in nodes):
        return True
    prefill = [n.id for n in nodes if n.role == "prefill"]
    decode = [n.id for n in nodes if n.role == "decode"]
    return any(nics.pair_bytes(p, d) for p in prefill for d in decode)


def _graph_flow(nodes: Sequence[FlowNode], link_rate: Callable[[int, int], float]) -> FlowResult:
    """The max-flow without NIC limits."""
    graph = nx.DiGraph()
    graph.add_node(SOURCE)
    graph.add_node(SINK)
    prefill = [n for n in nodes if n.role == "prefill"]
    decode = [n for n in nodes if n.role == "decode"]
    for n in nodes:
        cap = round(n.capacity * SCALE)
        if n.role == "prefill":
            graph.add_edge(SOURCE, n.id, capacity=cap)
        elif n.role == "decode":
            graph.add_edge(n.id, SINK, capacity=cap)
        else:
            graph.add_edge(SOURCE, n.id, capacity=cap)
            graph.add_edge(n.id, SINK, capacity=cap)
    for p in prefill:
        for d in decode:
            graph.add_edge(p.id, d.id, capacity=round(link_rate(p.id, d.id) * SCALE))
    residual = preflow_push(graph, SOURCE, SINK)
    value = residual.graph["flow_value"] / SCALE
    flows = []
    for u, v in graph.edges():
        f = residual[u][v]["flow"]
        if f > 0:
            flows.append(Flow(u, v, f / SCALE))
    flows.sort(key=lambda f: (str(f.src), str(f.dst)))
    reachable = _reachable(residual)
    cut = {"prefill": 0.0, "decode": 0.0, "link": 0.0, "colocated": 0.0}
    saturated: set[int] = set()
    roles = {n.id: n.role for n in nodes}
    for u, v, data in graph.edges(data=True):
        if u in reachable and v not in reachable:
            kind = "link" if u != SOURCE and v != SINK else roles[v if u == SOURCE else u]
            cut[kind] += data["capacity"]
            saturated.update(x for x in (u, v) if x not in (SOURCE, SINK))
    bottleneck = max(cut, key=lambda k: cut[k]) if value > 0 else "none"
    return FlowResult(value, tuple(flows), bottleneck, frozenset(saturated))


def _reachable(residual: nx.DiGraph) -> set[int | str]:
    seen: set[int | str] = {SOURCE}
    stack: list[int | str] = [SOURCE]
    while stack:
        u = stack.pop()
        for v, data in residual[u].items():
            if v not in seen and data["capacity"] - data["flow"] > 0:
                seen.add(v)
                stack.append(v)
    return seen


@dataclass(frozen=True)
class _Program:
    """The NIC linear program: ``rows @ x <= limits`` with ``bounds`` on x; rows are group capacities first,
    then NIC ports; x is one rate per prefill -> decode edge, then one per colocated group."""

    edges: list[tuple[int, int]]
    coloc: list[FlowNode]
    rows: csr_matrix
    limits: np.ndarray
    bounds: np.ndarray  # (columns, 2): lower 0, upper inf where unbounded
    prefill_rows: int
    group_rows: int

    def members(self, column: int) -> tuple[int, ...]:
        return self.edges[column] if column < len(self.edges) else (self.coloc[column - len(self.edges)].id,)


def _program(nodes: Sequence[FlowNode], link_rate: Callable[[int, int], float], nics: NicLimits) -> _Program:
    """The rows, limits and bounds of the NIC program, sparse. O(V + P*D*ports per column + C)."""
    prefill = [n for n in nodes if n.role == "prefill"]
    decode = [n for n in nodes if n.role == "decode"]
    coloc = [n for n in nodes if n.role == "colocated"]
    edges = [(p.id, d.id) for p in prefill for d in decode]
    ports = nics.port_columns()
    groups = len(prefill) + len(decode)
    empty: PortBytes = {}
    port_rows: list[np.ndarray] = []
    port_values: list[np.ndarray] = []
    uppers: list[float] = []
    for p, d in edges:
        r, v = ports.column(nics.node_bytes.get(p, empty), nics.node_bytes.get(d, empty), nics.pair_bytes(p, d))
        port_rows.append(r)
        port_values.append(v)
        uppers.append(link_rate(p, d))
    for c in coloc:
        r, v = ports.column(nics.node_bytes.get(c.id, empty))
        port_rows.append(r)
        port_values.append(v)
        uppers.append(c.capacity)
    edge_columns = np.arange(len(edges))
    counts = [len(r) for r in port_rows]
    rows = np.concatenate(
        [
            np.repeat(np.arange(len(prefill)), len(decode)),
            len(prefill) + np.tile(np.arange(len(decode)), len(prefill)),
            np.concatenate([np.zeros(0, dtype=np.int64), *port_rows]) + groups,
        ]
    )
    columns = np.concatenate([edge_columns, edge_columns, np.repeat(np.arange(len(uppers)), counts)])
    values = np.concatenate([np.ones(2 * len(edges)), *port_values])
    matrix = csr_matrix((values, (rows, columns)), shape=(groups + len(ports.ports), len(uppers)))
    matrix.eliminate_zeros()
    bounds = np.zeros((len(uppers), 2))
    bounds[:, 1] = uppers
    bounds[~np.isfinite(bounds[:, 1]), 1] = np.inf
    limits = np.concatenate([np.array([n.capacity for n in [*prefill, *decode]]), ports.limits])
    return _Program(edges, coloc, matrix, limits, bounds, len(prefill), groups)


def _nic_flow(nodes: Sequence[FlowNode], link_rate: Callable[[int, int], float], nics: NicLimits) -> FlowResult:
    """The best flow under the NIC limits, as a linear program over the edges.

    Variables: one per prefill -> decode edge (bounded by its link rate) and one per colocated group
    (bounded by its capacity). Rows: each prefill group's and decode group's capacity, and each NIC port.
    Groups of a full row or at a full bound are the saturated ones. O(LP) with P*D + C variables.
    """
    lp = _program(nodes, link_rate, nics)
    if not len(lp.bounds):
        return FlowResult(0.0, (), "none", frozenset())
    solved = linprog(-np.ones(lp.rows.shape[1]), A_ub=lp.rows, b_ub=lp.limits, bounds=lp.bounds, method="highs")
    x = np.maximum(solved.x, 0.0) if solved.status == 0 else np.zeros(lp.rows.shape[1])
    flows = _lp_flows(lp.edges, lp.coloc, x)
    tight = lp.rows @ x >= lp.limits * (1 - 1e-6)
    upper = lp.bounds[:, 1]
    at_bound = np.flatnonzero(np.isfinite(upper) & (x >= upper * (1 - 1e-6)))
    saturated = {n for j in at_bound for n in lp.members(int(j))}
    for r in np.flatnonzero(tight):
        row = lp.rows.indices[lp.rows.indptr[r] : lp.rows.indptr[r + 1]]
        saturated.update(n for j in row for n in lp.members(int(j)))
    value = float(x.sum())
    kinds = [
        ("network", bool(tight[lp.group_rows :].any())),
        ("prefill", bool(tight[: lp.prefill_rows].any())),
        ("decode", bool(tight[lp.prefill_rows : lp.group_rows].any())),
        ("link", any(j < len(lp.edges) for j in at_bound)),
    ]
    bottleneck = "none" if value <= 0 else next((k for k, full in kinds if full), "colocated")
    return FlowResult(value, flows, bottleneck, frozenset(saturated), nics.use(nics.loads(flows)))


def _lp_flows(edges: list[tuple[int, int]], coloc: list[FlowNode], x: np.ndarray) -> tuple[Flow, ...]:
    """Flows (source, group, sink edges) from the LP's edge and colocated variables, sorted like max_flow's."""
    into: dict[int, float] = {}
    out: dict[int, float] = {}
    flows = []
    for (p, d), rate in zip(edges, x[: len(edges)], strict=True):
        if rate > 0:
            flows.append(Flow(p, d, float(rate)))
            out[p] = out.get(p, 0.0) + float(rate)
            into[d] = into.get(d, 0.0) + float(rate)
    flows += [Flow(SOURCE, p, r) for p, r in out.items()] + [Flow(d, SINK, r) for d, r in into.items()]
    for c, rate in zip(coloc, x[len(edges) :], strict=True):
        if rate > 0:
            flows += [Flow(SOURCE, c.id, float(rate)), Flow(c.id, SINK, float(rate))]
    flows.sort(key=lambda f: (str(f.src), str(f.dst)))
    return tuple(flows)
