"""Host NIC accounting: the bytes a plan's groups and flows send between hosts, and what that asks of each NIC.

Three kinds of traffic cross hosts: a prefill group's prompt KV cache on its way to a decode group,
activations at a pipeline boundary between two hosts, and the ring all-reduces of a TP stage whose GPUs
sit on more than one host. Each byte leaves through the sender's NIC egress and enters through the
receiver's ingress, and a relayed pair's bytes (a KV hand-off, or a bridged group's pipeline boundary) also
enter and leave the relay's NIC (``Cluster.relays``); every group on a host shares that host's NIC. Traffic inside a host is free here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

from hexgen.coordinator.cluster import Cluster
from hexgen.coordinator.cost import CostModel
from hexgen.coordinator.plan import Plan, Role, Stage

HostPair = tuple[str, str]  # (sending host, receiving host), never equal
Port = tuple[str, str]  # (host, "out" or "in")
Traffic = dict[HostPair, float]


def _add(traffic: Traffic, a: str, b: str, nbytes: float) -> None:
    if a != b and nbytes > 0:
        traffic[a, b] = traffic.get((a, b), 0.0) + nbytes


def pass_bytes(cost: CostModel, stages: Sequence[Stage], tokens: float) -> Traffic:
    """Cross-host bytes of ``tokens`` tokens passing once through a pipeline.

    A boundary between stages on two hosts sends the tokens' activations once; a TP stage spanning hosts
    runs two ring all-reduces of them per layer, each ring edge carrying 2 (t - 1) / t of the data, and
    the edges between GPUs on different hosts cross NICs. O(S * t) for S stages of t GPUs.
    """
    cluster, m = cost.cluster, cost.model
    activation = tokens * m.hidden * m.bytes_per_param
    traffic: Traffic = {}
    for st in stages:
        hosts = [cluster.gpus[g].host for g in st.gpus]
        if st.tp > 1 and len(set(hosts)) > 1:
            per_edge = 2 * st.num_layers * 2 * (st.tp - 1) / st.tp * activation
            for a, b in zip(hosts, [*hosts[1:], hosts[0]], strict=True):
                _add(traffic, a, b, per_edge)
    for before, after in itertools.pairwise(stages):
        _add(traffic, cluster.gpus[before.gpus[-1]].host, cluster.gpus[after.gpus[0]].host, activation)
    return traffic


def request_bytes(cost: CostModel, stages: Sequence[Stage], role: Role) -> Traffic:
    """Cross-host bytes one mean request causes inside a group of ``role``: its prompt's prefill pass and/or
    its decode steps (one token each). O(S * t)."""
    traffic: Traffic = {}
    if role != "decode":
        traffic.update(pass_bytes(cost, stages, cost.stats.prompt))
    if role != "prefill":
        for pair, nbytes in pass_bytes(cost, stages, cost.stats.decode_steps).items():
            traffic[pair] = traffic.get(pair, 0.0) + nbytes
    return traffic


def kv_bytes(
    cost: CostModel, prefill: Sequence[Stage], decode: Sequence[Stage], prompt_tokens: float | None = None
) -> Traffic:
    """Cross-host bytes of a prompt's KV cache (default: the mean prompt's) moving from a prefill layout to
    a decode layout.

    A prefill host sends the layers it holds to the decode hosts holding them. O(S_p * S_d).
    """
    cluster, layers = cost.cluster, cost.model.layers
    nbytes = cost.prompt_kv_bytes() if prompt_tokens is None else cost.model.kv_bytes_per_token * prompt_tokens
    traffic: Traffic = {}
    for a in prefill:
        for b in decode:
            shared = max(0, min(a.layers[1], b.layers[1]) - max(a.layers[0], b.layers[0]))
            if shared:
                sender, receiver = cluster.gpus[a.gpus[0]].host, cluster.gpus[b.gpus[0]].host
                _add(traffic, sender, receiver, nbytes * shared / layers)
    return traffic


def as_ports(
    traffic: Mapping[HostPair, float], rate: float = 1.0, relays: Mapping[frozenset[str], str] | None = None
) -> dict[Port, float]:
    """Host-pair bytes at ``rate`` as NIC port bytes: the sender's egress and the receiver's ingress, and for
    a pair in ``relays`` its relay's ingress and egress too. O(pairs)."""
    ports: dict[Port, float] = {}
    for (a, b), nbytes in traffic.items():
        crossed = [(a, "out"), (b, "in")]
        if relays and (relay := relays.get(frozenset((a, b)))) is not None:
            crossed += [(relay, "in"), (relay, "out")]
        for port in crossed:
            ports[port] = ports.get(port, 0.0) + rate * nbytes
    return ports


