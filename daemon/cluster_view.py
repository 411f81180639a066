"""From the swarm's view (peer hardware adverts, link probes) to the planner's input, a ``Cluster``.

Every node that runs this on the same peer set and measurements builds the same cluster: peers are
taken in peer-id order, and one planner host stands for one peer (keyed by its peer id, which is unique
where host names need not be). ``probe_plan`` says which peer pairs to measure in a round, so that a
bounded number of probes per round covers every pair over successive rounds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hexgen.coordinator.cluster import GPU, Cluster, ClusterError, HostSpec, build_cluster
from hexgen.coordinator.cost import CostParams
from hexgen.coordinator.specs import GPU_TYPES, GPUType
from hexgen.daemon.hardware_profile import MAX_GB_S, GPUInfo, HardwareError, HardwareProfile, known_gpu_type

MAX_PEER_ID = 128
MAX_RTT_MS = 3.6e6
PROBE_PATHS = ("tcp", "kv-link", "libp2p")
_LINK_KEYS = {"a", "b", "gb_s", "rtt_ms", "path"}
GBIT_PER_GB = 8.0


def _peer_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_PEER_ID or not value.isprintable():
        shown = repr(value[:60]) if isinstance(value, str) else f"a {type(value).__name__}"  # repr may recurse deep
        raise HardwareError(f"{what} must be a peer id of 1..{MAX_PEER_ID} printable characters, got {shown}")
    return value


def _positive(value: Any, what: str, high: float, *, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HardwareError(f"{what} must be a number, got {type(value).__name__}")
    number = float(value) if abs(value) < 1e308 else math.inf  # float() overflows on huge ints
    if not math.isfinite(number) or not (number >= 0 if zero_ok else number > 0) or number > high:
        raise HardwareError(
            f"{what} must be a finite {'non-negative' if zero_ok else 'positive'} number <= {high:g}, got {value!r}"
        )
    return number


@dataclass(frozen=True)
class PeerHardware:
    """One member of the swarm: its peer id, its host name (for people) and its advertised hardware."""

    peer_id: str
    host_name: str
    profile: HardwareProfile

    def __post_init__(self) -> None:
        _peer_id(self.peer_id, "peer_id")
        if not isinstance(self.profile, HardwareProfile):
            raise HardwareError(f"profile of {self.peer_id} must be a HardwareProfile")


@dataclass(frozen=True)
class LinkMeasurement:
    """A probe of the network from peer ``a`` to peer ``b``: throughput in GB/s and round-trip time in ms, over
    ``path``: "tcp" (a connection between the two, as their workers' gloo makes), "kv-link" (hole-punched, or
    spliced by a relay, as their workers' own KV links take) or "libp2p" (a stream on their libp2p connection,
    what the control plane moves: a lower bound on the others)."""

    a: str
    b: str
    gb_s: float
    rtt_ms: float
    path: str = "libp2p"

    def __post_init__(self) -> None:
        _peer_id(self.a, "link a")
        _peer_id(self.b, "link b")
        if self.a == self.b:
            raise HardwareError(f"a link joins two different peers, got {self.a} twice")
        _positive(self.gb_s, "link gb_s", MAX_GB_S)
        _positive(self.rtt_ms, "link rtt_ms", MAX_RTT_MS, zero_ok=True)
        if self.path not in PROBE_PATHS:
            raise HardwareError(f"a link's path is one of {', '.join(PROBE_PATHS)}, got {self.path!r}"[:200])

    @staticmethod
    def from_probe(
        a: str, b: str, payload_bytes: int, elapsed_s: float, rtt_ms: float, path: str = "libp2p"
    ) -> LinkMeasurement:
        """The measurement of a probe that moved ``payload_bytes`` from a to b in ``elapsed_s``.

        The elapsed time includes about one round trip (the request, and the acknowledgement of the last
        byte) that is not throughput, so it is taken off, but never more than half of it: a small,
        latency-bound probe then reads low rather than absurdly high. O(1).
        """
        if isinstance(payload_bytes, bool) or not isinstance(payload_bytes, int) or payload_bytes < 1:
            raise HardwareError(f"probe payload must be a positive number of bytes, got {payload_bytes!r}")
        elapsed = _positive(elapsed_s, "probe elapsed_s", MAX_RTT_MS)
        rtt = _positive(rtt_ms, "probe rtt_ms", MAX_RTT_MS, zero_ok=True)
        transfer = max(elapsed - rtt / 1e3, elapsed / 2)
        return LinkMeasurement(a, b, min(payload_bytes / transfer / 1e9, MAX_GB_S), rtt, path)

    def to_dict(self) -> dict[str, Any]:
        """Plain types, ready for msgpack. O(1)."""
        return {"a": self.a, "b": self.b, "gb_s": self.gb_s, "rtt_ms": self.rtt_ms, "path": self.path}

    @staticmethod
    def from_dict(data: Any) -> LinkMeasurement:
        """Parse ``to_dict`` output from an untrusted peer (``path`` may be missing: "libp2p"); raises
        HardwareError on anything else. O(1)."""
        if not isinstance(data, dict) or not {"a", "b", "gb_s", "rtt_ms"} <= set(data) <= _LINK_KEYS:
            raise HardwareError("a link measurement is a mapping of a, b, gb_s, rtt_ms and optionally path")
        path = data.get("path", "libp2p")
        if not isinstance(path, str):
            raise HardwareError(f"a link's path is a string, got a {type(path).__name__}")
        return LinkMeasurement(
            a=_peer_id(data["a"], "link a"),
            b=_peer_id(data["b"], "link b"),
            gb_s=_positive(data["gb_s"], "link gb_s", MAX_GB_S),
            rtt_ms=_positive(data["rtt_ms"], "link rtt_ms", MAX_RTT_MS, zero_ok=True),
            path=path,
        )


def planner_figures(gpu: GPUInfo, params: CostParams | None = None) -> tuple[float, float]:
    """The (TFLOPS, HBM GB/s) the planner should use for an advertised GPU.

    The cost model applies its efficiency factors to rated (peak) figures, so a measured rate becomes
    the peak that, at those efficiencies, predicts it: measured / efficiency. For a recognised type the
    result never exceeds the spec table (an advert cannot overstate a known part) and drops below it only
    when the measurement shows the device falls short (a PCIe variant, a power cap); for an unrecognised
    device the measured figures decide, else the advertised ones. O(1).
    """
    params = params or CostParams()
    spec = GPU_TYPES.get(gpu.type) or known_gpu_type(gpu.type)
    tflops, hbm = gpu.tflops, gpu.hbm_gb_s
    if spec is not None:
        tflops, hbm = min(tflops, spec.tflops), min(hbm, spec.hbm_gbps)
    if gpu.measured_tflops is not None:
        derived = gpu.measured_tflops / params.compute_efficiency
        tflops = min(tflops, derived) if spec is not None else derived
    if gpu.measured_hbm_gb_s is not None:
        derived = gpu.measured_hbm_gb_s / params.memory_efficiency
        hbm = min(hbm, derived) if spec is not None else derived
    return tflops, hbm


def _planner_gpu(gpu_id: int, host: str, info: GPUInfo, params: CostParams | None) -> GPU:
    spec = GPU_TYPES.get(info.type) or known_gpu_type(info.type)
    tflops, hbm = planner_figures(info, params)
    return GPU(
        id=gpu_id,
        host=host,
        type=spec.name if spec is not None else info.type,
        memory_gb=info.memory_gb,
        tflops=tflops,
        hbm_gbps=hbm,
        price_per_hour=spec.price_per_hour if spec is not None else 0.0,
    )


def _known_types(profile: HardwareProfile) -> list[GPUType]:
    found = (GPU_TYPES.get(g.type) or known_gpu_type(g.type) for g in profile.gpus)
    return [t for t in found if t is not None]


def _intra_host_gb_s(profile: HardwareProfile) -> float:
    """The measured intra-host bandwidth, else the slowest spec figure among the host's recognised
    types, else the slowest in the spec table (PCIe)."""
    if profile.intra_host_gb_s is not None:
        return profile.intra_host_gb_s
    known = _known_types(profile) or list(GPU_TYPES.values())
    return min(t.intra_host_gbps for t in known)


def _link_gbit(links: Iterable[LinkMeasurement], present: set[str]) -> dict[tuple[str, str], float]:
    """Host pair -> Gbit/s for ``build_cluster``: per direction the last measurement, per pair the lower
    of the two directions; links to peers not in the cluster are left out. O(links)."""
    latest: dict[tuple[str, str], float] = {}
    for link in links:
        if link.a in present and link.b in present:
            latest[link.a, link.b] = link.gb_s
    pairs: dict[tuple[str, str], float] = {}
    for (a, b), gb_s in latest.items():
        key = (a, b) if a < b else (b, a)
        pairs[key] = min(gb_s, pairs.get(key, math.inf))
    return {key: gb_s * GBIT_PER_GB for key, gb_s in pairs.items()}


def build_cluster_from_peers(
    peers: Sequence[PeerHardware],
    links: Iterable[LinkMeasurement],
    default_network_gbit_s: float = 10.0,
    *,
    params: CostParams | None = None,
    name: str = "swarm",
) -> tuple[Cluster, dict[int, tuple[str, int]]]:
    """The planner's cluster of every advertised GPU, and planner GPU id -> (peer id, local GPU index).

    Peers are taken in peer-id order and peers without GPUs are left out, so every node builds the
    same cluster from the same view. Each peer is one planner host named by its peer id, with its
    measured intra-host bandwidth or the spec table's. Between hosts the bandwidth is the measured link
    (the lower of the two directions when both were probed), else ``default_network_gbit_s``.
    ``build_cluster`` lays out the hosts and the bandwidth matrix (and validates them); each GPU then
    takes its advertised memory and the figures of ``planner_figures``; a device of unknown type keeps
    its name as its type and has no list price (0 $/h). Raises ClusterError when no peer has a GPU, a
    peer id repeats, or the default bandwidth is not a positive number. O(G^2 + links) for G GPUs.
    """
    if isinstance(default_network_gbit_s, bool) or not isinstance(default_network_gbit_s, int | float):
        raise ClusterError(f"network bandwidth must be a number, got {default_network_gbit_s!r}")
    if not math.isfinite(default_network_gbit_s) or default_network_gbit_s <= 0:
        raise ClusterError(f"network bandwidth must be positive and finite, got {default_network_gbit_s}")
    members = sorted((p for p in peers if p.profile.gpus), key=lambda p: p.peer_id)
    anchor = next(iter(GPU_TYPES))
    hosts = [
        HostSpec(
            name=p.peer_id,
            gpu=(_known_types(p.profile) or [GPU_TYPES[anchor]])[0].name,
            count=len(p.profile.gpus),
            intra_host_gbps=_intra_host_gb_s(p.profile),
        )
        for p in members
    ]
    layout = build_cluster(hosts, default_network_gbit_s, _link_gbit(links, {p.peer_id for p in members}), name=name)
    gpus: list[GPU] = []
    mapping: dict[int, tuple[str, int]] = {}
    for peer in members:
        for local, info in enumerate(peer.profile.gpus):
            gpu_id = len(gpus)
            gpus.append(_planner_gpu(gpu_id, peer.peer_id, info, params))
            mapping[gpu_id] = (peer.peer_id, local)
    return replace(layout, gpus=tuple(gpus)), mapping


def _matching(ids: Sequence[str], k: int) -> list[tuple[str, str]]:
    """Round ``k`` of the circle-method round robin over ``ids``: disjoint pairs, each (low, high). O(n)."""
    slots: list[str | None] = list(ids) + ([None] if len(ids) % 2 else [])
    m = len(slots)
    rest = slots[1:]
    shift = k % (m - 1)
    ring = [slots[0], *rest[shift:], *rest[:shift]]
    pairs = []
    for i in range(m // 2):
        x, y = ring[i], ring[m - 1 - i]
        if x is not None and y is not None:
            pairs.append((x, y) if x < y else (y, x))
    return pairs


def probe_plan(peer_ids: Sequence[str], budget: int, *, round_index: int) -> list[tuple[str, str]]:
    """The peer pairs to probe in round ``round_index``: at most ``budget`` pairs, no peer in two of them.

    Pairs are (lower id, higher id). The rounds walk a round-robin schedule (circle method) over the
    sorted distinct ids, each of its n - 1 (n even) or n (n odd) matchings cut into chunks of at most
    ``budget`` pairs, one chunk per round; so any ``ceil(n / 2 / budget) * (n - 1 or n)`` consecutive
    rounds probe every pair exactly once, and the pairs of one round can run at the same time without
    competing for a peer's network. A pure function of its arguments; O(n) per call.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"probe budget must be a positive integer, got {budget!r}")
    ids = sorted(set(peer_ids))
    if len(ids) < 2:
        return []
    matchings = len(ids) - 1 if len(ids) % 2 == 0 else len(ids)
    size = len(ids) // 2
    chunks = -(-size // budget)
    slot = round_index % (matchings * chunks)
    matching = _matching(ids, slot // chunks)
    part = slot % chunks
    return matching[part * budget : (part + 1) * budget]
