"""End-to-end benchmark: a local hexgen swarm against the same model in one colocated process, TTFT, TPOT, tok/s.

Workload: a seeded sample of 64 requests (--quick: 16) from the Azure conversation trace, prompt and output
lengths scaled by one common factor (never up) so the longest prompt + output fits the token budget (500 of
stories260K's 512 positions; --quick: 250, so outputs are shorter), at least 1 token each. Prompts are
seeded random token ids in [3, 512) after BOS (id 1); outputs run to their length (EOS ignored, greedy). All
requests are submitted at once (an offline burst, not the trace's arrival times).

Systems, run one after the other on this machine:

* hexgen-swarm: 4 ``hexgen-node join`` daemons on loopback (simulated H100 / A100 / L40 / A6000, the
  test harness tests/daemon_harness.py) serving stories260K with the workers of their adopted plan. An
  in-process libp2p client sends the requests round-robin to the 4 daemons as entries over
  ``/hexgen/generate/1`` and times every token frame it receives.
* colocated: ``hexgen.engine.llm.LLM`` on the CPU in this process, one thread, every request added at once,
  then ``step()`` until done; a request's token times are the ends of the steps that grew it.

Per request, TTFT is first token - burst start and TPOT is (last token - first token) / (tokens - 1) (only
requests of 2+ tokens). Rows give median and p99 over requests and the useful output tokens/s of the
whole burst; meta["overhead"] holds the swarm / colocated ratios. Both systems are warmed up, then timed on
a few single requests alone (``*_alone`` keys: the fixed cost of one request's path without queueing).

Where the swarm's extra time goes: each engine step's tokens cross the worker -> driver daemon unix socket
as one msgpack frame, then the hop session (one libp2p stream per pair of daemons, one batch frame per step)
from the replica's driver daemon to the entry daemon (and another when prefill hands off to a decode
replica on another daemon), then a frame per token on each client's own stream (the tokens the entry
found queued together in one write); a prefill replica hands the sequence's KV to its decode replica over
torch.distributed (gloo); and 4 daemons, their workers and stores plus this client share 2 cores. meta["cpu_seconds"] splits the CPU used during the burst
between daemons, workers, other daemon children and this client, from /proc; meta["cpu_ms_per_token"] is the
same per output token of the burst (a figure that other load on the machine moves far less than latencies), and
meta["cpu_ms_per_token_net"] the same less what each kind of process used idle (heartbeats, gossip, health
pings: measured for IDLE_S just before the burst, scaled to the burst's wall time), the per-token cost alone.
``--profile DIR`` samples every swarm process with py-spy during each burst (DIR/swarm, DIR/disaggregated).

    python bench/e2e.py [--quick] [--json OUT] [--profile DIR]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trio

from hexgen.coordinator.workload import Request, WorkloadError, load_trace
from hexgen.daemon.generate_protocol import GenerateError, GenerateToken, replies
from hexgen.engine.llm import LLM
from hexgen.engine.sequence import SamplingParams, Sequence
from hexgen.testing import daemon_harness
from hexgen.testing.daemon_harness import (
    Daemon,
    Swarm,
    interrupted,
    open_client,
    serving,
    sigterm_as_interrupt,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared"
MODEL_DIR = SHARED / "models" / "stories260K"
TRACE = SHARED / "data" / "AzureLLMInferenceTrace_conv.csv"
OUT_DIR = ROOT / "bench" / "out"

SEED = 0
REQUESTS = 64
QUICK_REQUESTS = 16
BUDGET = 500  # longest prompt + output after scaling, of the model's 512 positions
QUICK_BUDGET = 250
BOS = 1
TOKEN_LOW, TOKEN_HIGH = 3, 512  # prompt token ids, high exclusive
GPUS = ["H100", "A100", "L40", "A6000"]
SWARM_NAME = "hexgen-swarm (4 daemons, 4 workers)"
DISAGG_NAME = "hexgen-swarm pinned TP2 prefill>PP2 dec"
PINNED = """
[[groups]]
role = "prefill"
stages = [{ gpus = ["n0", "n1"], layers = [0, 5] }]

