"""The HexGen-2 planner: unit tests of its parts and properties of its plans on random clusters."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hexgen.coordinator import baselines, planner
from hexgen.coordinator.cluster import Cluster, HostSpec, build_cluster
from hexgen.coordinator.cost import CostModel, CostParams, LengthStats
from hexgen.coordinator.evaluate import Evaluation, Evaluator, GroupSpec, PlanError
from hexgen.coordinator.exhaustive import exhaustive_best, set_partitions
from hexgen.coordinator.flow import FlowNode, NicLimits, max_flow
from hexgen.coordinator.network import plan_nic_use
from hexgen.coordinator.partition import partition
from hexgen.coordinator.plan import SINK, SOURCE, Plan
from hexgen.coordinator.search import Moves, SearchBudget, refine
from hexgen.coordinator.select import select
from hexgen.coordinator.simulator import simulate
from hexgen.coordinator.specs import MODELS, ModelSpec
from hexgen.coordinator.workload import Request, Workload

MIXED = Workload(
    "mixed", tuple(Request(0.0, p, o) for p, o in [(200, 50), (900, 300), (120, 400), (2000, 40), (600, 150)])
)


def het(*hosts: tuple[str, int], gbit: float = 10.0) -> Cluster:
    return build_cluster([HostSpec(f"{t.lower()}-{i}", t, n) for i, (t, n) in enumerate(hosts)], gbit)


def assert_valid(plan: Plan, cluster: Cluster, model: ModelSpec, workload: Workload) -> None:
    """Every invariant a plan must keep, checked from first principles rather than the planner's helpers."""
    params = CostParams()
    cost = CostModel(cluster, model, LengthStats.of(workload), params)
    seen: set[int] = set()
    for group in plan.groups:
        assert not seen & set(group.gpus), "a GPU is in two groups"
        seen |= set(group.gpus)
        assert all(0 <= g < len(cluster) for g in group.gpus)
        start = 0
        for i, stage in enumerate(group.stages):
            assert stage.layers[0] == start and stage.num_layers >= 1
            start = stage.layers[1]
            assert len({cluster.gpus[g].host for g in stage.gpus}) == 1, "TP crosses hosts"
            tp = stage.tp
            extra = 0.0
            if i == 0:
                extra += model.embedding_params * model.bytes_per_param / tp
            if i == len(group.stages) - 1 and not (i == 0 and model.tied_embeddings):
                extra += (model.head_params or model.embedding_params) * model.bytes_per_param / tp
            kv = group.batch * workload.mean_total * model.kv_bytes_per_token_layer / min(tp, model.kv_heads)
            need = stage.num_layers * (model.layer_bytes / tp + kv) + extra
            for g in stage.gpus:
                usable = cluster.gpus[g].memory_gb * 1e9 * params.memory_utilization - params.reserve_gb * 1e9
                assert need <= usable * (1 + 1e-9), f"stage on GPU {g} needs {need / 1e9:.1f} GB > {usable / 1e9:.1f}"
        assert start == model.layers
        assert group.batch >= params.concurrent_requests
    ids = {g.id: g for g in plan.groups}
    inflow: dict[int, float] = dict.fromkeys(ids, 0.0)
    outflow: dict[int, float] = dict.fromkeys(ids, 0.0)
    tol = 1e-6 * max(1.0, plan.throughput)
    for f in plan.flows:
        assert f.rate >= 0
        if f.src == SOURCE:
            assert ids[f.dst].role in ("prefill", "colocated")
            assert f.rate <= ids[f.dst].capacity + tol
            inflow[f.dst] += f.rate
        elif f.dst == SINK:
            assert ids[f.src].role in ("decode", "colocated")
            assert f.rate <= ids[f.src].capacity + tol
            outflow[f.src] += f.rate
        else:
            p, d = ids[f.src], ids[f.dst]
            assert (p.role, d.role) == ("prefill", "decode")
            assert f.rate <= cost.kv_transfer_rate(p.stages, d.stages) + tol
            outflow[f.src] += f.rate
            inflow[f.dst] += f.rate
    for g in ids:
        assert math.isclose(inflow[g], outflow[g], abs_tol=tol), f"flow not conserved at group {g}"
    from_source = sum(f.rate for f in plan.flows if f.src == SOURCE)
    assert math.isclose(from_source, plan.throughput, abs_tol=tol)
    use, port = plan_nic_use(plan, cost)
    assert use <= 1 + 1e-6, f"the plan asks {use:.2f}x of {port}"


