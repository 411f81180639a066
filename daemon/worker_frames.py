"""The frames between a daemon and its worker processes: one frozen dataclass per frame, read and written here.

A daemon sends its worker ``configure`` first, then, to a replica's driver only, ``generate``, ``import``,
``abort``, ``exchange`` (a later epoch's exchange group) and ``shutdown``. A worker answers ``progress``
while it loads, then ``ready`` or ``failed`` once, then streams ``step`` (the tokens
one engine step sampled), ``handoff``, ``error`` (a request it refuses), ``alive`` (a driver still stepping)
and ``exchange`` (whether a later group formed). Each frame is a msgpack map with an ``op`` (``daemon.wire``). ``from_wire`` is each frame's only reader and raises
``MalformedFrame`` with a one-line reason; ``to_wire`` its only writer. ``frame_to_worker`` and
``frame_from_worker`` pick the frame by its ``op``. Torch-, trio- and libp2p-free: the worker process reads
these on a bare GPU box.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from hexgen.daemon.failure import WorldFailure
from hexgen.daemon.kv_frames import MAX_PREFIX
from hexgen.daemon.wire import MalformedFrame, optional, validate
from hexgen.daemon.worker_setup import (
    INT64,
    MAX_PORT,
    NO_REPLICA,
    ExchangeSetup,
    ReplicaSetup,
    address,
    as_map,
    at_least,
    cause_of,
    need,
    sampling_from_wire,
    sampling_to_wire,
    seconds,
    secret_of,
    token_ids,
)
from hexgen.engine.bounds import CONNECT_TIMEOUT_S
from hexgen.engine.sequence import SamplingParams

# ----------------------------------------------------------------------------------- daemon -> worker


@dataclass(frozen=True)
class ConfigureFrame:
    """The first frame: this rank of ``replica`` and its world, met at ``store`` under ``prefix`` (or, for
    worlds started without a daemon, a tcp:// world on local ``port``), the address its daemon advertises
    (whose interface gloo and NCCL bind to) and the epoch's ``exchange`` group, when there is one. A bridged
    replica's rank is ``layout_rank`` of the replica, its world its stage alone (``rank`` its tensor rank),
    and its stages talk through the daemon's KV channel under ``bridge``."""

    OP: ClassVar[str] = "configure"
    rank: int
    world_size: int
    replica: ReplicaSetup
    store: tuple[str, int] | None = None
    port: int | None = None
    prefix: str = ""
    secret: bytes | None = None
    advertised: str | None = None
    exchange: ExchangeSetup | None = None
    device: str | None = None  # None: the replica's
    threads: int = 1
    backend: str = "gloo"
    progress: bool = False  # send progress frames while loading
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    bridge: str = ""  # "": the replica's ranks share one world
    layout_rank: int | None = None  # None: ``rank``

    @property
    def replica_rank(self) -> int:
        return self.rank if self.layout_rank is None else self.layout_rank

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "op": self.OP,
            "rank": self.rank,
            "world_size": self.world_size,
            "replica": self.replica.to_wire(),
            "prefix": self.prefix,
            "secret": None if self.secret is None else self.secret.hex(),
            "advertised": self.advertised,
            "exchange": None if self.exchange is None else self.exchange.to_wire(),
            "device": self.device,
            "threads": self.threads,
            "backend": self.backend,
            "progress": self.progress,
            "connect_timeout_s": self.connect_timeout_s,
            "bridge": self.bridge,
            "layout_rank": self.layout_rank,
        }
        return wire | ({"store": list(self.store)} if self.store else {"port": self.port})

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> ConfigureFrame:
        shape = {"prefix": optional(str), "advertised": optional(str), "device": optional(str)}
        config = validate(raw, shape | {"backend": optional(str), "progress": optional(bool), "bridge": optional(str)})
        rank, size = at_least(config, "rank", 0), at_least(config, "world_size", 1)
        need(rank < size, "field 'rank' must be below 'world_size'")
        replica = ReplicaSetup.from_wire(config.get("replica"))
        bridge = config.get("bridge") or ""
        need(len(bridge) <= MAX_PREFIX, f"field 'bridge' must be at most {MAX_PREFIX} characters")
        layout_rank = None if config.get("layout_rank") is None else at_least(config, "layout_rank", 0)
        need((layout_rank is None) == (not bridge), "fields 'bridge' and 'layout_rank' come together")
        need(layout_rank is None or layout_rank < sum(tp for *_, tp in replica.layout), "'layout_rank' is not a rank")
        store = None if config.get("store") is None else address(config["store"], "store")
        port = None if store is not None else at_least(config, "port", 1)
        need(port is None or port <= MAX_PORT, "field 'port' must be a port")
        return cls(
            rank,
            size,
            replica,
            store=store,
            port=port,
            prefix=config.get("prefix") or "",
            secret=secret_of(config),
            advertised=config.get("advertised"),
            exchange=None if not config.get("exchange") else ExchangeSetup.from_wire(config["exchange"]),
            device=config.get("device"),
            threads=at_least(config, "threads", 1, 1),
            backend=config.get("backend") or "gloo",
            progress=bool(config.get("progress")),
            connect_timeout_s=seconds(config, "connect_timeout_s", CONNECT_TIMEOUT_S),
            bridge=bridge,
            layout_rank=layout_rank,
        )


