"""Paged decode attention with FlexAttention: each query reads its sequence's KV blocks in place in the cache.

The cache of a layer, [num_blocks, block_size, kv_heads, dim], is viewed (no copy) as one long key
sequence that every decode query shares; a block mask built from the block tables names the blocks each
query reads, and a mask function keeps exactly its own positions (and its sliding window). Compiled
(CUDA), flex_attention runs a fused kernel that visits only the named blocks; eager (CPU) it scores
every cache slot, so the engine takes it on CPU only when asked for, to test it. The CUDA path was
written without a GPU to run it on.

Its per-step state lives in buffers allocated once (``logical`` [max_seqs, num_blocks + 1], ``lens``
[max_seqs]) and refilled in place, so the mask functions stay the same objects (no recompilation) and a
CUDA graph can capture a step that reads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

flex: Any = None
with contextlib.suppress(ImportError):  # torch older than 2.5 has no FlexAttention
    from torch.nn.attention import flex_attention as flex

# The one query row of each sequence sits in a q-block this tall: the compiled decoding kernel tiles rows
# (query length x grouped heads) by at least 16 and needs the q-block to be a multiple of its tile.
Q_BLOCK = 128
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def flex_installed() -> bool:
    return flex is not None


_compiled: Any = None


def _flex(device: torch.device) -> Any:
    """flex_attention, compiled once per process on CUDA (the fused kernel); eager elsewhere. Shapes are
    left to torch.compile's automatic dynamism: a second batch size recompiles once with a symbolic batch
    instead of once per size (past the recompile limit torch would fall back to the unfused eager path)."""
    global _compiled
    if device.type != "cuda":
        return flex.flex_attention
    if _compiled is None:  # pragma: no cover - CUDA only
        _compiled = torch.compile(flex.flex_attention)
    return _compiled


class PagedDecode:
    """The block masks of a runner's decode steps. ``update`` refills the buffers for a step's sequences;
    ``attend`` runs one layer's decode attention against its cache."""

    def __init__(self, num_blocks: int, block_size: int, device: torch.device, max_seqs: int = 64) -> None:
        if flex is None:
            raise RuntimeError("FlexAttention needs torch 2.5 or newer")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        self._allocate(max_seqs)
        self.batch = 0
        self._mods: dict[int, MaskMod] = {}
        self._caps: dict[float, Any] = {}
        self._masks: dict[int, Any] = {}

    def reserve(self, rows: int) -> None:
        """Room for decode batches of ``rows`` sequences from now on (a CUDA graph reads these buffers:
        they must not move once captured)."""
        if rows > self.logical.shape[0]:
            self._allocate(rows)

    def _allocate(self, rows: int) -> None:
        """Buffers for ``rows`` sequences; a larger batch reallocates them."""
        shape, i32, dev = (rows, self.num_blocks + 1), torch.int32, self.device
        self.logical = torch.full(shape, -1, dtype=i32, device=dev)
        self.lens = torch.zeros(rows, dtype=i32, device=dev)
        self.kv_count = torch.zeros(rows, 1, 1, dtype=i32, device=dev)
        self.tables = torch.zeros(rows, 1, 1, self.num_blocks, dtype=i32, device=dev)

    def update(self, block_tables: torch.Tensor, lens: torch.Tensor) -> None:
        """This step's ``block_tables`` [B, width] (short rows padded with anything; negative entries are
        blocks freed behind a window) and context lengths ``lens`` [B], both on the device. The block mask
        visits each row's held blocks only, listed first. No host sync. O(B * (num_blocks + width log width))."""
        batch, width = block_tables.shape
        self.reserve(batch if batch <= self.logical.shape[0] else max(batch, 2 * self.logical.shape[0]))
        count = (lens + self.block_size - 1) // self.block_size
        columns = torch.arange(width, device=lens.device)
        valid = (columns < count.unsqueeze(1)) & (block_tables >= 0)
        physical = torch.where(valid, block_tables.long(), self.num_blocks)  # the rest lands in the spare column
        logical = self.logical[:batch]
        logical.fill_(-1)
        logical.scatter_(1, physical, columns.int().expand(batch, width).contiguous())
        held_first = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)
        self.lens[:batch].copy_(lens)
        self.kv_count[:batch].copy_(valid.sum(1, dtype=torch.int32).view(batch, 1, 1))
        held = min(width, self.num_blocks)  # a trimmed table may be wider than the cache, never hold more
        self.tables[:batch, 0, 0, :held].copy_(torch.where(valid, block_tables, 0).gather(1, held_first)[:, :held])
        self.batch = batch
        self._masks.clear()

    def mask_mod(self, window: int) -> MaskMod:
        """Query ``b`` sees cache slot ``kv`` when its block is in b's table and its position is below b's
        length (and within ``window`` of it when > 0). The same function object per window."""
        if window not in self._mods:
            size = self.block_size

            def visible(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
                block = self.logical[b, kv // size]
                position = block * size + kv % size
                length = self.lens[b]
                seen = (block >= 0) & (position < length)
                return seen & (position >= length - window) if window else seen

            self._mods[window] = visible
        return self._mods[window]

    def score_mod(self, softcap: float) -> Any:
        """Soft-capped scores (Gemma 2), the same function object per cap; None without one."""
        if softcap and softcap not in self._caps:

            def capped(s: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> Any:
                return torch.tanh(s / softcap) * softcap

            self._caps[softcap] = capped
        return self._caps.get(softcap)

    def block_mask(self, window: int) -> Any:
        if window not in self._masks:
            b = self.batch
            self._masks[window] = flex.BlockMask.from_kv_blocks(
                self.kv_count[:b],
                self.tables[:b],
                BLOCK_SIZE=(Q_BLOCK, self.block_size),
                mask_mod=self.mask_mod(window),
                seq_lengths=(1, self.num_blocks * self.block_size),
                compute_q_blocks=False,
            )
        return self._masks[window]

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        """q [B, heads, dim] of this step's sequences against the cache in place; returns [B, heads, dim]."""
        batch, _, dim = q.shape
        kv_heads = k_cache.shape[2]
        slots = k_cache.shape[0] * self.block_size
        keys, values = (
            c.view(1, slots, kv_heads, dim).permute(0, 2, 1, 3).expand(batch, -1, -1, -1) for c in (k_cache, v_cache)
        )
        out = _flex(q.device)(
            q.unsqueeze(2),
            keys,
            values,
            score_mod=self.score_mod(softcap),
            block_mask=self.block_mask(window),
            scale=scale,
            enable_gqa=q.shape[1] != kv_heads,
        )
        result: torch.Tensor = out.squeeze(2)
        return result
