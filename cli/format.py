"""Rendering of ``hexgen-node plan`` results: aligned text tables for people, one JSON object for scripts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hexgen.coordinator.cluster import Cluster
from hexgen.coordinator.cost import CostModel, LengthStats
from hexgen.coordinator.plan import ROLES, SINK, SOURCE, Flow, Group, Plan, layer_range
from hexgen.coordinator.specs import ModelSpec
from hexgen.coordinator.workload import Workload
from hexgen.engine.quant_bytes import name_of


@dataclass(frozen=True)
class BaselineResult:
    """A baseline's plan, or the reason (``error``) it could not place the model."""

    name: str
    plan: Plan | None
    error: str | None


@dataclass(frozen=True)
class PlanReport:
    """Everything ``hexgen-node plan`` shows: the inputs, the HexGen-2 plan and the baselines."""

    cluster: Cluster
    model: ModelSpec
    workload: Workload
    plan: Plan
    baselines: tuple[BaselineResult, ...]
    seconds: float

    def tokens_per_s(self, plan: Plan) -> float:
        """Output tokens/s of a plan: requests/s times the workload's mean output length."""
        return plan.throughput * self.workload.mean_output

    def memory(self, group: Group) -> tuple[float, float]:
        """(weight bytes of the whole replica, the most any one of its GPUs holds), quantized as the model
        spec says. O(stages)."""
        cost = CostModel(self.cluster, self.model, LengthStats.of(self.workload))
        last = len(group.stages) - 1
        shares = [cost.stage_weight_bytes(s.num_layers, s.tp, i == 0, i == last) for i, s in enumerate(group.stages)]
        return sum(share * s.tp for share, s in zip(shares, group.stages, strict=True)), max(shares)

    def ratio(self, baseline: Plan) -> float | None:
        """HexGen-2 throughput over the baseline's; None when the baseline serves nothing."""
        return self.plan.throughput / baseline.throughput if baseline.throughput > 0 else None


def table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[int] = (), indent: int = 2
) -> list[str]:
    """Lines of a table with columns padded to their widest cell; columns listed in ``right`` align right."""
    cells = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append((" " * indent + "  ".join(padded)).rstrip())
    return lines


def gpu_summary(cluster: Cluster, gpu_ids: Iterable[int]) -> str:
    """GPUs grouped by host in cluster order, e.g. ``a100-0:A100 x 4, l40-0:L40 x 2``."""
    counts: dict[str, int] = {}
    for i in sorted(gpu_ids):
        counts[cluster.gpus[i].host] = counts.get(cluster.gpus[i].host, 0) + 1
    return ", ".join(f"{h}:{cluster.gpus[cluster.hosts[h][0]].type} x {n}" for h, n in counts.items())


def _endpoint(plan: Plan, end: int | str) -> str:
    if end in (SOURCE, SINK):
        return str(end)
    return f"{end} ({plan.group(int(end)).role})"


def _flow_order(flow: Flow) -> tuple[int, int]:
    """Source edges first, then group to group by source id, then edges into the sink."""
    if flow.src == SOURCE:
        return (0, int(flow.dst))
    if flow.dst == SINK:
        return (2, int(flow.src))
    return (1, int(flow.src))


