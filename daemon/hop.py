"""The messages of hops between daemons (``/hexgen/replica/1``): the request a replica's driver daemon runs,
and the events it sends back (tokens, word that the work still steps, an error).

An entry sends a ``HopRequest`` to the daemon driving the replica it picked; a prefill replica's daemon
sends one to the decode replica's daemon on the hand-off (an import). A stream carries either one hop (its
first frame is the request; each event comes back as a frame of its own) or, when its first frame is
``SESSION_OPEN``, every hop between two daemons: requests and ``HopAbort`` frames go one way, and the other
way a ``HopBatch`` carries every event that became due together (one engine step's tokens of every hop on
the stream), so a step costs one frame per pair of daemons, however many requests it advanced. Each parser
here is the only reader of its message and raises ``MalformedHop`` (a RequestError) with a one-line reason;
``to_wire`` is the only writer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hexgen.daemon.host import ProtocolId
from hexgen.daemon.request_limits import RequestError, sampling_params
from hexgen.daemon.worker_setup import INT64, sampling_to_wire
from hexgen.engine.sequence import SamplingParams

REPLICA_PROTOCOL = ProtocolId("/hexgen/replica/1")
FIRST_FRAME_TIMEOUT_S = 10.0  # a stream's request frame is due this soon after it opens, on either protocol
ANY_TOKEN = 1 << 63  # the vocabulary bound when the reader does not know the model's
NO_REPLICA = -1


class MalformedHop(RequestError):
    """A hop message that cannot be run or read; the message says why."""


class HopFailed(Exception):
    """A replica hop failed; the entry may re-submit."""


def _integer(raw: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not INT64[0] <= value < INT64[1]:
        raise MalformedHop(
            f"replica request needs an integer {key!r}" if default is None else f"{key!r} must be an integer"
        )
    return value


@dataclass(frozen=True)
class HopRequest:
    """Run ``tokens`` on ``replica`` of plan (``term``, ``epoch``) under sequence ``id``. A new request names
    the decode replica ``dst`` when ``replica`` is a prefill one; an import (``src`` >= 0) takes the sequence's
    KV from prefill replica ``src``."""

    id: int
    term: int
    epoch: int
    replica: int
    tokens: tuple[int, ...]
    sampling: SamplingParams
    src: int = NO_REPLICA
    dst: int = NO_REPLICA

    @property
    def version(self) -> tuple[int, int]:
        return (self.term, self.epoch)

    @property
    def is_import(self) -> bool:
        return self.src >= 0

    @classmethod
    def from_wire(cls, raw: object, vocab_size: int = ANY_TOKEN) -> HopRequest:
        """The hop in ``raw``: an id, term, epoch and replica, token ids in [0, vocab_size) (an id beyond the
        model's vocabulary kills the worker: pass the tokenizer's), sampling fields of the types the worker
        takes (``request_limits.sampling_params``). Raises MalformedHop."""
        if not isinstance(raw, Mapping):
            raise MalformedHop("a replica request is a map")
        seq_id, term, epoch, replica = (_integer(raw, key) for key in ("id", "term", "epoch", "replica"))
        tokens = raw.get("tokens")
        if (
            not isinstance(tokens, list)
            or not tokens
            or not all(type(t) is int and 0 <= t < vocab_size for t in tokens)
        ):
            raise MalformedHop(f"replica request needs a non-empty list of token ids in [0, {vocab_size})")
        try:
            sampling = sampling_params(raw.get("sampling"))
        except RequestError as exc:
            raise MalformedHop(str(exc)) from None
        # any negative replica means none; an import names no decode replica
        src = max(_integer(raw, "src", NO_REPLICA), NO_REPLICA)
        dst = NO_REPLICA if src >= 0 else max(_integer(raw, "dst", NO_REPLICA), NO_REPLICA)
        return cls(seq_id, term, epoch, replica, tuple(tokens), sampling, src=src, dst=dst)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "id": self.id,
            "term": self.term,
            "epoch": self.epoch,
            "replica": self.replica,
            "tokens": list(self.tokens),
            "sampling": sampling_to_wire(self.sampling),
        }
        if self.is_import:
            wire["src"] = self.src
        else:
            wire["dst"] = self.dst
        return wire

    def worker_frame(self) -> dict[str, Any]:
        """The frame the replica's driver worker takes for this hop (``generate`` or ``import``)."""
        frame: dict[str, Any] = {
            "id": self.id,
            "tokens": list(self.tokens),
            "sampling": sampling_to_wire(self.sampling),
        }
        if self.is_import:
            return frame | {"op": "import", "src": self.src}
        return frame | {"op": "generate", "dst": self.dst}


