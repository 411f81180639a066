"""The flow upper bound: hand-checked on two hosts, and never below the exhaustive best on small clusters."""

from __future__ import annotations

import random

import pytest

from hexgen.coordinator import planner
from hexgen.coordinator.bound import flow_upper_bound, group_sizes
from hexgen.coordinator.cluster import HostSpec, build_cluster
from hexgen.coordinator.evaluate import Evaluator
from hexgen.coordinator.exhaustive import exhaustive_best
from hexgen.coordinator.specs import MODELS
from hexgen.coordinator.workload import Request, Workload, synthetic

MIXED = Workload(
    "mixed", tuple(Request(0.0, p, o) for p, o in [(200, 50), (900, 300), (120, 400), (2000, 40), (600, 150)])
)


def test_group_sizes_cover_small_groups_then_double() -> None:
    assert group_sizes(3) == [1, 2, 3]
    assert group_sizes(40) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32]


@pytest.mark.parametrize("gbit", [0.01, 400.0])
def test_two_single_gpu_hosts_serve_the_slower_role_or_what_the_nic_carries(gbit: float) -> None:
    """One GPU prefills, the other decodes, and every prompt's KV crosses the NIC between them."""
    cluster = build_cluster([HostSpec("a", "A100", 1), HostSpec("b", "A100", 1)], gbit)
    evaluator = Evaluator(cluster, MODELS["llama-2-7b"], MIXED)
    bound = flow_upper_bound(evaluator)
    prefill, decode = bound.per_gpu["A100"]
    nic = gbit / 8 * 1e9 / evaluator.cost.prompt_kv_bytes()
    assert bound.integral
    assert bound.value == pytest.approx(min(prefill, decode, nic), rel=1e-6)
    assert (nic < min(prefill, decode)) == (gbit < 1)  # the two cases test different limits


@pytest.mark.parametrize("seed", [1, 3, 5, 7, 10, 12])
def test_no_plan_beats_the_bound(seed: int) -> None:
    rng = random.Random(seed)
    hosts = []
    left = rng.randint(4, 7)
    while left:
        count = min(left, rng.choice((1, 2, 4)))
        hosts.append(HostSpec(f"h{len(hosts)}", rng.choice(["H100", "A100", "L40", "A6000"]), count))
        left -= count
    cluster = build_cluster(hosts)
    model = MODELS[rng.choice(["llama-2-7b", "llama-2-13b"])]
    workload = synthetic("bound", rng.randint(200, 1500), rng.randint(50, 400), count=32)
    evaluator = Evaluator(cluster, model, workload)
    bound = flow_upper_bound(evaluator)
    best = exhaustive_best(evaluator, roles=planner.DISAGGREGATED)
    assert best is not None and best.value > 0
    assert best.value <= bound.value * (1 + 1e-6)
    assert planner.plan(cluster, model, workload).throughput <= bound.value * (1 + 1e-6)
