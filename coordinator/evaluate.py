"""Scoring an assignment of GPUs to groups and roles: layouts per group, then max-flow across them.

An assignment is the planner's search state; the planner, its refinement and the baselines all score
assignments here, so every plan is judged by one cost model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hexgen.coordinator.cluster import Cluster
from hexgen.coordinator.cost import CostModel, CostParams, LengthStats
from hexgen.coordinator.flow import FlowNode, FlowResult, NicLimits, PortBytes, PortColumns, max_flow
from hexgen.coordinator.network import as_ports, kv_bytes, port_capacity, request_bytes
from hexgen.coordinator.parallel import Layout, LayoutSearch
from hexgen.coordinator.plan import SINK, SOURCE, Flow, Group, Plan, Role
from hexgen.coordinator.specs import ModelSpec
from hexgen.coordinator.workload import Workload


class PlanError(ValueError):
    """The cluster cannot serve the model (no replica fits), or the planner's input is unusable."""


@dataclass(frozen=True, order=True)
class GroupSpec:
    """A group in an assignment: its GPUs, its role, and a fixed uniform TP degree (0: searched)."""

    gpus: tuple[int, ...]
    role: Role
    uniform_tp: int = 0


Assignment = tuple[GroupSpec, ...]


def canonical(groups: Iterable[GroupSpec]) -> Assignment:
    return tuple(sorted(GroupSpec(tuple(sorted(g.gpus)), g.role, g.uniform_tp) for g in groups if g.gpus))


@dataclass(frozen=True)
class Evaluation:
    assignment: Assignment
    layouts: tuple[Layout | None, ...]
    flow: FlowResult

    @property
    def value(self) -> float:
        return self.flow.value

    @property
    def used_gpus(self) -> int:
        return sum(len(g.gpus) for g, lay in zip(self.assignment, self.layouts, strict=True) if lay is not None)

    def key(self) -> tuple[float, int]:
        """Higher is better: throughput first (to 1e-9 relative), then fewer GPUs used."""
        return (round(self.value, 9), -self.used_gpus)