[[groups]]
role = "decode"
stages = [{ gpus = ["n2"], layers = [0, 3] }, { gpus = ["n3"], layers = [3, 5] }]
"""
COLOCATED_NAME = "colocated (1 process)"
PROBE_PROMPT = 16  # single-request probes: prompt tokens, output tokens, how many
PROBE_TOKENS = 16
PROBE_ROUNDS = 4
WARMUP_TOKENS = 4
READY_TIMEOUT_S = 120.0  # each daemon's ready line
SERVING_TIMEOUT_S = 180.0  # converged and every worker ready
REQUEST_TIMEOUT_S = 60.0  # one probe request
BURST_TIMEOUT_S = 600.0  # the whole burst on the swarm
COLOCATED_TIMEOUT_S = 600.0
IDLE_S = 3.0  # the swarm measured idle before each burst
PROFILER_START_S = 1.0
PROFILER_STOP_S = 30.0


class BenchError(Exception):
    """The swarm did not serve, or a request failed."""


@dataclass(frozen=True)
class Settings:
    quick: bool
    requests: int
    budget: int


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    outputs: list[int]
    factor: float


@dataclass
class Timing:
    """One request's token times in seconds from its submission (the burst start)."""

    wanted: int
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    error: str | None = None

    def token(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now
        self.tokens += 1

    @property
    def ttft(self) -> float | None:
        return self.first

    @property
    def tpot(self) -> float | None:
        if self.first is None or self.last is None or self.tokens < 2:
            return None
        return (self.last - self.first) / (self.tokens - 1)


@dataclass
class Result:
    timings: list[Timing]
    wall_s: float
    probes: list[Timing] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- workload


def scale_lengths(trace: tuple[Request, ...], count: int, budget: int) -> tuple[list[tuple[int, int]], float]:
    """``count`` seeded (prompt, output) lengths from the trace, both times one factor <= 1 chosen so the
    longest prompt + output is at most ``budget``; never below 1 token."""
    picked = random.Random(SEED).sample(trace, count)
    factor = min(1.0, budget / max(r.prompt_tokens + r.output_tokens for r in picked))
    return [(max(1, int(r.prompt_tokens * factor)), max(1, int(r.output_tokens * factor))) for r in picked], factor


def make_prompt(length: int, rng: random.Random) -> list[int]:
    """BOS then ``length - 1`` random ids in [TOKEN_LOW, TOKEN_HIGH)."""
    return [BOS, *(rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(length - 1))]


def make_workload(trace: tuple[Request, ...], settings: Settings) -> Workload:
    lengths, factor = scale_lengths(trace, settings.requests, settings.budget)
    rng = random.Random(SEED + 1)
    return Workload([make_prompt(p, rng) for p, _ in lengths], [o for _, o in lengths], factor)


def probe_prompts() -> list[list[int]]:
    rng = random.Random(SEED + 2)
    return [make_prompt(PROBE_PROMPT, rng) for _ in range(PROBE_ROUNDS)]


# ---------------------------------------------------------------------------------------------- colocated


def run_steps(llm: LLM, prompts: list[list[int]], outputs: list[int]) -> tuple[list[Timing], float]:
    """Add every request at once, step until done; each request's token times from the step ends."""
    timings = [Timing(n) for n in outputs]
    start = time.perf_counter()
    seqs: list[Sequence] = [
        llm.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in zip(prompts, outputs, strict=True)
    ]
    seen = [0] * len(seqs)
    while llm.has_unfinished():
        llm.step()
        now = time.perf_counter() - start
        if now > COLOCATED_TIMEOUT_S:
            raise BenchError(f"the colocated engine did not finish within {COLOCATED_TIMEOUT_S:.0f} s")
        for i, seq in enumerate(seqs):
            made = seq.num_completion_tokens
            while seen[i] < made:  # one step adds at most one token per sequence
                timings[i].token(now)
                seen[i] += 1
    return timings, time.perf_counter() - start


def bench_colocated(workload: Workload) -> Result:
    torch.set_num_threads(1)
    loaded = time.perf_counter()
    llm = LLM(MODEL_DIR, device="cpu")
    load_s = time.perf_counter() - loaded
    run_steps(llm, probe_prompts()[:1], [WARMUP_TOKENS])
    probes = [run_steps(llm, [p], [PROBE_TOKENS])[0][0] for p in probe_prompts()]
    timings, wall = run_steps(llm, workload.prompts, workload.outputs)
    return Result(timings, wall, probes, {"load_s": round(load_s, 3), "threads": torch.get_num_threads()})


# ---------------------------------------------------------------------------------------------- swarm


async def one_request(client: Any, entry: Daemon, prompt: list[int], timing: Timing, start: float) -> None:
    """Stream one request through ``entry``, recording token arrival times relative to ``start``."""
    request = {"tokens": prompt, "max_tokens": timing.wanted, "ignore_eos": True}
    try:
        async for frame in replies(client, entry.peer_id, request):
            if isinstance(frame, GenerateToken):
                timing.token(time.perf_counter() - start)
            elif isinstance(frame, GenerateError):
                timing.error = frame.error
            elif frame.completion_tokens != timing.tokens:
                timing.error = f"done says {frame.completion_tokens} tokens, {timing.tokens} streamed"
    except Exception as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    if timing.error is None and timing.tokens != timing.wanted:
        timing.error = f"{timing.tokens} of {timing.wanted} tokens"


async def alone(client: Any, entry: Daemon, prompt: list[int], tokens: int) -> Timing:
    timing = Timing(tokens)
    with trio.fail_after(REQUEST_TIMEOUT_S):
        await one_request(client, entry, prompt, timing, time.perf_counter())
    if timing.error:
        raise BenchError(f"request via {entry.name} failed: {timing.error}")
    return timing


async def burst(client: Any, daemons: list[Daemon], workload: Workload) -> tuple[list[Timing], float]:
    timings = [Timing(n) for n in workload.outputs]
    start = time.perf_counter()
    with trio.fail_after(BURST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for i, prompt in enumerate(workload.prompts):
                nursery.start_soon(one_request, client, daemons[i % len(daemons)], prompt, timings[i], start)
    return timings, time.perf_counter() - start


def plan_summary(view: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    states = [s for s in view.values() if s is not None]
    plan = states[0]["plan"]
    groups = ((plan.get("body") or {}).get("plan") or {}).get("groups") or []
    return {
        "term": plan.get("term"),
        "epoch": plan.get("epoch"),
        "groups": [
            {"role": g.get("role"), "stages": [len(s.get("gpus", [])) for s in g.get("stages", [])]} for g in groups
        ],
        "workers": sum(len(s["serving"]["workers"]) for s in states),
    }


async def measure_swarm(daemons: list[Daemon], workload: Workload, profile: Path | None = None) -> Result:
    ids = {d.peer_id for d in daemons}
    async with open_client() as client:
        view, ready_s = await wait_until(client, daemons, serving(ids), SERVING_TIMEOUT_S, "serving")
        for daemon in daemons:  # warm-up: every entry once, and with it every replica path the entries pick
            await alone(client, daemon, probe_prompts()[0], WARMUP_TOKENS)
        probes = [
            await alone(client, daemons[i % len(daemons)], p, PROBE_TOKENS) for i, p in enumerate(probe_prompts())
        ]
        idle_meter = CpuMeter.start(daemons)
        await trio.sleep(IDLE_S)
        idle = idle_meter.stop()
        meter = CpuMeter.start(daemons)
        profiler = Profiler.start(meter.kinds, profile) if profile is not None else None
        timings, wall = await burst(client, daemons, workload)
        cpu = meter.stop()
        if profiler is not None:
            profiler.stop()
    made = max(1, sum(t.tokens for t in timings))
    kinds = [kind for kind in cpu if kind != "wall"]
    per_token = {kind: round(1e3 * cpu[kind] / made, 3) for kind in kinds}
    # what each kind uses idle over as long as the burst took: background work, not the tokens' cost
    background = {kind: idle.get(kind, 0.0) / idle["wall"] * cpu["wall"] for kind in kinds}
    net = {kind: round(1e3 * max(0.0, cpu[kind] - background[kind]) / made, 3) for kind in kinds}
    extra = {"serving_after_s": round(ready_s, 2), "plan": plan_summary(view), "cpu_seconds": cpu, "idle_cpu": idle}
    return Result(timings, wall, probes, extra | {"cpu_ms_per_token": per_token, "cpu_ms_per_token_net": net})


def bench_swarm(workload: Workload, root: Path, pinned: str | None = None, profile: Path | None = None) -> Result:
    """The swarm with the planner's plan, or with ``pinned`` (a --pin-plan TOML layout over n0..n3)."""
    root.mkdir(parents=True, exist_ok=True)
    extra = None
    if pinned is not None:
        (root / "pinned.toml").write_text(pinned)
        extra = ["--pin-plan", str(root / "pinned.toml")]
    swarm = Swarm(root, model=str(MODEL_DIR))
    try:
        started = time.perf_counter()
        daemons = swarm.start_many(len(GPUS), gpus=GPUS, extra=extra)
        start_s = time.perf_counter() - started
        result = trio.run(measure_swarm, daemons, workload, profile)
        result.extra["daemons_start_s"] = round(start_s, 2)
        return result
    finally:
        swarm.close()


# ---------------------------------------------------------------------------------------------- /proc


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from the state on (field 3), or None for a process that is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def cpu_of(pid: int) -> float:
    fields = proc_stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_of(parents: set[int]) -> dict[int, str]:
    """Direct children of ``parents``: pid -> "workers" for engine workers, else "stores and other"."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = proc_stat(int(entry.name))
        if fields is None or int(fields[1]) not in parents:
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[int(entry.name)] = "workers" if "hexgen.daemon.worker_process" in command else "stores and other"
    return found


@dataclass
class CpuMeter:
    """CPU seconds per kind of process (daemons, their workers, their other children, this client)."""

    kinds: dict[int, str]
    before: dict[int, float]
    machine: float

    @staticmethod
    def start(daemons: list[Daemon]) -> CpuMeter:
        kinds = {d.proc.pid: "daemons" for d in daemons} | children_of({d.proc.pid for d in daemons})
        kinds[os.getpid()] = "bench client"
        return CpuMeter(kinds, {pid: cpu_of(pid) for pid in kinds}, time.perf_counter())

    def stop(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for pid, kind in self.kinds.items():
            used[kind] = used.get(kind, 0.0) + max(0.0, cpu_of(pid) - self.before[pid])
        out = {kind: round(seconds, 2) for kind, seconds in sorted(used.items())}
        out["wall"] = round(time.perf_counter() - self.machine, 2)
        return out


@dataclass
class Profiler:
    """py-spy sampling every process of the swarm during the burst, each into DIR/KIND-PID.txt (raw stacks,
    ``flamegraph.pl`` or a grep reads them); the processes are not paused (--nonblocking)."""

    runs: list[subprocess.Popen[bytes]]

    @staticmethod
    def start(kinds: dict[int, str], out: Path) -> Profiler:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out.mkdir(parents=True, exist_ok=True)
        runs = []
        for pid, kind in kinds.items():
            if pid == os.getpid():
                continue
            file = out / f"{kind.replace(' ', '_')}-{pid}.txt"
            command = [spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--format", "raw"]
            runs.append(
                subprocess.Popen([*command, "-o", str(file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        time.sleep(PROFILER_START_S)  # py-spy attaches before the burst starts
        return Profiler(runs)

    def stop(self) -> None:
        for run in self.runs:
            run.send_signal(signal.SIGINT)
        for run in self.runs:
            run.wait(PROFILER_STOP_S)


# ---------------------------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ms(value: float | None) -> float | None:
    return None if value is None else round(1e3 * value, 3)


def summarize(system: str, result: Result) -> dict[str, Any]:
    ok = [t for t in result.timings if t.error is None]
    ttft = [t.ttft for t in ok if t.ttft is not None]
    tpot = [t.tpot for t in ok if t.tpot is not None]
    probe_ttft = [t.ttft for t in result.probes if t.ttft is not None]
    probe_tpot = [t.tpot for t in result.probes if t.tpot is not None]
    errors = [t.error for t in result.timings if t.error is not None]
    row: dict[str, Any] = {
        "system": system,
        "ttft_ms_p50": ms(percentile(ttft, 50)),
        "ttft_ms_p99": ms(percentile(ttft, 99)),
        "tpot_ms_p50": ms(percentile(tpot, 50)),
        "tpot_ms_p99": ms(percentile(tpot, 99)),
        "tokens_per_s": round(sum(t.tokens for t in ok) / result.wall_s, 2) if result.wall_s > 0 else None,
        "requests": len(result.timings),
        "failed": len(errors),
        "output_tokens": sum(t.tokens for t in ok),
        "burst_wall_s": round(result.wall_s, 3),
        "ttft_ms_alone": ms(statistics.median(probe_ttft)) if probe_ttft else None,
        "tpot_ms_alone": ms(statistics.median(probe_tpot)) if probe_tpot else None,
    }
    if errors:
        row["first_error"] = errors[0][:300]
    return row


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def overhead(swarm: dict[str, Any], colocated: dict[str, Any]) -> dict[str, Any]:
    return {
        "ttft_p50": ratio(swarm["ttft_ms_p50"], colocated["ttft_ms_p50"]),
        "tpot_p50": ratio(swarm["tpot_ms_p50"], colocated["tpot_ms_p50"]),
        "tokens_per_s": ratio(swarm["tokens_per_s"], colocated["tokens_per_s"]),
        "ttft_alone": ratio(swarm["ttft_ms_alone"], colocated["ttft_ms_alone"]),
        "tpot_alone": ratio(swarm["tpot_ms_alone"], colocated["tpot_ms_alone"]),
        "meaning": "swarm / colocated: above 1 is slower for latencies; below 1 is less throughput",
    }


# ---------------------------------------------------------------------------------------------- output

COLUMNS = (
    ("system", "system", 40),
    ("TTFT p50", "ttft_ms_p50", 9),
    ("TTFT p99", "ttft_ms_p99", 9),
    ("TPOT p50", "tpot_ms_p50", 9),
    ("TPOT p99", "tpot_ms_p99", 9),
    ("tok/s", "tokens_per_s", 8),
    ("TTFT 1", "ttft_ms_alone", 8),
    ("TPOT 1", "tpot_ms_alone", 8),
    ("failed", "failed", 6),
)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def print_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    print(
        f"stories260K, {meta['requests']} Azure conversation requests in one burst (lengths x{meta['scale_factor']:.3f}:"
        f" prompt mean {meta['prompt_tokens_mean']:.0f} / output mean {meta['output_tokens_mean']:.0f} tokens)"
        f", {meta['cpu_count']} cores{', QUICK' if meta['quick'] else ''}"
    )
    header = " ".join(f"{title:<{w}}" if key == "system" else f"{title:>{w}}" for title, key, w in COLUMNS)
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            " ".join(
                f"{cell(r.get(key)):<{w}}" if key == "system" else f"{cell(r.get(key)):>{w}}" for _, key, w in COLUMNS
            )
        )
        if r.get("first_error"):
            print(f"  first error: {r['first_error']}")
    print(
        "ms medians and p99 over requests (TPOT: requests of 2+ tokens); tok/s: output tokens / burst wall time; "
        f"TTFT 1 / TPOT 1: medians of {PROBE_ROUNDS} requests alone ({PROBE_PROMPT}-token prompt, "
        f"{PROBE_TOKENS} tokens)"
    )
    for label, key in (("swarm", "overhead"), ("pinned disaggregated", "overhead_disaggregated")):
        over = meta.get(key)
        if over:
            print(
                f"overhead {label}/colocated: TTFT p50 x{cell(over['ttft_p50'])}, TPOT p50 x{cell(over['tpot_p50'])}, "
                f"throughput x{cell(over['tokens_per_s'])}; alone: TTFT x{cell(over['ttft_alone'])}, "
                f"TPOT x{cell(over['tpot_alone'])}"
            )
    swarm = meta.get("swarm") or {}
    if swarm.get("plan"):
        groups = ", ".join(f"{g['role']} {'x'.join(map(str, g['stages']))}" for g in swarm["plan"]["groups"])
        print(f"swarm plan: {groups or '-'}; {swarm['plan']['workers']} workers")
    for label, key in (("swarm", "swarm"), ("pinned disaggregated", "disaggregated")):
        for what, field_name in (("", "cpu_ms_per_token"), (" less idle", "cpu_ms_per_token_net")):
            used = (meta.get(key) or {}).get(field_name)
            if used:
                figures = ", ".join(f"{k} {v}" for k, v in used.items())
                print(f"{label} burst CPU ms per output token{what}: {figures}")
    roles = {g["role"] for g in (swarm.get("plan") or {}).get("groups", [])}
    handoff = (
        "a KV hand-off (gloo) and one more hop from prefill to decode replicas"
        if roles & {"prefill", "decode"}
        else "no prefill -> decode hand-off in this plan (colocated replicas only)"
    )
    print(
        "where the swarm's time goes: worker -> driver daemon over a unix socket (a frame per step), hop sessions "
        f"driver -> entry daemon (a frame per step and pair of daemons) -> client (a frame per token);\n{handoff}; "
        "daemons, workers, stores and this client share "
        f"{meta['cpu_count']} cores"
    )


def run_meta(args: argparse.Namespace, settings: Settings, workload: Workload) -> dict[str, Any]:
    prompts = [len(p) for p in workload.prompts]
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": settings.quick,
        "model": str(MODEL_DIR),
        "trace": str(args.trace),
        "seed": SEED,
        "requests": settings.requests,
        "submission": "offline burst: every request submitted at once",
        "token_budget": settings.budget,
        "scale_factor": workload.factor,
        "prompt_tokens": prompts,
        "output_tokens": workload.outputs,
        "prompt_tokens_mean": statistics.mean(prompts),
        "output_tokens_mean": statistics.mean(workload.outputs),
        "max_prompt_plus_output": max(p + o for p, o in zip(prompts, workload.outputs, strict=True)),
        "probe": {"rounds": PROBE_ROUNDS, "prompt_tokens": PROBE_PROMPT, "output_tokens": PROBE_TOKENS},
        "gpus_simulated": GPUS,
        "entries": "round-robin over the 4 daemons",
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "libp2p_version": importlib.metadata.version("libp2p"),
        "trio_version": importlib.metadata.version("trio"),
    }


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings, tuple[Request, ...]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_REQUESTS} requests within {QUICK_BUDGET} tokens: under a minute"
    )
    parser.add_argument("--json", type=Path, help="write results here (default bench/out/e2e[-quick].json)")
    parser.add_argument("--trace", type=Path, default=TRACE, help="Azure conversation trace CSV")
    parser.add_argument("--profile", type=Path, help="py-spy every swarm process during the bursts, into this folder")
    args = parser.parse_args(argv)
    if not (MODEL_DIR / "config.json").exists():
        print(f"error: model stories260K not found at {MODEL_DIR}", file=sys.stderr)
        sys.exit(2)
    try:
        trace = load_trace(args.trace)
    except WorkloadError as exc:
        parser.error(str(exc))
    settings = Settings(
        quick=args.quick,
        requests=QUICK_REQUESTS if args.quick else REQUESTS,
        budget=QUICK_BUDGET if args.quick else BUDGET,
    )
    if settings.requests > len(trace):
        parser.error(f"the trace has {len(trace)} requests, fewer than {settings.requests}")
    return args, settings, trace


def keep_logs(root: Path) -> Path:
    """Copy the daemons' logs out of the temporary directory; returns where."""
    dest = OUT_DIR / "e2e-logs"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for log in root.glob("*.log"):
        shutil.copy(log, dest / log.name)
    return dest


def main(argv: list[str] | None = None) -> int:
    args, settings, trace = parse_args(argv)
    for noisy in ("libp2p", "multiaddr", "async_service"):  # the client's own ping and stream failures
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    daemon_harness.READY_TIMEOUT_S = max(daemon_harness.READY_TIMEOUT_S, READY_TIMEOUT_S)
    torch.manual_seed(SEED)
    workload = make_workload(trace, settings)
    meta = run_meta(args, settings, workload)
    started = time.perf_counter()
    with sigterm_as_interrupt():
        print("colocated engine ...", file=sys.stderr, flush=True)
        colocated = bench_colocated(workload)
        runs = {}
        for name, pinned in ((SWARM_NAME, None), (DISAGG_NAME, PINNED)):
            print(f"{name} ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="hexgen-e2e-") as tmp:
                try:
                    profile = None if args.profile is None else args.profile / ("disaggregated" if pinned else "swarm")
                    runs[name] = bench_swarm(workload, Path(tmp) / "swarm", pinned, profile)
                except (BenchError, AssertionError, RuntimeError, trio.TooSlowError) as exc:
                    print(f"error: the swarm run failed: {str(exc)[:2000]}", file=sys.stderr)
                    print(f"daemon logs kept in {keep_logs(Path(tmp) / 'swarm')}", file=sys.stderr)
                    return 1
    swarm, disaggregated = runs[SWARM_NAME], runs[DISAGG_NAME]
    rows = [
        summarize(SWARM_NAME, swarm),
        summarize(DISAGG_NAME, disaggregated),
        summarize(COLOCATED_NAME, colocated),
    ]
    meta["overhead_disaggregated"] = overhead(rows[1], rows[2])
    meta["disaggregated"] = disaggregated.extra
    meta["overhead"] = overhead(rows[0], rows[2])
    meta["swarm"] = swarm.extra
    meta["colocated"] = colocated.extra
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)
    meta["load_average_end"] = os.getloadavg()[0]
    print_table(rows, meta)
    out = args.json or OUT_DIR / ("e2e-quick.json" if settings.quick else "e2e.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "meta": meta}, indent=1))
    print(f"wrote {out} ({meta['wall_seconds']:.1f} s)")
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BaseException as exc:
        if not interrupted(exc):
            raise
        print("interrupted: every daemon started here was killed", file=sys.stderr)
        sys.exit(130)