def test_set_partitions_counts_bell_numbers() -> None:
    assert [sum(1 for _ in set_partitions(list(range(n)))) for n in range(7)] == [1, 1, 2, 5, 15, 52, 203]


def test_max_flow_on_a_hand_computed_network() -> None:
    nodes = [FlowNode(0, "prefill", 2.0), FlowNode(1, "prefill", 1.0), FlowNode(2, "decode", 5.0)]
    nodes.append(FlowNode(3, "colocated", 0.5))
    result = max_flow(nodes, lambda p, d: 1.5 if p == 0 else 4.0)
    # prefill 0 is held to 1.5 by its link, prefill 1 to its own 1.0, plus 0.5 colocated
    assert result.value == pytest.approx(3.0)
    rates = {(f.src, f.dst): f.rate for f in result.flows}
    assert rates[(0, 2)] == pytest.approx(1.5) and rates[(1, 2)] == pytest.approx(1.0)
    assert rates[(2, SINK)] == pytest.approx(2.5)


def test_max_flow_names_the_bottleneck() -> None:
    prefill_bound = max_flow([FlowNode(0, "prefill", 1.0), FlowNode(1, "decode", 9.0)], lambda p, d: 9.0)
    decode_bound = max_flow([FlowNode(0, "prefill", 9.0), FlowNode(1, "decode", 1.0)], lambda p, d: 9.0)
    link_bound = max_flow([FlowNode(0, "prefill", 9.0), FlowNode(1, "decode", 9.0)], lambda p, d: 1.0)
    assert (prefill_bound.bottleneck, decode_bound.bottleneck, link_bound.bottleneck) == ("prefill", "decode", "link")


def test_max_flow_shares_a_hosts_nic_among_its_groups() -> None:
    # prefill groups 0 and 1 on host a (2 req/s each) hand 1 GB of KV per request to decode group 2 on
    # host b; a's 3 GB/s egress carries 3 requests/s in all, though each pair's link alone carries 4
    nodes = [FlowNode(0, "prefill", 2.0), FlowNode(1, "prefill", 2.0), FlowNode(2, "decode", 10.0)]
    kv = {("a", "out"): 1e9, ("b", "in"): 1e9}
    nics = NicLimits({}, lambda p, d: kv, {("a", "out"): 3e9, ("b", "in"): 100e9})
    result = max_flow(nodes, lambda p, d: 4.0, nics)
    assert result.value == pytest.approx(3.0)
    assert result.bottleneck == "network"
    assert result.nic_use == pytest.approx(1.0)
    assert result.saturated == {0, 1, 2}
    assert max_flow(nodes, lambda p, d: 4.0).value == pytest.approx(4.0)  # no NICs: each link alone
    # a colocated group's own cross-host traffic counts too: 0.5 GB a request on a's egress
    coloc = [*nodes, FlowNode(3, "colocated", 4.0)]
    own = {3: {("a", "out"): 0.5e9}}
    both = max_flow(coloc, lambda p, d: 4.0, NicLimits(own, lambda p, d: kv, {("a", "out"): 3e9}))
    # the colocated group, at half the bytes a request, fills first: 4 x 0.5 GB, then 1 GB/s of KV is left
    assert both.value == pytest.approx(5.0)
    assert sum(f.rate for f in both.flows if f.src == 3) == pytest.approx(4.0)


def test_the_search_bound_never_cuts_off_a_better_flow() -> None:
    """Refinement skips candidates whose cheap NIC-aware bound is not above the best so far: the bound must hold."""
    checked = 0
    for seed in range(12):
        rng = random.Random(seed)
        hosts = [(rng.choice(["H100", "A100", "L40", "A6000"]), rng.randint(1, 4)) for _ in range(rng.randint(2, 4))]
        evaluator = Evaluator(het(*hosts, gbit=rng.choice([1.0, 10.0])), MODELS["llama-2-7b"], MIXED)
        ids = list(range(len(evaluator.cluster)))
        for _ in range(10):
            rng.shuffle(ids)
            cuts = sorted(rng.sample(range(1, len(ids)), rng.randint(0, len(ids) - 1)))
            parts = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True)]
            groups = [GroupSpec(tuple(sorted(p)), rng.choice(["prefill", "decode", "colocated"])) for p in parts]
            value = evaluator.evaluate(groups).value
            assert evaluator.upper_bound(groups) >= value * (1 - 1e-6)
            checked += value > 0
    assert checked > 50