class Evaluator:
    """Scores assignments for one (cluster, model, workload); memoizes layouts, links and scores."""

    def __init__(self, cluster: Cluster, model: ModelSpec, workload: Workload, params: CostParams | None = None):
        self.cluster = cluster
        self.model = model
        self.workload = workload
        self.cost = CostModel(cluster, model, LengthStats.of(workload), params)
        self.layouts = LayoutSearch(self.cost)
        # keyed by the layouts' ids (hashing their stages dominated the search); each entry holds its
        # layouts so that an id is never reused while the entry lives
        self._links: dict[tuple[int, int], tuple[Layout, Layout, float]] = {}
        self._scores: dict[Assignment, Evaluation] = {}
        self.usable = [self.cost.usable_bytes_of(g.id) for g in cluster.gpus]
        self._node_bytes: dict[tuple[int, Role], tuple[Layout, PortBytes]] = {}
        self._pair_bytes: dict[tuple[int, int], tuple[Layout, Layout, PortBytes]] = {}
        self._host_kv: dict[int, tuple[Layout, dict[str, float]]] = {}  # by id, holding the layout alive
        self.nic_capacity = {
            port: cap
            for host in [*cluster.hosts, *cluster.relay_hosts]
            for port in ((host, "out"), (host, "in"))
            if (cap := port_capacity(cluster, port)) < float("inf")
        }
        self._columns = PortColumns(self.nic_capacity)

    @property
    def evaluations(self) -> int:
        return len(self._scores)

    def replica_bytes(self) -> float:
        return self.cost.replica_bytes()

    def max_replicas(self) -> int:
        return int(sum(self.usable) // self.replica_bytes())

    def check_fits(self) -> None:
        if self.max_replicas() < 1:
            need = self.replica_bytes() / 1e9
            have = sum(self.usable) / 1e9
            raise PlanError(
                f"the cluster cannot hold one replica of {self.model.name}: it needs {need:.1f} GB "
                f"(weights plus {self.cost.params.concurrent_requests} requests' KV cache), "
                f"the GPUs offer {have:.1f} GB usable"
            )

    def layout(self, group: GroupSpec) -> Layout | None:
        if group.uniform_tp:
            return self.layouts.uniform(group.gpus, group.role, group.uniform_tp)
        return self.layouts.best(group.gpus, group.role)

    def link_rate(self, prefill: Layout, decode: Layout) -> float:
        key = (id(prefill), id(decode))
        found = self._links.get(key)
        if found is None:
            rate = self.cost.kv_transfer_rate(prefill.stages, decode.stages)
            self._links[key] = found = (prefill, decode, rate)
        return found[2]

    def node_bytes(self, layout: Layout, role: Role) -> PortBytes:
        """NIC bytes per request a group's own traffic puts on each port, a bridged boundary's across a relayed
        pair on its relay's ports too (as a hand-off's); memoized."""
        key = (id(layout), role)
        found = self._node_bytes.get(key)
        if found is None:
            traffic = as_ports(request_bytes(self.cost, layout.stages, role), relays=self.cluster.relays)
            self._node_bytes[key] = found = (layout, traffic)
        return found[1]

    def pair_bytes(self, prefill: Layout, decode: Layout) -> PortBytes:
        """NIC bytes per request of the KV hand-off between two layouts; memoized."""
        key = (id(prefill), id(decode))
        found = self._pair_bytes.get(key)
        if found is None:
            traffic = as_ports(kv_bytes(self.cost, prefill.stages, decode.stages), relays=self.cluster.relays)
            self._pair_bytes[key] = found = (prefill, decode, traffic)
        return found[2]

    def upper_bound(self, groups: Iterable[GroupSpec]) -> float:
        """A cheap bound on the flow value: min(source-side capacity, sink-side capacity), each side under
        the NICs as far as one port per group tells (see ``_nic_bound``). O(G * S) memoized look-ups."""
        placed = [(g.role, lay) for g in groups if g.gpus and (lay := self.layout(g)) is not None]
        hosts: dict[str, set[str]] = {"prefill": set(), "decode": set()}
        for role, lay in placed:
            if role in hosts:
                hosts[role].update(self._kv_by_host(lay))
        sides: dict[str, list[tuple[float, PortBytes]]] = {"prefill": [], "decode": []}
        for role, lay in placed:
            own = self.node_bytes(lay, role)
            if role == "colocated":
                sides["prefill"].append((lay.rate, own))
                sides["decode"].append((lay.rate, own))
                continue
            # KV for the layers a group holds on a host with no partner group there must cross that NIC
            partner, direction = ("decode", "out") if role == "prefill" else ("prefill", "in")
            least = dict(own)
            for host, nbytes in self._kv_by_host(lay).items():
                if host not in hosts[partner]:
                    least[host, direction] = least.get((host, direction), 0.0) + nbytes
            sides[role].append((lay.rate, least))
        return min(self._nic_bound(sides["prefill"]), self._nic_bound(sides["decode"]))

    def _kv_by_host(self, layout: Layout) -> dict[str, float]:
        """A mean prompt's KV bytes of the layers ``layout`` holds on each of its hosts; memoized."""
        found = self._host_kv.get(id(layout))
        if found is None:
            per_layer = self.cost.prompt_kv_bytes() / self.model.layers
            kv: dict[str, float] = {}
            for st in layout.stages:
                host = self.cluster.gpus[st.gpus[0]].host
                kv[host] = kv.get(host, 0.0) + per_layer * st.num_layers
            self._host_kv[id(layout)] = found = (layout, kv)
        return found[1]

    def _nic_bound(self, groups: Sequence[tuple[float, PortBytes]]) -> float:
        """Most requests/s these groups can serve if each only had to fit its tightest NIC port, which it
        shares with the others assigned there (a fractional knapsack per port, fewest bytes first)."""
        total = 0.0
        by_port: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for rate, ports in groups:
            limited = [(nbytes / self.nic_capacity[p], p) for p, nbytes in ports.items() if p in self.nic_capacity]
            if not limited:
                total += rate
                continue
            _, port = max(limited)
            by_port.setdefault(port, []).append((ports[port], rate))
        for port, members in by_port.items():
            room = self.nic_capacity[port]
            for nbytes, rate in sorted(members):
                take = min(rate, room / nbytes) if nbytes > 0 else rate
                total += take
                room -= take * nbytes
        return total

    def evaluate(self, groups: Iterable[GroupSpec]) -> Evaluation:
        """Layouts for every group, then the flow under the NICs. Memoized on the canonical assignment."""
        assignment = canonical(groups)
        cached = self._scores.get(assignment)
        if cached is not None:
            return cached
        layouts = tuple(self.layout(g) for g in assignment)
        nodes = [
            FlowNode(i, g.role, lay.rate)
            for i, (g, lay) in enumerate(zip(assignment, layouts, strict=True))
            if lay is not None
        ]

        def link(prefill: int, decode: int) -> float:
            p, d = layouts[prefill], layouts[decode]
            assert p is not None and d is not None  # max_flow links only the nodes, which have layouts
            return self.link_rate(p, d)

        nics = None
        if self.nic_capacity:
            node_bytes = {
                i: self.node_bytes(lay, g.role)
                for i, (g, lay) in enumerate(zip(assignment, layouts, strict=True))
                if lay is not None
            }

            def pair(prefill: int, decode: int) -> PortBytes:
                p, d = layouts[prefill], layouts[decode]
                assert p is not None and d is not None
                return self.pair_bytes(p, d)

            nics = NicLimits(node_bytes, pair, self.nic_capacity, self._columns)
        flow = max_flow(nodes, link, nics)
        result = Evaluation(assignment, layouts, flow)
        self._scores[assignment] = result
        return result

    def to_plan(self, evaluation: Evaluation, **meta: object) -> Plan:
        """The Plan of an evaluation: feasible groups renumbered 0..n-1, flows mapped to them."""
        renumber: dict[int, int] = {}
        groups: list[Group] = []
        for i, (spec, lay) in enumerate(zip(evaluation.assignment, evaluation.layouts, strict=True)):
            if lay is None:
                continue
            renumber[i] = len(groups)
            groups.append(Group(len(groups), spec.role, lay.stages, lay.rate, lay.batch))
        used = {g for group in groups for g in group.gpus}

        def node(x: int | str) -> int | str:
            return x if x in (SOURCE, SINK) else renumber[int(x)]

        flows = tuple(Flow(node(f.src), node(f.dst), f.rate) for f in evaluation.flow.flows)
        info = {
            "unused_gpus": [g.id for g in self.cluster.gpus if g.id not in used],
            "tokens_per_s": evaluation.value * self.workload.mean_output,
            "nic_use": evaluation.flow.nic_use,
            "model": self.model.name,
            "cluster": self.cluster.name,
            "workload": self.workload.name,
            **meta,
        }
        return Plan(tuple(groups), flows, evaluation.value, evaluation.flow.bottleneck, info)


def groups_of(assignment: Sequence[GroupSpec], role: Role | None = None) -> list[GroupSpec]:
    return [g for g in assignment if role is None or g.role == role]
