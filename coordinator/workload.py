"""Workloads: request length distributions and arrival processes, from the Azure LLM inference trace."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

HEAVY_PROMPT = 512
HEAVY_OUTPUT = 128
WORKLOAD_KINDS = ("HPLD", "HPHD", "LPHD", "LPLD", "online")


class WorkloadError(ValueError):
    """A trace or workload name the planner cannot use."""


@dataclass(frozen=True)
class Request:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Workload:
    """Request lengths (a sample of the distribution) and, for online workloads, arrival times."""

    name: str
    requests: tuple[Request, ...]

    def __post_init__(self) -> None:
        if not self.requests:
            raise WorkloadError(f"workload {self.name!r} has no requests")

    @property
    def mean_prompt(self) -> float:
        return sum(r.prompt_tokens for r in self.requests) / len(self.requests)

    @property
    def mean_prompt_sq(self) -> float:
        return sum(r.prompt_tokens**2 for r in self.requests) / len(self.requests)

    @property
    def mean_output(self) -> float:
        return sum(r.output_tokens for r in self.requests) / len(self.requests)

    @property
    def mean_context(self) -> float:
        """Mean KV length a decode step attends over: prompt plus half the output."""
        return self.mean_prompt + self.mean_output / 2

    @property
    def mean_total(self) -> float:
        return self.mean_prompt + self.mean_output

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s

    def at_rate(self, requests_per_s: float) -> Workload:
        """The same requests with arrival times scaled so the mean rate is ``requests_per_s``."""
        if requests_per_s <= 0:
            raise WorkloadError("arrival rate must be positive")
        span = self.duration_s
        n = len(self.requests)
        if span <= 0:
            scaled = tuple(
                Request(i / requests_per_s, r.prompt_tokens, r.output_tokens) for i, r in enumerate(self.requests)
            )
        else:
            factor = (n - 1) / requests_per_s / span
            t0 = self.requests[0].arrival_s
            scaled = tuple(
                Request((r.arrival_s - t0) * factor, r.prompt_tokens, r.output_tokens) for r in self.requests
            )
        return Workload(self.name, scaled)

    def offline(self) -> Workload:
        """The same requests, all arriving at time zero (an offline batch)."""
        return Workload(self.name, tuple(Request(0.0, r.prompt_tokens, r.output_tokens) for r in self.requests))


def synthetic(name: str, prompt: int, output: int, count: int = 1) -> Workload:
    """A workload of ``count`` identical requests."""
    return Workload(name, tuple(Request(0.0, prompt, output) for _ in range(count)))


def load_trace(path: str | Path) -> tuple[Request, ...]:
    """Read an Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens).

    Arrival times are seconds from the first request. O(n) in the number of rows.
    """
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            needed = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
            if not needed <= set(reader.fieldnames or ()):
                raise WorkloadError(f"{path}: expected columns {', '.join(sorted(needed))}")
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    stamp = datetime.fromisoformat(row["TIMESTAMP"][:26])
                    rows.append((stamp, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
                except (TypeError, ValueError) as exc:
                    raise WorkloadError(f"{path}:{line}: bad row: {exc}") from None
    except OSError as exc:
        raise WorkloadError(f"cannot read trace {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise WorkloadError(f"{path} is not a CSV trace: {exc}") from None
    if not rows:
        raise WorkloadError(f"{path}: no requests")
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    return tuple(
        Request((stamp - t0).total_seconds(), max(1, prompt), max(1, output)) for stamp, prompt, output in rows
    )


def classify(request: Request) -> str:
    """HP/LP for prompts over/under 512 tokens, HD/LD for outputs over/under 128 tokens."""
    prefill = "HP" if request.prompt_tokens > HEAVY_PROMPT else "LP"
    decode = "HD" if request.output_tokens > HEAVY_OUTPUT else "LD"
    return prefill + decode


def workload_from_trace(
    trace: tuple[Request, ...], kind: str, count: int = 1000, seed: int = 0, max_context: int | None = None
) -> Workload:
    """Sample a workload of ``count`` requests from a trace.

    ``kind`` is HPLD, HPHD, LPHD or LPLD (an offline batch of that class, sampled with replacement)
    or ``online`` (a contiguous slice of the trace with its real arrival times). Requests longer than
    ``max_context`` are clipped so prompt + output fits.
    """
    if kind not in WORKLOAD_KINDS:
        raise WorkloadError(f"unknown workload {kind!r} (known: {', '.join(WORKLOAD_KINDS)})")
    rng = random.Random(seed)
    if kind == "online":
        start = rng.randrange(max(1, len(trace) - count + 1))
        chosen = list(trace[start : start + count])
        t0 = chosen[0].arrival_s
        chosen = [Request(r.arrival_s - t0, r.prompt_tokens, r.output_tokens) for r in chosen]
    else:
        pool = [r for r in trace if classify(r) == kind]
        if not pool:
            raise WorkloadError(f"the trace has no {kind} requests")
        chosen = [Request(0.0, r.prompt_tokens, r.output_tokens) for r in rng.choices(pool, k=count)]
    if max_context is not None:
        chosen = [_clip(r, max_context) for r in chosen]
    return Workload(kind, tuple(chosen))


def _clip(request: Request, max_context: int) -> Request:
    output = min(request.output_tokens, max(1, max_context // 4))
    prompt = min(request.prompt_tokens, max_context - output)
    return Request(request.arrival_s, max(1, prompt), output)