def test_partition_cuts_the_slow_links() -> None:
    cluster = het(("A100", 4), ("A100", 4), ("L40", 4), ("L40", 4))
    usable = [g.memory_gb * 1e9 for g in cluster.gpus]
    groups = partition(cluster, range(len(cluster)), 4, 100e9, usable)
    assert sorted(sorted({cluster.gpus[g].host for g in grp}) for grp in groups) == [[h] for h in sorted(cluster.hosts)]


def test_partition_keeps_every_group_above_the_replica_memory() -> None:
    cluster = het(("H100", 2), ("A100", 4), ("L40", 6), ("A6000", 8))
    usable = [g.memory_gb * 0.9e9 - 1e9 for g in cluster.gpus]
    for k in (2, 3):
        groups = partition(cluster, range(len(cluster)), k, 150e9, usable)
        assert sorted(g for grp in groups for g in grp) == list(range(len(cluster)))
        assert all(sum(usable[g] for g in grp) >= 150e9 for grp in groups)


def test_every_system_on_het4_keeps_its_own_rules() -> None:
    cluster = het(("H100", 2), ("A100", 4), ("L40", 6), ("A6000", 8))
    model = MODELS["llama-2-70b"]
    alone = planner.plan(cluster, model, MIXED)
    colocate = planner.plan_colocate(cluster, model, MIXED)
    live = planner.plan_live(cluster, model, MIXED)
    for plan in (alone, colocate, live):
        assert_valid(plan, cluster, model, MIXED)
    assert {g.role for g in alone.groups} <= {"prefill", "decode"}, "HexGen-2 alone never colocates"
    assert live.throughput == max(alone.throughput, colocate.throughput)
    distserve = baselines.distserve(cluster, model, MIXED)
    assert_valid(distserve, cluster, model, MIXED)
    configs = set()
    for g in distserve.groups:
        assert len({cluster.gpus[i].type for i in g.gpus}) == 1, "a DistServe group is homogeneous"
        assert (
            len({s.tp for s in g.stages}) == 1
            and max(s.num_layers for s in g.stages) - min(s.num_layers for s in g.stages) <= 1
        ), "DistServe splits layers evenly over equal stages"
        configs.add((g.role, g.stages[0].tp, g.pp))
    assert len(configs) == len({role for role, _, _ in configs}), "one configuration per phase"
    hexgen = baselines.hexgen(cluster, model, MIXED)
    assert_valid(hexgen, cluster, model, MIXED)
    assert {g.role for g in hexgen.groups} == {"colocated"}
    assert_valid(baselines.naive(cluster, model, MIXED), cluster, model, MIXED)


def _batch(seed: int, count: int) -> Workload:
    rng = random.Random(seed)
    return Workload("batch", tuple(Request(0.0, rng.randint(400, 2000), rng.randint(100, 600)) for _ in range(count)))


def test_offline_tie_break_replays_a_held_out_sample() -> None:
    """The max-flow value is a steady-state rate; an offline batch also pays ramp-up and drain. Among the
    finalists within the tie band of the best rate, the one that finishes the held-out batch soonest wins."""
    cluster = build_cluster(
        [HostSpec("h0", "L40", 1), HostSpec("h1", "L40", 1), HostSpec("h2", "L40", 2), HostSpec("h3", "L40", 4)], 10.0
    )
    model = MODELS["llama-2-7b"]
    scored, holdout = _batch(5, 400), _batch(6, 300)
    evaluator = Evaluator(cluster, model, scored)
    found = planner.finalists(evaluator, planner.SearchBudget(), random.Random(0))
    found += baselines.hexgen_candidates(evaluator) + baselines.distserve_candidates(evaluator)
    band = 0.05
    chosen, meta = select(evaluator, found, tie_band=band, holdout=holdout)
    top = max(found, key=lambda e: e.key())
    tied = [e for e in found if e.value >= top.value * (1 - band)]
    assert meta["tie_break"]["tied"] == len({e.assignment for e in tied}) >= 2
    assert meta["tie_break"]["holdout_requests"] == 300
    assert chosen.value >= top.value * (1 - band)
    replay = {e.assignment: simulate(evaluator.to_plan(e), evaluator.cost, holdout).tokens_per_s for e in tied}
    assert replay[chosen.assignment] == max(replay.values()) == meta["tie_break"]["simulated_tokens_per_s"]
    assert select(evaluator, found, tie_band=band)[0] is top, "no held-out sample, no tie-break"


