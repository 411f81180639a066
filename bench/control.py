"""Control-plane benchmark: convergence, failover, join re-plan, idle CPU and RSS of real hexgen daemons.

For each swarm size it starts that many ``hexgen-node join`` daemons on loopback (simulated GPUs cycling
A100 / H100 / L40x2 / A6000x2, model llama-2-7b) through the test harness (tests/daemon_harness.py) and
measures, polling every daemon's ``/hexgen/status/1`` from an in-process libp2p client:

* converge_s: from the last daemon's ready line until every daemon sees every other, all agree on one
  coordinator and all adopted one plan for exactly those members (``converge_total_s``: from the first
  daemon's start);
* idle_cpu_pct / rss_mb: after convergence, with the client closed (no polling), the median over daemons
  of CPU time (/proc/PID/stat utime+stime) per second of wall time, in percent of one core, and of VmRSS;
* failover_s: from SIGKILL of the coordinator until a plan of a newer term without it is adopted everywhere;
* join_replan_s: from a new daemon's ready line until a plan including it is adopted everywhere.

``failover_converged_s`` and ``join_converged_s`` wait for the full converge condition instead (also every
member table exact), which a stale advert of the dead node replayed by gossip to the joiner can delay.

Polled times are upper bounds (the end of the first poll round that saw the state; ``poll_round_s`` is
the resolution); the ``*_log_s`` fields are when the last daemon logged adopting that plan (its log's
millisecond timestamps), free of the polling delay. Prints a table with the targets and writes JSON.
--quick: 4 daemons only and a 3 s idle window (under a minute); --sizes overrides the sizes. Daemon logs
are kept in bench/out/control-logs/nN for a size that failed, and for every size with --keep-logs.

    python bench/control.py [--quick] [--json OUT] [--sizes 4,8,16] [--keep-logs]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from hexgen.testing import daemon_harness
from hexgen.testing.daemon_harness import (
    Daemon,
    Swarm,
    interrupted,
    open_client,
    sigterm_as_interrupt,
    statuses,
)

ROOT = Path(__file__).resolve().parents[1]

OUT_DIR = ROOT / "bench" / "out"
MODEL = "llama-2-7b"
GPUS = ("A100", "H100", "L40x2", "A6000x2")
SIZES = (4, 8, 16)
QUICK_SIZES = (4,)
IDLE_WINDOW_S = 30.0
QUICK_IDLE_WINDOW_S = 3.0
SETTLE_S = 1.0  # after convergence, before the idle window: lets the last client streams and replies drain
POLL_S = 0.1
READY_TIMEOUT_S = 180.0
START_CONCURRENCY = max(2, os.cpu_count() or 2)
CONVERGE_TARGET_S = 3.0
FAILOVER_TARGET_S = 5.0
IDLE_CPU_TARGET_PCT = 2.0
TARGET_NODES = 16
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOG_TIME = re.compile(r"ts=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z ")

Statuses = dict[str, dict[str, Any] | None]
BRIEF = {"brief": True}  # membership, coordinator and adopted plan only: polling 16 daemons stays light
Check = Callable[[Statuses], bool]


class BenchError(Exception):
    """A phase that did not reach its state in time, or a daemon that did not start."""


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    quick: bool
    idle_window_s: float
    keep_logs: bool


@dataclass(frozen=True)
class Seen:
    """One daemon set's statuses that satisfied a condition, and the wall-clock poll round that saw them."""

    view: Statuses
    began: float
    ended: float

    def any(self) -> dict[str, Any]:
        return next(s for s in self.view.values() if s is not None)


# ------------------------------------------------------------------------------------------------- conditions


