"""Paged attention: writes each step's K/V into the block cache and attends with flash-attn or torch SDPA.

The cache of one layer is a pair of [num_blocks, block_size, kv_heads, head_dim] tensors. flash-attn
(CUDA, when installed) reads it directly through the block table; the SDPA path gathers each sequence's
slots into a dense tensor once per step per layer, using indices the runner computed once per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
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
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale, enable_gqa=self.gqa
        )

    def _sdpa_decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [B, heads, 1, dim] against each sequence's keys gathered from the cache."""
        assert meta.gather is not None  # the runner gathers for every SDPA decode step
        k = self._blocks(self.k_cache, meta.gather, q.shape[0])[:, : meta.gather_len].transpose(1, 2)
        v = self._blocks(self.v_cache, meta.gather, q.shape[0])[:, : meta.gather_len].transpose(1, 2)
        return self._sdpa(q, k, v, attn_mask=meta.mask)

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
            outs.append(self._sdpa(qi, ki, vi, is_causal=n > 1).squeeze(0).transpose(0, 1))
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
            causal = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)
            qi = q[start : start + n].transpose(0, 1).unsqueeze(0)
            outs.append(self._sdpa(qi, k, v, attn_mask=causal).squeeze(0).transpose(0, 1))
            start += n
        return torch.cat(outs)

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
            block_table=meta.block_tables if meta.has_prefix else None,
        )
        return out
