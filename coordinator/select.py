"""The one rule that picks a plan from a search's finalists, the same for HexGen-2 and every baseline.

The best predicted throughput wins. The max-flow value is a steady-state rate: an offline batch also
pays a ramp-up (decode waits for its first KV caches), a drain (the last prefilled requests still need
their whole decode) and the imbalance of a static split, which move a plan's batch throughput by a few
per cent either way. So when the caller has a held-out offline sample of its workload (never the
requests it will be scored on), the finalists within ``tie_band`` of the best predicted throughput
are replayed on it in the simulator, and the one that finishes it soonest wins (then the lower mean
latency, then the higher prediction). An online workload is never tie-broken: at low load every plan
keeps up, and a tie-break there would give away peak throughput for nothing the trace can show.
"""

from __future__ import annotations

from collections.abc import Sequence

from hexgen.coordinator.evaluate import Assignment, Evaluation, Evaluator
from hexgen.coordinator.simulator import simulate
from hexgen.coordinator.workload import Workload


def is_offline_batch(workload: Workload) -> bool:
    """True when every request arrives at once: the batch is done when its last request is."""
    first = workload.requests[0].arrival_s
    return all(r.arrival_s == first for r in workload.requests)


def select(
    evaluator: Evaluator,
    finalists: Sequence[Evaluation],
    *,
    tie_band: float = 0.05,
    holdout: Workload | None = None,
    holdout_requests: int = 2000,
    seed: int = 0,
) -> tuple[Evaluation, dict[str, object]]:
    """The chosen finalist and what the tie-break did (empty when it did not run).

    ``finalists`` must be non-empty. One simulation of at most ``holdout_requests`` held-out requests per
    tied finalist, O(R log R + I * S) each.
    """
    unique: dict[Assignment, Evaluation] = {}
    for ev in sorted(finalists, key=lambda e: e.key(), reverse=True):
        unique.setdefault(ev.assignment, ev)
    ordered = list(unique.values())
    top = ordered[0]
    if holdout is None or tie_band <= 0 or not holdout.requests or not is_offline_batch(holdout):
        return top, {}
    tied = [ev for ev in ordered if ev.value > 0 and ev.value >= top.value * (1 - tie_band)]
    if len(tied) < 2:
        return top, {}
    sample = holdout
    if len(holdout.requests) > holdout_requests:
        stride = len(holdout.requests) / holdout_requests
        sample = Workload(holdout.name, tuple(holdout.requests[int(i * stride)] for i in range(holdout_requests)))
    chosen, chosen_score = top, (-1.0, 0.0, 0.0)
    for ev in tied:
        result = simulate(evaluator.to_plan(ev), evaluator.cost, sample, seed=seed)
        score = (result.tokens_per_s, -result.latency_mean_s, ev.value)
        if score > chosen_score:
            chosen, chosen_score = ev, score
    return chosen, {
        "tie_break": {
            "tied": len(tied),
            "holdout_requests": len(sample.requests),
            "simulated_tokens_per_s": chosen_score[0],
            "best_predicted_tokens_per_s": top.value * evaluator.workload.mean_output,
        }
    }