def plan_adopted(ids: set[str], newer_than_term: int = 0) -> Check:
    """Every daemon answers and adopted one plan (same term and epoch) for exactly ``ids``, by one of them."""

    def check(view: Statuses) -> bool:
        if not view or any(s is None for s in view.values()):
            return False
        plans = [s["plan"] for s in view.values() if s is not None]
        return (
            None not in plans
            and len({(p["term"], p["epoch"]) for p in plans}) == 1
            and all(set(p["members"]) == ids and p["coordinator"] in ids for p in plans)
            and plans[0]["term"] > newer_than_term
        )

    return check


def converged(ids: set[str], newer_than_term: int = 0) -> Check:
    """``plan_adopted``, and every daemon sees exactly ``ids`` and the same live coordinator (one claims it)."""
    adopted = plan_adopted(ids, newer_than_term)

    def check(view: Statuses) -> bool:
        if not adopted(view):
            return False
        states = [s for s in view.values() if s is not None]
        coordinators = {s["coordinator"] for s in states}
        return (
            len(coordinators) == 1
            and coordinators <= ids
            and all(set(s["members"]) == ids for s in states)
            and sum(bool(s["is_coordinator"]) for s in states) == 1
        )

    return check


def brief(view: Statuses) -> str:
    """A short account of a swarm that has not converged, for error messages."""
    parts = []
    for peer_id, s in view.items():
        if s is None:
            parts.append(f"{peer_id[-6:]}: no answer")
            continue
        plan = s.get("plan") or {}
        parts.append(
            f"{peer_id[-6:]}: {len(s['members'])} members, coordinator {(s.get('coordinator') or '-')[-6:]}, "
            f"plan {plan.get('term')}/{plan.get('epoch')} for {len(plan.get('members') or [])}"
        )
    return "; ".join(parts)


async def wait_for(client: Any, daemons: list[Daemon], checks: dict[str, Check], within_s: float) -> dict[str, Seen]:
    """Poll all ``daemons`` every POLL_S until each check has held once; the first round that saw each.

    Raises BenchError when some check has not held within ``within_s`` seconds.
    """
    deadline = time.time() + within_s
    found: dict[str, Seen] = {}
    view: Statuses = {}
    while time.time() < deadline:
        began = time.time()
        view = await statuses(client, daemons, BRIEF)
        ended = time.time()
        for name, check in checks.items():
            if name not in found and check(view):
                found[name] = Seen(view, began, ended)
        if len(found) == len(checks):
            return found
        await trio.sleep(POLL_S)
    missing = ", ".join(name for name in checks if name not in found)
    raise BenchError(f"not {missing} within {within_s:.0f} s: {brief(view)}")


def phase_timeout(nodes: int) -> float:
    return 30.0 + 5.0 * nodes


# ------------------------------------------------------------------------------------------------- daemons


def start_one(swarm: Swarm, name: str, gpu: str, bootstrap: str | None) -> tuple[Daemon, float]:
    """Start one daemon (blocks until its ready line); returns it and the wall time the line was read."""
    daemon = swarm.start(name, bootstrap=[bootstrap] if bootstrap else None, gpu=gpu)
    return daemon, time.time()


async def start_swarm(swarm: Swarm, nodes: int) -> tuple[list[Daemon], float]:
    """The first daemon, then the others bootstrapped on it, as many at a time as there are cores (start-up
    is CPU-bound: more at once would only starve the running daemons); returns the last ready time."""
    first, first_ready = await trio.to_thread.run_sync(start_one, swarm, "n0", GPUS[0], None)
    started: list[tuple[Daemon, float]] = [(first, first_ready)]
    limiter = trio.CapacityLimiter(START_CONCURRENCY)

    async def start(i: int) -> None:
        gpu = GPUS[i % len(GPUS)]
        started.append(await trio.to_thread.run_sync(start_one, swarm, f"n{i}", gpu, first.addr, limiter=limiter))

    async with trio.open_nursery() as nursery:
        for i in range(1, nodes):
            nursery.start_soon(start, i)
    order = {f"n{i}": i for i in range(nodes)}
    daemons = sorted((d for d, _ in started), key=lambda d: order[d.name])
    return daemons, max(t for _, t in started)