def _si(x: float) -> str:
    """A count with a decimal prefix: 68.98 G, 259.3 k."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.2f} {prefix}"
    return f"{x:.0f} "


def _rps(x: float) -> str:
    return f"{x:.3f}"


def _tokens(x: float) -> str:
    return f"{x:,.0f}"


def _roles(plan: Plan) -> str:
    counts: dict[str, int] = {}
    for g in plan.groups:
        counts[g.role] = counts.get(g.role, 0) + 1
    return ", ".join(f"{counts[role]} {role}" for role in ROLES if role in counts)


def report_text(r: PlanReport) -> str:
    """The human-readable report: inputs, groups, flows, throughput, and the baselines beside it."""
    c, m, w, p = r.cluster, r.model, r.workload, r.plan
    hosts = ", ".join(f"{h} ({c.gpus[ids[0]].type} x {len(ids)})" for h, ids in c.hosts.items())
    lines = [
        f"cluster   {c.describe()}",
        f"hosts     {hosts}",
        f"model     {m.name}: {m.layers} layers, {_si(m.params)} parameters, {_si(m.weight_bytes)}B of weights "
        f"(linear weights: {m.prequantized.name if m.prequantized else name_of(m.quantize)})",
        f"workload  {w.name}: {len(w.requests)} requests, mean prompt {w.mean_prompt:,.0f} tokens, "
        f"mean output {w.mean_output:,.0f} tokens",
        f"planned   in {r.seconds:.2f} s",
        "",
        "groups",
    ]
    rows = []
    for g in p.groups:
        weights, most = r.memory(g)
        for i, stage in enumerate(g.stages):
            head = [str(g.id), g.role, f"{_rps(g.capacity)} req/s", f"{_si(weights)}B", f"{_si(most)}B"]
            head = head if i == 0 else [""] * len(head)
            rows.append([*head, str(i), gpu_summary(c, stage.gpus), str(stage.tp), layer_range(*stage.layers)])
    headers = ["id", "role", "capacity", "weights", "per GPU", "stage", "GPUs", "TP", "layers"]
    lines += table(headers, rows, right=(0, 2, 3, 4, 5, 7, 8))
    lines.append("  weights: the replica's weight memory; per GPU: the most any of its GPUs holds")
    unused = sorted(set(range(len(c))) - set(p.gpus))
    lines.append(f"  unused GPUs: {gpu_summary(c, unused) if unused else 'none'}")
    lines += ["", "flows"]
    flows = sorted((f for f in p.flows if f.rate > 0), key=_flow_order)
    lines += table(
        ["from", "", "to", "req/s"],
        ([_endpoint(p, f.src), "->", _endpoint(p, f.dst), _rps(f.rate)] for f in flows),
        right=(3,),
    )
    lines += [
        "",
        f"predicted throughput  {_rps(p.throughput)} req/s, {_tokens(r.tokens_per_s(p))} tokens/s "
        f"(bottleneck: {p.bottleneck})",
        "",
    ]
    rows = [["hexgen-2 (this plan)", _rps(p.throughput), _tokens(r.tokens_per_s(p)), "1.00x", p.bottleneck, _roles(p)]]
    for b in r.baselines:
        if b.plan is None:
            rows.append([b.name, "-", "-", "-", "-", f"infeasible: {b.error}"])
            continue
        ratio = r.ratio(b.plan)
        shown = f"{ratio:.2f}x" if ratio is not None else "-"
        q = b.plan
        rows.append([b.name, _rps(q.throughput), _tokens(r.tokens_per_s(q)), shown, q.bottleneck, _roles(q)])
    lines += table(["plan", "req/s", "tokens/s", "ratio", "bottleneck", "groups"], rows, right=(1, 2, 3))
    lines.append("  ratio: hexgen-2's predicted throughput over the plan's, in the same cost model")
    return "\n".join(lines)


def report_json(r: PlanReport) -> dict[str, Any]:
    """One JSON-ready object: ``plan.to_dict()`` plus the inputs, tokens/s and each baseline."""
    c, w = r.cluster, r.workload
    baselines: dict[str, Any] = {}
    for b in r.baselines:
        if b.plan is None:
            baselines[b.name] = {"error": b.error}
        else:
            baselines[b.name] = {**b.plan.to_dict(), "tokens_per_s": r.tokens_per_s(b.plan), "ratio": r.ratio(b.plan)}
    return {
        "cluster": {
            "name": c.name,
            "price_per_hour": round(c.price_per_hour, 6),
            "gpus": [{"id": g.id, "host": g.host, "type": g.type} for g in c.gpus],
        },
        "model": r.model.name,
        "quantize": name_of(r.model.quantize),
        "weight_bytes": r.model.weight_bytes,
        "replica_memory": [
            {"group": g.id, "weight_bytes": weights, "max_gpu_weight_bytes": most}
            for g in r.plan.groups
            for weights, most in [r.memory(g)]
        ],
        "workload": {
            "name": w.name,
            "requests": len(w.requests),
            "mean_prompt": w.mean_prompt,
            "mean_output": w.mean_output,
        },
        **r.plan.to_dict(),
        "tokens_per_s": r.tokens_per_s(r.plan),
        "plan_seconds": r.seconds,
        "baselines": baselines,
    }