def test_online_plans_keep_the_best_predicted_rate() -> None:
    """Online every plan that keeps up serves the same requests; the rule never trades peak rate for it."""
    cluster = build_cluster([HostSpec("h0", "A100", 2), HostSpec("h1", "L40", 2), HostSpec("h2", "A6000", 4)], 10.0)
    model = MODELS["llama-2-7b"]
    batch = _batch(7, 300)
    peak = planner.plan(cluster, model, batch, budget=planner.SearchBudget(tie_band=0))
    online = Workload(
        "online", tuple(Request(i * 0.37, r.prompt_tokens, r.output_tokens) for i, r in enumerate(batch.requests))
    ).at_rate(0.1 * peak.throughput)
    plan = planner.plan(cluster, model, batch, holdout=online)
    assert "tie_break" not in plan.meta
    assert plan.throughput == peak.throughput
    for baseline in (baselines.distserve, baselines.hexgen, baselines.naive):
        assert "tie_break" not in baseline(cluster, model, batch, holdout=online).meta


def test_plan_is_deterministic_for_a_seed() -> None:
    cluster = het(("A100", 4), ("L40", 6), ("A6000", 4))
    model = MODELS["llama-2-13b"]
    a = planner.plan(cluster, model, MIXED, seed=3).to_dict()
    b = planner.plan(cluster, model, MIXED, seed=3).to_dict()
    for d in (a, b):
        d["meta"].pop("seconds")
    assert a == b


def test_a_cluster_too_small_for_one_replica_is_refused() -> None:
    with pytest.raises(PlanError, match="cannot hold one replica"):
        planner.plan(het(("L40", 2)), MODELS["llama-2-70b"], MIXED)


def test_a_single_gpu_swarm_is_planned_colocated() -> None:
    cluster = het(("A100", 1))
    model = MODELS["llama-2-7b"]
    with pytest.raises(PlanError):
        planner.plan(cluster, model, MIXED)
    live = planner.plan_live(cluster, model, MIXED)
    assert [g.role for g in live.groups] == ["colocated"]
    assert live.throughput > 0
    assert_valid(live, cluster, model, MIXED)


def test_replan_after_a_leave_and_a_join_moves_few_gpus() -> None:
    cluster = het(("A100", 8), ("L40", 8), ("A6000", 8), ("H100", 4))
    model = MODELS["llama-2-13b"]
    first = planner.plan(cluster, model, MIXED)
    leaving = first.groups[0].gpus[-1]
    smaller, _ = cluster.without([leaving])
    after_leave = planner.replan(first, cluster, smaller, model, MIXED)
    assert_valid(after_leave, smaller, model, MIXED)
    assert after_leave.meta["moved_gpus"] <= len(smaller) // 4
    assert after_leave.throughput >= 0.8 * first.throughput
    bigger = het(("A100", 8), ("L40", 8), ("A6000", 8), ("H100", 4), ("H100", 4))
    after_join = planner.replan(first, cluster, bigger, model, MIXED)
    assert_valid(after_join, bigger, model, MIXED)
    assert after_join.throughput > first.throughput
    assert after_join.meta["moved_gpus"] <= len(cluster) // 4


def test_planner_is_close_to_exhaustive_search_on_a_small_cluster() -> None:
    cluster = het(("A100", 2), ("L40", 2), ("A6000", 3))
    model = MODELS["llama-2-13b"]
    best = exhaustive_best(Evaluator(cluster, model, MIXED), roles=("prefill", "decode"))
    assert best is not None
    plan = planner.plan(cluster, model, MIXED)
    assert plan.throughput <= best.value * (1 + 1e-9)
    assert plan.throughput >= 0.9 * best.value


GPU_NAMES = st.sampled_from(["H100", "A100", "L40", "A6000"])
HOSTS = st.lists(st.tuples(GPU_NAMES, st.integers(1, 4)), min_size=1, max_size=4)
LENGTHS = st.lists(st.tuples(st.integers(16, 3000), st.integers(1, 500)), min_size=1, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hosts=HOSTS,
    lengths=LENGTHS,
    model=st.sampled_from(["llama-2-7b", "llama-2-13b", "opt-30b"]),
    gbit=st.sampled_from([1.0, 10.0, 100.0]),
)
def test_plans_on_random_clusters_keep_every_invariant(
    hosts: list[tuple[str, int]], lengths: list[tuple[int, int]], model: str, gbit: float
) -> None:
    cluster = het(*hosts, gbit=gbit)
    workload = Workload("random", tuple(Request(0.0, p, o) for p, o in lengths))
    spec = MODELS[model]
    try:
        plan = planner.plan(cluster, spec, workload, budget=planner.SearchBudget(refine_steps=8))
    except PlanError:
        assume(False)
    assert plan.throughput > 0
    assert_valid(plan, cluster, spec, workload)
    again = planner.plan(cluster, spec, workload, budget=planner.SearchBudget(refine_steps=8))
    assert again.groups == plan.groups and again.flows == plan.flows


