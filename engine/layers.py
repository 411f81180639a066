"""Building blocks shared by the model families: the shard a worker owns, tensor-parallel linears, norms, RoPE."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hexgen.engine.quant import QuantizedWeight


@dataclass(frozen=True)
class Shard:
    """The part of a replica one worker runs: layers [start_layer, end_layer) and one tensor-parallel rank.

    ``tp_group`` is the process group of this stage's TP ranks (None when tp_size is 1); ``tp_ranks`` are
    their global ranks in that group's world, tp rank 0 first.
    """

    start_layer: int
    end_layer: int
    num_layers: int
    tp_size: int = 1
    tp_rank: int = 0
    tp_group: Any = None
    tp_ranks: tuple[int, ...] = ()

    @property
    def is_first(self) -> bool:
        return self.start_layer == 0

    @property
    def is_last(self) -> bool:
        return self.end_layer == self.num_layers

    @property
    def layers(self) -> range:
        return range(self.start_layer, self.end_layer)

    def part(self, size: int, what: str) -> tuple[int, int]:
        """This rank's contiguous range of an evenly split dimension of ``size``."""
        if size % self.tp_size:
            raise ValueError(f"{what} ({size}) does not split evenly over tensor parallelism {self.tp_size}")
        step = size // self.tp_size
        return self.tp_rank * step, (self.tp_rank + 1) * step

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x


@dataclass(frozen=True)
class Piece:
    """Rows or columns [start, end) of a checkpoint tensor along ``dim`` (dim None: the whole tensor).

    ``pad_to`` zero-pads the slice to that many entries along ``dim`` (a vocabulary that does not split
    evenly over TP ranks).
    """

    name: str
    dim: int | None = None
    start: int = 0
    end: int = 0
    pad_to: int = 0


def rows(name: str, span: tuple[int, int]) -> Piece:
    return Piece(name, 0, span[0], span[1])


def cols(name: str, span: tuple[int, int]) -> Piece:
    return Piece(name, 1, span[0], span[1])


class TensorMap(nn.Module):
    """A module from one tensor to one tensor of the same leading shape; calling it is typed as such."""

    if TYPE_CHECKING:

        def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class Linear(TensorMap):
    """y = x W^T (+ b). ``reduce`` makes it row-parallel: partial sums are all-reduced before the bias."""

    def __init__(self, shard: Shard, in_features: int, out_features: int, bias: bool, reduce: bool = False) -> None:
        super().__init__()
        self.shard = shard
        self.reduce = reduce and shard.tp_size > 1
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.quantized: QuantizedWeight | None = None

    def quantize(self, weight: torch.Tensor, scheme: str, dtype: torch.dtype, device: torch.device) -> None:
        """Hold ``weight`` (this shard's, [out, in]) quantized with ``scheme`` (engine.quant) in place of
        the full-precision parameter."""
        self.quantized = QuantizedWeight(weight, scheme, dtype, device)
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is None:
            assert self.weight is not None  # a linear holds its weight until it is quantized
            if not self.reduce:
                return F.linear(x, self.weight, self.bias)
            y = F.linear(x, self.weight)
        else:
            y = self.quantized(x)
        if self.reduce:
            y = self.shard.all_reduce(y)
        return y if self.bias is None else y + self.bias


class RMSNorm(TensorMap):
    """RMSNorm over the last dimension, scaled by w, or by (1 + w) in float32 when ``offset`` is 1 (Gemma)."""

    def __init__(self, size: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:
            normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
            return (normed * (self.offset + self.weight.float())).to(x.dtype)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LayerNorm(TensorMap):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class VocabEmbedding(TensorMap):
    """Token embedding split over TP ranks by vocabulary rows; out-of-range ids contribute zeros."""

    def __init__(self, shard: Shard, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.shard = shard
        self.vocab_size = vocab_size
        self.per_rank = math.ceil(vocab_size / shard.tp_size)
        self.start = shard.tp_rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim), requires_grad=False)

    def piece(self, name: str) -> Piece:
        return Piece(name, 0, self.start, min(self.start + self.per_rank, self.vocab_size), self.per_rank)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.shard.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.shard.all_reduce(out)


