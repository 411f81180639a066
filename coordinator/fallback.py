"""The plan of last resort, and the check that sends a plan there.

When worlds across hosts cannot form (a blocked link, repeated worker failures), the swarm still serves:
every host that can hold a replica on its own GPUs runs one colocated replica, and no world or exchange
group crosses a host. ``needs_pair`` tells whether a plan would need a link it cannot have: across a blocked
pair (a world failed there) no group and no exchange (every rank of an epoch joins one group); across a
worldless pair (relayed or hole-punched) no stage (a tensor-parallel world), while a stage boundary (a bridged
group) and a KV hand-off may cross it, carried by the daemons.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from hexgen.coordinator.cluster import Cluster
from hexgen.coordinator.evaluate import Evaluator, PlanError
from hexgen.coordinator.plan import SINK, SOURCE, Flow, Group, Plan
from hexgen.coordinator.specs import ModelSpec
from hexgen.coordinator.workload import Workload


def colocated_plan(cluster: Cluster, model: ModelSpec, workload: Workload) -> Plan:
    """One colocated replica per host that can hold one on its own GPUs (the best layout of them, which may
    leave some out), flows in proportion to each replica's rate. Raises PlanError when no host can.
    Deterministic; O(hosts x layout search)."""
    evaluator = Evaluator(cluster, model, workload)
    groups: list[Group] = []
    for host in sorted(cluster.hosts):
        layout = evaluator.layouts.best(cluster.hosts[host], "colocated")
        if layout is None or layout.rate <= 0:
            continue
        groups.append(Group(len(groups), "colocated", layout.stages, layout.rate, layout.batch))
    if not groups:
        raise PlanError(f"no host can hold a replica of {model.name} on its own GPUs")
    flows = [Flow(SOURCE, g.id, g.capacity) for g in groups] + [Flow(g.id, SINK, g.capacity) for g in groups]
    total = sum(g.capacity for g in groups)
    return Plan(tuple(groups), tuple(flows), total, "one replica per host", {"planner": "colocated-fallback"})


def needs_pair(
    plan: Plan,
    gpu_peer: Mapping[int, str],
    blocked: Iterable[tuple[str, str]],
    worldless: Iterable[tuple[str, str]] = (),
) -> tuple[str, str] | None:
    """The first pair of peers ``plan`` cannot have: a ``blocked`` pair that a group or the epoch's exchange
    spans, else a ``worldless`` pair that a stage spans; None when there is none. ``gpu_peer``: the peer of
    each planner GPU. O(GPUs + pairs x stages)."""
    spans = [{gpu_peer[g] for g in group.gpus} for group in plan.groups]
    stages = [{gpu_peer[g] for g in stage.gpus} for group in plan.groups for stage in group.stages]
    if any(group.role == "prefill" for group in plan.groups):
        spans.append(set().union(*spans))  # the epoch's exchange group holds every rank
    for pairs, among in ((blocked, spans), (worldless, stages)):
        for a, b in pairs:
            if any(a in span and b in span for span in among):
                return (a, b)
    return None
