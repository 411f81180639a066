"""What a worker is told to build, as worker frames carry it: its replica, KV cache, exchange group and sampling.

The field readers here raise ``MalformedFrame`` (``daemon.wire``) with a one-line reason; ``daemon.worker_frames``
builds every frame from them. Torch-, trio- and libp2p-free: the worker process reads these on a bare GPU box.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from hexgen.daemon.failure import WorldFailure
from hexgen.daemon.wire import MalformedFrame, list_of, optional, validate
from hexgen.engine.bounds import CONNECT_TIMEOUT_S, SECRET_BYTES
from hexgen.engine.quant_bytes import NONE, QUANTIZATIONS
from hexgen.engine.sequence import SamplingParams

ROLES = ("colocated", "prefill", "decode")
TRANSPORTS = ("torch", "libp2p")  # how an exchange moves KV (``messages.EXCHANGE_TRANSPORTS``)
NO_REPLICA = -1
MAX_PORT = 65535
INT64 = (-(1 << 63), 1 << 64)  # the integers msgpack carries
SAMPLING_KINDS: dict[str, type] = {
    "max_tokens": int,
    "top_k": int,
    "seed": int,
    "temperature": float,
    "top_p": float,
    "ignore_eos": bool,
}


def need(ok: bool, message: str) -> None:
    if not ok:
        raise MalformedFrame(message)


def as_map(raw: object, what: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise MalformedFrame(f"a {what} is a map")
    return raw


def at_least(raw: Mapping[str, Any], key: str, low: int, default: int | None = None) -> int:
    """The integer under ``key`` (``default`` when absent), at least ``low`` and one msgpack carries."""
    value = raw.get(key, default)
    if type(value) is not int or not max(low, INT64[0]) <= value < INT64[1]:
        raise MalformedFrame(f"field '{key}' must be a 64-bit integer >= {low}")
    return value


def seconds(raw: Mapping[str, Any], key: str, default: float) -> float:
    value = raw.get(key)
    if value is None:
        return default
    # an int beyond what msgpack carries would overflow the float conversion: refused like any bad value
    number = (type(value) is int and 0 < value < INT64[1]) or (
        type(value) is float and math.isfinite(value) and value > 0
    )
    need(number, f"field '{key}' must be a positive number of seconds")
    return float(value)


def token_ids(raw: Mapping[str, Any], key: str) -> tuple[int, ...]:
    tokens: Any = raw.get(key)
    ok = isinstance(tokens, list) and bool(tokens) and all(type(t) is int and 0 <= t < 1 << 63 for t in tokens)
    need(ok, f"field '{key}' must be a non-empty list of token ids")
    return tuple(tokens)


def address(raw: object, key: str) -> tuple[str, int]:
    if not isinstance(raw, list) or len(raw) != 2:
        raise MalformedFrame(f"field '{key}' must be [host, port]")
    host, port = raw
    need(isinstance(host, str) and bool(host) and type(port) is int and 0 < port <= MAX_PORT, f"bad '{key}'")
    return str(host), int(port)


def secret_of(raw: Mapping[str, Any]) -> bytes | None:
    """The world's store secret, hex on the wire; only worlds started without a daemon have none."""
    text = raw.get("secret")
    if text is None:
        return None
    try:
        secret = bytes.fromhex(text) if isinstance(text, str) else b""
    except ValueError:
        secret = b""
    need(len(secret) == SECRET_BYTES, f"field 'secret' must be {SECRET_BYTES} bytes in hex")
    return secret


def cause_of(raw: Mapping[str, Any]) -> WorldFailure | None:
    if raw.get("cause") is None:
        return None
    try:
        return WorldFailure.from_dict(raw["cause"])
    except ValueError as exc:
        raise MalformedFrame(f"field 'cause': {exc}") from None


def sampling_from_wire(raw: object) -> SamplingParams:
    """The sampling parameters in a request frame: each field of the type the engine takes (a str seed would
    kill the worker when it samples), ``max_tokens`` required. Raises MalformedFrame."""
    sampling = as_map(raw, "sampling")
    names = {f.name for f in fields(SamplingParams)}
    need(set(sampling) <= names, f"sampling fields are {sorted(names)}")
    for name, kind in SAMPLING_KINDS.items():
        value = sampling.get(name)
        if value is None and name == "seed":
            continue
        integer = type(value) is int and INT64[0] <= value < INT64[1]
        ok = isinstance(value, bool) if kind is bool else integer if kind is int else integer or type(value) is float
        need(name not in sampling or ok, f"sampling field '{name}' must be {kind.__name__}")
    stops = sampling.get("stop_token_ids", [])
    need(isinstance(stops, list) and all(type(t) is int and 0 <= t < 1 << 63 for t in stops), "bad stop_token_ids")
    need("max_tokens" in sampling, "sampling needs 'max_tokens'")
    try:
        return SamplingParams(**(dict(sampling) | {"stop_token_ids": tuple(stops)}))
    except (ValueError, OverflowError) as exc:  # OverflowError: an int too large for a float
        raise MalformedFrame(f"bad sampling: {exc}") from None


def sampling_to_wire(params: SamplingParams) -> dict[str, Any]:
    """``params`` as the sampling map a hop and a worker frame carry: every field (``sampling_from_wire`` reads it)."""
    return {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "seed": params.seed,
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": params.ignore_eos,
    }


# ------------------------------------------------------------------------------------------ what a worker runs


