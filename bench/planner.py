"""Planner benchmark: HexGen-2 alone, its colocating variant and the baselines, each plan replayed in one simulator.

For each reference setting x interconnect (10 and 100 Gbit/s NICs) x model x workload every system plans
the same way: from the lengths of a held-out sample of the trace (the odd-numbered requests), with the
same selection rule and the same held-out offline tie-break; then the scored requests (a sample of the
even-numbered ones) are replayed through each plan in the discrete-event simulator. Online rows offer
75 % of the best predicted peak among the systems. Each plan's busiest host NIC is checked against its
capacity at the plan's own flows (a plan above 1.0 is a bug the bench reports and fails on).
``distserve_8xh100`` is DistServe on 8 x H100 (the same hourly budget). Then planner time versus cluster
size, the incremental re-plan time, and HexGen-2's gap to exhaustive search on small random clusters.

    python bench/planner.py [--quick] [--json OUT] [--trace PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hexgen.coordinator import baselines, planner
from hexgen.coordinator.bound import flow_upper_bound
from hexgen.coordinator.cluster import Cluster, HostSpec, build_cluster, load_cluster_toml
from hexgen.coordinator.cost import CostModel, LengthStats
from hexgen.coordinator.evaluate import Evaluator, PlanError
from hexgen.coordinator.exhaustive import exhaustive_best
from hexgen.coordinator.network import plan_nic_use
from hexgen.coordinator.plan import Plan
from hexgen.coordinator.simulator import simulate
from hexgen.coordinator.specs import MODELS, ModelSpec
from hexgen.coordinator.workload import WORKLOAD_KINDS, Request, Workload, load_trace, workload_from_trace

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT.parent / "shared" / "data" / "AzureLLMInferenceTrace_conv.csv"
SETTINGS = ("het-1", "het-2", "het-3", "het-4", "het-5")
INTERCONNECTS = ("10g", "100g")
BENCH_MODELS = ("opt-30b", "llama-2-70b")
SYSTEMS = ("hexgen2", "hexgen2_colocate", "distserve", "distserve_8xh100", "hexgen", "naive")
SAME_CLUSTER = ("distserve", "hexgen", "naive")
ONLINE_LOAD = 0.75
HOLDOUT_REQUESTS = 2000
Planner = Callable[..., Plan]
PLANNERS: dict[str, Planner] = {
    "hexgen2": planner.plan,
    "hexgen2_colocate": planner.plan_colocate,
    "distserve": baselines.distserve,
    "distserve_8xh100": baselines.distserve,
    "hexgen": baselines.hexgen,
    "naive": baselines.naive,
}


def load_setting(name: str, interconnect: str = "10g") -> Cluster:
    suffix = "" if interconnect == "10g" or name == "homogeneous" else f"-{interconnect}"
    return load_cluster_toml((ROOT / "bench" / "clusters" / f"{name}{suffix}.toml").read_text(), name + suffix)


def steady_tokens_per_s(first_token: tuple[float, ...], finish: tuple[float, ...], outputs: list[int]) -> float:
    """Output tokens/s between 20 % and 80 % of completions: the run without its ramp-up and drain.

    Each request's tokens are spread evenly from its first token to its finish. O(n log n).
    """
    done = sorted(f for f in finish if f != float("inf"))
    if len(done) < 5:
        return 0.0
    t1, t2 = done[len(done) // 5], done[(4 * len(done)) // 5]
    if t2 <= t1:
        return 0.0
    tokens = 0.0
    for start, end, out in zip(first_token, finish, outputs, strict=True):
        if end == float("inf"):
            continue
        if end <= start:
            tokens += out if t1 <= end <= t2 else 0
            continue
        overlap = max(0.0, min(end, t2) - max(start, t1))
        tokens += out * overlap / (end - start)
    return tokens / (t2 - t1)


def plan_all(clusters: dict[str, Cluster], model: ModelSpec, lengths: Workload, holdout: Workload) -> dict:
    """Every system's plan (None when it finds none) and its planning seconds, all planned the same way."""
    plans: dict = {}
    for name in SYSTEMS:
        started = time.perf_counter()
        try:
            plans[name] = PLANNERS[name](clusters[name], model, lengths, holdout=holdout)
        except PlanError:
            plans[name] = None
        plans[name + "_seconds"] = time.perf_counter() - started
    return plans


