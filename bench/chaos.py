"""Chaos benchmark: a local swarm serving greedy requests while daemons are SIGKILLed and restarted, then under load.

Churn (tests/chaos.py, ``run_churn``): ``hexgen-node join`` daemons on loopback (simulated H100 / A100 / L40 /
A6000) serve stories260K. One in-process libp2p client sends requests to the entry daemon ``n0`` (never killed;
its key is made so that it never becomes the coordinator), ``in_flight`` at a time, while a killer SIGKILLs a
non-entry daemon every ``kill_every_s`` at the soonest (at most ``max_down`` down at once; in turn the
coordinator of the moment, a decode group's daemon when there is one, a random one), waits until the survivors
serve without it, restarts it with the same key file and host name (the same peer) and waits until it serves
again. Every request's tokens are checked against transformers' greedy output for its prompt: ``lost`` (no
final frame, or an error), ``duplicated_tokens`` / ``missing_tokens`` / ``wrong_tokens`` (an alignment with
the reference). A failover is the time from the SIGKILL until every surviving daemon serves one plan without
the victim, its workers ready (``failovers``); ``plan_s`` is until the entry adopted such a plan, ``back_s``
until the restarted daemon serves in the entry's plan again.

Scenarios: ``planner``: the planner's plan (for stories260K on these GPUs: one colocated group per daemon);
``disaggregated`` (full run only): a pinned layout, two TP1 prefill groups handing off to a decode group and
a PP=2 decode group, the entry outside it (while a pinned host is down, the planner's plan serves).

Load (after the planner scenario's churn, on the same swarm whole again; the entry runs with ``--http``):
``load_clients`` concurrent clients for ``load_duration_s``, half over the OpenAI API (``/v1/completions``,
every other request streamed, answers checked against the entry's greedy libp2p answer for the same text)
and half over libp2p (checked against the reference). ``load_errors`` counts failed and wrong answers;
``rss_growth_pct`` is the growth of the daemons' resident memory (the trio processes) from the end of the
warm-up to the end (``rss_growth_all_pct``: with their workers and stores).

The top-level keys sum the scenarios (latency percentiles over all their requests); ``scenarios`` holds
each one's summary and kills. ``--quick`` (under a minute): 4 daemons, 40 requests, 2 kills (the coordinator
and another), 20 clients for 5 s.

    python bench/chaos.py [--quick] [--json OUT] [--keep-logs]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from hexgen.testing import daemon_harness
from hexgen.testing.chaos import (
    DISAGGREGATED,
    ChurnConfig,
    ChurnResult,
    ChurnSwarm,
    LoadResult,
    percentile,
    run_churn,
    run_load,
)
from hexgen.testing.checkpoints import random_prompts, reference_greedy
from hexgen.testing.daemon_harness import interrupted, sigterm_as_interrupt

ROOT = Path(__file__).resolve().parents[1]

MODEL_DIR = ROOT.parent / "shared" / "models" / "stories260K"
OUT_DIR = ROOT / "bench" / "out"
PROMPT_SEED = 31
TEXTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park", "One day, a big bird", "The sun"]


@dataclass(frozen=True)
class Settings:
    quick: bool
    prompts: int  # distinct prompts, cycled over the requests
    max_tokens: int
    scenarios: dict[str, ChurnConfig]
    load_clients: int
    load_duration_s: float
    load_warmup_s: float


def settings(quick: bool) -> Settings:
    if quick:
        planner = ChurnConfig(
            daemons=4, requests=40, in_flight=8, max_tokens=24, kill_every_s=2.0, max_down=1, min_kills=2,
            max_kills=2, entry_http=True, serving_timeout_s=60.0,
        )  # fmt: skip
        return Settings(True, 8, 24, {"planner": planner}, 20, 5.0, 1.5)
    common = {"daemons": 6, "in_flight": 8, "max_tokens": 48, "kill_every_s": 3.0, "max_down": 2}
    return Settings(
        quick=False,
        prompts=24,
        max_tokens=48,
        scenarios={
            "planner": ChurnConfig(requests=200, min_kills=6, entry_http=True, **common),
            "disaggregated": ChurnConfig(requests=100, min_kills=4, pinned=DISAGGREGATED, **common),
        },
        load_clients=100,
        load_duration_s=60.0,
        load_warmup_s=10.0,
    )


# ------------------------------------------------------------------------------------------------- running


def run_scenario(
    name: str, config: ChurnConfig, prompts: list[list[int]], reference: list[list[int]], s: Settings, root: Path
) -> tuple[ChurnResult, LoadResult | None]:
    loads: list[LoadResult] = []

    async def load(swarm: ChurnSwarm, client: Any) -> None:
        print(f"  load: {s.load_clients} clients for {s.load_duration_s:.0f} s ...", file=sys.stderr, flush=True)
        loads.append(
            await run_load(
                swarm,
                client,
                prompts,
                reference,
                TEXTS,
                clients=s.load_clients,
                duration_s=s.load_duration_s,
                max_tokens=s.max_tokens,
                warmup_s=s.load_warmup_s,
            )
        )

    print(f"{name}: {config.daemons} daemons, {config.requests} requests ...", file=sys.stderr, flush=True)
    after = load if config.entry_http else None
    result = trio.run(run_churn, root, MODEL_DIR, prompts, reference, config, after)
    return result, (loads[0] if loads else None)


def scenario_row(name: str, result: ChurnResult) -> dict[str, Any]:
    failovers = [k.failover_s for k in result.kills if k.failover_s is not None]
    backs = [k.serving_s for k in result.kills if k.serving_s is not None]
    return {
        "scenario": name,
        "daemons": result.config.daemons,
        **result.summary(),
        "failover_median_s": round(statistics.median(failovers), 3) if failovers else None,
        "back_median_s": round(statistics.median(backs), 3) if backs else None,
        "kill_details": [
            {
                "victim": k.victim,
                "why": k.why,
                "was_coordinator": k.was_coordinator,
                "roles": k.roles,
                "at_s": round(k.at_s, 2),
                "in_flight": k.in_flight,
                "plan_s": _r(k.plan_without_s),
                "failover_s": _r(k.failover_s),
                "restart_s": _r(k.restart_s),
                "rejoin_s": _r(k.rejoin_s),
                "back_s": _r(k.serving_s),
                "processes_left": k.processes_left,
                "error": k.error,
            }
            for k in result.kills
        ],
        "config": {k: v for k, v in asdict(result.config).items() if k != "pinned"}
        | {"pinned": bool(result.config.pinned)},
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def totals(results: dict[str, ChurnResult], load: LoadResult | None) -> dict[str, Any]:
    """The issue's keys: the scenarios summed, the load phase's figures."""
    rows = [r.summary() for r in results.values()]
    latencies = [x for r in results.values() for x in r.latencies]
    out = {
        "requests": sum(r["requests"] for r in rows),
        "lost": sum(r["lost"] for r in rows),
        "duplicated_tokens": sum(r["duplicated_tokens"] for r in rows),
        "missing_tokens": sum(r["missing_tokens"] for r in rows),
        "wrong_tokens": sum(r["wrong_tokens"] for r in rows),
        "p50_latency_s": _r(percentile(latencies, 50)),
        "p99_latency_s": _r(percentile(latencies, 99)),
        "failovers": [f for r in rows for f in r["failovers"]],
        "load_clients": None,
        "load_errors": None,
        "rss_growth_pct": None,
    }
    if load is not None:
        out |= load.summary()
    return out


# ------------------------------------------------------------------------------------------------- report


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict[str, Any]], top: dict[str, Any], meta: dict[str, Any]) -> None:
    columns = [
        ("scenario", "scenario", 0),
        ("daemons", "daemons", 0),
        ("requests", "requests", 0),
        ("lost", "lost", 0),
        ("dup", "duplicated_tokens", 0),
        ("miss", "missing_tokens", 0),
        ("wrong", "wrong_tokens", 0),
        ("resubmit", "resubmitted", 0),
        ("p50_s", "p50_latency_s", 2),
        ("p99_s", "p99_latency_s", 2),
        ("kills", "kills", 0),
        ("coord", "coordinator_kills", 0),
        ("failover_s", "failover_median_s", 2),
        ("back_s", "back_median_s", 2),
        ("wall_s", "wall_s", 1),
    ]
    widths = [max(len(title), 8) for title, _, _ in columns]
    widths[0] = 14
    print(f"stories260K, {meta['cpu_count']} cores{', QUICK' if meta['quick'] else ''}; churn: SIGKILL + restart")
    header = " ".join(f"{title:>{w}}" for (title, _, _), w in zip(columns, widths, strict=True))
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = [fmt(row.get(key), digits) for _, key, digits in columns]
        print(" ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths, strict=True)))
        for kill in row["kill_details"]:
            print(
                f"{'':>14}   kill {kill['victim']} ({kill['why']}{', coordinator' if kill['was_coordinator'] else ''},"
                f" {'/'.join(kill['roles']) or 'no role'}, {kill['in_flight']} in flight) at {kill['at_s']:.1f} s:"
                f" plan {fmt(kill['plan_s'])} s, failover {fmt(kill['failover_s'])} s, restarted"
                f" {fmt(kill['restart_s'])} s, back {fmt(kill['back_s'])} s"
                + (f"  ERROR {kill['error']}" if kill["error"] else "")
            )
        for error in row.get("errors", []):
            print(f"{'':>14}   error: {error[:300]}")
    if top.get("load_clients"):
        print(
            f"load: {top['load_clients']} clients ({top['load_http_clients']} HTTP, the rest libp2p) for"
            f" {fmt(top['load_duration_s'], 0)} s: {top['load_requests']} requests ({fmt(top['load_requests_per_s'])}/s),"
            f" {top['load_errors']} errors ({top['load_mismatches']} wrong answers), p50 {fmt(top['load_p50_latency_s'])} s,"
            f" p99 {fmt(top['load_p99_latency_s'])} s; RSS growth {fmt(top['rss_growth_pct'])} % (daemons),"
            f" {fmt(top['rss_growth_all_pct'])} % (with workers)"
        )
        for sample in top.get("load_error_samples", []):
            print(f"      load error: {sample}")
    print(
        f"total: {top['requests']} requests, lost {top['lost']}, duplicated tokens {top['duplicated_tokens']},"
        f" p50 {fmt(top['p50_latency_s'])} s, p99 {fmt(top['p99_latency_s'])} s,"
        f" failovers {', '.join(fmt(f) for f in top['failovers'])} s"
    )
    print(
        "failover: SIGKILL until every survivor serves one plan without the victim (workers ready); back: until the"
        " restarted daemon serves in the entry's plan; resubmit: requests the entry re-submitted after a failed hop"
    )


def run_meta(s: Settings, argv: list[str]) -> dict[str, Any]:
    return {
        "quick": s.quick,
        "command": " ".join(["python", "bench/chaos.py", *argv]),
        "model": str(MODEL_DIR.name),
        "distinct_prompts": s.prompts,
        "max_tokens": s.max_tokens,
        "load": {"clients": s.load_clients, "duration_s": s.load_duration_s, "warmup_s": s.load_warmup_s},
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_version": importlib.metadata.version("torch"),
        "libp2p_version": importlib.metadata.version("libp2p"),
        "trio_version": importlib.metadata.version("trio"),
        "load_average_start": os.getloadavg()[0],
    }


def keep_logs(root: Path, name: str) -> None:
    target = OUT_DIR / "chaos-logs" / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(root, target, ignore=shutil.ignore_patterns("*.key"))
    print(f"  daemon logs kept in {target}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="4 daemons, 40 requests, 2 kills, a 5 s load: under a minute"
    )
    parser.add_argument(
        "--json", type=Path, default=OUT_DIR / "chaos.json", help="results (default bench/out/chaos.json)"
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep daemon logs in bench/out/chaos-logs (always on error)"
    )
    args = parser.parse_args(argv)
    if not (MODEL_DIR / "config.json").exists():
        print(f"chaos: the stories260K checkpoint is absent ({MODEL_DIR})", file=sys.stderr)
        return 2
    for noisy in ("libp2p", "multiaddr", "async_service", "httpx"):  # the client's own dial and stream failures
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    s = settings(args.quick)
    daemon_harness.READY_TIMEOUT_S = max(daemon_harness.READY_TIMEOUT_S, 120.0)
    meta = run_meta(s, argv)
    started = time.perf_counter()
    prompts = random_prompts(s.prompts, 512, seed=PROMPT_SEED, low=3, high=30)
    reference = reference_greedy(MODEL_DIR, prompts, s.max_tokens)
    meta["reference_s"] = round(time.perf_counter() - started, 1)
    results: dict[str, ChurnResult] = {}
    load: LoadResult | None = None
    rows: list[dict[str, Any]] = []
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="hexgen-chaos-") as tmp:
        for name, config in s.scenarios.items():
            root = Path(tmp) / name
            try:
                result, scenario_load = run_scenario(name, config, prompts, reference, s, root)
            except Exception as exc:  # noqa: BLE001 - a scenario's failure, whatever it is, ends the run with its logs kept
                keep_logs(root, name)
                print(f"{name}: failed: {exc!r}", file=sys.stderr)
                return 1
            results[name] = result
            load = load or scenario_load
            rows.append(scenario_row(name, result))
            if args.keep_logs or result.errors or result.lost:
                keep_logs(root, name)
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)
    meta["load_average_end"] = os.getloadavg()[0]
    top = totals(results, load)
    print_table(rows, top, meta)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(top | {"scenarios": rows, "meta": meta}, indent=1))
    print(f"wrote {args.json} ({meta['wall_seconds']:.1f} s)")
    broken = top["lost"] or top["duplicated_tokens"] or top["missing_tokens"] or top["wrong_tokens"]
    return 1 if broken or top["load_errors"] or any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BaseException as exc:
        if not interrupted(exc):
            raise
        print("interrupted: every daemon started here was killed", file=sys.stderr)
        sys.exit(130)
