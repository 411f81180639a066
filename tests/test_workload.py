"""Workloads: request classification, trace CSV loading, sampling the four classes and the online slice."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest

from hexgen.coordinator.workload import (
    WORKLOAD_KINDS,
    Request,
    Workload,
    WorkloadError,
    classify,
    load_trace,
    synthetic,
    workload_from_trace,
)

TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "AzureLLMInferenceTrace_conv.csv"
needs_trace = pytest.mark.skipif(not TRACE.is_file(), reason=f"Azure trace not present at {TRACE}")

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def _write(tmp_path: Path, body: str, header: str = HEADER) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(header + body)
    return path


@pytest.mark.parametrize(
    ("prompt", "output", "kind"),
    [(512, 128, "LPLD"), (513, 128, "HPLD"), (512, 129, "LPHD"), (513, 129, "HPHD"), (1, 1, "LPLD")],
)
def test_classify_thresholds_are_strictly_greater(prompt: int, output: int, kind: str) -> None:
    assert classify(Request(0.0, prompt, output)) == kind


def test_load_trace_sorts_and_measures_seconds_from_the_first(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "2023-11-16 18:15:50.5000000,600,200\n"
        "2023-11-16 18:15:46.2500000,100,0\n"  # zero output tokens count as one
        "2023-11-16 18:16:46.2500001,0,30\n",
    )
    trace = load_trace(path)
    assert trace == (
        Request(0.0, 100, 1),
        Request(4.25, 600, 200),
        Request(60.0, 1, 30),
    )


@pytest.mark.parametrize(
    ("header", "body", "message"),
    [
        ("TIMESTAMP,Prompt,Output\n", "2023-11-16 18:15:46,1,2\n", "expected columns"),
        (HEADER, "2023-11-16 18:15:46,ten,2\n", r"trace.csv:2: bad row"),
        (HEADER, "2023-11-16 18:15:46,1,2\nyesterday,1,2\n", r"trace.csv:3: bad row"),
        (HEADER, "2023-11-16 18:15:46,1\n", r"trace.csv:2: bad row"),
        (HEADER, "", "no requests"),
        ("", "", "expected columns"),
    ],
)
def test_bad_traces(tmp_path: Path, header: str, body: str, message: str) -> None:
    with pytest.raises(WorkloadError, match=message):
        load_trace(_write(tmp_path, body, header))


def test_missing_trace(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match=r"cannot read trace .*nope\.csv"):
        load_trace(tmp_path / "nope.csv")


def _mixed_trace() -> tuple[Request, ...]:
    # Two requests of each class, one second apart.
    lengths = [(100, 20), (600, 20), (100, 300), (600, 300), (50, 5), (700, 10), (200, 500), (900, 900)]
    return tuple(Request(float(i), p, o) for i, (p, o) in enumerate(lengths))


@pytest.mark.parametrize("kind", ["HPLD", "HPHD", "LPHD", "LPLD"])
def test_offline_classes_sample_only_their_class(kind: str) -> None:
    w = workload_from_trace(_mixed_trace(), kind, count=50, seed=3)
    assert w.name == kind
    assert len(w.requests) == 50
    assert all(classify(r) == kind and r.arrival_s == 0.0 for r in w.requests)
    assert w == workload_from_trace(_mixed_trace(), kind, count=50, seed=3)


def test_online_is_a_contiguous_slice_starting_at_zero() -> None:
    trace = _mixed_trace()
    w = workload_from_trace(trace, "online", count=3, seed=1)
    lengths = [(r.prompt_tokens, r.output_tokens) for r in trace]  # all distinct
    first = lengths.index((w.requests[0].prompt_tokens, w.requests[0].output_tokens))
    assert [(r.prompt_tokens, r.output_tokens) for r in w.requests] == lengths[first : first + 3]
    assert [r.arrival_s for r in w.requests] == [0.0, 1.0, 2.0]


def test_unknown_kind_and_empty_class() -> None:
    with pytest.raises(WorkloadError, match="unknown workload 'HEAVY'"):
        workload_from_trace(_mixed_trace(), "HEAVY")
    with pytest.raises(WorkloadError, match="no HPHD requests"):
        workload_from_trace((Request(0.0, 10, 10),), "HPHD")


def test_max_context_clips_to_fit() -> None:
    trace = (Request(0.0, 3000, 1000),)
    (r,) = workload_from_trace(trace, "HPHD", count=1, max_context=2048).requests
    # output capped at a quarter of the context, the prompt fills the rest
    assert (r.prompt_tokens, r.output_tokens) == (1536, 512)


def test_workload_means_and_rates() -> None:
    w = Workload("w", (Request(0.0, 100, 10), Request(2.0, 300, 30), Request(4.0, 200, 20)))
    assert w.mean_prompt == 200
    assert w.mean_prompt_sq == pytest.approx((100**2 + 300**2 + 200**2) / 3)
    assert w.mean_output == 20
    assert w.mean_context == 210  # prompt + half the output
    assert w.mean_total == 220
    assert w.duration_s == 4.0
    fast = w.at_rate(2.0)  # two gaps in one second
    assert [r.arrival_s for r in fast.requests] == pytest.approx([0.0, 0.5, 1.0])
    assert [r.arrival_s for r in w.offline().requests] == [0.0, 0.0, 0.0]
    burst = synthetic("s", 64, 8, count=4)
    assert [r.arrival_s for r in burst.at_rate(4.0).requests] == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(WorkloadError, match="positive"):
        w.at_rate(0)
    with pytest.raises(WorkloadError, match="no requests"):
        Workload("empty", ())


@needs_trace
def test_real_trace_loads_every_row_in_order() -> None:
    with TRACE.open(newline="") as f:
        rows = list(csv.DictReader(f))
    trace = load_trace(TRACE)
    assert len(trace) == len(rows) > 10_000
    assert trace[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(trace))
    # The conversation trace spans about an hour.
    assert 3000 < trace[-1].arrival_s < 4000
    assert sorted(r.prompt_tokens for r in trace) == sorted(max(1, int(r["ContextTokens"])) for r in rows)


@needs_trace
def test_real_trace_has_every_class() -> None:
    trace = load_trace(TRACE)
    for kind in WORKLOAD_KINDS:
        w = workload_from_trace(trace, kind, count=1000, seed=0)
        assert len(w.requests) == 1000
        if kind != "online":
            assert {classify(r) for r in w.requests} == {kind}
    online = workload_from_trace(trace, "online", count=1000, seed=0)
    assert online.duration_s > 0
    assert online.mean_prompt > 0 and online.mean_output > 0