# ------------------------------------------------------------------------------------------------- logs


def log_time(line: str) -> float | None:
    match = LOG_TIME.match(line)
    if match is None:
        return None
    stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S.%f")
    return stamp.replace(tzinfo=datetime.UTC).timestamp()


def adopted_at(daemon: Daemon, term: int, epoch: int) -> float | None:
    """When ``daemon`` logged adopting (or, as coordinator, publishing) plan ``epoch`` of ``term``."""
    needle = f"plan epoch {epoch} of term {term} "
    for line in daemon.log().splitlines():
        if needle in line and ("adopted" in line or "published" in line):
            return log_time(line)
    return None


def last_adoption(daemons: list[Daemon], seen: Seen) -> float | None:
    plan = seen.any()["plan"]
    times = [adopted_at(d, plan["term"], plan["epoch"]) for d in daemons]
    return None if any(t is None for t in times) else max(t for t in times if t is not None)


def since(reference: float, moment: float | None) -> float | None:
    return None if moment is None else round(moment - reference, 3)


# ------------------------------------------------------------------------------------------------- /proc sampling


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15; the list starts at field 3


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies over all cores from /proc/stat."""
    # user nice system idle iowait irq softirq steal (guest time is already inside user and nice)
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


@dataclass
class CpuMeter:
    """CPU used by some daemons, and by the whole machine, since the meter was made."""

    pids: list[int]
    cpu: list[float]
    busy: tuple[int, int]
    wall: float

    @staticmethod
    def start(pids: list[int]) -> CpuMeter:
        return CpuMeter(pids, [cpu_seconds(p) for p in pids], machine_busy(), time.monotonic())

    def per_process_pct(self) -> list[float]:
        """Percent of one core per process since the start."""
        elapsed = time.monotonic() - self.wall
        return [100.0 * (cpu_seconds(p) - c) / elapsed for p, c in zip(self.pids, self.cpu, strict=True)]

    def machine_pct(self) -> float:
        """Percent of all cores busy since the start, whoever used them."""
        busy, total = machine_busy()
        return 100.0 * (busy - self.busy[0]) / max(1, total - self.busy[1])


def sample_idle(daemons: list[Daemon], window_s: float) -> dict[str, Any]:
    """CPU percent of one core and RSS per daemon over ``window_s`` of doing nothing here."""
    meter = CpuMeter.start([d.proc.pid for d in daemons])
    time.sleep(window_s)
    pct, busy = meter.per_process_pct(), meter.machine_pct()
    return {"cpu_pct": pct, "rss_mb": [rss_mb(d.proc.pid) for d in daemons], "machine_busy_pct": busy}


# ------------------------------------------------------------------------------------------------- phases


async def converge_phase(swarm: Swarm, nodes: int, row: dict[str, Any]) -> tuple[list[Daemon], str]:
    """Start the swarm and wait for it to converge; returns the daemons and the coordinator's peer id."""
    async with open_client() as client:
        first_start = time.time()
        daemons, last_ready = await start_swarm(swarm, nodes)
        daemons_cpu, bench_cpu = CpuMeter.start([d.proc.pid for d in daemons]), CpuMeter.start([os.getpid()])
        ids = {d.peer_id for d in daemons}
        try:
            found = await wait_for(client, daemons, {"converged": converged(ids)}, phase_timeout(nodes))
        finally:
            record_cpu(row, "converge", daemons_cpu, bench_cpu)
    seen = found["converged"]
    row["converge_s"] = since(last_ready, seen.ended)
    row["converge_total_s"] = since(first_start, seen.ended)
    row["converge_log_s"] = since(last_ready, last_adoption(daemons, seen))
    row["start_s"] = since(first_start, last_ready)
    row["poll_round_s"] = round(seen.ended - seen.began, 3)
    row["plan_term_epoch"] = plan_key(seen)
    return daemons, seen.any()["coordinator"]