def labelled_partition(cluster: Cluster, model: ModelSpec, k: int) -> tuple[Evaluator, Evaluation]:
    """A fresh evaluator and the planner's labelled partition of ``cluster`` into ``k`` groups."""
    evaluator = Evaluator(cluster, model, MIXED)
    groups = partition(cluster, [g.id for g in cluster.gpus], k, evaluator.replica_bytes(), evaluator.usable)
    return evaluator, planner.label_roles(evaluator, groups)


def test_the_search_stops_at_its_evaluation_budget() -> None:
    cluster = het(("A100", 4), ("L40", 6), ("A6000", 4))
    model = MODELS["llama-2-13b"]

    def refined_evaluations(limit: int) -> tuple[int, int]:
        evaluator, start = labelled_partition(cluster, model, 3)
        before = evaluator.evaluations
        budget = SearchBudget(gpu_evaluations=(before + limit) * len(cluster))
        refine(evaluator, start, budget, random.Random(0), planner.DISAGGREGATED)
        return before, evaluator.evaluations

    before, after = refined_evaluations(5)
    assert after <= before + 5 + 1  # the start, re-scored with searched layouts, may add one
    assert refined_evaluations(10_000)[1] > before + 6


def test_a_step_draws_more_of_a_neighbourhood_only_when_its_first_sample_left_some_out() -> None:
    cluster = het(("A100", 8), ("L40", 8), ("A6000", 8))
    evaluator = Evaluator(cluster, MODELS["llama-2-13b"], MIXED)
    groups = partition(cluster, [g.id for g in cluster.gpus], 4, evaluator.replica_bytes(), evaluator.usable)
    current = planner.label_roles(evaluator, groups)
    wide = Moves(evaluator, random.Random(0), 20, planner.DISAGGREGATED)
    assert len(wide.neighbours(current)) == 20
    again = wide.neighbours(current, draw=1)
    assert 0 < len(again) <= 20
    everything = Moves(evaluator, random.Random(0), 100_000, planner.DISAGGREGATED)
    assert everything.neighbours(current, draw=1) == []


def test_a_large_cluster_is_planned_from_its_cells_and_refined_whole() -> None:
    cluster = het(("A100", 4), ("L40", 4), ("A6000", 4), ("H100", 4), ("L40", 2), ("A100", 2))
    model = MODELS["llama-2-13b"]
    budget = SearchBudget(cells_above=8, cell_gpus=6, seeds_refined=1, k_values=4)
    evaluator = Evaluator(cluster, model, MIXED)
    union = planner._cells_union(evaluator, budget, random.Random(0), planner.DISAGGREGATED)
    cells = partition(cluster, [g.id for g in cluster.gpus], 4, evaluator.replica_bytes(), evaluator.usable)
    cell_of = {g: i for i, cell in enumerate(cells) for g in cell}
    assert len({cell_of[g] for spec in union for g in spec.gpus}) > 1
    assert all(len({cell_of[g] for g in spec.gpus}) == 1 for spec in union), "a cell's plan left its cell"
    start = evaluator.evaluate(union)
    found = planner.finalists(evaluator, budget, random.Random(0))
    assert len(found) == 1 and found[0].value >= start.value > 0
    plan = planner.plan(cluster, model, MIXED, budget=budget)
    assert_valid(plan, cluster, model, MIXED)


def test_first_improvement_takes_the_first_move_of_a_sampled_neighbourhood_that_gains() -> None:
    cluster = het(("A100", 8), ("L40", 8), ("A6000", 8))
    model = MODELS["llama-2-13b"]

    def first_step(first: bool) -> tuple[int, float]:
        evaluator, start = labelled_partition(cluster, model, 4)
        before = evaluator.evaluations
        budget = SearchBudget(refine_steps=1, candidates_per_step=40, first_improvement=first, resamples=0)
        found = refine(evaluator, start, budget, random.Random(0), planner.DISAGGREGATED)
        return evaluator.evaluations - before, found.value / start.value

    steepest, first = first_step(False), first_step(True)
    assert first[1] > 1 and steepest[1] >= first[1]
    assert first[0] < steepest[0]
