"""The KV cache format of a replica, published to the exchange's store and checked before any hand-off.

Prefill and decode replicas must agree on block size, dtype and head layout, or the bytes of one land as
garbage in the other (a flash-attn host pages KV in 256-token bf16 blocks, a CPU host in 16-token fp32
ones). Each rank publishes its format when it joins the exchange; before a hand-off every rank of both
replicas reads the formats of all their ranks from the same store, so all of them reach the same verdict
without a message between them, and a mismatch is refused on both sides instead of being sent.

Why refuse a block-size difference instead of converting it: the transfer moves whole blocks on both
sides with one gather per chunk; converting would mean per-token-range copies at one end (and a dtype
difference still could not be converted without silently losing precision). A deployment should run one
format, so a difference is a configuration error to report, not a case to serve slowly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

FORMAT_FIELDS = ("block_size", "dtype", "num_layers", "num_kv_heads", "head_dim")
MAX_FORMAT_BYTES = 512


class KVFormatError(ValueError):
    """Two replicas' KV formats differ, or a published format cannot be read; the message names both."""


@dataclass(frozen=True)
class KVFormat:
    block_size: int
    dtype: str  # "bfloat16", "float32", ... (torch's name without the "torch." prefix)
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def describe(self) -> str:
        return (
            f"blocks of {self.block_size} tokens, {self.dtype}, {self.num_layers} layers x "
            f"{self.num_kv_heads} KV heads x head_dim {self.head_dim}"
        )

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_bytes(raw: Any) -> KVFormat:
        """Parse a published format; raises KVFormatError (and nothing else) on anything malformed."""
        if not isinstance(raw, bytes | bytearray) or len(raw) > MAX_FORMAT_BYTES:
            raise KVFormatError("a published KV format is not a short byte string")
        try:
            data = json.loads(bytes(raw))
        except ValueError:
            raise KVFormatError("a published KV format is not JSON") from None
        if not isinstance(data, dict) or set(data) != set(FORMAT_FIELDS):
            raise KVFormatError(f"a published KV format has fields {sorted(data) if isinstance(data, dict) else data}")
        ints = [data[f] for f in FORMAT_FIELDS if f != "dtype"]
        if any(isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 1 << 31 for v in ints):
            raise KVFormatError(f"a published KV format has bad sizes: {data}")
        if not isinstance(data["dtype"], str) or not data["dtype"].isidentifier():
            raise KVFormatError(f"a published KV format has a bad dtype: {data['dtype']!r}")
        return KVFormat(**data)


def format_key(prefix: str, rank: int) -> str:
    return f"{prefix}/hexgen-kv-format/{rank}"


def mismatch(src: KVFormat, dst: KVFormat) -> str | None:
    """None when KV moves as is from ``src`` (the prefill side) to ``dst``; else why not, naming both."""
    differ = [f.replace("_", " ") for f in FORMAT_FIELDS if getattr(src, f) != getattr(dst, f)]
    if not differ:
        return None
    return (
        f"KV formats differ ({', '.join(differ)}): the prefill replica has {src.describe()}, the decode "
        f"replica has {dst.describe()}; run one KV block size and dtype across the deployment"
    )


def replica_format(formats: list[KVFormat], what: str) -> KVFormat:
    """The one format of a replica's ranks; raises KVFormatError when its ranks disagree."""
    if not formats:
        raise KVFormatError(f"{what} has no ranks")
    odd = [f for f in formats if f != formats[0]]
    if odd:
        raise KVFormatError(f"the ranks of {what} disagree: {formats[0].describe()} vs {odd[0].describe()}")
    return formats[0]