@dataclass(frozen=True)
class HopToken:
    """A token the replica made; ``finished`` (the finish reason) on the last one."""

    token: int
    finished: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"token": self.token, "finished": self.finished}


@dataclass(frozen=True)
class HopAlive:
    """The replica holding the request still steps (sent while no token is due)."""

    def to_wire(self) -> dict[str, Any]:
        return {"alive": True}


@dataclass(frozen=True)
class HopError:
    """The hop ended without its work: ``refused`` when it never started (a daemon not on the plan yet,
    a replica still starting, withdrawn by a new plan, a peer gone), which says nothing against the request."""

    error: str
    refused: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"error": self.error, "refused": self.refused} if self.refused else {"error": self.error}


HopEvent = HopToken | HopAlive | HopError


def event_from_wire(raw: object) -> HopEvent:
    """The hop event in ``raw`` (an error, an alive or a token, checked in that order). Raises MalformedHop."""
    if not isinstance(raw, Mapping):
        raise MalformedHop("a replica event is a map")
    if "error" in raw:
        error, refused = raw["error"], raw.get("refused", False)
        if not isinstance(error, str) or not isinstance(refused, bool):
            raise MalformedHop("an error event has a string 'error' and a boolean 'refused'")
        return HopError(error, refused)
    if raw.get("alive") is True:
        return HopAlive()
    token, finished = raw.get("token"), raw.get("finished")
    if type(token) is not int or not 0 <= token < ANY_TOKEN:
        raise MalformedHop("a token event has a token id")
    if finished is not None and not (isinstance(finished, str) and finished):
        raise MalformedHop("'finished' is a finish reason")
    return HopToken(token, finished)


def is_last(event: HopEvent) -> bool:
    """Whether nothing follows ``event`` on its hop."""
    return isinstance(event, HopError) or (isinstance(event, HopToken) and event.finished is not None)


SESSION_OPEN: dict[str, Any] = {"session": 1}  # the first frame of a stream that carries many hops
MAX_BATCH = 512  # events in one batch frame: error texts are short, so a batch stays far below MAX_FRAME


def opens_session(raw: object) -> bool:
    """Whether the first frame of a stream opens a session (else it is a single hop's request)."""
    return isinstance(raw, Mapping) and raw.get("session") == 1 and len(raw) == 1


@dataclass(frozen=True)
class HopAbort:
    """The entry no longer wants hop ``id`` of its session: the replica frees the work."""

    id: int

    def to_wire(self) -> dict[str, Any]:
        return {"abort": self.id}


def session_frame_from_wire(raw: object, vocab_size: int = ANY_TOKEN) -> HopRequest | HopAbort:
    """A frame an entry sends on a session: an abort, or a request (``HopRequest.from_wire``). Raises MalformedHop."""
    if isinstance(raw, Mapping) and "abort" in raw:
        return HopAbort(_integer(raw, "abort"))
    return HopRequest.from_wire(raw, vocab_size)


def hop_id(raw: object) -> int | None:
    """The id a malformed request on a session names, when it names one: the refusal goes back under it."""
    seq_id = raw.get("id") if isinstance(raw, Mapping) else None
    return seq_id if type(seq_id) is int and INT64[0] <= seq_id < INT64[1] else None


@dataclass(frozen=True)
class HopBatch:
    """Events of a session's hops that became due together, each under its hop's id, in the order they came."""

    events: tuple[tuple[int, HopEvent], ...]

    def to_wire(self) -> dict[str, Any]:
        return {"batch": [[seq_id, event.to_wire()] for seq_id, event in self.events]}

    @classmethod
    def from_wire(cls, raw: object) -> HopBatch:
        """The batch in ``raw``: a non-empty list of [hop id, event] pairs (``event_from_wire``). Raises MalformedHop."""
        batch = raw.get("batch") if isinstance(raw, Mapping) else None
        if not isinstance(batch, list) or not 0 < len(batch) <= MAX_BATCH:
            raise MalformedHop(f"a batch is a list of 1 to {MAX_BATCH} [hop id, event] pairs")
        events = []
        for item in batch:
            if not isinstance(item, list) or len(item) != 2 or hop_id({"id": item[0]}) is None:
                raise MalformedHop("a batch is a list of [hop id, event] pairs")
            events.append((item[0], event_from_wire(item[1])))
        return cls(tuple(events))
