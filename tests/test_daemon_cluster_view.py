"""From peer adverts and link probes to the planner's cluster; the bounded, rotating probe schedule."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hexgen.coordinator import planner
from hexgen.coordinator.cluster import ClusterError
from hexgen.coordinator.cost import CostParams
from hexgen.coordinator.specs import GPU_TYPES, MODELS
from hexgen.coordinator.workload import synthetic
from hexgen.daemon.cluster_view import (
    LinkMeasurement,
    PeerHardware,
    build_cluster_from_peers,
    planner_figures,
    probe_plan,
)
from hexgen.daemon.hardware import simulated_profile
from hexgen.daemon.hardware_profile import GPUInfo, HardwareError, HardwareProfile

CPU_ONLY = HardwareProfile(gpus=(), cpu_count=8, memory_gb=32.0)


def peer(peer_id: str, spec: str | None, host: str = "box") -> PeerHardware:
    return PeerHardware(peer_id, host, simulated_profile(spec) if spec else CPU_ONLY)


def swarm() -> list[PeerHardware]:
    """Three GPU peers and a CPU-only one, deliberately out of peer-id order."""
    return [peer("QmC", "A100x2"), peer("QmA", "H100x2"), peer("QmZ", None), peer("QmB", "H100x2")]


def test_gpus_follow_peer_id_order_and_map_back_to_peers() -> None:
    cluster, mapping = build_cluster_from_peers(swarm(), [])
    assert [(g.id, g.host, g.type) for g in cluster.gpus] == [
        (0, "QmA", "H100"),
        (1, "QmA", "H100"),
        (2, "QmB", "H100"),
        (3, "QmB", "H100"),
        (4, "QmC", "A100"),
        (5, "QmC", "A100"),
    ]
    assert mapping == {0: ("QmA", 0), 1: ("QmA", 1), 2: ("QmB", 0), 3: ("QmB", 1), 4: ("QmC", 0), 5: ("QmC", 1)}
    assert cluster.name == "swarm"
    h100, a100 = GPU_TYPES["H100"], GPU_TYPES["A100"]
    assert (cluster.gpus[0].memory_gb, cluster.gpus[0].tflops, cluster.gpus[0].hbm_gbps) == (80.0, 989.0, 3350.0)
    assert cluster.gpus[4].price_per_hour == a100.price_per_hour
    assert cluster.bandwidth[0][1] == h100.intra_host_gbps
    assert cluster.bandwidth[4][5] == a100.intra_host_gbps
    assert cluster.bandwidth[1][2] == cluster.bandwidth[0][5] == 10.0 / 8  # default 10 Gbit/s


def test_every_order_of_the_same_view_builds_the_same_cluster() -> None:
    links = [LinkMeasurement("QmA", "QmB", 3.0, 0.2), LinkMeasurement("QmC", "QmA", 0.5, 1.0)]
    reference, ref_map = build_cluster_from_peers(swarm(), links)
    rng = random.Random(7)
    for _ in range(10):
        peers, shuffled = swarm(), list(links)
        rng.shuffle(peers)
        rng.shuffle(shuffled)
        cluster, mapping = build_cluster_from_peers(peers, shuffled)
        assert cluster.gpus == reference.gpus
        assert cluster.bandwidth == reference.bandwidth
        assert mapping == ref_map


def test_zero_gpu_peers_are_left_out() -> None:
    cluster, mapping = build_cluster_from_peers(swarm(), [LinkMeasurement("QmA", "QmZ", 9.0, 0.1)])
    assert "QmZ" not in cluster.hosts
    assert all(p != "QmZ" for p, _ in mapping.values())
    assert len(cluster) == 6
    with pytest.raises(ClusterError, match="no GPUs"):
        build_cluster_from_peers([peer("QmZ", None)], [])


def test_measured_links_override_the_default_lower_direction_wins() -> None:
    links = [
        LinkMeasurement("QmA", "QmB", 3.0, 0.2),
        LinkMeasurement("QmB", "QmA", 2.0, 0.2),  # both directions: the lower
        LinkMeasurement("QmC", "QmA", 0.9, 1.0),
        LinkMeasurement("QmC", "QmA", 0.5, 1.0),  # the same direction again: the latest
        LinkMeasurement("QmA", "QmGone", 7.0, 0.1),  # a peer not in the view: ignored
    ]
    cluster, _ = build_cluster_from_peers(swarm(), links, default_network_gbit_s=40.0)
    bw = cluster.bandwidth
    assert bw[0][2] == bw[3][1] == 2.0  # QmA <-> QmB
    assert bw[0][4] == bw[5][1] == 0.5  # QmA <-> QmC
    assert bw[2][4] == 5.0  # QmB <-> QmC: not measured, 40 Gbit/s declared
    assert bw[0][1] == GPU_TYPES["H100"].intra_host_gbps
    assert all(bw[i][j] == bw[j][i] for i in range(6) for j in range(6))
    assert cluster.host_bandwidth["QmA", "QmB"] == 2.0


def test_intra_host_bandwidth_comes_from_the_profile_else_the_spec_table() -> None:
    base = simulated_profile("L40x2")
    measured = HardwareProfile(base.gpus, base.cpu_count, base.memory_gb, intra_host_gb_s=21.0)
    unmeasured = HardwareProfile(base.gpus, base.cpu_count, base.memory_gb, intra_host_gb_s=None)
    cluster, _ = build_cluster_from_peers([PeerHardware("a", "x", measured), PeerHardware("b", "x", unmeasured)], [])
    assert cluster.bandwidth[0][1] == 21.0
    assert cluster.bandwidth[2][3] == GPU_TYPES["L40"].intra_host_gbps


def test_unknown_devices_keep_their_name_and_measured_figures() -> None:
    eff = CostParams()
    rtx = GPUInfo("NVIDIA GeForce RTX 4090", 25.4, 110.0, 800.0, False, "NVIDIA GeForce RTX 4090", 110.0, 800.0)
    profile = HardwareProfile((rtx, rtx), cpu_count=16, memory_gb=64.0)
    cluster, mapping = build_cluster_from_peers([PeerHardware("p", "desk", profile), peer("q", "A6000")], [])
    g = cluster.gpus[0]
    assert (g.type, g.host, g.memory_gb, g.price_per_hour) == ("NVIDIA GeForce RTX 4090", "p", 25.4, 0.0)
    assert g.tflops == pytest.approx(110.0 / eff.compute_efficiency)
    assert g.hbm_gbps == pytest.approx(800.0 / eff.memory_efficiency)
    assert cluster.bandwidth[0][1] == min(t.intra_host_gbps for t in GPU_TYPES.values())  # PCIe when unknown
    assert mapping[2] == ("q", 0) and cluster.gpus[2].type == "A6000"


def test_planner_figures_never_exceed_the_spec_of_a_known_type() -> None:
    params = CostParams()
    h100 = GPU_TYPES["H100"]
    # A fast measurement, or an inflated advert, is capped at the spec table.
    inflated = GPUInfo("H100", 80.0, 5000.0, 9000.0, False, "NVIDIA H100 80GB HBM3", 800.0, 3000.0)
    assert planner_figures(inflated, params) == (h100.tflops, h100.hbm_gbps)
    # A device measurably slower than its type (a PCIe variant) is planned at what it showed.
    pcie = GPUInfo("H100", 80.0, h100.tflops, h100.hbm_gbps, False, "NVIDIA H100 PCIe", 400.0, 1500.0)
    tflops, hbm = planner_figures(pcie, params)
    assert tflops == pytest.approx(400.0 / params.compute_efficiency)
    assert hbm == pytest.approx(1500.0 / params.memory_efficiency)
    # Uncalibrated: the advertised (spec) figures.
    plain = simulated_profile("A100").gpus[0]
    assert planner_figures(plain) == (GPU_TYPES["A100"].tflops, GPU_TYPES["A100"].hbm_gbps)


def test_bad_views_raise_cluster_error() -> None:
    with pytest.raises(ClusterError, match="listed twice"):
        build_cluster_from_peers([peer("QmA", "H100"), peer("QmA", "L40")], [])
    for bad in (0.0, -1.0, math.nan, math.inf, True):
        with pytest.raises(ClusterError):
            build_cluster_from_peers(swarm(), [], default_network_gbit_s=bad)


@pytest.mark.parametrize(
    "args",
    [
        ("a", "a", 1.0, 0.1),
        ("", "b", 1.0, 0.1),
        ("a", "b", 0.0, 0.1),
        ("a", "b", math.nan, 0.1),
        ("a", "b", 1.0, -1.0),
        ("a", "b", 1.0, math.inf),
        ("a", 5, 1.0, 0.1),
    ],
)
def test_link_measurements_validate(args: tuple[Any, ...]) -> None:
    with pytest.raises(HardwareError):
        LinkMeasurement(*args)


def test_link_measurement_wire_form_and_probe_arithmetic() -> None:
    link = LinkMeasurement("a", "b", 1.25, 0.4)
    assert LinkMeasurement.from_dict(link.to_dict()) == link and link.path == "libp2p"
    tcp = LinkMeasurement("a", "b", 1.25, 0.4, "tcp")
    assert LinkMeasurement.from_dict(tcp.to_dict()) == tcp
    older = {k: v for k, v in tcp.to_dict().items() if k != "path"}  # an advert from before paths were named
    assert LinkMeasurement.from_dict(older) == link
    bad_paths = ({"path": "carrier pigeon"}, {"path": 3}, {"path": "x" * 10_000})
    for bad in (
        None,
        {},
        link.to_dict() | {"x": 1},
        link.to_dict() | {"gb_s": "fast"},
        *(older | p for p in bad_paths),
    ):
        with pytest.raises(HardwareError):
            LinkMeasurement.from_dict(bad)
    # 100 MB in 0.11 s with a 10 ms round trip: 100 MB / 0.1 s = 1 GB/s.
    probe = LinkMeasurement.from_probe("a", "b", 100_000_000, 0.11, 10.0)
    assert probe.gb_s == pytest.approx(1.0) and probe.rtt_ms == 10.0
    # A latency-bound probe is never credited with more than twice its raw rate.
    tiny = LinkMeasurement.from_probe("a", "b", 1000, 0.001, 50.0)
    assert tiny.gb_s == pytest.approx(1000 / 0.0005 / 1e9)
    with pytest.raises(HardwareError):
        LinkMeasurement.from_probe("a", "b", 0, 0.1, 1.0)
    with pytest.raises(HardwareError):
        LinkMeasurement.from_probe("a", "b", 10, 0.0, 1.0)


def test_the_cluster_is_accepted_by_the_planner() -> None:
    cluster, mapping = build_cluster_from_peers(
        [peer("QmH1", "H100x2"), peer("QmH2", "H100x2"), peer("QmA1", "A100x2"), peer("QmCPU", None)],
        [LinkMeasurement("QmH1", "QmH2", 5.0, 0.2)],
    )
    workload = synthetic("test", 512, 128, count=16)
    result = planner.plan(cluster, MODELS["llama-2-7b"], workload)
    assert result.throughput > 0
    placed = {g for group in result.groups for g in group.gpus}
    assert placed and placed <= set(mapping)
    assert {mapping[g][0] for g in placed} <= {"QmH1", "QmH2", "QmA1"}


# ------------------------------------------------------------------ probe plan


def _rounds(n: int, budget: int) -> int:
    matchings = n - 1 if n % 2 == 0 else n
    return matchings * -(-(n // 2) // budget)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 13), budget=st.integers(1, 8), offset=st.integers(-50, 50))
def test_probe_plan_is_bounded_disjoint_and_covers_every_pair(n: int, budget: int, offset: int) -> None:
    ids = [f"peer{i:02d}" for i in range(n)]
    every = set(itertools.combinations(ids, 2))
    seen: list[tuple[str, str]] = []
    rounds = _rounds(n, budget) if n >= 2 else 1
    for r in range(offset, offset + rounds):
        pairs = probe_plan(ids, budget, round_index=r)
        assert len(pairs) <= budget
        assert all(a < b for a, b in pairs)
        members = [p for pair in pairs for p in pair]
        assert len(members) == len(set(members)), "a peer is in two probes of one round"
        assert pairs == probe_plan(list(reversed(ids)) + ids[:1], budget, round_index=r)  # order, duplicates
        seen.extend(pairs)
    assert len(seen) == len(every) and set(seen) == every


def test_probe_plan_rotates_and_uses_its_budget() -> None:
    ids = ["d", "a", "c", "b", "f", "e"]
    assert probe_plan(ids, 3, round_index=0) != probe_plan(ids, 3, round_index=1)
    assert all(len(probe_plan(ids, 3, round_index=r)) == 3 for r in range(10))
    assert all(len(probe_plan(ids, 2, round_index=r)) in (1, 2) for r in range(10))
    assert probe_plan(ids, 3, round_index=5) == probe_plan(ids, 3, round_index=0)  # period 5
    assert probe_plan([], 4, round_index=3) == probe_plan(["solo"], 4, round_index=0) == []
    assert probe_plan(["b", "a"], 1, round_index=9) == [("a", "b")]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            probe_plan(ids, bad, round_index=0)  # type: ignore[arg-type]