@dataclass(frozen=True)
class GenerateFrame:
    """A new request for the driver; a prefill replica hands it off to replica ``dst`` of the exchange."""

    OP: ClassVar[str] = "generate"
    id: int
    tokens: tuple[int, ...]
    sampling: SamplingParams
    dst: int = NO_REPLICA

    def to_wire(self) -> dict[str, Any]:
        base = {"op": self.OP, "id": self.id, "tokens": list(self.tokens)}
        return base | {"sampling": sampling_to_wire(self.sampling), "dst": self.dst}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> GenerateFrame:
        seq_id = at_least(raw, "id", INT64[0])
        dst = at_least(raw, "dst", NO_REPLICA, NO_REPLICA)
        return cls(seq_id, token_ids(raw, "tokens"), sampling_from_wire(raw.get("sampling")), dst)


@dataclass(frozen=True)
class ImportFrame:
    """A request prefilled on replica ``src`` (``tokens``: prompt and first token), whose KV every rank of
    the driver's replica then receives."""

    OP: ClassVar[str] = "import"
    id: int
    tokens: tuple[int, ...]
    sampling: SamplingParams
    src: int

    def to_wire(self) -> dict[str, Any]:
        base = {"op": self.OP, "id": self.id, "tokens": list(self.tokens)}
        return base | {"sampling": sampling_to_wire(self.sampling), "src": self.src}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> ImportFrame:
        seq_id, src = at_least(raw, "id", INT64[0]), at_least(raw, "src", 0)
        return cls(seq_id, token_ids(raw, "tokens"), sampling_from_wire(raw.get("sampling")), src)


@dataclass(frozen=True)
class AbortFrame:
    OP: ClassVar[str] = "abort"
    id: int

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP, "id": self.id}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> AbortFrame:
        return cls(at_least(raw, "id", INT64[0]))


@dataclass(frozen=True)
class ExchangeFrame:
    """Move a replica that carries on across epochs to the new epoch's exchange group."""

    OP: ClassVar[str] = "exchange"
    exchange: ExchangeSetup

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP, "exchange": self.exchange.to_wire()}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> ExchangeFrame:
        return cls(ExchangeSetup.from_wire(raw.get("exchange")))


@dataclass(frozen=True)
class ShutdownFrame:
    OP: ClassVar[str] = "shutdown"

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> ShutdownFrame:
        return cls()


# ----------------------------------------------------------------------------------- worker -> daemon


@dataclass(frozen=True)
class ProgressFrame:
    """Bytes of weights loaded of the total: the daemon moves the worker's start deadline on them."""

    OP: ClassVar[str] = "progress"
    done: int
    total: int

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP, "done": self.done, "total": self.total}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> ProgressFrame:
        return cls(at_least(raw, "done", 0), at_least(raw, "total", 0))


@dataclass(frozen=True)
class ReadyFrame:
    """The worker's world and the epoch's exchange group formed."""

    OP: ClassVar[str] = "ready"
    rank: int
    driver: bool
    blocks: int

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP, "rank": self.rank, "driver": self.driver, "blocks": self.blocks}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> ReadyFrame:
        validate(raw, {"driver": bool})
        return cls(at_least(raw, "rank", 0), raw["driver"], at_least(raw, "blocks", 0))


@dataclass(frozen=True)
class FailedFrame:
    """The worker could not start; ``cause`` says which world could not form, when that was why."""

    OP: ClassVar[str] = "failed"
    error: str
    cause: WorldFailure | None = None

    def to_wire(self) -> dict[str, Any]:
        cause = None if self.cause is None else self.cause.to_dict()
        return {"op": self.OP, "error": self.error, "cause": cause}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> FailedFrame:
        return cls(validate(raw, {"error": str})["error"], cause_of(raw))


@dataclass(frozen=True)
class TokenFrame:
    """A token the driver sampled for request ``id``; ``finished`` (the reason) on its last one. Not a frame of
    its own: a ``StepFrame`` carries a step's tokens together."""

    id: int
    token: int
    finished: str | None = None


