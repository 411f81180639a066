"""Runs one step of a stage model: turns a batch of sequences into tensors, owns the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hexgen.engine.attention import AttentionMetadata, flash_available
from hexgen.engine.config import ModelConfig
from hexgen.engine.layers import Shard
from hexgen.engine.layout import kv_head_range
from hexgen.engine.loader import load_weights
from hexgen.engine.models import StageModel, build_model
from hexgen.engine.sequence import Sequence

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DTYPES |= {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(name: str | torch.dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    """ "auto" keeps the checkpoint's dtype, except that half precision on CPU becomes float32."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        dtype = DTYPES.get(config.torch_dtype, torch.float32)
        return torch.float32 if device.type == "cpu" and dtype != torch.float32 else dtype
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


@dataclass(frozen=True)
class CacheConfig:
    """Block size and count of the KV cache. ``num_blocks`` 0 sizes it from ``memory_bytes`` (CPU) or from
    ``gpu_memory_utilization`` of the device's memory (CUDA)."""

    block_size: int = 0
    num_blocks: int = 0
    memory_bytes: int = 256 << 20
    gpu_memory_utilization: float = 0.9

    def resolved_block_size(self, device: torch.device) -> int:
        # flash-attn's paged decode wants pages of a multiple of 256 tokens.
        return self.block_size or (256 if flash_available(device) else 16)


class ModelRunner:
    """One worker's model shard and KV cache. ``run`` executes a prefill or decode step."""

    def __init__(
        self,
        model_dir: str | Path,
        config: ModelConfig,
        shard: Shard,
        dtype: torch.dtype,
        device: torch.device,
        cache: CacheConfig,
    ) -> None:
        self.config = config
        self.shard = shard
        self.dtype = dtype
        self.device = device
        self.use_flash = flash_available(device) and dtype in (torch.float16, torch.bfloat16)
        self.model: StageModel = build_model(config, shard)
        load_weights(self.model, model_dir, dtype, device)
        self.model.to(device)
        self.block_size = cache.resolved_block_size(device)
        kv = kv_head_range(config.num_kv_heads, shard.tp_size, shard.tp_rank)
        self.num_kv_heads = kv[1] - kv[0]
        self.num_blocks = cache.num_blocks or self._blocks_that_fit(cache)
        if self.num_blocks < 1:
            raise ValueError("the KV cache budget does not hold a single block; give it more memory")
        num_layers = shard.end_layer - shard.start_layer
        self.kv_cache = torch.zeros(
            2,
            num_layers,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            config.head_dim,
            dtype=dtype,
            device=device,
        )
        for i, layer in enumerate(self.model.layers):
            layer.attn.k_cache = self.kv_cache[0, i]
            layer.attn.v_cache = self.kv_cache[1, i]

    @property
    def block_bytes(self) -> int:
        layers = self.shard.end_layer - self.shard.start_layer
        return 2 * layers * self.block_size * self.num_kv_heads * self.config.head_dim * self.dtype.itemsize

    def _blocks_that_fit(self, cache: CacheConfig) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - cache.gpu_memory_utilization) * total
        else:
            budget = cache.memory_bytes
        return int(budget // self.block_bytes)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool, hidden: torch.Tensor | None = None) -> torch.Tensor | None:
        """One step. First stage: ``hidden`` None (token ids come from the sequences). Returns the hidden
        states for the next stage, or on the last stage the logits [len(seqs), vocab] (None on TP ranks
        other than 0)."""
        input_ids, positions, meta, last = self.prepare(seqs, is_prefill)
        out = self.model(input_ids if hidden is None else hidden, positions, meta)
        if not self.shard.is_last:
            return out
        if last is not None:
            out = out[last]
        logits = self.model.logits(out)
        return None if logits is None else logits.float()

    def prepare(
        self, seqs: list[Sequence], is_prefill: bool
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor | None]:
        return self._prepare_prefill(seqs) if is_prefill else self._prepare_decode(seqs)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _prepare_prefill(
        self, seqs: list[Sequence]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, context_lens = [], []
        for seq in seqs:
            start, end = seq.num_cached_tokens, len(seq)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq, start, end))
            query_lens.append(end - start)
            context_lens.append(end)
        has_prefix = any(q != k for q, k in zip(query_lens, context_lens, strict=True))
        dev = self.device
        cu_q = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_lens=query_lens,
            context_lens=context_lens,
            has_prefix=has_prefix,
            use_flash=self.use_flash,
        )
        if self.use_flash:
            meta.cu_q = cu_q.to(dev)
            meta.cu_k = torch.tensor([0, *context_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
        if has_prefix:
            meta.block_tables = self._block_tables(seqs)
        last = (cu_q[1:] - 1).to(dev, torch.long)
        return torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta, last

    def _prepare_decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, None]:
        bs = self.block_size
        lens = [len(seq) for seq in seqs]
        slots = [seq.block_table[(n - 1) // bs] * bs + (n - 1) % bs for seq, n in zip(seqs, lens, strict=True)]
        dev = self.device
        meta = AttentionMetadata(
            is_prefill=False,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_lens=[1] * len(seqs),
            context_lens=lens,
            use_flash=self.use_flash,
        )
        meta.block_tables = self._block_tables(seqs)
        if self.use_flash:
            meta.context_lens_tensor = torch.tensor(lens, dtype=torch.int32, device=dev)
        else:
            longest = max(lens)
            meta.gather = meta.block_tables.long().view(-1)
            meta.gather_len = longest
            if min(lens) != longest:
                span = torch.arange(longest, device=dev)
                meta.mask = (span < torch.tensor(lens, device=dev).unsqueeze(1)).view(len(seqs), 1, 1, longest)
        ids = torch.tensor([seq.token_ids[-1] for seq in seqs], device=dev)
        positions = torch.tensor([n - 1 for n in lens], device=dev)
        return ids, positions, meta, None

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(seq.block_table) for seq in seqs)
        padded = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs]
        return torch.tensor(padded, dtype=torch.int32, device=self.device)