def port_loads(
    weighted: Iterable[tuple[float, Mapping[HostPair, float]]], relays: Mapping[frozenset[str], str] | None = None
) -> dict[Port, float]:
    """Bytes/s on each NIC port from (requests/s, bytes per request per host pair) terms, relayed pairs also
    on their relay's ports (``as_ports``). O(terms * pairs)."""
    loads: dict[Port, float] = {}
    for rate, traffic in weighted:
        if rate > 0:
            for port, nbytes in as_ports(traffic, rate, relays).items():
                loads[port] = loads.get(port, 0.0) + nbytes
    return loads


def port_capacity(cluster: Cluster, port: Port) -> float:
    """Bytes/s a NIC port carries (inf for a host without a NIC limit)."""
    host, direction = port
    gbps = cluster.egress(host) if direction == "out" else cluster.ingress(host)
    return gbps * 1e9


def worst_use(cluster: Cluster, loads: Mapping[Port, float]) -> tuple[float, str]:
    """The largest load / capacity over the ports, and which port it is ("" when no traffic crosses hosts)."""
    worst, where = 0.0, ""
    for port, load in loads.items():
        cap = port_capacity(cluster, port)
        use = load / cap if math.isfinite(cap) else 0.0
        if use > worst:
            worst, where = use, f"{port[0]} {'egress' if port[1] == 'out' else 'ingress'}"
    return worst, where


def plan_loads(plan: Plan, cost: CostModel) -> dict[Port, float]:
    """Bytes/s on each NIC port when ``plan`` runs at its flows: every group's own traffic at the rate it
    serves and every prefill -> decode flow's KV. O(G * S * t + F * S^2)."""
    inflow: dict[int, float] = {}
    terms: list[tuple[float, Mapping[HostPair, float]]] = []
    groups = {g.id: g for g in plan.groups}
    for f in plan.flows:
        if isinstance(f.dst, int):
            inflow[f.dst] = inflow.get(f.dst, 0.0) + f.rate
        if isinstance(f.src, int) and isinstance(f.dst, int):
            terms.append((f.rate, kv_bytes(cost, groups[f.src].stages, groups[f.dst].stages)))
    for gid, rate in inflow.items():
        g = groups[gid]
        terms.append((rate, request_bytes(cost, g.stages, g.role)))
    return port_loads(terms, cost.cluster.relays)


def plan_nic_use(plan: Plan, cost: CostModel) -> tuple[float, str]:
    """The worst NIC port's load over its capacity when ``plan`` runs at its flows, and that port."""
    return worst_use(cost.cluster, plan_loads(plan, cost))


class NicQueue:
    """The simulator's NIC ports: each is a server of its host's egress or ingress rate with two classes.

    Bulk transfers (KV caches) queue first come, first served on the sender's egress and the receiver's
    ingress at the pair's rate (``Cluster.host_bandwidth``). Activations (pipeline and TP traffic, a few
    MB a step) go ahead of the bulk backlog, as their small messages interleave with a long transfer on
    a real link: they wait only for each other, and push the bulk backlog back by their own time.
    Reservations must come in time order (the simulator's events do). A host without a NIC limit gets a
    port per peer host instead, so its transfers queue per host pair only. A relayed pair's transfer also
    holds its relay's ports.
    """

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.bulk: dict[tuple[str, ...], float] = {}
        self.urgent: dict[tuple[str, ...], float] = {}

    def _port(self, host: str, direction: str, other: str) -> tuple[str, ...]:
        limited = host in self.cluster.nics
        return (host, direction) if limited else (host, direction, other)

    def reserve(
        self,
        traffic: Mapping[HostPair, float],
        t: float,
        latency_s: float = 0.0,
        urgent: bool = False,
        measured: bool = False,
    ) -> float:
        """When the last of these transfers, starting at ``t`` or later, has arrived: each pair's last byte lands
        ``latency_s`` after it leaves, or with ``measured`` the pair's measured one-way latency where the cluster
        has one (``Cluster.latency``). O(pairs)."""
        done = t
        for (a, b), nbytes in traffic.items():
            ports = [self._port(a, "out", b), self._port(b, "in", a)]
            relay = self.cluster.relays.get(frozenset((a, b))) if self.cluster.relays else None
            if relay is not None:
                ports += [self._port(relay, "in", a), self._port(relay, "out", b)]
            seconds = nbytes / (self.cluster.host_bandwidth[a, b] * 1e9)
            queue = self.urgent if urgent else self.bulk
            start = max(t, *(queue.get(p, 0.0) for p in ports))
            end = start + seconds
            for p in ports:
                queue[p] = end
                if urgent:
                    self.bulk[p] = max(self.bulk.get(p, 0.0), t) + seconds
            landing = self.cluster.latency(a, b) if measured else None
            done = max(done, end + (latency_s if landing is None else landing))
        return done
