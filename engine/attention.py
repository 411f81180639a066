"""Paged attention: writes each step's K/V into the block cache and attends with flash-attn, FlexAttention or SDPA.

The cache of one layer is a pair of [num_blocks, block_size, kv_heads, head_dim] tensors. flash-attn
(CUDA, when installed) reads it directly through the block table, prefill and decode. Without it, decode
on CUDA reads the blocks in place through FlexAttention (engine.paged); the SDPA path (CPU) gathers each
sequence's blocks into a dense tensor once per step per layer. Prefill without flash-attn is one SDPA call
over the step's sequences padded into a batch (engine.varlen). A step may mix both: with chunked
prefill its leading sequences decode (one token each) and the rest prefill a prompt chunk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hexgen.engine.paged import PagedDecode, flex_installed
from hexgen.engine.varlen import PrefillPlan, pad, prefill_mask, unpad

try:  # optional: only on CUDA machines with the gpu extra
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = flash_attn_with_kvcache = None


FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2 runs on Ampere and newer only
FLASH_BLOCK_MULTIPLE = 256  # its paged KV (block_table) wants pages of a multiple of 256 tokens
SDPA_BLOCK_SIZE = 16  # small pages waste less of the cache on short sequences
FLEX_BLOCK_SIZE = 128  # flex_attention's sparse block size: its compiled kernels' tiles divide it
BACKENDS = ("auto", "flash-attn", "flex", "sdpa")

log = logging.getLogger("hexgen.engine.attention")
_said: set[str] = set()


def flash_available(device: torch.device) -> bool:
    """Whether flash-attn is installed and the device is CUDA (the capability is checked by choose_attention)."""
    return device.type == "cuda" and flash_attn_varlen_func is not None


@dataclass(frozen=True)
class AttentionChoice:
    """The attention path of a worker and the KV block size that goes with it; ``reason`` says why."""

    backend: str  # "flash-attn", "flex" (prefill by SDPA, decode by FlexAttention) or "sdpa"
    block_size: int
    reason: str


def choose_attention(
    device_type: str,
    capability: tuple[int, int] | None,
    flash_installed: bool,
    dtype: torch.dtype,
    block_size: int = 0,
    prefer: str = "auto",
    flex_ok: bool = False,
) -> AttentionChoice:
    """flash-attn where it runs (CUDA, compute capability >= 8.0, fp16/bf16, a block size that is a multiple
    of 256 or unset); else on CUDA FlexAttention's paged decode where this torch has it (``flex_ok``);
    else the SDPA path. ``prefer`` names one path (``BACKENDS``): "flex" runs on CPU too (eagerly, slowly:
    for tests), "sdpa" always runs, "flash-attn" only where it would be chosen. ``block_size`` 0 picks the
    path's default."""
    if block_size < 0:
        raise ValueError(f"block size must be positive (or 0 for the default), got {block_size}")
    if prefer not in BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(BACKENDS)}; got {prefer!r}")
    why_not = _why_not_flash(device_type, capability, flash_installed, dtype, block_size)
    if why_not is None and prefer in ("auto", "flash-attn"):
        size = block_size or FLASH_BLOCK_MULTIPLE
        return AttentionChoice("flash-attn", size, f"flash-attn attention, KV blocks of {size} tokens")
    if prefer == "flash-attn":
        raise ValueError(f"flash-attn attention was asked for but cannot run: {why_not}")
    if flex_ok and (prefer == "flex" or (prefer == "auto" and device_type == "cuda")):
        size = block_size or FLEX_BLOCK_SIZE
        why = "asked for" if prefer == "flex" else why_not
        return AttentionChoice("flex", size, f"FlexAttention paged decode, SDPA prefill ({why}), KV blocks of {size}")
    if prefer == "flex":
        raise ValueError("FlexAttention was asked for but this torch has none (it needs torch 2.5 or newer)")
    why = "asked for" if prefer == "sdpa" else why_not
    return AttentionChoice("sdpa", block_size or SDPA_BLOCK_SIZE, f"torch SDPA attention: {why}")


def _why_not_flash(
    device_type: str, capability: tuple[int, int] | None, flash_installed: bool, dtype: torch.dtype, block_size: int
) -> str | None:
    if device_type != "cuda":
        return f"the device is {device_type}, not CUDA"
    if not flash_installed:
        return "flash-attn is not installed"
    if capability is None or tuple(capability) < FLASH_MIN_CAPABILITY:
        shown = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        return f"compute capability {shown} is below 8.0"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs fp16 or bf16, the model runs in {str(dtype).removeprefix('torch.')}"
    if block_size % FLASH_BLOCK_MULTIPLE:
        return f"block size {block_size} is not a multiple of {FLASH_BLOCK_MULTIPLE}"
    return None