@dataclass(frozen=True)
class CacheSetup:
    """KV cache settings for the engine's CacheConfig; None leaves the engine's default."""

    block_size: int | None = None
    num_blocks: int | None = None
    memory_bytes: int | None = None
    gpu_memory_utilization: float | None = None

    def overrides(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to_wire(self) -> dict[str, Any]:
        return self.overrides()

    @classmethod
    def from_wire(cls, raw: object) -> CacheSetup:
        cache = as_map(raw, "cache")
        need(set(cache) <= {f.name for f in fields(cls)}, f"cache fields are {[f.name for f in fields(cls)]}")
        counts = {k: at_least(cache, k, 0) for k in ("block_size", "num_blocks", "memory_bytes") if k in cache}
        share = cache.get("gpu_memory_utilization")
        ok = share is None or (type(share) in (int, float) and 0 < share <= 1)
        need(ok, "field 'gpu_memory_utilization' must be in (0, 1]")
        return cls(**counts, gpu_memory_utilization=None if share is None else float(share))


@dataclass(frozen=True)
class ReplicaSetup:
    """A replica as a worker builds it (the engine's ReplicaSpec): checkpoint, layout (first layer, end
    layer, tp per stage), its first rank in the world it is numbered in, role, device, weight quantization,
    and the prompt tokens a step prefills at most (0: whole prompts; None: the engine's default for the role)."""

    model_dir: str
    layout: tuple[tuple[int, int, int], ...]
    first_rank: int = 0
    mode: str = "colocated"
    device: str = "cpu"
    dtype: str = "auto"
    cache: CacheSetup = field(default_factory=CacheSetup)
    quantize: str = NONE  # one of QUANTIZATIONS
    prefill_chunk: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "model_dir": self.model_dir,
            "layout": [list(stage) for stage in self.layout],
            "first_rank": self.first_rank,
            "mode": self.mode,
            "device": self.device,
            "dtype": self.dtype,
            "cache": self.cache.to_wire(),
            "quantize": self.quantize,
            "prefill_chunk": self.prefill_chunk,
        }

    @classmethod
    def from_wire(cls, raw: object) -> ReplicaSetup:
        spec = validate(as_map(raw, "replica"), {"model_dir": str, "layout": list_of(list_of(int, 3), 4096)})
        layout = tuple(tuple(stage) for stage in spec["layout"])
        ok = bool(layout) and all(len(s) == 3 and 0 <= s[0] < s[1] < INT64[1] and 1 <= s[2] < INT64[1] for s in layout)
        need(ok, "field 'layout' must be stages of [first layer, end layer, tp]")
        text = optional(str)
        validate(spec, {"mode": text, "device": text, "dtype": text, "quantize": text})
        mode = spec.get("mode") or "colocated"
        need(mode in ROLES, f"field 'mode' must be one of {ROLES}")
        quantize = spec.get("quantize") or NONE
        need(quantize in QUANTIZATIONS, f"field 'quantize' must be one of {QUANTIZATIONS}")
        return cls(
            spec["model_dir"],
            layout,
            first_rank=at_least(spec, "first_rank", 0, 0),
            mode=mode,
            device=spec.get("device") or "cpu",
            dtype=spec.get("dtype") or "auto",
            cache=CacheSetup.from_wire(spec.get("cache") or {}),
            quantize=quantize,
            prefill_chunk=None if spec.get("prefill_chunk") is None else at_least(spec, "prefill_chunk", 0),
        )


@dataclass(frozen=True)
class ExchangeSetup:
    """An epoch's exchange group, over which KV moves between replicas: its store, key prefix and secret,
    this replica's first rank in it, its size, and every replica of the epoch in its numbering."""

    store: tuple[str, int]
    prefix: str
    secret: bytes | None
    first_rank: int
    size: int
    replicas: tuple[ReplicaSetup, ...]
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    transport: str = "torch"  # "libp2p": KV goes through the daemons (``daemon.kv_relay``) ...
    members: tuple[int, ...] = ()  # ... but among these replicas over a gloo group ("torch": among all)

    def to_wire(self) -> dict[str, Any]:
        return {
            "store": list(self.store),
            "prefix": self.prefix,
            "secret": None if self.secret is None else self.secret.hex(),
            "first_rank": self.first_rank,
            "size": self.size,
            "replicas": [r.to_wire() for r in self.replicas],
            "connect_timeout_s": self.connect_timeout_s,
            "transport": self.transport,
            "members": list(self.members),
        }

    @classmethod
    def from_wire(cls, raw: object) -> ExchangeSetup:
        group = validate(as_map(raw, "exchange group"), {"prefix": str, "replicas": list_of(dict, 4096)})
        size = at_least(group, "size", 1)
        first_rank = at_least(group, "first_rank", 0)
        need(first_rank < size and bool(group["replicas"]), "an exchange group holds its replicas' ranks")
        transport = group.get("transport") or "torch"
        need(transport in TRANSPORTS, f"field 'transport' must be one of {TRANSPORTS}")
        members = group.get("members") or []
        count = len(group["replicas"])
        ok = isinstance(members, list) and all(type(i) is int and 0 <= i < count for i in members)
        need(ok and members == sorted(set(members)), "field 'members' must be increasing replica indices")
        return cls(
            address(group.get("store"), "store"),
            group["prefix"],
            secret_of(group),
            first_rank,
            size,
            tuple(ReplicaSetup.from_wire(r) for r in group["replicas"]),
            seconds(group, "connect_timeout_s", CONNECT_TIMEOUT_S),
            transport,
            tuple(members),
        )
