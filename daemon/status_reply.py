"""A daemon's status reply (``/hexgen/status/1`` and ``GET /status``) as a typed value, brief or full.

``to_wire`` is what the daemon sends; ``from_wire`` is the one parser of a reply, over msgpack or JSON (the
HTTP status is the same map), raising ``MessageError``. A brief status carries who is in the swarm, who
coordinates and which plan is adopted; a full one adds this node's details and the plan's body.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hexgen.daemon.messages import MessageError, PlanBody

MAX_ITEMS = 4096
WORKER_STATES = ("starting", "joining", "ready", "failed")


def _map(raw: Any, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise MessageError(f"{what} is a map")
    return raw


def _list(raw: Any, what: str) -> list[Any]:
    if not isinstance(raw, list) or len(raw) > MAX_ITEMS:
        raise MessageError(f"{what} is a list of at most {MAX_ITEMS} items")
    return raw


def _str(raw: Any, what: str) -> str:
    if not isinstance(raw, str):
        raise MessageError(f"{what} is a string")
    return raw


def _int(raw: Any, what: str) -> int:
    if type(raw) is not int:
        raise MessageError(f"{what} is an integer")
    return raw


def _optional_int(raw: Any, what: str) -> int | None:
    return None if raw is None else _int(raw, what)


def _strings(raw: Any, what: str) -> tuple[str, ...]:
    return tuple(_str(item, what) for item in _list(raw, what))


@dataclass(frozen=True)
class WorkerStatus:
    """One local worker process: its replica, role, the epoch its world formed in and its state."""

    replica: int
    role: str
    formed: int | None
    state: str
    error: str | None = None
    pid: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "role": self.role,
            "formed": self.formed,
            "state": self.state,
            "error": self.error,
            "pid": self.pid,
        }

    @staticmethod
    def from_wire(raw: Any) -> WorkerStatus:
        body = _map(raw, "a worker status")
        state = body.get("state")
        if state not in WORKER_STATES:
            raise MessageError(f"a worker's state is one of {', '.join(WORKER_STATES)}")
        error = body.get("error")
        return WorkerStatus(
            replica=_int(body.get("replica"), "a worker's replica"),
            role=_str(body.get("role"), "a worker's role"),
            formed=_optional_int(body.get("formed"), "a worker's formed epoch"),
            state=state,
            error=None if error is None else _str(error, "a worker's error"),
            pid=_optional_int(body.get("pid"), "a worker's pid"),
        )


@dataclass(frozen=True)
class ServingStatus:
    """This daemon's workers: the epoch they serve, each by global rank, and requests in flight."""

    model: str
    epoch: int | None
    workers: Mapping[int, WorkerStatus]
    in_flight: int = 0

    @property
    def all_ready(self) -> bool:
        return all(w.state == "ready" for w in self.workers.values())

    def to_wire(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "epoch": self.epoch,
            "workers": {str(rank): w.to_wire() for rank, w in sorted(self.workers.items())},
            "in_flight": self.in_flight,
        }

    @staticmethod
    def from_wire(raw: Any) -> ServingStatus:
        body = _map(raw, "a serving status")
        workers = _map(body.get("workers"), "the workers")
        if not all(isinstance(rank, str) and rank.isdigit() and len(rank) < 10 for rank in workers):
            raise MessageError("workers are keyed by rank")
        return ServingStatus(
            model=_str(body.get("model"), "the served model"),
            epoch=_optional_int(body.get("epoch"), "the served epoch"),
            workers={int(rank): WorkerStatus.from_wire(w) for rank, w in workers.items()},
            in_flight=_int(body.get("in_flight", 0), "requests in flight"),
        )


@dataclass(frozen=True)
class PlanSummary:
    """The adopted plan: its version, signer and members; its body in a full status only."""

    term: int
    epoch: int
    coordinator: str
    members: tuple[str, ...]
    body: PlanBody | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "term": self.term,
            "epoch": self.epoch,
            "coordinator": self.coordinator,
            "members": list(self.members),
        }
        if self.body is not None:
            out["body"] = self.body.to_wire()
        return out

    @staticmethod
    def from_wire(raw: Any) -> PlanSummary:
        body = _map(raw, "a plan summary")
        return PlanSummary(
            term=_int(body.get("term"), "the plan's term"),
            epoch=_int(body.get("epoch"), "the plan's epoch"),
            coordinator=_str(body.get("coordinator"), "the plan's coordinator"),
            members=_strings(body.get("members"), "the plan's members"),
            body=None if body.get("body") is None else PlanBody.from_wire(body["body"]),
        )


