"""The cluster the planner places a model on: GPUs, hosts, the links between them and each host's NIC.

Every byte between two hosts leaves through the sender's NIC and enters through the receiver's, so a
host pair's link is never faster than either NIC, and all the traffic of a host shares its NIC (the
planner's flow and the simulator charge it there). Links inside a host (NVLink, PCIe) are not NIC-bound.
Some host pairs are *worldless*: linked only through a relay or a hole punch, they carry no world
(torch.distributed), only what the daemons carry over libp2p. So no stage (a tensor-parallel world) may span
one, while a group may: its stages then each form a world of their own and the daemons bridge the boundaries
between them (a *bridged* group), as they carry KV hand-offs between groups. A relayed pair's bytes also cross
the relay's NIC, in and out (``relays``); the relay need not hold a GPU. A host pair may carry its measured one-way
latency (``latency_s``, half the RTT its probes saw, through the relay for a relayed pair); the cost model charges
it where a message crosses that pair, and its fixed constants (``CostParams``) where no probe measured one.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from hexgen.coordinator.specs import GPU_TYPES, SpecError, gpu_type

GBIT = 1 / 8  # GB/s per Gbit/s


class ClusterError(ValueError):
    """A cluster description the planner cannot use; the message names the problem."""


@dataclass(frozen=True)
class GPU:
    id: int
    host: str
    type: str
    memory_gb: float
    tflops: float
    hbm_gbps: float
    price_per_hour: float


@dataclass(frozen=True)
class HostSpec:
    name: str
    gpu: str
    count: int
    intra_host_gbps: float | None = None
    memory_gb: float | None = None
    tflops: float | None = None
    hbm_gbps: float | None = None
    nic_gbit_s: float | None = None  # both directions, unless one of the next two says otherwise
    nic_in_gbit_s: float | None = None
    nic_out_gbit_s: float | None = None


@dataclass(frozen=True)
class Nic:
    """A host's network interface: what it can send (egress) and receive (ingress), GB/s."""

    egress: float
    ingress: float