def bench_row(setting: str, interconnect: str, model_name: str, kind: str, trace: tuple, count: int) -> dict:
    model = MODELS[model_name]
    het = load_setting(setting, interconnect)
    clusters = {name: het for name in SYSTEMS} | {"distserve_8xh100": load_setting("homogeneous")}
    scored = workload_from_trace(trace[0::2], kind, count, seed=1, max_context=model.max_context)
    held = workload_from_trace(trace[1::2], kind, HOLDOUT_REQUESTS, seed=2, max_context=model.max_context)
    # every system plans from the held-out lengths; the offline tie-break replays the held-out batch
    plans = plan_all(clusters, model, held.offline(), held.offline() if kind != "online" else held)
    replay = scored
    if kind == "online":
        peak = max(p.throughput for name in SYSTEMS if (p := plans[name]) is not None)
        replay = scored.at_rate(ONLINE_LOAD * peak)
    row: dict = {"setting": setting, "interconnect": interconnect, "model": model_name, "workload": kind}
    outputs = [r.output_tokens for r in replay.requests]
    for field in ("predicted_tokens_per_s", "steady_tokens_per_s", "nic_use", "nic_port", "latency", "seconds"):
        row[field] = {}
    for name in SYSTEMS:
        plan = plans[name]
        row["seconds"][name] = plans[name + "_seconds"]
        if plan is None:
            row[name] = 0.0
            continue
        cost = CostModel(clusters[name], model, LengthStats.of(held))
        result = simulate(plan, cost, replay)
        row[name] = result.tokens_per_s
        row["steady_tokens_per_s"][name] = steady_tokens_per_s(result.first_token_s, result.finish_s, outputs)
        row["predicted_tokens_per_s"][name] = plan.throughput * held.mean_output
        row["nic_use"][name], row["nic_port"][name] = plan_nic_use(plan, cost)
        row["latency"][name] = {"ttft_mean_s": result.ttft_mean_s, "latency_mean_s": result.latency_mean_s}
    row["layouts"] = {
        name: [f"{g.role} {len(g.gpus)} {g.layout()}" for g in plans[name].groups]
        for name in ("hexgen2", "distserve")
        if plans[name] is not None
    }
    row["bottleneck"] = {name: plans[name].bottleneck for name in SYSTEMS if plans[name] is not None}
    return row


def mixed_cluster(n: int, rng: random.Random, host_sizes: tuple[int, ...] = (2, 4, 8)) -> Cluster:
    """``n`` GPUs on hosts of random sizes, each host of one random GPU type, 10 Gbit/s NICs."""
    hosts: list[HostSpec] = []
    left = n
    while left:
        count = min(left, rng.choice(host_sizes))
        hosts.append(HostSpec(f"h{len(hosts)}", rng.choice(["H100", "A100", "L40", "A6000"]), count))
        left -= count
    return build_cluster(hosts, name=f"mixed-{n}")


def bench_scaling(sizes: list[int], trace: tuple[Request, ...]) -> tuple[list[dict], float]:
    model = MODELS["llama-2-70b"]
    workload = workload_from_trace(trace, "online", 1000, seed=1, max_context=model.max_context)
    rows = []
    replan_seconds = float("nan")
    for n in sizes:
        cluster = mixed_cluster(n, random.Random(n))
        started, cpu = time.perf_counter(), time.process_time()
        plan = planner.plan(cluster, model, workload)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        bound = flow_upper_bound(Evaluator(cluster, model, workload))
        rows.append(
            {
                "gpus": n,
                "hosts": len(cluster.hosts),
                "seconds": seconds,
                "cpu_seconds": cpu,
                "groups": len(plan.groups),
                "evaluations": plan.meta["evaluations"],
                "requests_per_s": plan.throughput,
                "upper_bound": bound.value,
                "bound_whole_gpus": bound.integral,
                "gap_to_bound": bound.gap(plan.throughput),
                "bottleneck": plan.bottleneck,
            }
        )
        if n == 64:
            leaving = plan.groups[0].gpus[-1]
            smaller, _ = cluster.without([leaving])
            started, cpu = time.perf_counter(), time.process_time()
            after = planner.replan(plan, cluster, smaller, model, workload)
            replan_seconds = time.perf_counter() - started
            rows[-1]["replan_moved_gpus"] = after.meta["moved_gpus"]
            rows[-1]["replan_cpu_seconds"] = time.process_time() - cpu
    return rows, replan_seconds


