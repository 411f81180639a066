"""The control plane's signed message bodies as typed values: adverts, leases, plans, suspect reports.

Each has one ``from_wire`` (the only parser: it validates an untrusted body with today's limits and raises
``MessageError``, and nothing else) and one ``to_wire`` (plain msgpack types). Failure reports live with the
rest of the failure logic in ``daemon.failure``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hexgen.coordinator.plan import Plan, PlanFormatError
from hexgen.daemon.cluster_view import LinkMeasurement, PeerHardware
from hexgen.daemon.hardware_profile import HardwareError, HardwareProfile
from hexgen.engine.quant_bytes import NONE, QUANTIZATIONS

MAX_ADDRS = 16
MAX_LINKS = 64
MAX_MEMBERS = 4096
MAX_ACCUSED = 64
MAX_REASON_CHARS = 300
MAX_TEXT_CHARS = 4096
MAX_GPUS = 65536
MAX_CONNECTIONS = 512
MAX_PLAN_LINKS = 4096
LINK_KINDS = ("direct", "hole-punched", "relayed")  # how two daemons are connected (``Host.link_kinds``)
UNKNOWN_LINK = "unknown"  # a pair of the plan that neither end reported a connection for
# a plan's pairs: the kinds adverts report, and "outbound" (direct, but only from the private end out:
# ``pair_links.outbound_pairs``)
PLAN_LINK_KINDS = (*LINK_KINDS, "outbound", UNKNOWN_LINK)
LINK_USES = ("stage", "handoff")
# KV hand-offs over a gloo exchange group (every pair of its hosts linked directly), or through the daemons'
# libp2p streams (some pair is relayed or hole-punched)
EXCHANGE_TRANSPORTS = ("torch", "libp2p")
MAX_QUANTIZATIONS = 16


class MessageError(ValueError):
    """A message body that does not parse; the text says which field and why."""


def _map(raw: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise MessageError(f"{what} is a map")
    return raw


def _text(raw: Any, what: str, limit: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(raw, str) or len(raw) > limit:
        raise MessageError(f"{what} must be a string of at most {limit} characters")
    return raw


def _optional_text(raw: Any, what: str) -> str | None:
    return None if raw is None else _text(raw, what)


def _int(raw: Any, what: str) -> int:
    if type(raw) is not int:
        raise MessageError(f"{what} must be an integer")
    return raw


def _strings(raw: Any, what: str, limit: int) -> tuple[str, ...]:
    if not isinstance(raw, list) or len(raw) > limit or not all(isinstance(s, str) and len(s) <= 256 for s in raw):
        raise MessageError(f"{what} must be a list of at most {limit} strings")
    return tuple(raw)


def _profile(raw: Any, what: str) -> HardwareProfile:
    try:
        return HardwareProfile.from_dict(raw)
    except HardwareError as exc:
        raise MessageError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class Advert:
    """A member's self-description: where it listens, its hardware, its model and, when it serves a
    checkpoint, the model's fingerprint and the address of the store for worlds whose rank 0 it hosts."""

    addrs: tuple[str, ...]
    hardware: HardwareProfile
    host: str
    model: str = ""
    load: Mapping[str, Any] = field(default_factory=dict)
    links: tuple[LinkMeasurement, ...] = ()
    cert: bytes | None = None
    model_hash: str | None = None
    rendezvous: tuple[str, int] | None = None
    connections: Mapping[str, str] = field(default_factory=dict)  # peer -> kind of link (``LINK_KINDS``)
    quantizations: tuple[str, ...] = (NONE,)  # the weight quantizations its workers can load (``QUANTIZATIONS``)
    relay: bool = False  # it serves circuit relay v2 (hop) for members

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "addrs": list(self.addrs),
            "hardware": self.hardware.to_dict(),
            "host": self.host,
            "model": self.model,
            "load": dict(self.load),
            "links": [link.to_dict() for link in self.links],
            "quantizations": list(self.quantizations),
        }
        if self.cert is not None:
            body["cert"] = self.cert
        if self.model_hash is not None:
            body["model_hash"] = self.model_hash
        if self.rendezvous is not None:
            body["rendezvous"] = list(self.rendezvous)
        if self.connections:
            body["connections"] = dict(self.connections)
        if self.relay:
            body["relay"] = True
        return body

    @staticmethod
    def from_wire(raw: Any) -> Advert:
        """Links that do not parse are left out (a peer's measurements are advisory); O(size of the body)."""
        body = _map(raw, "an advert body")
        load = body.get("load")
        if load is not None and not isinstance(load, dict):
            raise MessageError("advert load must be a map")
        links = body.get("links")
        if links is not None and not isinstance(links, list):
            raise MessageError("advert links must be a list")
        cert = body.get("cert")
        if cert is not None and not isinstance(cert, bytes):
            raise MessageError("advert cert must be bytes")
        relay = body.get("relay", False)
        if not isinstance(relay, bool):
            raise MessageError("advert relay must be true or false")
        return Advert(
            addrs=_strings(body.get("addrs"), "advert addrs", MAX_ADDRS),
            hardware=_profile(body.get("hardware"), "advert hardware"),
            host=_text(body.get("host"), "advert host"),
            model=_optional_text(body.get("model"), "advert model") or "",
            load=dict(load or {}),
            links=_links(links or []),
            cert=cert,
            model_hash=_optional_text(body.get("model_hash"), "advert model_hash"),
            rendezvous=_rendezvous(body.get("rendezvous")),
            connections=_connections(body.get("connections")),
            quantizations=_quantizations(body.get("quantizations")),
            relay=relay,
        )


