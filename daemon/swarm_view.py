"""Whole-swarm predicates over the daemons' status replies (``/hexgen/status/1``): pure functions.

A view maps each daemon's peer id to its status (None where it did not answer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hexgen.coordinator.plan import layer_range
from hexgen.daemon.messages import MessageError, PlanBody
from hexgen.daemon.status_reply import Status

View = Mapping[str, dict[str, Any] | None]


def parsed(view: View) -> list[Status] | None:
    """Every daemon's status through its parser; None when one did not answer or answered nonsense."""
    out = []
    for raw in view.values():
        try:
            out.append(Status.from_wire(raw))
        except MessageError:
            return None
    return out or None


def converged(view: View, ids: set[str]) -> bool:
    """Every daemon answered, sees exactly ``ids``, agrees on one coordinator and adopted one plan for ``ids``.
    O(daemons x members)."""
    states = parsed(view)
    return states is not None and _agree(states, ids)


def _agree(states: list[Status], ids: set[str]) -> bool:
    coordinators = {s.coordinator for s in states}
    plans = {(s.plan.term, s.plan.epoch) if s.plan else None for s in states}
    return (
        all(set(s.members) == ids for s in states)
        and len(coordinators) == 1
        and None not in coordinators
        and len(plans) == 1
        and None not in plans
        and all(s.plan is not None and set(s.plan.members) == ids for s in states)
        and sum(s.is_coordinator for s in states) == (1 if coordinators <= ids else 0)
    )


def serving(view: View, ids: set[str]) -> bool:
    """Converged, and every daemon runs the adopted epoch's workers, all ready (needs full statuses)."""
    states = parsed(view)
    if states is None or not _agree(states, ids):
        return False
    epoch = states[0].plan.epoch if states[0].plan else None
    return all(
        s.details is not None
        and s.details.serving is not None
        and s.details.serving.epoch == epoch
        and s.details.serving.all_ready
        for s in states
    )


def assignments(body: PlanBody | None) -> dict[str, list[dict[str, Any]]]:
    """Peer id -> the GPUs it serves in a plan: ``{"gpu", "group", "role", "stage", "tp", "layers"}``; empty for
    no plan, and GPUs the body does not place are left out. O(GPUs in the plan)."""
    out: dict[str, list[dict[str, Any]]] = {}
    if body is None or body.plan is None:
        return out
    for group in body.plan.groups:
        for stage_index, stage in enumerate(group.stages):
            for gpu in stage.gpus:
                if gpu not in body.gpus:
                    continue
                peer, local = body.gpus[gpu]
                role = {"gpu": local, "group": group.id, "role": group.role, "stage": stage_index, "tp": stage.tp}
                out.setdefault(peer, []).append(role | {"layers": list(stage.layers)})
    return out


def wire_assignments(raw: Any) -> dict[str, list[dict[str, Any]]]:
    """``assignments`` of a plan body as it came over the wire (a status reply's); empty when it does not parse."""
    try:
        return assignments(PlanBody.from_wire(raw))
    except MessageError:
        return {}


def describe_roles(body: PlanBody, peer_id: str) -> str:
    """What ``peer_id``'s GPUs do in a plan, as the tail of an event line."""
    roles = assignments(body).get(peer_id, [])
    if not roles:
        return ": no GPU of this node serves in it"
    return ": " + ", ".join(
        f"GPU {r['gpu']} {r['role']} in group {r['group']} stage {r['stage']} (layers {layer_range(*r['layers'])})"
        for r in roles
    )
