"""Max-flow over the plan's dispatch network: source -> prefill -> decode -> sink.

The network has one node per group. Prefill groups get an edge from the source (capacity: prefill
requests/s), decode groups an edge to the sink (decode requests/s), and every prefill group an edge to
every decode group (requests/s whose KV the link between them carries). Colocated groups sit on a
source -> group -> sink path with their combined capacity. The flow value is the predicted throughput;
edge flows are the dispatch weights; the min cut names the bottleneck.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import networkx as nx
from networkx.algorithms.flow import preflow_push

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


def max_flow(nodes: Sequence[FlowNode], link_rate: Callable[[int, int], float]) -> FlowResult:
    """Maximum requests/s through the groups; ``link_rate(prefill_id, decode_id)`` caps KV transfer.

    Uses networkx's preflow-push, O(V^2 sqrt(E)) for V groups and E = P*D links. The bottleneck is the
    kind of min-cut edge with the largest total capacity: "prefill", "decode", "link" or "colocated"
    ("none" when nothing can flow).
    """
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