def _links(raw: list[Any]) -> tuple[LinkMeasurement, ...]:
    links = []
    for item in raw[:MAX_LINKS]:
        try:
            links.append(LinkMeasurement.from_dict(item))
        except HardwareError:
            continue
    return tuple(links)


def _connections(raw: Any) -> dict[str, str]:
    """Peer -> kind of link: at most ``MAX_CONNECTIONS`` peer ids, each kind one of ``LINK_KINDS``. O(entries)."""
    connections = _map(raw if raw is not None else {}, "advert connections")
    if len(connections) > MAX_CONNECTIONS:
        raise MessageError(f"an advert names at most {MAX_CONNECTIONS} connections")
    for peer, kind in connections.items():
        if not isinstance(peer, str) or not 0 < len(peer) <= 128 or not isinstance(kind, str) or kind not in LINK_KINDS:
            raise MessageError(f"advert connections map peer ids to one of {', '.join(LINK_KINDS)}")
    return dict(connections)


def _quantizations(raw: Any) -> tuple[str, ...]:
    """The quantizations an advert offers: those of ``QUANTIZATIONS`` it names, in that order (a newer node's
    other names are left out); an advert from before the field offers full precision only. O(entries)."""
    if raw is None:
        return (NONE,)
    named = set(_strings(raw, "advert quantizations", MAX_QUANTIZATIONS))
    return tuple(q for q in QUANTIZATIONS if q in named)


def _rendezvous(raw: Any) -> tuple[str, int] | None:
    if raw is None:
        return None
    if not (
        isinstance(raw, list)
        and len(raw) == 2
        and isinstance(raw[0], str)
        and 0 < len(raw[0]) <= 256
        and type(raw[1]) is int
        and 0 < raw[1] < 65536
    ):
        raise MessageError("advert rendezvous must be [host, port]")
    return raw[0], raw[1]


@dataclass(frozen=True)
class LeaseBody:
    """The coordinator's lease: its holder (the signer), its term and the epoch of its latest plan."""

    holder: str
    term: int
    epoch: int | None = None

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"holder": self.holder, "term": self.term}
        if self.epoch is not None:
            body["epoch"] = self.epoch
        return body

    @staticmethod
    def from_wire(raw: Any) -> LeaseBody:
        body = _map(raw, "a lease body")
        epoch = body.get("epoch")
        return LeaseBody(
            _text(body.get("holder"), "lease holder", 256),
            _int(body.get("term"), "lease term"),
            epoch if type(epoch) is int else None,
        )


@dataclass(frozen=True)
class BlockedPair:
    """Two peers whose link cannot carry a world, and why."""

    peers: tuple[str, str]
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"peers": list(self.peers), "reason": self.reason}

    @staticmethod
    def from_wire(raw: Any) -> BlockedPair:
        body = _map(raw, "a blocked pair")
        peers = _strings(body.get("peers"), "blocked peers", 2)
        if len(peers) != 2:
            raise MessageError("a blocked pair names two peers")
        return BlockedPair((peers[0], peers[1]), _text(body.get("reason"), "blocked reason"))


