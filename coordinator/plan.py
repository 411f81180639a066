"""The planner's output: groups of GPUs with a role and a stage layout, and the flows between them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["prefill", "decode", "colocated"]
ROLES: tuple[Role, ...] = ("prefill", "decode", "colocated")
SOURCE = "source"
SINK = "sink"


class PlanFormatError(ValueError):
    """A plan map (``Plan.to_dict`` output, from a peer) that ``Plan.from_dict`` cannot read; the message says why."""


def layer_range(start: int, end: int) -> str:
    """How every output writes a stage's layers: half-open, ``[0, 5)`` is layers 0 to 4 (README, "Layer ranges")."""
    return f"[{start}, {end})"


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
        return " | ".join(f"TP{s.tp} {layer_range(*s.layers)}" for s in self.stages)


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
    def from_dict(data: Any) -> Plan:
        """Parse ``to_dict`` output from an untrusted peer; raises PlanFormatError, and nothing else, on any
        other input. O(size of the plan)."""
        groups = tuple(_group(g, f"group {i}") for i, g in enumerate(_field(data, "groups", list, "plan")))
        flows = tuple(
            Flow(
                _end(_field(f, "src", (int, str), "flow"), SOURCE),
                _end(_field(f, "dst", (int, str), "flow"), SINK),
                _number(_field(f, "rate", (int, float), "flow"), "flow rate"),
            )
            for f in _field(data, "flows", list, "plan")
        )
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise PlanFormatError("plan meta must be a map")
        throughput = _number(_field(data, "throughput_rps", (int, float), "plan"), "plan throughput_rps")
        return Plan(groups, flows, throughput, _field(data, "bottleneck", str, "plan"), dict(meta))


def _field(data: Any, name: str, kinds: type | tuple[type, ...], where: str) -> Any:
    """``data[name]``, checked to be one of ``kinds`` (never a bool); PlanFormatError otherwise."""
    if not isinstance(data, dict):
        raise PlanFormatError(f"{where} must be a map, got {type(data).__name__}")
    if name not in data:
        raise PlanFormatError(f"{where} lacks {name!r}")
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise PlanFormatError(f"{where} has a {type(value).__name__} for {name!r}")
    return value


def _number(value: int | float, what: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise PlanFormatError(f"{what} is out of range") from None


def _int_list(value: Any, what: str, length: int | None = None) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not value
        or (length is not None and len(value) != length)
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    ):
        count = f"{length} " if length is not None else "a non-empty list of "
        raise PlanFormatError(f"{what} must be {count}integers")
    return tuple(value)


def _group(data: Any, where: str) -> Group:
    role = _field(data, "role", str, where)
    if role not in ROLES:
        raise PlanFormatError(f"{where} has unknown role {role[:40]!r}")
    stages = []
    for j, stage in enumerate(_field(data, "stages", list, where)):
        gpus = _int_list(_field(stage, "gpus", list, f"{where} stage {j}"), f"{where} stage {j} gpus")
        start, end = _int_list(_field(stage, "layers", list, f"{where} stage {j}"), f"{where} stage {j} layers", 2)
        stages.append(Stage(gpus, (start, end)))
    capacity = _number(_field(data, "capacity_rps", (int, float), where), f"{where} capacity_rps")
    return Group(_field(data, "id", int, where), role, tuple(stages), capacity, _field(data, "batch", int, where))


def _end(value: int | str, terminal: str) -> int | str:
    """A flow end: a group id, or the terminal (SOURCE or SINK) that end may name."""
    if isinstance(value, str) and value != terminal:
        raise PlanFormatError(f"a flow end is a group id or {terminal!r}, got {value[:40]!r}")
    return value
