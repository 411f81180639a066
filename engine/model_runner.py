"""Runs one step of a stage model: turns a batch of sequences into tensors, owns the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hexgen.engine.attention import Attention, AttentionChoice, AttentionMetadata, attention_for
from hexgen.engine.config import ModelConfig
from hexgen.engine.kv_format import KVFormat
from hexgen.engine.layers import Shard
from hexgen.engine.layout import kv_head_range
from hexgen.engine.loader import ProgressFn, load_weights
from hexgen.engine.memory import MemoryProfile, fixed_budget_blocks, kv_cache_blocks
from hexgen.engine.models import build_model
from hexgen.engine.sequence import Sequence
from hexgen.engine.stage import StageModel

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

    def resolved_block_size(self, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> int:
        """The block size the attention path chosen for ``device`` and ``dtype`` uses (attention.py)."""
        return attention_for(device, dtype, self.block_size).block_size


def kv_format_for(config: ModelConfig, dtype: torch.dtype, device: torch.device, cache: CacheConfig) -> KVFormat:
    """The KV format a ModelRunner of these settings pages its cache in, known before any weight loads (a
    joining worker publishes it while it loads): the same attention choice the runner makes."""
    block_size = attention_for(device, dtype, cache.block_size).block_size
    name = str(dtype).removeprefix("torch.")
    return KVFormat(block_size, name, config.num_layers, config.num_kv_heads, config.head_dim)


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
        *,
        allocate: bool = True,
        progress: ProgressFn | None = None,
        quantize: str | None = None,
    ) -> None:
        """Loads the shard, its linear weights quantized with ``quantize`` (engine.quant) when given.
        ``allocate`` False leaves the KV cache to ``allocate_cache``: a replica sizes it only once its
        process groups exist and every rank agreed (NCCL's buffers take device memory too)."""
        self.config = config
        self.shard = shard
        self.dtype = dtype
        self.device = device
        self.cache_config = cache
        self.attention: AttentionChoice = attention_for(device, dtype, cache.block_size)  # as kv_format_for
        self.use_flash = self.attention.backend == "flash-attn"
        self.block_size = self.attention.block_size
        self.model: StageModel = build_model(config, shard)
        load_weights(self.model, model_dir, dtype, device, progress, quantize)
        self.model.to(device)
        kv = kv_head_range(config.num_kv_heads, shard.tp_size, shard.tp_rank)
        self.num_kv_heads = kv[1] - kv[0]
        self.num_blocks = 0
        self.kv_cache = torch.empty(0, dtype=dtype, device=device)
        self.memory_profile: MemoryProfile | None = None  # set by profile_memory (CUDA)
        if allocate:
            self.allocate_cache(self.blocks_that_fit())

    def allocate_cache(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(
                f"the KV cache budget does not hold a single block of {self.block_bytes} bytes; give it more memory"
            )
        self.num_blocks = num_blocks
        num_layers = self.shard.end_layer - self.shard.start_layer
        self.kv_cache = torch.zeros(
            2,
            num_layers,
            num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.config.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        for i, layer in enumerate(self.model.layers):
            attn = layer.attn
            assert isinstance(attn, Attention)
            attn.k_cache = self.kv_cache[0, i]
            attn.v_cache = self.kv_cache[1, i]

    @property
    def block_bytes(self) -> int:
        layers = self.shard.end_layer - self.shard.start_layer
        return 2 * layers * self.block_size * self.num_kv_heads * self.config.head_dim * self.dtype.itemsize

    def blocks_that_fit(self, max_num_batched_tokens: int = 4096, max_num_seqs: int = 64) -> int:
        """The configured count, else on CUDA what a profiled max-batch forward leaves of
        ``gpu_memory_utilization`` of the device, else (CPU) the fixed ``memory_bytes`` budget. On CUDA every
        TP rank of the stage must call this together (the profiling pass all-reduces)."""
        cache = self.cache_config
        if cache.num_blocks:
            return cache.num_blocks
        if self.device.type != "cuda":
            return fixed_budget_blocks(cache.memory_bytes, self.block_bytes)
        profile = self.profile_memory(max_num_batched_tokens, max_num_seqs)
        return kv_cache_blocks(profile, cache.gpu_memory_utilization, self.block_bytes)

    @torch.inference_mode()
    def profile_memory(self, max_num_batched_tokens: int, max_num_seqs: int) -> MemoryProfile:  # pragma: no cover
        """Peak memory of a forward pass over the largest batch the scheduler may form (no KV cache yet, so
        attention writes nothing), and the device memory outside torch's allocator. CUDA only."""
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        self.profile_forward(max_num_batched_tokens, max_num_seqs)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        non_torch = max(0, (total - free) - torch.cuda.memory_reserved(dev))
        self.memory_profile = MemoryProfile(total=total, peak_allocated=peak, non_torch=non_torch)
        return self.memory_profile

    @torch.inference_mode()
    def profile_forward(self, max_num_batched_tokens: int, max_num_seqs: int) -> torch.Tensor | None:
        """A forward pass over ``max_num_batched_tokens`` tokens split into ``max_num_seqs`` sequences (as a
        prefill step, the largest activations a step can have), before the KV cache exists; returns the
        logits on the last stage (the hidden states elsewhere). Every TP rank of the stage runs it together."""
        if self.kv_cache.numel():
            raise RuntimeError("profile before the KV cache is allocated: the pass would write into it")
        dev = self.device
        tokens = max(1, max_num_batched_tokens)
        seqs = max(1, min(max_num_seqs, tokens))
        lens = [tokens // seqs + (1 if i < tokens % seqs else 0) for i in range(seqs)]
        positions = torch.cat([torch.arange(n, device=dev) for n in lens])
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=torch.empty(0, dtype=torch.long, device=dev),
            query_lens=lens,
            context_lens=lens,
            use_flash=self.use_flash,
        )
        cu = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
        meta.cu_q = meta.cu_k = cu
        if self.shard.is_first:
            inputs = torch.zeros(tokens, dtype=torch.long, device=dev)
        else:
            inputs = torch.zeros(tokens, self.config.hidden_size, dtype=self.dtype, device=dev)
        out = self.model(inputs, positions, meta)
        if not self.shard.is_last:
            return out
        logits = self.model.logits(out[(cu[1:] - 1).long()])
        return None if logits is None else logits.float()

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
