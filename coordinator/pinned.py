"""Pinned plans: an operator's own layout in TOML, served instead of the planner's when its hosts are present.

    [[groups]]
    role = "prefill"                                  # prefill | decode | colocated
    stages = [{ gpus = ["host-a", "host-b"], layers = [0, 5] }]

    [[groups]]
    role = "decode"
    stages = [{ gpus = ["host-c"], layers = [0, 3] }, { gpus = ["host-d:1"], layers = [3, 5] }]

Each entry of ``gpus`` is one GPU: ``HOST`` (its GPU 0) or ``HOST:INDEX``, tensor ranks in order. Flows
are even: from the source to every prefill and colocated group, from every prefill group to every
decode group, and from every decode and colocated group to the sink.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hexgen.coordinator.plan import ROLES, SINK, SOURCE, Flow, Group, Plan, Role, Stage, layer_range


class PinnedPlanError(ValueError):
    """The pinned plan is malformed, or does not fit the swarm; the message names the problem."""


@dataclass(frozen=True)
class PinnedStage:
    gpus: tuple[tuple[str, int], ...]
    layers: tuple[int, int]


@dataclass(frozen=True)
class PinnedGroup:
    role: Role
    stages: tuple[PinnedStage, ...]


def parse_pinned(text: str, num_layers: int | None = None) -> tuple[PinnedGroup, ...]:
    """The groups of a pinned-plan TOML document; raises PinnedPlanError. O(size of the document)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PinnedPlanError(f"not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per level of nesting
        raise PinnedPlanError("not valid TOML: values nested too deeply") from None
    raw_groups = data.get("groups")
    if not isinstance(raw_groups, list) or not raw_groups:
        raise PinnedPlanError("a pinned plan needs at least one [[groups]] table")
    seen: set[tuple[str, int]] = set()
    groups = [_group(raw, f"group {i}", seen, num_layers) for i, raw in enumerate(raw_groups)]
    roles = {g.role for g in groups}
    if "prefill" in roles and "decode" not in roles:
        raise PinnedPlanError("prefill groups need at least one decode group")
    if roles == {"decode"}:
        raise PinnedPlanError("a plan of decode groups alone cannot take requests")
    return tuple(groups)


def _group(raw: Any, where: str, seen: set[tuple[str, int]], num_layers: int | None) -> PinnedGroup:
    """One [[groups]] table; adds its GPUs to ``seen``, which must not hold them already."""
    if not isinstance(raw, dict) or raw.get("role") not in ROLES:
        raise PinnedPlanError(f"{where}: role must be one of {', '.join(ROLES)}")
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise PinnedPlanError(f"{where}: needs a non-empty list of stages")
    parsed: list[PinnedStage] = []
    for j, stage in enumerate(stages):
        parsed.append(_stage(stage, f"{where} stage {j}", parsed[-1].layers[1] if parsed else 0, seen))
    covered = parsed[-1].layers[1]
    if num_layers is not None and covered != num_layers:
        raise PinnedPlanError(f"{where}: stages cover layers {layer_range(0, covered)}, the model has {num_layers}")
    return PinnedGroup(ROLES[ROLES.index(raw["role"])], tuple(parsed))


def _stage(stage: Any, where: str, expected_start: int, seen: set[tuple[str, int]]) -> PinnedStage:
    """One stage table, whose layers must start at ``expected_start``; adds its GPUs to ``seen``."""
    if not isinstance(stage, dict):
        raise PinnedPlanError(f"{where}: must be a table with gpus and layers")
    layers = stage.get("layers")
    if (
        not isinstance(layers, list)
        or len(layers) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
        or layers[0] != expected_start
        or layers[1] <= layers[0]
    ):
        raise PinnedPlanError(f"{where}: layers must be [start, end) continuing from {expected_start}")
    gpus = stage.get("gpus")
    if not isinstance(gpus, list) or not gpus:
        raise PinnedPlanError(f"{where}: gpus must be a non-empty list of HOST or HOST:INDEX")
    places = tuple(_gpu(entry, where) for entry in gpus)
    for place in places:
        if place in seen:
            raise PinnedPlanError(f"{where}: GPU {place[0]}:{place[1]} is used twice")
        seen.add(place)
    return PinnedStage(places, (layers[0], layers[1]))


def _gpu(entry: Any, where: str) -> tuple[str, int]:
    if not isinstance(entry, str) or not entry:
        raise PinnedPlanError(f"{where}: each GPU is a string HOST or HOST:INDEX, got {entry!r}")
    host, _, index = entry.partition(":")
    if not host or (index and not (index.isascii() and index.isdigit() and len(index) <= 6)):  # not "²", not huge
        raise PinnedPlanError(f"{where}: each GPU is a string HOST or HOST:INDEX, got {entry!r}")
    return host, int(index or 0)


def pinned_plan(groups: tuple[PinnedGroup, ...], gpu_index: Mapping[tuple[str, int], int]) -> Plan:
    """The Plan of pinned ``groups`` given the cluster's GPU index of each (host name, local GPU).

    Raises PinnedPlanError naming the first GPU the cluster does not have. O(GPUs + groups^2).
    """
    plan_groups = []
    for gid, group in enumerate(groups):
        stages = []
        for stage in group.stages:
            missing = [f"{h}:{i}" for h, i in stage.gpus if (h, i) not in gpu_index]
            if missing:
                raise PinnedPlanError(f"the swarm has no GPU {missing[0]}")
            stages.append(Stage(tuple(gpu_index[g] for g in stage.gpus), stage.layers))
        plan_groups.append(Group(gid, group.role, tuple(stages), 0.0, 0))
    flows = []
    for g in plan_groups:
        if g.role in ("prefill", "colocated"):
            flows.append(Flow(SOURCE, g.id, 1.0))
        if g.role in ("decode", "colocated"):
            flows.append(Flow(g.id, SINK, 1.0))
        if g.role == "prefill":
            flows.extend(Flow(g.id, d.id, 1.0) for d in plan_groups if d.role == "decode")
    return Plan(tuple(plan_groups), tuple(flows), 0.0, "pinned", {"planner": "pinned"})
