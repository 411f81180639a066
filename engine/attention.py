"""Paged attention: writes each step's K/V into the block cache and attends with flash-attn or torch SDPA.

The cache of one layer is a pair of [num_blocks, block_size, kv_heads, head_dim] tensors. flash-attn
(CUDA, when installed) reads it directly through the block table; the SDPA path gathers each sequence's
slots into a dense tensor once per step per layer, using indices the runner computed once per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional: only on CUDA machines with the gpu extra
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = flash_attn_with_kvcache = None


FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2 runs on Ampere and newer only
FLASH_BLOCK_MULTIPLE = 256  # its paged KV (block_table) wants pages of a multiple of 256 tokens
SDPA_BLOCK_SIZE = 16  # small pages waste less of the cache on short sequences

log = logging.getLogger("hexgen.engine.attention")
_said: set[str] = set()


def flash_available(device: torch.device) -> bool:
    """Whether flash-attn is installed and the device is CUDA (the capability is checked by choose_attention)."""
    return device.type == "cuda" and flash_attn_varlen_func is not None


@dataclass(frozen=True)
class AttentionChoice:
    """The attention path of a worker and the KV block size that goes with it; ``reason`` says why."""

    backend: str  # "flash-attn" or "sdpa"
    block_size: int
    reason: str


def choose_attention(
    device_type: str,
    capability: tuple[int, int] | None,
    flash_installed: bool,
    dtype: torch.dtype,
    block_size: int = 0,
) -> AttentionChoice:
    """flash-attn where it runs (CUDA, compute capability >= 8.0, fp16/bf16, a block size that is a multiple
    of 256 or unset), the SDPA path otherwise. ``block_size`` 0 picks the path's default."""
    if block_size < 0:
        raise ValueError(f"block size must be positive (or 0 for the default), got {block_size}")
    why_not = None
    if device_type != "cuda":
        why_not = f"the device is {device_type}, not CUDA"
    elif not flash_installed:
        why_not = "flash-attn is not installed"
    elif capability is None or tuple(capability) < FLASH_MIN_CAPABILITY:
        shown = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        why_not = f"compute capability {shown} is below 8.0"
    elif dtype not in (torch.float16, torch.bfloat16):
        why_not = f"flash-attn needs fp16 or bf16, the model runs in {str(dtype).removeprefix('torch.')}"
    elif block_size % FLASH_BLOCK_MULTIPLE:
        why_not = f"block size {block_size} is not a multiple of {FLASH_BLOCK_MULTIPLE}"
    if why_not is not None:
        return AttentionChoice("sdpa", block_size or SDPA_BLOCK_SIZE, f"torch SDPA attention: {why_not}")
    size = block_size or FLASH_BLOCK_MULTIPLE
    return AttentionChoice("flash-attn", size, f"flash-attn attention, KV blocks of {size} tokens")