def record_cpu(row: dict[str, Any], phase: str, daemons: CpuMeter, bench: CpuMeter) -> None:
    """CPU during a phase, in % of one core: all daemons together and this process (the polling client)."""
    with contextlib.suppress(OSError):
        row[f"{phase}_daemons_cpu_pct"] = round(sum(daemons.per_process_pct()), 1)
        row[f"{phase}_bench_cpu_pct"] = round(bench.per_process_pct()[0], 1)
        row[f"{phase}_machine_busy_pct"] = round(daemons.machine_pct(), 1)


def plan_key(seen: Seen) -> list[int]:
    plan = seen.any()["plan"]
    return [plan["term"], plan["epoch"]]


def idle_phase(daemons: list[Daemon], coordinator: str, window_s: float, row: dict[str, Any]) -> None:
    time.sleep(SETTLE_S)
    sample = sample_idle(daemons, window_s)
    cpu, rss = sample["cpu_pct"], sample["rss_mb"]
    row["idle_cpu_pct"] = round(statistics.median(cpu), 2)
    row["rss_mb"] = round(statistics.median(rss), 1)
    row["idle_cpu_pct_max"] = round(max(cpu), 2)
    row["rss_mb_max"] = round(max(rss), 1)
    row["idle_cpu_pct_coordinator"] = next(
        (round(c, 2) for d, c in zip(daemons, cpu, strict=True) if d.peer_id == coordinator), None
    )
    row["machine_busy_pct"] = round(sample["machine_busy_pct"], 1)


async def failover_phase(client: Any, swarm: Swarm, daemons: list[Daemon], row: dict[str, Any]) -> list[Daemon]:
    """SIGKILL the coordinator; returns the survivors once they converged without it."""
    ids = {d.peer_id for d in daemons}
    timeout = phase_timeout(len(daemons))
    before = (await wait_for(client, daemons, {"converged": converged(ids)}, timeout))["converged"]
    row["idle_stable"] = plan_key(before) == row["plan_term_epoch"]
    old = before.any()
    dead = next(d for d in daemons if d.peer_id == old["coordinator"])
    survivors = [d for d in daemons if d is not dead]
    ids.discard(dead.peer_id)
    daemons_cpu, bench_cpu = CpuMeter.start([d.proc.pid for d in survivors]), CpuMeter.start([os.getpid()])
    killed = time.time()
    swarm.kill(dead)
    checks = {"plan": plan_adopted(ids, old["term"]), "converged": converged(ids, old["term"])}
    try:
        seen = await wait_for(client, survivors, checks, timeout)
    finally:
        record_cpu(row, "failover", daemons_cpu, bench_cpu)
    row["failover_s"] = since(killed, seen["plan"].ended)
    row["failover_log_s"] = since(killed, last_adoption(survivors, seen["plan"]))
    row["failover_converged_s"] = since(killed, seen["converged"].ended)
    return survivors


async def join_phase(client: Any, swarm: Swarm, daemons: list[Daemon], row: dict[str, Any]) -> None:
    """Start one more daemon, bootstrapped on a non-coordinator, and wait for a plan that includes it."""
    coordinator = (await statuses(client, daemons[:1], BRIEF))[daemons[0].peer_id] or {}
    anchor = next((d for d in daemons if d.peer_id != coordinator.get("coordinator")), daemons[0])
    gpu = GPUS[len(daemons) % len(GPUS)]
    joiner, ready = await trio.to_thread.run_sync(start_one, swarm, f"j{len(daemons)}", gpu, anchor.addr)
    members = [*daemons, joiner]
    ids = {d.peer_id for d in members}
    checks = {"plan": plan_adopted(ids), "converged": converged(ids)}
    seen = await wait_for(client, members, checks, phase_timeout(len(members)))
    row["join_replan_s"] = since(ready, seen["plan"].ended)
    row["join_replan_log_s"] = since(ready, last_adoption(members, seen["plan"]))
    row["join_converged_s"] = since(ready, seen["converged"].ended)