@dataclass(frozen=True)
class PlanLink:
    """Two peers a plan moves model data between and the kind of link joining them: ``use`` "stage" (a stage
    boundary inside group ``groups[0]`` == ``groups[1]``) or "handoff" (KV from prefill group ``groups[0]`` to
    decode group ``groups[1]``); ``kind`` one of ``PLAN_LINK_KINDS``; ``transport`` one of
    ``EXCHANGE_TRANSPORTS``."""

    peers: tuple[str, str]
    use: str
    kind: str
    groups: tuple[int, int]
    transport: str = "torch"  # what carries the data: torch.distributed, or the daemons' libp2p streams

    def to_wire(self) -> dict[str, Any]:
        return {
            "peers": list(self.peers),
            "use": self.use,
            "kind": self.kind,
            "groups": list(self.groups),
            "transport": self.transport,
        }

    @staticmethod
    def from_wire(raw: Any) -> PlanLink:
        body = _map(raw, "a plan link")
        peers = _strings(body.get("peers"), "plan link peers", 2)
        groups = body.get("groups")
        use, kind = body.get("use"), body.get("kind")
        if len(peers) != 2 or use not in LINK_USES or kind not in PLAN_LINK_KINDS:
            raise MessageError("a plan link names two peers, its use (stage, handoff) and its kind")
        if not (isinstance(groups, list) and len(groups) == 2 and all(type(g) is int for g in groups)):
            raise MessageError("a plan link names the two groups it joins")
        transport = body.get("transport", "torch")
        if transport not in EXCHANGE_TRANSPORTS:
            raise MessageError(f"a plan link's transport is one of {', '.join(EXCHANGE_TRANSPORTS)}")
        return PlanLink((peers[0], peers[1]), use, kind, (groups[0], groups[1]), str(transport))


@dataclass(frozen=True)
class PlanBody:
    """A signed plan: the planner's result (None when no plan fits, with ``error`` saying why), the GPU index
    -> (peer, local GPU) map, the membership it is for, and what it was made from, so that a successor
    coordinator can re-plan incrementally. ``restart`` asks every replica to be rebuilt (a worker failed)."""

    term: int
    epoch: int
    members: tuple[str, ...]
    plan: Plan | None = None
    error: str | None = None
    throughput: float = 0.0
    gpus: Mapping[int, tuple[str, int]] = field(default_factory=dict)
    blocked: tuple[BlockedPair, ...] = ()
    peers: tuple[PeerHardware, ...] = ()
    restart: bool = False
    links: tuple[PlanLink, ...] = ()
    quantize: str = NONE  # every replica's weight quantization (one of ``QUANTIZATIONS``)
    exchange: str = "torch"  # how the epoch's KV hand-offs travel (one of ``EXCHANGE_TRANSPORTS``)
    # with "libp2p": the groups whose hand-offs among themselves still go over a gloo exchange group
    gloo_groups: tuple[int, ...] = ()
    # with "libp2p": the groups that span a worldless pair, each stage a world of its own, bridged by the daemons
    bridged_groups: tuple[int, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "plan": None if self.plan is None else self.plan.to_dict(),
            "error": self.error,
            "throughput": self.throughput,
            "gpus": {str(index): [peer, local] for index, (peer, local) in self.gpus.items()},
            "blocked": [pair.to_wire() for pair in self.blocked],
            "term": self.term,
            "epoch": self.epoch,
            "members": list(self.members),
            "peers": [{"peer_id": p.peer_id, "host": p.host_name, "hardware": p.profile.to_dict()} for p in self.peers],
            "restart": self.restart,
            "links": [link.to_wire() for link in self.links],
            "quantize": self.quantize,
            "exchange": self.exchange,
            "gloo_groups": list(self.gloo_groups),
            "bridged_groups": list(self.bridged_groups),
        }

    @staticmethod
    def from_wire(raw: Any) -> PlanBody:
        """O(size of the plan)."""
        body = _map(raw, "a plan body")
        throughput = body.get("throughput", 0.0)
        if isinstance(throughput, bool) or not isinstance(throughput, int | float) or not math.isfinite(throughput):
            raise MessageError("plan throughput must be a finite number")
        blocked = body.get("blocked") or []
        peers = body.get("peers") or []
        links = body.get("links") or []
        if not isinstance(blocked, list) or not isinstance(peers, list) or len(peers) > MAX_MEMBERS:
            raise MessageError("plan blocked and peers must be lists")
        if not isinstance(links, list) or len(links) > MAX_PLAN_LINKS:
            raise MessageError(f"plan links must be a list of at most {MAX_PLAN_LINKS}")
        return PlanBody(
            term=_int(body.get("term"), "plan term"),
            epoch=_int(body.get("epoch"), "plan epoch"),
            members=_strings(body.get("members"), "plan members", MAX_MEMBERS),
            plan=_plan(body.get("plan")),
            error=_optional_text(body.get("error"), "plan error"),
            throughput=float(throughput),
            gpus=_gpus(body.get("gpus")),
            blocked=tuple(BlockedPair.from_wire(pair) for pair in blocked[:MAX_MEMBERS]),
            peers=tuple(_peer(p) for p in peers),
            restart=body.get("restart") is True,
            links=tuple(PlanLink.from_wire(link) for link in links),
            quantize=_quantize(body.get("quantize")),
            exchange=_exchange(body.get("exchange")),
            gloo_groups=_group_ids(body.get("gloo_groups"), "gloo_groups"),
            bridged_groups=_group_ids(body.get("bridged_groups"), "bridged_groups"),
        )