def attention_for(device: torch.device, dtype: torch.dtype, block_size: int = 0) -> AttentionChoice:
    """choose_attention for this process's device, logged once per distinct outcome."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    choice = choose_attention(device.type, capability, flash_attn_varlen_func is not None, dtype, block_size)
    if choice.reason not in _said:
        _said.add(choice.reason)
        log.info("%s", choice.reason)
    return choice


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, built once per step and shared by all layers.

    Prefill: ``query_lens`` new tokens per sequence, ``context_lens`` total tokens per sequence (cached
    prefix + new); ``cu_q``/``cu_k`` their prefix sums. Decode: one query token per sequence.
    ``gather`` (the block tables flattened to [B * blocks]), ``gather_len`` (the longest context) and
    ``mask`` ([B, 1, 1, gather_len], None when every sequence has the same length) serve the SDPA path
    whenever keys come from the cache: whole blocks are copied, which is far cheaper than single slots.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    has_prefix: bool = False
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    context_lens_tensor: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    gather: torch.Tensor | None = None
    gather_len: int = 0
    mask: torch.Tensor | None = None
    use_flash: bool = False
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # decode masks by window, built once


def window_mask(num_queries: int, total: int, window: int, device: torch.device) -> torch.Tensor:
    """Which of ``total`` keys each of the last ``num_queries`` positions sees: [num_queries, total] bool.
    Causal, and with ``window`` > 0 only the keys less than ``window`` positions back (transformers'
    sliding window: the query itself and window - 1 before it). O(num_queries * total)."""
    query_pos = torch.arange(total - num_queries, total, device=device).unsqueeze(1)
    key_pos = torch.arange(total, device=device).unsqueeze(0)
    allowed = key_pos <= query_pos
    return allowed & (query_pos - key_pos < window) if window else allowed


def decode_window_mask(meta: AttentionMetadata, window: int) -> torch.Tensor:
    """The SDPA decode mask [B, 1, 1, gather_len] of a layer with ``window``: each sequence's own keys, only
    its last ``window``; built once per step and window, O(B * gather_len)."""
    if window not in meta.window_masks:
        device = meta.slot_mapping.device
        lens = torch.tensor(meta.context_lens, device=device).view(-1, 1, 1, 1)
        span = torch.arange(meta.gather_len, device=device)
        meta.window_masks[window] = (span < lens) & (span >= lens - window)
    return meta.window_masks[window]


class Attention(nn.Module):
    """Attention over the paged cache. ``window`` > 0: each query sees only that many latest positions
    (itself included); ``softcap`` > 0: scores become softcap * tanh(scores / softcap) (Gemma 2)."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, window: int = 0, softcap: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.window = window
        self.softcap = softcap
        self.gqa = num_heads != num_kv_heads
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [N, heads, dim], k and v [N, kv_heads, dim] for the step's N tokens; returns [N, heads * dim]."""
        if self.k_cache.numel():
            flat = (-1, self.num_kv_heads, self.head_dim)
            self.k_cache.view(flat).index_copy_(0, meta.slot_mapping, k)
            self.v_cache.view(flat).index_copy_(0, meta.slot_mapping, v)
        if meta.use_flash:
            out = self._flash(q, k, v, meta)
        elif meta.is_prefill:
            out = self._sdpa_prefill(q, k, v, meta)
        else:
            out = self._sdpa_decode(q.unsqueeze(2), meta).squeeze(2)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _sdpa(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if self.softcap:
            return self._capped(q, k, v, attn_mask)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale, enable_gqa=self.gqa
        )

    def _capped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention with soft-capped scores, which SDPA cannot do; softmax in float32 as transformers does."""
        if self.gqa:
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v)

    def _sdpa_decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [B, heads, 1, dim] against each sequence's keys gathered from the cache."""
        assert meta.gather is not None  # the runner gathers for every SDPA decode step
        k = self._blocks(self.k_cache, meta.gather, q.shape[0])[:, : meta.gather_len].transpose(1, 2)
        v = self._blocks(self.v_cache, meta.gather, q.shape[0])[:, : meta.gather_len].transpose(1, 2)
        windowed = self.window and self.window < meta.gather_len
        return self._sdpa(q, k, v, attn_mask=decode_window_mask(meta, self.window) if windowed else meta.mask)

    def _blocks(self, cache: torch.Tensor, block_ids: torch.Tensor, batch: int) -> torch.Tensor:
        """The cache blocks ``block_ids`` as [batch, blocks * block_size, kv_heads, dim]."""
        return cache.index_select(0, block_ids).view(batch, -1, self.num_kv_heads, self.head_dim)

    def _sdpa_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if meta.has_prefix:
            return self._sdpa_prefix(q, meta)
        outs = []
        start = 0
        for n in meta.query_lens:
            end = start + n
            qi, ki, vi = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            if (self.window and self.window < n) or self.softcap:
                out = self._sdpa(qi, ki, vi, attn_mask=window_mask(n, n, self.window, q.device))
            else:
                out = self._sdpa(qi, ki, vi, is_causal=n > 1)
            outs.append(out.squeeze(0).transpose(0, 1))
            start = end
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _sdpa_prefix(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        assert meta.block_tables is not None  # a prefill with a cached prefix reads the cache through them
        outs = []
        start = 0
        for i, (n, total) in enumerate(zip(meta.query_lens, meta.context_lens, strict=True)):
            blocks = meta.block_tables[i].long()
            k = self._blocks(self.k_cache, blocks, 1)[:, :total].transpose(1, 2)
            v = self._blocks(self.v_cache, blocks, 1)[:, :total].transpose(1, 2)
            qi = q[start : start + n].transpose(0, 1).unsqueeze(0)
            mask = window_mask(n, total, self.window, q.device)
            outs.append(self._sdpa(qi, k, v, attn_mask=mask).squeeze(0).transpose(0, 1))
            start += n
        return torch.cat(outs)

    @property
    def flash_window(self) -> tuple[int, int]:
        """flash-attn's (left, right) window: ``window`` - 1 keys back, none ahead; (-1, -1) is unbounded."""
        return (self.window - 1, 0) if self.window else (-1, -1)

    def _flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        out: torch.Tensor
        if not meta.is_prefill:
            out = flash_attn_with_kvcache(
                q.unsqueeze(1),
                self.k_cache,
                self.v_cache,
                cache_seqlens=meta.context_lens_tensor,
                block_table=meta.block_tables,
                softmax_scale=self.scale,
                causal=True,
                window_size=self.flash_window,
                softcap=self.softcap,
            )
            return out.squeeze(1)
        if meta.has_prefix:
            k, v = self.k_cache, self.v_cache
        out = flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q=meta.cu_q,
            cu_seqlens_k=meta.cu_k,
            max_seqlen_q=max(meta.query_lens),
            max_seqlen_k=max(meta.context_lens),
            softmax_scale=self.scale,
            causal=True,
            window_size=self.flash_window,
            softcap=self.softcap,
            block_table=meta.block_tables if meta.has_prefix else None,
        )
        return out