def bench_optimality(instances: int, trace: tuple[Request, ...]) -> dict:
    """HexGen-2's gap to the exhaustive best prefill/decode assignment on random clusters of 4-8 GPUs."""
    gaps = []
    seed = 0
    while len(gaps) < instances:
        rng = random.Random(seed)
        seed += 1
        cluster = mixed_cluster(rng.randint(4, 8), rng, host_sizes=(1, 2, 4))
        model = MODELS[rng.choice(["llama-2-7b", "llama-2-13b", "opt-30b"])]
        workload = workload_from_trace(trace, rng.choice(WORKLOAD_KINDS), 300, seed=seed, max_context=model.max_context)
        best = exhaustive_best(Evaluator(cluster, model, workload), roles=planner.DISAGGREGATED)
        if best is None or best.value <= 0:
            continue
        found = planner.plan(cluster, model, workload).throughput
        gaps.append(max(0.0, 1 - found / best.value))
    return {"instances": len(gaps), "mean_gap": statistics.fmean(gaps), "max_gap": max(gaps)}


def ratio(row: dict, name: str) -> float:
    """``name``'s simulated tokens/s over the best baseline's on the same cluster (distserve, hexgen, naive)."""
    best = max(row[s] for s in SAME_CLUSTER)
    return row[name] / best if best > 0 else float("inf")


def print_rows(rows: list[dict]) -> None:
    short = {"hexgen2_colocate": "+coloc", "distserve_8xh100": "ds-8xH100", "distserve": "distserve"}
    head = f"{'setting':8} {'net':4} {'model':11} {'load':6} " + " ".join(f"{short.get(s, s):>9}" for s in SYSTEMS)
    print(head + f" {'hg2/best':>8} {'hg2/8xH100':>10} {'worst NIC':>9}")
    for r in rows:
        cells = " ".join(f"{r[s]:9.0f}" for s in SYSTEMS)
        nic = max(r["nic_use"].values(), default=0.0)
        same_budget = r["hexgen2"] / r["distserve_8xh100"] if r["distserve_8xh100"] > 0 else float("inf")
        print(
            f"{r['setting']:8} {r['interconnect']:4} {r['model']:11} {r['workload']:6} {cells} "
            f"{ratio(r, 'hexgen2'):7.2f}x {same_budget:9.2f}x {nic:9.2f}"
        )


def summarize(rows: list[dict]) -> dict:
    het14 = [r for r in rows if r["setting"] in ("het-1", "het-2", "het-3", "het-4")]
    summary: dict = {}
    for net in INTERCONNECTS:
        for name in ("hexgen2", "hexgen2_colocate"):
            ratios = [ratio(r, name) for r in het14 if r["interconnect"] == net]
            if ratios:
                summary[f"{name}_vs_best_baseline_het1_4_{net}"] = {
                    "mean": statistics.fmean(ratios),
                    "max": max(ratios),
                    "min": min(ratios),
                    "rows_below_1": sum(1 for x in ratios if x < 1 - 1e-9),
                    "rows": len(ratios),
                }
    summary["hexgen2_losses"] = [
        {
            "row": f"{r['setting']}/{r['interconnect']}/{r['model']}/{r['workload']}",
            "ratio": ratio(r, "hexgen2"),
            "winner": max(SAME_CLUSTER, key=lambda s: r[s]),
            "hexgen2_bottleneck": r["bottleneck"].get("hexgen2"),
            "hexgen2_worst_nic": r["nic_port"].get("hexgen2"),
        }
        for r in rows
        if ratio(r, "hexgen2") < 1 - 1e-9
    ]
    summary["nic_violations"] = [
        f"{r['setting']}/{r['interconnect']}/{r['model']}/{r['workload']}/{s}: {u:.3f} of {r['nic_port'][s]}"
        for r in rows
        for s, u in r["nic_use"].items()
        if u > 1 + 1e-6
    ]
    return summary