def _exchange(raw: Any) -> str:
    """A plan's KV transport: one of ``EXCHANGE_TRANSPORTS``; a plan from before the field uses torch."""
    if raw is None:
        return "torch"
    if raw not in EXCHANGE_TRANSPORTS:
        raise MessageError(f"plan exchange must be one of {', '.join(EXCHANGE_TRANSPORTS)}")
    return str(raw)


def _group_ids(raw: Any, what: str) -> tuple[int, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_GPUS or not all(type(g) is int and g >= 0 for g in raw):
        raise MessageError(f"plan {what} must be a list of group ids")
    return tuple(raw)


def _quantize(raw: Any) -> str:
    """A plan's quantization: one of ``QUANTIZATIONS``; a plan from before the field is full precision."""
    if raw is None:
        return NONE
    if raw not in QUANTIZATIONS:
        raise MessageError(f"plan quantize must be one of {', '.join(QUANTIZATIONS)}")
    return str(raw)


def _plan(raw: Any) -> Plan | None:
    if raw is None:
        return None
    try:
        return Plan.from_dict(raw)
    except (PlanFormatError, RecursionError) as exc:
        raise MessageError(f"plan: {exc}") from None


def _gpus(raw: Any) -> dict[int, tuple[str, int]]:
    gpus = _map(raw if raw is not None else {}, "plan gpus")
    if len(gpus) > MAX_GPUS:
        raise MessageError(f"a plan names at most {MAX_GPUS} GPUs")
    out = {}
    for key, place in gpus.items():
        if not isinstance(key, str) or not key.isdigit() or len(key) > 9:
            raise MessageError("plan gpus are keyed by GPU index")
        if not (isinstance(place, list) and len(place) == 2 and isinstance(place[0], str) and type(place[1]) is int):
            raise MessageError("a plan GPU is [peer, local index]")
        out[int(key)] = (place[0], place[1])
    return out


def _peer(raw: Any) -> PeerHardware:
    body = _map(raw, "a plan peer")
    try:
        return PeerHardware(
            _text(body.get("peer_id"), "plan peer id", 256),
            _text(body.get("host"), "plan peer host", 256),
            _profile(body.get("hardware"), "plan peer hardware"),
        )
    except HardwareError as exc:
        raise MessageError(f"plan peer: {exc}") from None


@dataclass(frozen=True)
class SuspectReport:
    """A member's spot-check caught ``peers`` returning tokens two other routes disagree with."""

    peers: tuple[str, ...]
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"peers": list(self.peers), "reason": self.reason}

    @staticmethod
    def from_wire(raw: Any) -> SuspectReport:
        body = raw if isinstance(raw, dict) else {}
        peers, reason = body.get("peers"), body.get("reason")
        if (
            not isinstance(peers, list)
            or not 0 < len(peers) <= MAX_ACCUSED
            or not all(isinstance(p, str) and len(p) <= 128 for p in peers)
            or not isinstance(reason, str)
        ):
            raise MessageError(f"a suspect report names 1 to {MAX_ACCUSED} peers and a reason")
        return SuspectReport(tuple(peers), reason[:MAX_REASON_CHARS])