@dataclass(frozen=True)
class Details:
    """What a full status adds: this node, its peers as it sees them, its counters and its serving state.
    Peer records, links, events and the like stay plain maps: they are shown, not acted on."""

    addrs: tuple[str, ...]
    host: str
    hardware: Mapping[str, Any]
    model: str
    swarm: str
    reachability: str = "unknown"  # whether other hosts can dial this node: "public", "private", "unknown"
    load: Mapping[str, Any] = field(default_factory=dict)
    roles: tuple[Mapping[str, Any], ...] = ()
    peers: tuple[Mapping[str, Any], ...] = ()
    rejections: Mapping[str, int] = field(default_factory=dict)
    flagged: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    blocked: tuple[Mapping[str, Any], ...] = ()
    spot_checks: Mapping[str, int] = field(default_factory=dict)
    links: tuple[Mapping[str, Any], ...] = ()
    serving: ServingStatus | None = None
    events: tuple[Mapping[str, Any], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "addrs": list(self.addrs),
            "host": self.host,
            "hardware": dict(self.hardware),
            "model": self.model,
            "load": dict(self.load),
            "roles": [dict(r) for r in self.roles],
            "swarm": self.swarm,
            "reachability": self.reachability,
            "peers": [dict(p) for p in self.peers],
            "rejections": dict(self.rejections),
            "flagged": {k: dict(v) for k, v in self.flagged.items()},
            "blocked": [dict(b) for b in self.blocked],
            "spot_checks": dict(self.spot_checks),
            "links": [dict(link) for link in self.links],
            "serving": None if self.serving is None else self.serving.to_wire(),
            "events": [dict(e) for e in self.events],
        }

    @staticmethod
    def from_wire(body: dict[str, Any]) -> Details:
        def maps(name: str) -> tuple[dict[str, Any], ...]:
            return tuple(_map(item, name) for item in _list(body.get(name, []), name))

        serving = body.get("serving")
        return Details(
            addrs=_strings(body.get("addrs"), "the addresses"),
            host=_str(body.get("host"), "the host name"),
            hardware=_map(body.get("hardware"), "the hardware"),
            model=_str(body.get("model"), "the model"),
            swarm=_str(body.get("swarm"), "the swarm"),
            reachability=_str(body.get("reachability", "unknown"), "the reachability"),
            load=_map(body.get("load", {}), "the load"),
            roles=maps("roles"),
            peers=maps("peers"),
            rejections=_map(body.get("rejections", {}), "the rejections"),
            flagged=_map(body.get("flagged", {}), "the flagged peers"),
            blocked=maps("blocked"),
            spot_checks=_map(body.get("spot_checks", {}), "the spot checks"),
            links=maps("links"),
            serving=None if serving is None else ServingStatus.from_wire(serving),
            events=maps("events"),
        )


@dataclass(frozen=True)
class Status:
    """A daemon's view of the swarm; ``details`` is None in a brief status."""

    peer_id: str
    coordinator: str | None
    term: int
    is_coordinator: bool
    members: tuple[str, ...]
    plan: PlanSummary | None = None
    details: Details | None = None

    def to_wire(self) -> dict[str, Any]:
        head: dict[str, Any] = {
            "peer_id": self.peer_id,
            "coordinator": self.coordinator,
            "term": self.term,
            "is_coordinator": self.is_coordinator,
            "members": list(self.members),
            "plan": None if self.plan is None else self.plan.to_wire(),
        }
        return head if self.details is None else head | self.details.to_wire()

    @staticmethod
    def from_wire(raw: Any) -> Status:
        """O(size of the status)."""
        body = _map(raw, "a status")
        coordinator = body.get("coordinator")
        is_coordinator = body.get("is_coordinator")
        if not isinstance(is_coordinator, bool):
            raise MessageError("is_coordinator is true or false")
        return Status(
            peer_id=_str(body.get("peer_id"), "the peer id"),
            coordinator=None if coordinator is None else _str(coordinator, "the coordinator"),
            term=_int(body.get("term"), "the term"),
            is_coordinator=is_coordinator,
            members=_strings(body.get("members"), "the members"),
            plan=None if body.get("plan") is None else PlanSummary.from_wire(body["plan"]),
            details=Details.from_wire(body) if "host" in body else None,
        )
