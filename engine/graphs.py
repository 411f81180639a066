"""Decode steps replayed from captured graphs: one per batch-size bucket, fed through static input buffers.

A decode step's kernels depend on the batch size only, once its paged-KV metadata (token ids, positions,
cache slots, context lengths, block tables) sits in buffers that never move: each bucket's step is
captured once, and a step of B sequences copies its inputs into those buffers (two pinned, non-blocking
copies on CUDA) and replays the smallest bucket >= B. Rows past B repeat row 0, so they write row 0's own
K/V into its own slot (identical values) and their logits are dropped; no cache block is set aside.

How a step is captured is injected (``Capture``): ``cuda_capture`` records a torch.cuda.CUDAGraph; the tests
pass a capture that reruns the step eagerly on replay, which checks that a step reads nothing but the
static buffers. Only backends whose decode reads device tensors alone qualify (flash-attn, FlexAttention).
The CUDA capture was written without a GPU to run it on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from hexgen.engine.attention import AttentionChoice, AttentionMetadata
from hexgen.engine.config import ModelConfig
from hexgen.engine.paged import PagedDecode
from hexgen.engine.sequence import Sequence
from hexgen.engine.stage import StageModel
from hexgen.engine.step_inputs import staged

Step = Callable[[], torch.Tensor]
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class Capture(Protocol):
    def __call__(self, step: Step) -> Step:
        """Record ``step`` (run at least once) and return what replays it, giving the same output tensor."""
        ...


class Runner(Protocol):
    """What the graphs use of a model_runner.ModelRunner."""

    attention: AttentionChoice
    config: ModelConfig
    model: StageModel
    device: torch.device
    block_size: int
    use_flash: bool
    paged: PagedDecode | None


def cuda_capture(pool: Any = None, warmup: int = 2) -> Capture:  # pragma: no cover - CUDA only
    """Capture with torch.cuda.CUDAGraph, every bucket's graph in one memory ``pool`` (capture the largest
    batch first); ``warmup`` eager runs on a side stream first compile and allocate what the step needs."""
    shared = pool if pool is not None else torch.cuda.graph_pool_handle()

    def capture(step: Step) -> Step:
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=shared):
            out = step()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    return capture


def unsupported(runner: Runner) -> str | None:
    """Why a decode step of ``runner`` cannot be replayed from a graph, or None when it can."""
    if runner.attention.backend not in ("flash-attn", "flex"):
        return f"the {runner.attention.backend} decode path sizes its tensors on the host each step"
    if getattr(getattr(runner.model, "rotary", None), "trained", 0):
        return "dynamic RoPE scaling picks its tables from the lengths on the host"
    if runner.config.num_experts:
        return "mixture-of-experts routing groups tokens by expert on the host"
    return None


def buckets_up_to(max_batch: int) -> list[int]:
    """The batch sizes to capture: BUCKETS up to the first >= ``max_batch`` (and ``max_batch`` itself
    past the largest). Largest first, the order a shared memory pool wants."""
    chosen = [b for b in BUCKETS if b < max_batch] + [next((b for b in BUCKETS if b >= max_batch), max_batch)]
    return sorted(chosen, reverse=True)


class DecodeGraphs:
    """The captured decode steps of one single-stage model runner (``model_runner.ModelRunner``), built
    lazily per bucket. ``run`` returns the logits [B, vocab] of a decode step of ``seqs``."""

    def __init__(self, runner: Runner, capture: Capture, max_batch: int, max_blocks: int) -> None:
        why_not = unsupported(runner)
        if why_not:
            raise ValueError(f"decode graphs cannot run here: {why_not}")
        self.runner = runner
        self.capture = capture
        self.buckets = buckets_up_to(max_batch)
        self.max_blocks = max_blocks
        dev, size = runner.device, self.buckets[0]
        self.inputs = torch.zeros(4, size, dtype=torch.long, device=dev)  # ids, positions, slots, lengths
        self.tables = torch.zeros(size, max_blocks, dtype=torch.int32, device=dev)
        if runner.paged is not None:
            runner.paged.reserve(size)
        self.steps: dict[int, Step] = {}
        self.num_captures = 0
        self.num_replays = 0

    def bucket(self, batch: int) -> int:
        """The smallest captured batch size >= ``batch``."""
        fits = [b for b in self.buckets if b >= batch]
        if not fits:
            raise ValueError(f"a decode batch of {batch} sequences exceeds the largest graph ({self.buckets[0]})")
        return min(fits)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket now, largest first."""
        for size in self.buckets:
            self._step(size)

    def _step(self, size: int) -> Step:
        if size not in self.steps:
            self.steps[size] = self.capture(self._forward(size))
            self.num_captures += 1
        return self.steps[size]

    def _forward(self, size: int) -> Step:
        runner, model = self.runner, self.runner.model
        ids, positions, slots, lens = self.inputs[:, :size]
        lens32, tables = self.inputs[3, :size].int(), self.tables[:size]
        top = runner.config.max_position - 1  # the RoPE table is sized for every position up front

        def step() -> torch.Tensor:
            lens32.copy_(lens)
            meta = AttentionMetadata(False, slots, [], [], max_position=top, use_flash=runner.use_flash)
            meta.block_tables, meta.context_lens_tensor = tables, lens32
            meta.num_decode, meta.decode_lens = size, lens32
            if runner.paged is not None:
                runner.paged.update(tables, lens32)
                meta.paged = runner.paged
            logits = model.logits(model(ids, positions, meta))
            assert logits is not None  # a single-stage runner is its own last stage
            return logits.float()

        return step

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Fill the static buffers for ``seqs`` (rows past them repeat the first) and replay their bucket."""
        batch, bs = len(seqs), self.runner.block_size
        size = self.bucket(batch)
        rows = seqs + [seqs[0]] * (size - batch)
        lens = [len(seq) for seq in rows]
        slots = [seq.block_table[(n - 1) // bs] * bs + (n - 1) % bs for seq, n in zip(rows, lens, strict=True)]
        host = torch.tensor([[seq.token_ids[-1] for seq in rows], [n - 1 for n in lens], slots, lens])
        width = max(len(seq.block_table) for seq in rows)
        if width > self.max_blocks:
            raise ValueError(f"a sequence of {max(lens)} tokens needs more than the graphs' {self.max_blocks} blocks")
        table = torch.zeros(size, self.max_blocks, dtype=torch.int32)
        for i, seq in enumerate(rows):
            table[i, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        if self.runner.paged is None:  # only FlexAttention skips FREED entries; the others read block 0, masked
            table.clamp_(min=0)
        self.inputs[:, :size].copy_(staged(host, self.inputs.device), non_blocking=True)
        self.tables[:size].copy_(staged(table, self.tables.device), non_blocking=True)
        step = self._step(size)
        self.num_replays += 1
        return step()[:batch]
