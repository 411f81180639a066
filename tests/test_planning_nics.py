"""The daemon's pure planning step feeds the planner each host's NIC as its link probes measured it."""

from __future__ import annotations

from hexgen.coordinator.cost import CostModel, LengthStats
from hexgen.coordinator.network import plan_nic_use
from hexgen.coordinator.specs import MODELS
from hexgen.coordinator.workload import synthetic
from hexgen.daemon.cluster_view import LinkMeasurement, PeerHardware, build_cluster_from_peers
from hexgen.daemon.hardware import simulated_profile
from hexgen.daemon.planning import PlanningInput, compute_plan, measured_nics

A, B, C = "12D3KooWPeerA", "12D3KooWPeerB", "12D3KooWPeerC"


def _peers() -> list[PeerHardware]:
    return [PeerHardware(p, p[-1].lower(), simulated_profile("A100x2")) for p in (A, B, C)]


def test_a_hosts_nic_is_its_fastest_probe() -> None:
    cluster, _ = build_cluster_from_peers(_peers(), [])
    links = [LinkMeasurement(A, B, 5.0, 0.2), LinkMeasurement(B, A, 3.0, 0.2), LinkMeasurement(B, C, 0.5, 1.0)]
    nics = measured_nics(cluster, links)
    assert {h: (n.egress, n.ingress) for h, n in nics.items()} == {A: (5.0, 5.0), B: (5.0, 5.0), C: (0.5, 0.5)}
    fed = cluster.with_nics(nics)
    assert fed.host_bandwidth[A, C] == 0.5  # the default 10 Gbit/s link, held to C's 0.5 GB/s NIC
    assert cluster.nics[A].egress == 1.25  # unprobed: the 10 Gbit/s default


def test_the_live_plan_fits_the_measured_nics() -> None:
    model = MODELS["llama-2-7b"]
    links = [LinkMeasurement(A, B, 0.05, 0.2), LinkMeasurement(B, C, 0.05, 0.2), LinkMeasurement(A, C, 0.05, 0.2)]
    outcome = compute_plan(PlanningInput(model, _peers(), links))
    assert outcome.plan is not None and outcome.error is None
    assert outcome.plan.meta["planner"] in ("hexgen2", "hexgen2_colocate")
    cluster, _ = build_cluster_from_peers(_peers(), links)
    cluster = cluster.with_nics(measured_nics(cluster, links))
    workload = synthetic("default", min(512, model.max_context // 2), 128, count=64)
    use, port = plan_nic_use(outcome.plan, CostModel(cluster, model, LengthStats.of(workload)))
    assert use <= 1 + 1e-6, f"{use:.2f}x of {port}"