@dataclass(frozen=True, eq=False)
class Cluster:
    """GPUs, a symmetric link matrix in GB/s (``bandwidth[i][j]`` between GPU ids i and j) and host NICs.

    ``nics`` maps a host to its NIC; a host it leaves out has an unlimited one. ``worldless`` holds the host
    pairs no stage may span (``spans_worldless``, ``allows_stages``); their bandwidth still carries KV
    hand-offs and the boundaries of bridged groups. ``relays`` maps a host pair to the host relaying its bytes
    (whose NIC, when ``nics`` has it, carries them too). ``latency_s`` maps a host pair to its measured one-way
    latency in seconds (``latency``); a pair it leaves out, or a cluster built without it (a cluster file), has
    none, and the cost model falls back on its constants.
    """

    gpus: tuple[GPU, ...]
    bandwidth: tuple[tuple[float, ...], ...]
    name: str = "cluster"
    nics: Mapping[str, Nic] = field(default_factory=dict)
    worldless: frozenset[frozenset[str]] = frozenset()
    relays: Mapping[frozenset[str], str] = field(default_factory=dict)
    latency_s: Mapping[frozenset[str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.gpus)
        if any(g.id != i for i, g in enumerate(self.gpus)):
            raise ClusterError("GPU ids must be 0..n-1 in order")
        if len(self.bandwidth) != n or any(len(row) != n for row in self.bandwidth):
            raise ClusterError(f"bandwidth matrix must be {n}x{n}")

    def __len__(self) -> int:
        return len(self.gpus)

    @cached_property
    def hosts(self) -> dict[str, tuple[int, ...]]:
        by_host: dict[str, list[int]] = {}
        for g in self.gpus:
            by_host.setdefault(g.host, []).append(g.id)
        return {h: tuple(ids) for h, ids in by_host.items()}

    @cached_property
    def host_bandwidth(self) -> dict[tuple[str, str], float]:
        """GB/s one transfer between two hosts gets: the best GPU pair's link, capped by the sender's egress
        and the receiver's ingress; intra-host (no NIC) for equal names. O(n^2)."""
        result: dict[tuple[str, str], float] = {}
        for a, ids_a in self.hosts.items():
            for b, ids_b in self.hosts.items():
                pairs = [self.bandwidth[i][j] for i in ids_a for j in ids_b if i != j]
                best = max(pairs) if pairs else 0.0
                result[a, b] = best if a == b else min(best, self.egress(a), self.ingress(b))
        return result

    def egress(self, host: str) -> float:
        nic = self.nics.get(host)
        return nic.egress if nic is not None else math.inf

    def ingress(self, host: str) -> float:
        nic = self.nics.get(host)
        return nic.ingress if nic is not None else math.inf

    def link(self, a: int, b: int) -> float:
        """GB/s between GPUs ``a`` and ``b``: their link, NIC-capped when they sit on different hosts."""
        ha, hb = self.gpus[a].host, self.gpus[b].host
        if ha == hb:
            return self.bandwidth[a][b]
        return min(self.bandwidth[a][b], self.egress(ha), self.ingress(hb), self.egress(hb), self.ingress(ha))

    def with_nics(self, nics: Mapping[str, Nic]) -> Cluster:
        """The same cluster with these hosts' NICs replaced (others kept)."""
        return dataclasses.replace(self, nics={**self.nics, **nics})

    def latency(self, a: str, b: str) -> float | None:
        """The measured one-way latency in seconds between hosts ``a`` and ``b``; None inside a host or where no
        probe measured the pair (the cost model then uses its constants). O(1)."""
        return self.latency_s.get(frozenset((a, b))) if a != b else None

    def with_latencies(self, latencies: Mapping[tuple[str, str], float]) -> Cluster:
        """The same cluster with these host pairs' one-way latencies (seconds) replaced, others kept; pairs naming
        absent hosts or one host twice are left out. Raises ClusterError on a negative or non-finite latency.
        O(pairs)."""
        found = dict(self.latency_s)
        for pair, seconds in latencies.items():
            if not (math.isfinite(seconds) and seconds >= 0):
                raise ClusterError(
                    f"link {pair[0]}-{pair[1]}: latency must be a finite non-negative number, got {seconds}"
                )
            if len(set(pair)) == 2 and set(pair) <= set(self.hosts):
                found[frozenset(pair)] = seconds
        return dataclasses.replace(self, latency_s=found)

    def with_worldless(self, pairs: Iterable[tuple[str, str]]) -> Cluster:
        """The same cluster where no stage may span these host pairs (pairs naming absent hosts are left out)."""
        found = frozenset(frozenset(pair) for pair in pairs if len(set(pair)) == 2 and set(pair) <= set(self.hosts))
        return dataclasses.replace(self, worldless=found)

    def with_relays(self, relays: Mapping[tuple[str, str], str]) -> Cluster:
        """The same cluster where each of these host pairs' bytes also cross the named relay's NIC (pairs naming
        absent hosts, or relayed by one of their own ends, are left out)."""
        found = {
            frozenset(pair): relay
            for pair, relay in relays.items()
            if len(set(pair)) == 2 and set(pair) <= set(self.hosts) and relay not in pair
        }
        return dataclasses.replace(self, relays=found)

    @property
    def relay_hosts(self) -> list[str]:
        """The relays of ``relays`` that hold no GPU of this cluster, sorted."""
        return sorted(set(self.relays.values()) - set(self.hosts))

    def spans_worldless(self, gpu_ids: Iterable[int]) -> bool:
        """Whether GPUs ``gpu_ids`` sit on two hosts of a worldless pair: no stage (a world) may hold them all,
        and a group that does is bridged. O(GPUs + hosts^2); O(1) for a cluster without worldless pairs."""
        if not self.worldless:
            return False
        hosts = sorted({self.gpus[g].host for g in gpu_ids})
        return any(frozenset((a, b)) in self.worldless for i, a in enumerate(hosts) for b in hosts[i + 1 :])

    def allows_stages(self, stages: Iterable[Iterable[int]]) -> bool:
        """Whether a group of these stages (each its GPU ids) may run here: no stage spans a worldless pair,
        since a stage's tensor parallelism needs a world; the boundaries between stages may cross one, which
        the daemons then bridge. O(GPUs + stages x hosts^2); O(1) for a cluster without worldless pairs."""
        return not self.worldless or not any(self.spans_worldless(stage) for stage in stages)

    @property
    def price_per_hour(self) -> float:
        return sum(g.price_per_hour for g in self.gpus)

    @property
    def memory_gb(self) -> float:
        return sum(g.memory_gb for g in self.gpus)

    def without(self, gpu_ids: Iterable[int]) -> tuple[Cluster, dict[int, int]]:
        """This cluster less some GPUs, renumbered; returns it and the map old id -> new id."""
        gone = set(gpu_ids)
        keep = [g for g in self.gpus if g.id not in gone]
        return self.subset([g.id for g in keep])

    def subset(self, gpu_ids: Iterable[int]) -> tuple[Cluster, dict[int, int]]:
        """The cluster of just these GPUs, renumbered; returns it and the map old id -> new id."""
        ids = sorted(set(gpu_ids))
        remap = {old: new for new, old in enumerate(ids)}
        gpus = tuple(
            GPU(remap[g.id], g.host, g.type, g.memory_gb, g.tflops, g.hbm_gbps, g.price_per_hour)
            for g in (self.gpus[i] for i in ids)
        )
        bw = tuple(tuple(self.bandwidth[i][j] for j in ids) for i in ids)
        hosts = {g.host for g in gpus}
        worldless = frozenset(p for p in self.worldless if p <= hosts)
        relays = {p: relay for p, relay in self.relays.items() if p <= hosts}
        nics = {h: n for h, n in self.nics.items() if h in hosts or h in relays.values()}
        latency = {p: seconds for p, seconds in self.latency_s.items() if p <= hosts}
        return Cluster(gpus, bw, self.name, nics, worldless, relays, latency), remap

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for g in self.gpus:
            counts[g.type] = counts.get(g.type, 0) + 1
        parts = ", ".join(f"{n} x {t}" for t, n in counts.items())
        hosts = len(self.hosts)
        rates = [min(n.egress, n.ingress) / GBIT for n in self.nics.values()]
        nic = ""
        if rates:
            lo, hi = min(rates), max(rates)
            nic = f", {lo:g} Gbit/s NICs" if lo == hi else f", {lo:g}-{hi:g} Gbit/s NICs"
        return f"{self.name}: {parts} on {hosts} host{'s' if hosts != 1 else ''}{nic}, ${self.price_per_hour:.2f}/h"


def build_cluster(
    hosts: Iterable[HostSpec],
    network_gbit_s: float = 10.0,
    links: Mapping[tuple[str, str], float] | None = None,
    name: str = "cluster",
    nic_gbit_s: float | None = None,
) -> Cluster:
    """A cluster from host descriptions.

    Inside a host GPUs talk at the type's intra-host bandwidth (NVLink or PCIe) unless the host
    overrides it; between hosts at ``network_gbit_s`` Gbit/s unless ``links`` (host pair -> Gbit/s)
    says otherwise. Each host's NIC runs at its own ``nic_*_gbit_s`` figures, else ``nic_gbit_s``,
    else ``network_gbit_s``. Complexity O(n^2) in the number of GPUs.
    """
    gpus: list[GPU] = []
    intra: dict[str, float] = {}
    if not network_gbit_s > 0:
        raise ClusterError(f"network bandwidth must be positive, got {network_gbit_s}")
    nic_default = network_gbit_s if nic_gbit_s is None else nic_gbit_s
    if not nic_default > 0:
        raise ClusterError(f"NIC bandwidth must be positive, got {nic_default}")
    nics: dict[str, Nic] = {}
    for host in hosts:
        if host.name in intra:
            raise ClusterError(f"host {host.name!r} is listed twice")
        intra[host.name], host_gpus = _host_gpus(host, len(gpus))
        nics[host.name] = _nic(host, nic_default)
        gpus.extend(host_gpus)
    if not gpus:
        raise ClusterError("the cluster has no GPUs")
    link_gbs = _link_bandwidths(links or {}, set(intra))
    default = network_gbit_s * GBIT

    def bandwidth(ga: GPU, gb: GPU) -> float:
        if ga.id == gb.id:
            return 0.0
        if ga.host == gb.host:
            return intra[ga.host]
        return link_gbs.get(frozenset((ga.host, gb.host)), default)

    return Cluster(tuple(gpus), tuple(tuple(bandwidth(ga, gb) for gb in gpus) for ga in gpus), name, nics)


def _nic(host: HostSpec, default_gbit_s: float) -> Nic:
    both = host.nic_gbit_s if host.nic_gbit_s is not None else default_gbit_s
    out = host.nic_out_gbit_s if host.nic_out_gbit_s is not None else both
    into = host.nic_in_gbit_s if host.nic_in_gbit_s is not None else both
    if not (out > 0 and into > 0):
        raise ClusterError(f"host {host.name!r}: NIC bandwidth must be positive")
    return Nic(out * GBIT, into * GBIT)


def _host_gpus(host: HostSpec, first_id: int) -> tuple[float, list[GPU]]:
    """The host's intra-host bandwidth (GB/s) and its GPUs, numbered from ``first_id``."""
    if host.count < 1:
        raise ClusterError(f"host {host.name!r}: count must be at least 1, got {host.count}")
    try:
        spec = gpu_type(host.gpu)
    except SpecError as exc:
        raise ClusterError(f"host {host.name!r}: {exc}") from None
    gpu = GPU(
        id=first_id,
        host=host.name,
        type=spec.name,
        memory_gb=host.memory_gb if host.memory_gb is not None else spec.memory_gb,
        tflops=host.tflops if host.tflops is not None else spec.tflops,
        hbm_gbps=host.hbm_gbps if host.hbm_gbps is not None else spec.hbm_gbps,
        price_per_hour=spec.price_per_hour,
    )
    intra = host.intra_host_gbps if host.intra_host_gbps is not None else spec.intra_host_gbps
    return intra, [dataclasses.replace(gpu, id=first_id + i) for i in range(host.count)]


def _link_bandwidths(links: Mapping[tuple[str, str], float], hosts: set[str]) -> dict[frozenset[str], float]:
    """Host pair -> GB/s from host pair -> Gbit/s, checking that both hosts exist and the rate is positive."""
    link_gbs: dict[frozenset[str], float] = {}
    for (a, b), gbit in links.items():
        for h in (a, b):
            if h not in hosts:
                raise ClusterError(f"link names unknown host {h!r}")
        if gbit <= 0:
            raise ClusterError(f"link {a}-{b}: bandwidth must be positive, got {gbit}")
        link_gbs[frozenset((a, b))] = gbit * GBIT
    return link_gbs


def _number(table: Mapping[str, Any], key: str, where: str, default: float | None = None) -> float | None:
    value = table.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or value == float("inf"):
        raise ClusterError(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


def parse_cluster(data: Mapping[str, Any], name: str = "cluster") -> Cluster:
    """A cluster from the mapping of a cluster TOML file (see ``bench/clusters/*.toml``)."""
    known = {"name", "network_gbit_s", "nic_gbit_s", "hosts", "links"}
    unknown = set(data) - known
    if unknown:
        raise ClusterError(f"unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    raw_hosts = data.get("hosts")
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise ClusterError("the cluster needs a non-empty [[hosts]] list")
    hosts = [_host_spec(h, f"hosts[{i}]", f"host{i}") for i, h in enumerate(raw_hosts)]
    links = _links(data.get("links", []))
    network = _number(data, "network_gbit_s", "cluster", 10.0)
    nic = _number(data, "nic_gbit_s", "cluster")
    return build_cluster(hosts, network or 0.0, links, name=str(data.get("name", name)), nic_gbit_s=nic)


_HOST_KEYS = {
    "name",
    "gpu",
    "count",
    "intra_host_gb_s",
    "memory_gb",
    "tflops",
    "hbm_gb_s",
    "nic_gbit_s",
    "nic_in_gbit_s",
    "nic_out_gbit_s",
}


def _host_spec(h: Any, where: str, default_name: str) -> HostSpec:
    """One [[hosts]] table."""
    if not isinstance(h, dict):
        raise ClusterError(f"{where} must be a table")
    unknown = set(h) - _HOST_KEYS
    if unknown:
        raise ClusterError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    gpu = h.get("gpu")
    if not isinstance(gpu, str):
        raise ClusterError(f"{where}: gpu must be a GPU type name ({', '.join(GPU_TYPES)})")
    count = h.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int):
        raise ClusterError(f"{where}: count must be an integer, got {count!r}")
    return HostSpec(
        name=str(h.get("name", default_name)),
        gpu=gpu,
        count=count,
        intra_host_gbps=_number(h, "intra_host_gb_s", where),
        memory_gb=_number(h, "memory_gb", where),
        tflops=_number(h, "tflops", where),
        hbm_gbps=_number(h, "hbm_gb_s", where),
        nic_gbit_s=_number(h, "nic_gbit_s", where),
        nic_in_gbit_s=_number(h, "nic_in_gbit_s", where),
        nic_out_gbit_s=_number(h, "nic_out_gbit_s", where),
    )


def _links(raw_links: Any) -> dict[tuple[str, str], float]:
    """The [[links]] tables: host pair -> Gbit/s."""
    if not isinstance(raw_links, list):
        raise ClusterError("links must be a [[links]] list of tables")
    links: dict[tuple[str, str], float] = {}
    for i, link in enumerate(raw_links):
        where = f"links[{i}]"
        if not isinstance(link, dict) or set(link) != {"a", "b", "gbit_s"}:
            raise ClusterError(f"{where} needs a, b (host names) and gbit_s, and nothing else")
        if link["a"] == link["b"]:
            raise ClusterError(f"{where} links host {link['a']!r} to itself (use intra_host_gb_s)")
        links[str(link["a"]), str(link["b"])] = _number(link, "gbit_s", where) or 0.0
    return links


def load_cluster_toml(text: str, name: str = "cluster") -> Cluster:
    """Parse cluster TOML text; raises ClusterError with a one-line reason on any problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ClusterError(f"malformed TOML: {exc}") from None
    return parse_cluster(data, name)