def attention_for(
    device: torch.device, dtype: torch.dtype, block_size: int = 0, prefer: str = "auto"
) -> AttentionChoice:
    """choose_attention for this process's device, logged once per distinct outcome."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    flash = flash_attn_varlen_func is not None
    choice = choose_attention(device.type, capability, flash, dtype, block_size, prefer, flex_installed())
    if choice.reason not in _said:
        _said.add(choice.reason)
        log.info("%s", choice.reason)
    return choice


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, built once per step and shared by all layers.

    ``query_lens`` new tokens per sequence, ``context_lens`` total tokens per sequence (cached prefix +
    new); ``cu_q``/``cu_k`` their prefix sums (flash-attn). ``max_position`` the largest position of the
    step, known on the host. Without flash-attn the first ``num_decode`` sequences (one query each; all
    of a decode step) take the decode path: ``decode_lens`` their lengths on the device and either
    ``paged`` (FlexAttention) or ``gather`` (their block tables flattened), ``gather_len`` (the longest)
    and ``mask`` ([B, 1, 1, gather_len], None when every length is the same) for SDPA; the rest take
    ``prefill``, one padded SDPA call (engine.varlen).
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    has_prefix: bool = False
    max_position: int = 0
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    context_lens_tensor: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    use_flash: bool = False
    num_decode: int = 0
    decode_lens: torch.Tensor | None = None
    paged: PagedDecode | None = None
    gather: torch.Tensor | None = None
    gather_len: int = 0
    mask: torch.Tensor | None = None
    prefill: list[PrefillPlan] | None = None
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # decode masks by window, built once


def decode_window_mask(meta: AttentionMetadata, window: int) -> torch.Tensor:
    """The SDPA decode mask [B, 1, 1, gather_len] of a layer with ``window``: each sequence's own keys, only
    its last ``window``; built once per step and window, O(B * gather_len)."""
    if window not in meta.window_masks:
        assert meta.decode_lens is not None  # the runner sets them for every decode part
        lens = meta.decode_lens.view(-1, 1, 1, 1)
        span = torch.arange(meta.gather_len, device=lens.device)
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
        else:
            d = meta.num_decode
            parts = [self._decode(q[:d], meta)] if d else []
            if d < q.shape[0]:
                parts.append(self._sdpa_prefill(q[d:], k[d:], v[d:], meta))
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [B, heads, dim], one query per sequence at its last position, against its cached keys."""
        if meta.paged is not None:
            return meta.paged.attend(q, self.k_cache, self.v_cache, self.scale, self.window, self.softcap)
        return self._sdpa_decode(q.unsqueeze(2), meta).squeeze(2)

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
        """The prefill part's tokens [N, heads, dim], one SDPA call per length group (engine.varlen)."""
        assert meta.prefill is not None  # the runner plans every SDPA prefill part
        out = None if len(meta.prefill) == 1 else torch.empty_like(q)
        for plan in meta.prefill:
            src = plan.source
            if src is None:
                part = self._sdpa_group(q, k, v, plan)
            else:
                part = self._sdpa_group(q.index_select(0, src), k.index_select(0, src), v.index_select(0, src), plan)
            if out is None:
                return part
            out.index_copy_(0, src if src is not None else torch.arange(q.shape[0], device=q.device), part)
        assert out is not None  # a plan has at least one group
        return out

    def _sdpa_group(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PrefillPlan) -> torch.Tensor:
        """One length group's tokens in one SDPA call over its padded batch."""
        if plan.gather is not None:  # a cached prefix: every key comes from the cache, the new ones included
            k = self._blocks(self.k_cache, plan.gather, plan.batch)[:, : plan.k_width].transpose(1, 2)
            v = self._blocks(self.v_cache, plan.gather, plan.batch)[:, : plan.k_width].transpose(1, 2)
        else:
            k, v = pad(k, plan), pad(v, plan)
        q = pad(q, plan)
        if plan.gather is None and not self.softcap and not (self.window and self.window < plan.q_width):
            out = self._sdpa(q, k, v, is_causal=plan.q_width > 1)
        else:
            out = self._sdpa(q, k, v, attn_mask=prefill_mask(plan, self.window))
        return unpad(out, plan)

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
