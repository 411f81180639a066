"""The planner's output: groups of GPUs with a role and a stage layout, and the flows between them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["prefill", "decode", "colocated"]
ROLES: tuple[Role, ...] = ("prefill", "decode", "colocated")
SOURCE = "source"
SINK = "sink"


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: its tensor-parallel GPUs (in rank order) and its layer range [start, end)."""

    gpus: tuple[int, ...]
    layers: tuple[int, int]

    @property
    def tp(self) -> int:
        return len(self.gpus)

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class Group:
    """One model replica: a role, its stages, its capacity in requests/s and its decode batch."""

    id: int
    role: Role
    stages: tuple[Stage, ...]
    capacity: float
    batch: int

    @property
    def gpus(self) -> tuple[int, ...]:
        return tuple(g for s in self.stages for g in s.gpus)

    @property
    def pp(self) -> int:
        return len(self.stages)

    def layout(self) -> str:
        return " | ".join(f"TP{s.tp} L{s.layers[0]}-{s.layers[1] - 1}" for s in self.stages)


@dataclass(frozen=True)
class Flow:
    """Requests/s from ``src`` to ``dst``; each end is SOURCE, SINK or a group id."""

    src: int | str
    dst: int | str
    rate: float


@dataclass(frozen=True)
class Plan:
    groups: tuple[Group, ...]
    flows: tuple[Flow, ...]
    throughput: float
    bottleneck: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def gpus(self) -> tuple[int, ...]:
        return tuple(g for group in self.groups for g in group.gpus)

    def group(self, group_id: int) -> Group:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise KeyError(group_id)

    def out_flows(self, src: int | str) -> tuple[Flow, ...]:
        return tuple(f for f in self.flows if f.src == src and f.rate > 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "throughput_rps": self.throughput,
            "bottleneck": self.bottleneck,
            "groups": [
                {
                    "id": g.id,
                    "role": g.role,
                    "capacity_rps": g.capacity,
                    "batch": g.batch,
                    "stages": [{"gpus": list(s.gpus), "layers": list(s.layers)} for s in g.stages],
                }
                for g in self.groups
            ],
            "flows": [{"src": f.src, "dst": f.dst, "rate": f.rate} for f in self.flows],
            "meta": self.meta,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Plan:
        groups = tuple(
            Group(
                id=int(g["id"]),
                role=g["role"],
                stages=tuple(Stage(tuple(s["gpus"]), (s["layers"][0], s["layers"][1])) for s in g["stages"]),
                capacity=float(g["capacity_rps"]),
                batch=int(g["batch"]),
            )
            for g in data["groups"]
        )
        flows = tuple(Flow(f["src"], f["dst"], float(f["rate"])) for f in data["flows"])
        return Plan(groups, flows, float(data["throughput_rps"]), str(data["bottleneck"]), dict(data.get("meta", {})))
