"""Host NIC accounting: the cross-host bytes of pipelines, TP stages and KV hand-offs, and a plan's NIC use."""

from __future__ import annotations

import pytest

from hexgen.coordinator.cluster import HostSpec, build_cluster
from hexgen.coordinator.cost import CostModel, LengthStats
from hexgen.coordinator.network import NicQueue, kv_bytes, pass_bytes, plan_nic_use, request_bytes
from hexgen.coordinator.plan import SINK, SOURCE, Flow, Group, Plan, Stage
from hexgen.coordinator.specs import MODELS

MODEL = MODELS["llama-2-7b"]  # hidden 4096, fp16, 32 layers
STATS = LengthStats(prompt=1000.0, prompt_sq=1e6, output=101.0)
ACT = 4096 * 2  # bytes of one token's activations


def _cost() -> CostModel:
    hosts = [HostSpec("a", "A100", 2), HostSpec("b", "A100", 2), HostSpec("c", "A100", 2)]
    return CostModel(build_cluster(hosts, network_gbit_s=8.0), MODEL, STATS)


def test_pipeline_boundaries_between_hosts_send_activations() -> None:
    cost = _cost()
    stages = (Stage((0,), (0, 10)), Stage((1,), (10, 20)), Stage((2,), (20, 32)))
    # a -> a stays inside host a; a -> b crosses once
    assert pass_bytes(cost, stages, 100) == {("a", "b"): 100 * ACT}
    # decode sends one token per step, o - 1 = 100 steps a request
    assert request_bytes(cost, stages, "decode") == {("a", "b"): 100 * ACT}
    assert request_bytes(cost, stages, "colocated") == {("a", "b"): 1100 * ACT}


def test_a_tp_stage_spanning_hosts_pays_its_ring_across_them() -> None:
    cost = _cost()
    # TP4 over a, a, b, b: ring edges a->b and b->a cross; each carries 2 (t-1)/t of the data per all-reduce,
    # two all-reduces per layer
    stage = (Stage((0, 1, 2, 3), (0, 32)),)
    per_edge = 2 * 32 * 2 * 3 / 4 * 10 * ACT
    assert pass_bytes(cost, stage, 10) == pytest.approx({("a", "b"): per_edge, ("b", "a"): per_edge})


def test_kv_goes_from_each_prefill_host_to_the_decode_hosts_holding_its_layers() -> None:
    cost = _cost()
    prefill = (Stage((0,), (0, 16)), Stage((2,), (16, 32)))
    decode = (Stage((1,), (0, 32)),)
    # layers 0-15 stay in host a; layers 16-31 go from b (GPU 2) to a
    assert kv_bytes(cost, prefill, decode) == {("b", "a"): MODEL.kv_bytes_per_token * 1000 / 2}


def test_plan_nic_use_sums_every_group_on_a_host() -> None:
    cost = _cost()
    groups = (
        Group(0, "prefill", (Stage((0,), (0, 32)),), 1.0, 32),
        Group(1, "prefill", (Stage((1,), (0, 32)),), 1.0, 32),
        Group(2, "decode", (Stage((2,), (0, 32)),), 1.0, 32),
    )
    flows = (Flow(SOURCE, 0, 1.5), Flow(SOURCE, 1, 0.5), Flow(0, 2, 1.5), Flow(1, 2, 0.5), Flow(2, SINK, 2.0))
    use, port = plan_nic_use(Plan(groups, flows, 2.0, "test"), cost)
    # 2 requests/s of a 1000-token prompt's KV leave host a through its 1 GB/s NIC
    assert use == pytest.approx(2 * MODEL.kv_bytes_per_token * 1000 / 1e9)
    assert port in ("a egress", "b ingress")


def test_activations_go_ahead_of_a_kv_backlog() -> None:
    cluster = build_cluster([HostSpec("a", "A100", 1), HostSpec("b", "A100", 1)], network_gbit_s=8.0)
    queue = NicQueue(cluster)
    assert queue.reserve({("a", "b"): 4e9}, 0.0) == pytest.approx(4.0)  # 4 GB at 1 GB/s
    assert queue.reserve({("a", "b"): 1e9}, 1.0) == pytest.approx(5.0)  # bulk waits its turn
    assert queue.reserve({("a", "b"): 1e8}, 1.0, urgent=True) == pytest.approx(1.1)  # activations do not
    assert queue.reserve({("a", "b"): 1e9}, 2.0) == pytest.approx(6.1)  # and push the bulk back by 0.1 s
