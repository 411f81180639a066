"""Runs one step of a stage model: turns a batch of sequences into tensors, owns the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hexgen.engine.attention import Attention, AttentionChoice, AttentionMetadata, attention_for
from hexgen.engine.block_manager import cache_window
from hexgen.engine.config import ModelConfig
from hexgen.engine.graphs import Capture, DecodeGraphs
from hexgen.engine.kv_format import KVFormat
from hexgen.engine.layers import Shard
from hexgen.engine.layout import kv_head_range
from hexgen.engine.loader import ProgressFn, load_weights
from hexgen.engine.memory import MemoryProfile, fixed_budget_blocks, kv_cache_blocks
from hexgen.engine.models import build_model
from hexgen.engine.paged import PagedDecode
from hexgen.engine.sequence import Sequence
from hexgen.engine.stage import StageModel
from hexgen.engine.step_inputs import ints, padded_tables
from hexgen.engine.varlen import PrefillPlan, plan_prefill

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
    attention: str = "auto"  # attention.BACKENDS: "auto" takes flash-attn, else FlexAttention on CUDA, else SDPA

    def resolved_block_size(self, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> int:
        """The block size the attention path chosen for ``device`` and ``dtype`` uses (attention.py)."""
        return attention_for(device, dtype, self.block_size, self.attention).block_size


def kv_format_for(config: ModelConfig, dtype: torch.dtype, device: torch.device, cache: CacheConfig) -> KVFormat:
    """The KV format a ModelRunner of these settings pages its cache in, known before any weight loads (a
    joining worker publishes it while it loads): the same attention choice the runner makes."""
    block_size = cache.resolved_block_size(device, dtype)
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
        self.attention: AttentionChoice = attention_for(device, dtype, cache.block_size, cache.attention)
        self.use_flash = self.attention.backend == "flash-attn"
        self.paged: PagedDecode | None = None  # FlexAttention's decode state, made with the cache
        self.graphs: DecodeGraphs | None = None  # captured decode steps (enable_graphs)
        self.block_size = self.attention.block_size
        self.kv_window = cache_window(config.layer_windows)  # BlockManager's window: trimmed tables hold FREED
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
        if self.attention.backend == "flex":
            self.paged = PagedDecode(num_blocks, self.block_size, self.device)

    def enable_graphs(self, capture: Capture, max_batch: int) -> DecodeGraphs:
        """Replay decode steps of up to ``max_batch`` sequences from graphs recorded by ``capture``
        (engine.graphs); a single-stage, single-rank runner with its cache allocated only."""
        if not (self.shard.is_first and self.shard.is_last and self.shard.tp_size == 1):
            raise ValueError("decode graphs run a whole model on one rank only")
        if not self.num_blocks:
            raise RuntimeError("allocate the KV cache before capturing decode graphs: they read its address")
        max_blocks = -(-self.config.max_position // self.block_size)  # a trimmed table outgrows the cache
        if not self.kv_window:
            max_blocks = min(self.num_blocks, max_blocks)
        self.graphs = DecodeGraphs(self, capture, max_batch, max_blocks)
        return self.graphs

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
            max_position=max(lens) - 1,
            use_flash=self.use_flash,
        )
        cu = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
        meta.cu_q = meta.cu_k = cu
        if not self.use_flash:
            meta.prefill = plan_prefill(lens, lens, None, dev)
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
    def run(
        self,
        seqs: list[Sequence],
        is_prefill: bool,
        hidden: torch.Tensor | None = None,
        num_new_tokens: list[int] | None = None,
    ) -> torch.Tensor | None:
        """One step. First stage: ``hidden`` None (token ids come from the sequences). ``num_new_tokens``:
        the tokens each sequence computes (scheduler.Batch; default every uncached token in a prefill, one
        in a decode). Returns the hidden states for the next stage, or on the last stage the logits of the
        sequences whose step reaches their last token ([len(seqs), vocab] unless a prompt chunk ends
        short; None on TP ranks other than 0)."""
        if self.graphs is not None and not is_prefill and hidden is None and len(seqs) <= self.graphs.buckets[0]:
            return self.graphs.run(seqs)
        input_ids, positions, meta, last = self.prepare(seqs, is_prefill, num_new_tokens)
        out = self.model(input_ids if hidden is None else hidden, positions, meta)
        if not self.shard.is_last:
            return out
        if last is not None:
            out = out[last]
        logits = self.model.logits(out)
        return None if logits is None else logits.float()

    def prepare(
        self, seqs: list[Sequence], is_prefill: bool, num_new_tokens: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor | None]:
        if not is_prefill:
            return self._prepare_decode(seqs)
        return self._prepare_prefill(seqs, num_new_tokens or [len(seq) - seq.num_cached_tokens for seq in seqs])

    def _read_tables(self, block_tables: list[list[int]]) -> torch.Tensor:
        """Block tables [B, longest] for the paths that read or gather whole tables (SDPA, flash-attn): a
        ``FREED`` entry reads block 0, whose keys there lie before every query's window and are masked."""
        tables = padded_tables(block_tables, self.device)
        return tables.clamp_(min=0) if self.kv_window else tables

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _prepare_prefill(
        self, seqs: list[Sequence], num_new_tokens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last: list[int] = []
        context_lens = []
        for seq, n in zip(seqs, num_new_tokens, strict=True):
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + n
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq, start, end))
            context_lens.append(end)
            if end == len(seq):  # the step reaches its last token: it samples
                last.append(len(ids) - 1)
        dev = self.device
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=ints(slots, dev),
            query_lens=list(num_new_tokens),
            context_lens=context_lens,
            has_prefix=any(q != k for q, k in zip(num_new_tokens, context_lens, strict=True)),
            max_position=max(context_lens) - 1,
            use_flash=self.use_flash,
        )
        if self.use_flash:
            meta.cu_q = ints([0, *num_new_tokens], dev, torch.int32).cumsum(0, dtype=torch.int32)
            meta.cu_k = ints([0, *context_lens], dev, torch.int32).cumsum(0, dtype=torch.int32)
            if meta.has_prefix:
                meta.block_tables = self._read_tables([seq.block_table for seq in seqs])
        else:
            self._split_decode_and_prefill(seqs, meta)
        return ints(ids, dev), ints(positions, dev), meta, ints(last, dev)

    def _split_decode_and_prefill(self, seqs: list[Sequence], meta: AttentionMetadata) -> None:
        """Without flash-attn: the leading one-token sequences take the decode path, the rest one varlen
        prefill (a chunked-prefill step puts its decodes first)."""
        d = next((i for i, n in enumerate(meta.query_lens) if n != 1), len(seqs))
        if d:
            self._decode_part(seqs[:d], meta.context_lens[:d], meta)
        if d < len(seqs):
            meta.prefill = self._prefill_part(seqs[d:], meta.query_lens[d:], meta.context_lens[d:])

    def _prefill_part(self, seqs: list[Sequence], query_lens: list[int], context_lens: list[int]) -> list[PrefillPlan]:
        """The varlen prefill plan of ``seqs``. With a cached prefix each sequence's keys are gathered from
        the first block its first query reads (a window) and its context counted from there, so a chunk
        costs O(chunk x (window + chunk)) however long the prompt before it."""
        if all(q == k for q, k in zip(query_lens, context_lens, strict=True)):
            return plan_prefill(query_lens, context_lens, None, self.device)
        skips = [self._blocks_behind(k - q + 1) for q, k in zip(query_lens, context_lens, strict=True)]
        tables = self._read_tables([seq.block_table[s:] for seq, s in zip(seqs, skips, strict=True)])
        shifted = [k - s * self.block_size for k, s in zip(context_lens, skips, strict=True)]
        return plan_prefill(query_lens, shifted, tables, self.device)

    def _decode_part(self, seqs: list[Sequence], lens: list[int], meta: AttentionMetadata) -> None:
        """Decode metadata of ``seqs`` (the first ``len(seqs)`` of the step) at context lengths ``lens``:
        FlexAttention's block masks, or the SDPA path's gather indices and padding mask. The SDPA path
        gathers from the first block any of them still reads (a window), so a step costs O(B x window)
        however long the sequences, and counts its lengths and masks from there."""
        dev = self.device
        meta.num_decode = len(seqs)
        if self.paged is not None:
            meta.decode_lens = ints(lens, dev)
            self.paged.update(padded_tables([seq.block_table for seq in seqs], dev), meta.decode_lens)
            meta.paged = self.paged
            return
        skip = min(self._blocks_behind(n) for n in lens)
        tables = self._read_tables([seq.block_table for seq in seqs])[:, skip:]
        lens = [n - skip * self.block_size for n in lens]
        meta.decode_lens = ints(lens, dev)
        longest = max(lens)
        meta.gather = tables.long().reshape(-1)
        meta.gather_len = longest
        if min(lens) != longest:
            span = torch.arange(longest, device=dev)
            meta.mask = (span < meta.decode_lens.unsqueeze(1)).view(len(seqs), 1, 1, longest)

    def _blocks_behind(self, context_len: int) -> int:
        """Leading blocks of a sequence of ``context_len`` tokens that its query (the last) does not read:
        every position in them is at least the window before it. O(1)."""
        if not self.kv_window:
            return 0
        return max(0, (context_len - self.kv_window) // self.block_size)

    def _prepare_decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, None]:
        bs = self.block_size
        lens = [len(seq) for seq in seqs]
        slots = [seq.block_table[(n - 1) // bs] * bs + (n - 1) % bs for seq, n in zip(seqs, lens, strict=True)]
        dev = self.device
        meta = AttentionMetadata(
            is_prefill=False,
            slot_mapping=ints(slots, dev),
            query_lens=[1] * len(seqs),
            context_lens=lens,
            max_position=max(lens) - 1,
            use_flash=self.use_flash,
        )
        if self.use_flash:
            meta.block_tables = self._read_tables([seq.block_table for seq in seqs])
            meta.context_lens_tensor = ints(lens, dev, torch.int32)
        else:
            self._decode_part(seqs, lens, meta)
        ids = ints([seq.token_ids[-1] for seq in seqs], dev)
        positions = ints([n - 1 for n in lens], dev)
        return ids, positions, meta, None