def het5_resources() -> dict:
    """het-5's aggregate TFLOPS, HBM bandwidth and memory over 8 x H100's."""
    het5, h100 = load_setting("het-5"), load_setting("homogeneous")
    return {
        key: sum(getattr(g, attr) for g in het5.gpus) / sum(getattr(g, attr) for g in h100.gpus)
        for key, attr in (("tflops", "tflops"), ("hbm_bandwidth", "hbm_gbps"), ("memory", "memory_gb"))
    } | {"price": het5.price_per_hour / h100.price_per_hour}


def report(rows: list[dict], summary: dict, scaling: list[dict], replan_seconds: float, optimality: dict) -> None:
    print("Simulated output tokens/s (same scored requests through every plan; online at 75 % of the best peak)")
    print_rows(rows)
    for key, value in summary.items():
        if key.startswith("hexgen2") and isinstance(value, dict):
            print(
                f"{key}: mean {value['mean']:.2f}x, max {value['max']:.2f}x, min {value['min']:.2f}x, "
                f"below 1 in {value['rows_below_1']} of {value['rows']}"
            )
    resources = het5_resources()
    print("het-5 over 8 x H100: " + ", ".join(f"{k} {v:.2f}" for k, v in resources.items()))
    for r in rows:
        if r["setting"] == "het-5" and r["distserve_8xh100"] > 0:
            print(
                f"  het-5/{r['interconnect']}/{r['model']}/{r['workload']}: hexgen2 / distserve_8xh100 = "
                f"{r['hexgen2'] / r['distserve_8xh100']:.2f}"
            )
    print("\nPlanner time (mixed clusters, llama-2-70b):")
    for s in scaling:
        kind = "whole-GPU" if s["bound_whole_gpus"] else "LP"
        print(
            f"  {s['gpus']:4d} GPUs on {s['hosts']} hosts: {s['seconds']:6.2f} s ({s['cpu_seconds']:.2f} s CPU), "
            f"{s['groups']} groups, "
            f"{s['evaluations']} evaluations, {s['requests_per_s']:.1f} req/s, {kind} bound "
            f"{s['upper_bound']:.1f} (gap {s['gap_to_bound']:.1%}, bottleneck {s['bottleneck']})"
        )
    print(f"  re-plan after one GPU leaves a 64-GPU plan: {replan_seconds:.2f} s")
    print(
        f"\nHexGen-2 vs exhaustive prefill/decode search ({optimality['instances']} clusters of 4-8 GPUs): "
        f"mean gap {optimality['mean_gap']:.2%}, worst {optimality['max_gap']:.2%}"
    )
    print(f"NIC over capacity: {summary['nic_violations'] or 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset that runs in under a minute")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Azure LLM inference trace CSV")
    args = parser.parse_args(argv)
    if not args.trace.is_file():
        print(f"bench/planner.py: error: trace not found: {args.trace} (pass --trace)", file=sys.stderr)
        return 2
    trace = load_trace(args.trace)
    if args.quick:
        settings, models, kinds, count = ("het-4",), ("llama-2-70b",), ("LPHD", "online"), 4000
        sizes, instances = [16], 3
    else:
        settings, models, kinds, count = SETTINGS, BENCH_MODELS, WORKLOAD_KINDS, 4000
        sizes, instances = [16, 64, 256], 10
    rows = []
    for setting in settings:
        for net in INTERCONNECTS:
            for model_name in models:
                for kind in kinds:
                    rows.append(bench_row(setting, net, model_name, kind, trace, count))
                    print(f"  {setting}/{net}/{model_name}/{kind}: {ratio(rows[-1], 'hexgen2'):.2f}x", file=sys.stderr)
    summary = summarize(rows)
    scaling, replan_seconds = bench_scaling(sizes, trace)
    optimality = bench_optimality(instances, trace)
    report(rows, summary, scaling, replan_seconds, optimality)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "rows": rows,
            "scaling": scaling,
            "replan_seconds": replan_seconds,
            "optimality": optimality,
            "het5_over_8xh100": het5_resources(),
            "summary": summary,
            "run": {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                "quick": args.quick,
                "load_average_at_end": os.getloadavg()[0],  # other jobs on the machine inflate the wall times
            },
        }
        args.json.write_text(json.dumps(out, indent=1))
    return 1 if summary["nic_violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
