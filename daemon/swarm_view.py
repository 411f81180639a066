"""Whole-swarm predicates over the daemons' status replies (``/hexgen/status/1``): pure functions.

A view maps each daemon's peer id to its status (None where it did not answer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

View = Mapping[str, dict[str, Any] | None]


def converged(view: View, ids: set[str]) -> bool:
    """Every daemon answered, sees exactly ``ids``, agrees on one coordinator and adopted one plan for ``ids``.
    O(daemons x members)."""
    if not view or any(s is None for s in view.values()):
        return False
    states = [s for s in view.values() if s is not None]
    coordinators = {s["coordinator"] for s in states}
    plans = {(s["plan"]["term"], s["plan"]["epoch"]) if s["plan"] else None for s in states}
    return (
        all(set(s["members"]) == ids for s in states)
        and len(coordinators) == 1
        and None not in coordinators
        and len(plans) == 1
        and None not in plans
        and all(set(s["plan"]["members"]) == ids for s in states)
        and sum(s["is_coordinator"] for s in states) == (1 if coordinators <= ids else 0)
    )


def serving(view: View, ids: set[str]) -> bool:
    """Converged, and every daemon runs the adopted epoch's workers, all ready."""
    if not converged(view, ids):
        return False
    states = [s for s in view.values() if s is not None]
    epoch = states[0]["plan"]["epoch"]
    return all(
        s.get("serving") is not None
        and s["serving"]["epoch"] == epoch
        and all(w["state"] == "ready" for w in s["serving"]["workers"].values())
        for s in states
    )


def assignments(body: dict[str, Any] | None) -> dict[str, list[dict[str, Any]]]:
    """Peer id -> the GPUs it serves in a plan body: ``{"gpu", "group", "role", "stage", "tp", "layers"}``.

    Tolerates a malformed or empty body (no assignments); O(GPUs in the plan)."""
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        gpus = body["gpus"]
        for group in body["plan"]["groups"]:
            for stage_index, stage in enumerate(group["stages"]):
                for gpu in stage["gpus"]:
                    peer, local = gpus[str(gpu)]
                    out.setdefault(str(peer), []).append(
                        {
                            "gpu": int(local),
                            "group": int(group["id"]),
                            "role": str(group["role"]),
                            "stage": stage_index,
                            "tp": len(stage["gpus"]),
                            "layers": list(stage["layers"]),
                        }
                    )
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError):  # int(inf), str(deep)
        return {}
    return out