class VocabHead(nn.Module):
    """Output projection split by vocabulary rows; TP rank 0 gathers the full logits (others get None)."""

    def __init__(self, shard: Shard, vocab_size: int, dim: int, tied: VocabEmbedding | None = None) -> None:
        super().__init__()
        self.shard = shard
        self.vocab_size = vocab_size
        self.per_rank = math.ceil(vocab_size / shard.tp_size)
        self.start = shard.tp_rank * self.per_rank
        self.tied = tied
        self.weight = None if tied else nn.Parameter(torch.empty(self.per_rank, dim), requires_grad=False)

    def piece(self, name: str) -> Piece:
        return Piece(name, 0, self.start, min(self.start + self.per_rank, self.vocab_size), self.per_rank)

    if TYPE_CHECKING:

        def __call__(self, x: torch.Tensor) -> torch.Tensor | None: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        weight = self.tied.weight if self.tied is not None else self.weight
        assert weight is not None  # an untied head holds its own weight
        logits = F.linear(x, weight)
        if self.shard.tp_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.shard.tp_size)] if self.shard.tp_rank == 0 else None
        dist.gather(logits.contiguous(), parts, dst=self.shard.tp_ranks[0], group=self.shard.tp_group)
        if parts is None:
            return None
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse RoPE frequencies, with the linear, Llama 3 and yarn scalings of Hugging Face configs."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    if scaling["rope_type"] == "yarn":
        return yarn_inv_freq(head_dim, theta, scaling)
    if scaling["rope_type"] == "dynamic":
        return inv_freq
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


def yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN (arXiv 2309.00071): the highest frequencies kept, the lowest divided by ``factor``, a linear ramp
    between the dimensions that turn ``beta_fast`` and ``beta_slow`` times over the original context."""
    factor = float(scaling["factor"])
    context = float(scaling["original_max_position_embeddings"])
    fast, slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def dim_of(turns: float) -> float:
        return head_dim * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(fast), dim_of(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    keep = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def dynamic_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any], length: int) -> torch.Tensor:
    """Dynamic NTK scaling: for a sequence of ``length`` tokens past the trained context, a larger base
    (transformers' formula); the plain frequencies within it."""
    factor, trained = float(scaling["factor"]), int(scaling["original_max_position_embeddings"])
    length = max(length, trained)
    base = theta * ((factor * length / trained) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return 1.0 / torch.pow(base, torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """What yarn multiplies cos and sin by (its ``attention_factor``, or 0.1 ln(factor) + 1); 1 otherwise."""
    if scaling is None or scaling["rope_type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(float(scaling["mscale"])) / mscale(float(scaling["mscale_all_dim"]))
    return mscale(1.0)


class Rotary(nn.Module):
    """cos/sin tables indexed by position, grown on demand; applied in the rotate-half convention."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)
        self.attention_factor = rope_attention_factor(scaling)
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        dynamic = scaling is not None and scaling["rope_type"] == "dynamic"
        self.trained = int(scaling["original_max_position_embeddings"]) if scaling and dynamic else 0
        self.cos = torch.empty(0)
        self.sin = torch.empty(0)

    def tables(
        self, positions: torch.Tensor, max_position: int, dtype: torch.dtype, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [N, 1, head_dim] of ``positions``. With dynamic scaling, ``lengths`` gives each token's
        sequence length this step, which sets its frequencies once past the trained context."""
        if self.trained and lengths is not None and int(lengths.max()) > self.trained:
            return self._dynamic(positions, lengths, dtype)
        if max_position >= self.cos.shape[0] or self.cos.dtype != dtype or self.cos.device != positions.device:
            length = max(2 * max_position, 256)
            t = torch.arange(length, device=self.inv_freq.device).float()
            freqs = torch.outer(t, self.inv_freq.float())
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
            self.cos, self.sin = cos.to(positions.device, dtype), sin.to(positions.device, dtype)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def _dynamic(
        self, positions: torch.Tensor, lengths: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token tables, one set of frequencies per distinct length: O(N * head_dim)."""
        assert self.scaling is not None  # only dynamic scaling comes here
        cos = torch.empty(positions.shape[0], self.head_dim, device=positions.device)
        sin = torch.empty_like(cos)
        for length in sorted(set(lengths.tolist())):
            chosen = lengths == length
            inv_freq = dynamic_inv_freq(self.head_dim, self.theta, self.scaling, int(length)).to(positions.device)
            freqs = positions[chosen].float().unsqueeze(1) * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos[chosen], sin[chosen] = emb.cos(), emb.sin()
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