async def failover_and_join_phase(swarm: Swarm, daemons: list[Daemon], row: dict[str, Any]) -> None:
    async with open_client() as client:
        survivors = await failover_phase(client, swarm, daemons, row)
        await join_phase(client, swarm, survivors, row)


def bench_size(nodes: int, settings: Settings, root: Path) -> dict[str, Any]:
    """One swarm of ``nodes`` daemons through every phase; every daemon is killed on the way out."""
    row: dict[str, Any] = {"nodes": nodes}
    root.mkdir(parents=True, exist_ok=True)
    swarm = Swarm(root, model=MODEL)
    try:
        daemons, coordinator = trio.run(converge_phase, swarm, nodes, row)
        idle_phase(daemons, coordinator, settings.idle_window_s, row)
        trio.run(failover_and_join_phase, swarm, daemons, row)
    except Exception as exc:
        row["error"] = describe(exc)[:2000]
        print(f"  {nodes} daemons: {row['error'][:500]}", file=sys.stderr)
    finally:
        swarm.close()
        if settings.keep_logs or "error" in row:
            keep_logs(root, nodes)
    return row


def describe(exc: BaseException) -> str:
    """The leaf exceptions of ``exc`` (trio nests a task's error in one group per nursery), one per line."""
    if isinstance(exc, BaseExceptionGroup):
        return "\n".join(describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def keep_logs(root: Path, nodes: int) -> None:
    target = OUT_DIR / "control-logs" / f"n{nodes}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(root, target, ignore=shutil.ignore_patterns("*.key"))
    print(f"  daemon logs kept in {target}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------- report


COLUMNS = (
    ("nodes", "nodes", 0),
    ("converge", "converge_s", 2),
    ("total", "converge_total_s", 2),
    ("log", "converge_log_s", 2),
    ("failover", "failover_s", 2),
    ("log", "failover_log_s", 2),
    ("views", "failover_converged_s", 2),
    ("join_replan", "join_replan_s", 2),
    ("log", "join_replan_log_s", 2),
    ("views", "join_converged_s", 2),
    ("idle_cpu_%", "idle_cpu_pct", 2),
    ("max", "idle_cpu_pct_max", 2),
    ("coord", "idle_cpu_pct_coordinator", 2),
    ("rss_mb", "rss_mb", 0),
    ("busy_%", "machine_busy_pct", 0),
)


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def mark(value: float | None, limit: float) -> str:
    return "" if value is None else (" ok" if value <= limit else " MISS")


def print_table(rows: list[dict[str, Any]]) -> None:
    widths = [max(len(title), 6) for title, _, _ in COLUMNS]
    header = " ".join(f"{title:>{w}}" for (title, _, _), w in zip(COLUMNS, widths, strict=True))
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = [fmt(r.get(key), digits) for _, key, digits in COLUMNS]
        print(" ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths, strict=True)))
        if r.get("error"):
            print(f"      error: {r['error'][:300]}")
    print(
        "seconds; total: from the first daemon's start; log: when the last daemon logged adopting that plan; "
        "views: until every daemon also sees exactly the members;\nidle CPU in % of one core per daemon (median, "
        "max, coordinator); rss_mb: median VmRSS; busy_%: the whole machine during the idle window"
    )
    print_targets(rows)


def print_targets(rows: list[dict[str, Any]]) -> None:
    at = next((r for r in rows if r["nodes"] == TARGET_NODES), None)
    note = ""
    if at is None and rows:
        at = max(rows, key=lambda r: r["nodes"])
        note = f" ({TARGET_NODES} nodes not measured; shown at {at['nodes']})"
    if at is None:
        return
    idle = [r["idle_cpu_pct"] for r in rows if r.get("idle_cpu_pct") is not None]
    worst = max(idle) if idle else None
    print(f"targets{note}:")
    print(f"  convergence <= {CONVERGE_TARGET_S} s at {TARGET_NODES}: {fmt(at.get('converge_s'))} s", end="")
    print(mark(at.get("converge_s"), CONVERGE_TARGET_S))
    print(f"  failover    <= {FAILOVER_TARGET_S} s at {TARGET_NODES}: {fmt(at.get('failover_s'))} s", end="")
    print(mark(at.get("failover_s"), FAILOVER_TARGET_S))
    print(f"  idle CPU    <  {IDLE_CPU_TARGET_PCT} % of a core per daemon (worst median): {fmt(worst)} %", end="")
    print("" if worst is None else (" ok" if worst < IDLE_CPU_TARGET_PCT else " MISS"))


def run_meta(settings: Settings) -> dict[str, Any]:
    return {
        "quick": settings.quick,
        "sizes": list(settings.sizes),
        "model": MODEL,
        "gpus_cycle": list(GPUS),
        "idle_window_s": settings.idle_window_s,
        "settle_before_idle_s": SETTLE_S,
        "poll_interval_s": POLL_S,
        "status_client": "one in-process libp2p host asking brief statuses, closed during the idle window",
        "start": f"first daemon, then the rest bootstrapped on it, {START_CONCURRENCY} starting at a time",
        "join": "one new daemon bootstrapped on a non-coordinator survivor after the failover",
        "targets": {
            "converge_s": CONVERGE_TARGET_S,
            "failover_s": FAILOVER_TARGET_S,
            "at_nodes": TARGET_NODES,
            "idle_cpu_pct": IDLE_CPU_TARGET_PCT,
        },
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "libp2p_version": importlib.metadata.version("libp2p"),
        "trio_version": importlib.metadata.version("trio"),
    }


# ------------------------------------------------------------------------------------------------- main


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected at least one size, got {text!r}")
    if any(n < 2 for n in sizes):
        raise argparse.ArgumentTypeError(f"every size must be at least 2 (a failover needs a survivor), got {text!r}")
    return sizes


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 daemons, 3 s idle window: under a minute")
    parser.add_argument("--json", type=Path, help="write results here (default bench/out/control[-quick].json)")
    parser.add_argument("--sizes", type=parse_sizes, help="comma-separated swarm sizes (default 4,8,16; quick 4)")
    parser.add_argument("--keep-logs", action="store_true", help="keep daemon logs in bench/out/control-logs/nN")
    args = parser.parse_args(argv)
    settings = Settings(
        sizes=args.sizes or (QUICK_SIZES if args.quick else SIZES),
        quick=args.quick,
        idle_window_s=QUICK_IDLE_WINDOW_S if args.quick else IDLE_WINDOW_S,
        keep_logs=args.keep_logs,
    )
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    for noisy in ("libp2p", "multiaddr", "async_service"):  # the client's own ping and stream failures
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    daemon_harness.READY_TIMEOUT_S = max(daemon_harness.READY_TIMEOUT_S, READY_TIMEOUT_S)
    meta = run_meta(settings)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="hexgen-control-") as tmp:
        for nodes in settings.sizes:
            print(f"swarm of {nodes} daemons ...", file=sys.stderr, flush=True)
            rows.append(bench_size(nodes, settings, Path(tmp) / f"n{nodes}"))
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)
    meta["load_average_end"] = os.getloadavg()[0]
    print_table(rows)
    out = args.json or OUT_DIR / ("control-quick.json" if settings.quick else "control.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "meta": meta}, indent=1))
    print(f"wrote {out} ({meta['wall_seconds']:.1f} s)")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BaseException as exc:
        if not interrupted(exc):
            raise
        print("interrupted: every daemon started here was killed", file=sys.stderr)
        sys.exit(130)