def _finish_reason(value: object) -> str | None:
    need(value is None or (isinstance(value, str) and bool(value)), "field 'finished' holds finish reasons or nil")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class StepFrame:
    """Every token one engine step of the driver sampled, in one frame: per-token cost on the socket and in
    the daemon does not grow a frame, a write or a parse per request. On the wire three lists of one length
    (``ids``, ``tokens``, ``finished``), so a step of n sequences is one msgpack value of O(n) bytes."""

    OP: ClassVar[str] = "step"
    tokens: tuple[TokenFrame, ...]

    def to_wire(self) -> dict[str, Any]:
        ids, tokens = [t.id for t in self.tokens], [t.token for t in self.tokens]
        return {"op": self.OP, "ids": ids, "tokens": tokens, "finished": [t.finished for t in self.tokens]}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> StepFrame:
        frame = validate(raw, {"ids": list, "tokens": list, "finished": list})
        ids, tokens, finished = frame["ids"], frame["tokens"], frame["finished"]
        need(len(ids) == len(tokens) == len(finished), "fields 'ids', 'tokens' and 'finished' must be of one length")
        need(all(type(i) is int and 0 <= i < INT64[1] for i in ids), "field 'ids' holds request ids")
        need(all(type(t) is int and 0 <= t < 1 << 63 for t in tokens), "field 'tokens' holds token ids")
        reasons = [_finish_reason(f) for f in finished]
        return cls(tuple(map(TokenFrame, ids, tokens, reasons)))


@dataclass(frozen=True)
class HandoffFrame:
    """A prefill replica is about to send request ``id``'s KV on: ``tokens`` are its prompt and first token."""

    OP: ClassVar[str] = "handoff"
    id: int
    tokens: tuple[int, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP, "id": self.id, "tokens": list(self.tokens)}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> HandoffFrame:
        return cls(at_least(raw, "id", INT64[0]), token_ids(raw, "tokens"))


@dataclass(frozen=True)
class ErrorFrame:
    """The worker refused request ``id`` (a KV format mismatch)."""

    OP: ClassVar[str] = "error"
    id: int
    error: str

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP, "id": self.id, "error": self.error}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> ErrorFrame:
        return cls(at_least(raw, "id", INT64[0]), validate(raw, {"error": str})["error"])


@dataclass(frozen=True)
class AliveFrame:
    """A driver with work in hand still steps."""

    OP: ClassVar[str] = "alive"

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> AliveFrame:
        return cls()


@dataclass(frozen=True)
class ExchangedFrame:
    """Whether the exchange group under ``prefix`` formed for this rank (``error`` and ``cause`` if not)."""

    OP: ClassVar[str] = "exchange"
    prefix: str
    formed: bool
    error: str | None = None
    cause: WorldFailure | None = None

    def to_wire(self) -> dict[str, Any]:
        cause = None if self.cause is None else self.cause.to_dict()
        return {"op": self.OP, "prefix": self.prefix, "formed": self.formed, "error": self.error, "cause": cause}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> ExchangedFrame:
        frame = validate(raw, {"prefix": str, "formed": optional(bool), "error": optional(str)})
        return cls(frame["prefix"], frame.get("formed") is True, frame.get("error"), cause_of(frame))


ToWorker = ConfigureFrame | GenerateFrame | ImportFrame | AbortFrame | ExchangeFrame | ShutdownFrame
FromWorker = (
    ProgressFrame | ReadyFrame | FailedFrame | StepFrame | HandoffFrame | ErrorFrame | AliveFrame | ExchangedFrame
)
RequestFrame = GenerateFrame | ImportFrame
_TO_WORKER: dict[str, Any] = {
    f.OP: f for f in (ConfigureFrame, GenerateFrame, ImportFrame, AbortFrame, ExchangeFrame, ShutdownFrame)
}
_FROM_WORKER: dict[str, Any] = {
    f.OP: f
    for f in (ProgressFrame, ReadyFrame, FailedFrame, StepFrame, HandoffFrame, ErrorFrame, AliveFrame, ExchangedFrame)
}


def _parse(raw: object, table: Mapping[str, Any], sender: str) -> Any:
    frame = as_map(raw, "worker frame")
    op = frame.get("op")
    kind = table.get(op) if isinstance(op, str) else None
    if kind is None:
        raise MalformedFrame(f"no frame a {sender} sends has op {str(op)[:40]!r}")
    return kind.from_wire(frame)


def frame_to_worker(raw: object) -> ToWorker:
    """The frame a daemon sent its worker, by its op. Raises MalformedFrame."""
    frame: ToWorker = _parse(raw, _TO_WORKER, "daemon")
    return frame


def frame_from_worker(raw: object) -> FromWorker:
    """The frame a worker sent its daemon, by its op. Raises MalformedFrame."""
    frame: FromWorker = _parse(raw, _FROM_WORKER, "worker")
    return frame
