"""The cost model against figures computed by hand from its formulas, and split_layers against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from hexgen.coordinator.cluster import Cluster, HostSpec, build_cluster
from hexgen.coordinator.cost import CostModel, LengthStats, StageCost, split_layers, stage_hardware
from hexgen.coordinator.plan import Stage
from hexgen.coordinator.specs import MODELS

# Llama-2-7B: one layer holds 4*4096^2 + 3*4096*11008 = 202,375,168 parameters (404,750,336 bytes);
# the embedding and the head 32000*4096 = 131,072,000 each; a token's KV per layer 2*32*128*2 = 16,384 B.
LLAMA_7B = MODELS["llama-2-7b"]
STATS = LengthStats(prompt=1000.0, prompt_sq=1_000_000.0, output=100.0)
# Default efficiencies: compute 0.55, memory 0.75, so an H100 gives 989e12*0.55 = 543.95e12 FLOP/s
# and 3350e9*0.75 = 2.5125e12 B/s.


def _one_h100() -> CostModel:
    return CostModel(build_cluster([HostSpec("h", "H100", 1)]), LLAMA_7B, STATS)


def _mixed() -> Cluster:
    # a: 4 x H100 (NVLink 450 GB/s), b: 2 x A100, c: 2 x L40; a-b on 100 Gbit/s (their NICs too), the rest
    # on 10 Gbit/s.
    hosts = [
        HostSpec("a", "H100", 4, nic_gbit_s=100),
        HostSpec("b", "A100", 2, nic_gbit_s=100),
        HostSpec("c", "L40", 2),
    ]
    return build_cluster(hosts, network_gbit_s=10, links={("a", "b"): 100.0})


def test_replica_bytes_llama_70b() -> None:
    cost = CostModel(_mixed(), MODELS["llama-2-70b"], LengthStats(1000.0, 1e6, 200.0))
    # weights 68,975,329,280 * 2 = 137,950,658,560; KV 32 requests * 327,680 B * 1200 tokens = 12,582,912,000
    assert cost.replica_bytes() == 150_533_570_560
    assert cost.kv_bytes_per_request() == 393_216_000
    assert cost.prompt_kv_bytes() == 327_680_000


def test_prefill_stage_one_gpu_by_hand() -> None:
    cost = _one_h100()
    hw = stage_hardware(cost.cluster, [0])
    assert (hw.tp, hw.tflops, hw.link_gbps, hw.spans_hosts) == (1, 989.0, float("inf"), False)
    c = cost.prefill_stage(hw, first=True, last=True, next_link=None)
    # FLOPs per layer: 2*202,375,168*1000 + 2*1e6*4096 = 412,942,336,000 -> / 543.95e12 = 7.591550e-4 s.
    # The weight read (404,750,336 / 2.5125e12 = 1.610947e-4 s, times 1000/2048 tokens) is smaller.
    assert c.per_layer == pytest.approx(7.591550e-4, rel=1e-6)
    # The head on the last stage: 2*32000*4096 FLOPs for the one last token / 543.95e12.
    assert c.fixed == pytest.approx(4.819266e-7, rel=1e-6)
    # Usable 80e9*0.9 - 1e9 = 71e9, less embedding and head 524,288,000 B = 70,475,712,000 B;
    # a layer costs 404,750,336 B + 32 requests * 1100 tokens * 16,384 B = 981,467,136 B -> 71 layers.
    assert c.max_layers == 71
    # A whole 32-layer prefill of that one request: 32 * 7.591550e-4 + 4.819266e-7.
    times = cost.prefill_stage_times([Stage((0,), (0, 32))], 1000.0, 1_000_000.0, 1)
    assert times == pytest.approx([0.02429344], rel=1e-6)


def test_decode_step_one_gpu_by_hand() -> None:
    cost = _one_h100()
    hw = stage_hardware(cost.cluster, [0])
    c = cost.decode_stage(hw, batch=32, micro=32, first=True, last=True, next_link=None)
    # Mean context 1000 + 100/2 = 1050 tokens; KV read per layer 32*1050*16,384 = 550,502,400 B;
    # memory time (404,750,336 + 550,502,400) / 2.5125e12 = 3.802001e-4 s, above the compute time
    # (2*202,375,168 + 4*1050*4096) * 32 / 543.95e12 = 2.482308e-5 s.
    assert c.per_layer == pytest.approx(3.802001e-4, rel=1e-6)
    # The head: 32000*4096*2 B / 2.5125e12 = 1.043359e-4 s beats 2*32000*4096*32 FLOPs / 543.95e12.
    assert c.fixed == pytest.approx(1.043359e-4, rel=1e-6)
    assert c.max_layers == 71
    # One step of all 32 layers: 32 * 3.802001e-4 + 1.043359e-4.
    assert cost.decode_stage_times([Stage((0,), (0, 32))], 32, 32.0, 1050.0) == pytest.approx([0.01227074], rel=1e-6)


def test_prefill_tp2_pays_two_allreduces_per_layer() -> None:
    cost = CostModel(build_cluster([HostSpec("h", "H100", 2)]), LLAMA_7B, STATS)
    hw = stage_hardware(cost.cluster, [0, 1])
    c = cost.prefill_stage(hw, True, True, None, per_request=1.0)
    # compute halves: 7.591550e-4 / 2 = 3.795775e-4; the activation 1000*4096*2 = 8,192,000 B is
    # all-reduced twice: 2 * (2*1*10e-6 + 2/2 * 8,192,000 / 450e9) = 2 * 3.820444e-5.
    assert c.per_layer == pytest.approx(4.559864e-4, rel=1e-6)
    # By default a request's share of a 2048-token batch (2.048 mean requests): the all-reduce
    # latency 2 * 2e-5 is paid once a batch, the bytes and the compute once a request.
    assert cost.prefill_batch_requests() == pytest.approx(2.048)
    shared = cost.prefill_stage(hw, True, True, None)
    assert shared.per_layer == pytest.approx(3.795775e-4 + 2 * (2e-5 / 2.048 + 1.820444e-5), rel=1e-6)


def test_length_stats_count_decode_iterations_and_the_context_they_attend() -> None:
    from hexgen.coordinator.workload import Request, Workload

    workload = Workload("w", (Request(0.0, 100, 1), Request(0.0, 200, 11), Request(0.0, 50, 3)))
    stats = LengthStats.of(workload)
    # prefill makes the first token: 0 + 10 + 2 decode iterations over 3 requests
    assert stats.decode_steps == pytest.approx(4.0)
    # iteration k of a request attends over p + k tokens: (10*200 + 55) + (2*50 + 3) over 12 iterations,
    # above the p + o/2 = 116.7 + 2.5 of the means, because the long output holds its slot longest
    assert stats.context == pytest.approx(2158 / 12)
    # given only the means, the stats are those of identical requests
    assert LengthStats(100.0, 1e4, 11.0).decode_steps == 10.0
    assert LengthStats(100.0, 1e4, 11.0).context == 105.5


def test_allreduce_time_intra_and_cross_host() -> None:
    cost = CostModel(_mixed(), LLAMA_7B, STATS)
    nvlink = stage_hardware(cost.cluster, [0, 1, 2, 3])
    assert (nvlink.tp, nvlink.link_gbps, nvlink.spans_hosts) == (4, 450.0, False)
    # ring: 2*(4-1) steps * 10 us + 6/4 * 9e6 B / 450e9 B/s = 6e-5 + 3e-5
    assert cost.allreduce_time(9e6, nvlink) == pytest.approx(9e-5, rel=1e-12)
    cross = stage_hardware(cost.cluster, [0, 4])
    # slowest member's figures (A100) and the 100 Gbit/s = 12.5 GB/s link between the hosts
    assert (cross.tflops, cross.hbm_gbps, cross.memory_gb, cross.link_gbps) == (312.0, 2039.0, 80.0, 12.5)
    # 2 steps * 50 us + 2/2 * 1.25e6 / 12.5e9 = 1e-4 + 1e-4
    assert cost.allreduce_time(1.25e6, cross) == pytest.approx(2e-4, rel=1e-12)
    assert cost.allreduce_time(1e9, stage_hardware(cost.cluster, [5])) == 0.0
    # one send: 50 us + 1e6 / 12.5e9
    assert cost.send_time(1e6, 12.5, same_host=False) == pytest.approx(1.3e-4, rel=1e-12)


def test_kv_routes_carry_the_layers_both_ends_hold() -> None:
    cost = CostModel(_mixed(), LLAMA_7B, STATS)
    # same host: min(2, 2) NVLink pairs in parallel carry all 32 layers
    assert cost.kv_routes([Stage((0, 1), (0, 32))], [Stage((2, 3), (0, 32))]) == [(900.0, 1.0, True)]
    # a prefill on host a, a decode pipeline over b (layers [0, 16)) and c ([16, 32)): each pair carries half
    routes = cost.kv_routes([Stage((0,), (0, 32))], [Stage((4,), (0, 16)), Stage((6,), (16, 32))])
    assert sorted(routes) == [(1.25, 0.5, False), (12.5, 0.5, False)]
    # a host pair that shares no layers carries nothing
    split = cost.kv_routes([Stage((0,), (0, 16)), Stage((4,), (16, 32))], [Stage((6,), (0, 16)), Stage((7,), (16, 32))])
    assert sorted(split) == [(1.25, 0.5, False), (1.25, 0.5, False)]


def test_kv_transfer_rate_is_set_by_the_busiest_host_pair() -> None:
    cost = CostModel(_mixed(), LLAMA_7B, STATS)
    # a 1000-token prompt's KV: 524,288 B/token * 1000 = 524,288,000 B
    same_host = cost.kv_transfer_rate([Stage((0, 1), (0, 32))], [Stage((2, 3), (0, 32))])
    assert same_host == pytest.approx(900e9 / 524_288_000)
    # half the KV over the 10 Gbit/s a-c link limits it, though a-b runs at 100 Gbit/s
    fan_out = cost.kv_transfer_rate([Stage((0,), (0, 32))], [Stage((4,), (0, 16)), Stage((6,), (16, 32))])
    assert fan_out == pytest.approx(1.25e9 / (0.5 * 524_288_000))
    # 50 us + 524,288,000 B / 1.25e9 B/s
    assert cost.kv_transfer_time(1000, [Stage((4,), (0, 32))], [Stage((6,), (0, 32))]) == pytest.approx(
        0.4194804, rel=1e-9
    )


def test_max_layers_shards_kv_by_at_most_kv_heads() -> None:
    model = MODELS["llama-2-70b"]  # a layer is 855,638,016 params; 8 KV heads; KV 4,096 B/token/layer
    stats = LengthStats(1000.0, 1e6, 200.0)
    cost = CostModel(build_cluster([HostSpec("big", "H100", 16)]), model, stats)
    tp4 = stage_hardware(cost.cluster, range(4))
    # per GPU: 1,711,276,032/4 + 32*1200*4096/4 = 467,140,608 B a layer; room 71e9 - 1,048,576,000/4
    assert cost.max_layers(tp4, 32, first=True, last=True) == 151
    tp16 = stage_hardware(cost.cluster, range(16))
    # 16 GPUs but only 8 KV heads: the KV splits 8 ways. 106,954,752 + 19,660,800 a layer;
    # room 71e9 - 65,536,000 = 70,934,464,000 -> 560 layers
    assert cost.max_layers(tp16, 32, first=True, last=True) == 560
    # a middle stage holds neither embedding nor head: 71e9 // 467,140,608
    assert cost.max_layers(tp4, 32, first=False, last=False) == 151
    assert cost.max_layers(tp4, 1000, first=False, last=False) == 42  # 71e9 // (427,819,008 + 1,228,800,000)


def _brute_force(total: int, costs: list[StageCost]) -> float | None:
    best = None
    ranges = [range(1, min(c.max_layers, total) + 1) for c in costs]
    for layers in itertools.product(*ranges):
        if sum(layers) != total:
            continue
        worst = max(c.fixed + n * c.per_layer for c, n in zip(costs, layers, strict=True))
        best = worst if best is None else min(best, worst)
    return best


def test_split_layers_is_optimal_against_brute_force() -> None:
    rng = random.Random(7)
    for _ in range(400):
        total = rng.randint(1, 12)
        costs = [
            StageCost(rng.uniform(0.1, 3.0), rng.choice([0.0, rng.uniform(0.0, 5.0)]), rng.randint(0, total + 1))
            for _ in range(rng.randint(1, 4))
        ]
        expected = _brute_force(total, costs)
        got = split_layers(total, costs)
        if expected is None:
            assert got is None, (total, costs)
            continue
        assert got is not None, (total, costs)
        layers, bottleneck = got
        assert sum(layers) == total
        assert all(1 <= n <= c.max_layers for n, c in zip(layers, costs, strict=True))
        assert bottleneck == pytest.approx(max(c.fixed + n * c.per_layer for c, n in zip(costs, layers, strict=True)))
        assert bottleneck == pytest.approx(expected), (total, costs)


def test_split_layers_uneven_by_hand() -> None:
    # A stage twice as fast per layer takes twice the layers: 8 + 4 layers at 1 s and 2 s each -> 8 s.
    assert split_layers(12, [StageCost(1.0, 0.0, 100), StageCost(2.0, 0.0, 100)]) == ((8, 4), 8.0)
    # memory caps the fast stage at 5 layers
    assert split_layers(12, [StageCost(1.0, 0.0, 5), StageCost(2.0, 0.0, 100)]) == ((5, 7), 14.0)
    assert split_layers(12, [StageCost(1.0, 0.0, 5), StageCost(2.0, 0.0, 6)]) is None
    assert split_layers(1, [StageCost(1.0, 0.0, 5), StageCost(1.0, 0.0, 5)]) is None
