"""LLM: a whole replica in one process (no parallelism): the API tests, benchmarks and single-node mode use."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hexgen.engine.block_manager import BlockManager
from hexgen.engine.config import ModelConfig, load_config
from hexgen.engine.graphs import cuda_capture, unsupported
from hexgen.engine.hub import local_model
from hexgen.engine.layers import Shard
from hexgen.engine.model_runner import CacheConfig, ModelRunner, resolve_dtype
from hexgen.engine.quant import check_scheme
from hexgen.engine.sampler import sample
from hexgen.engine.scheduler import Scheduler, SchedulerConfig
from hexgen.engine.sequence import SamplingParams, Sequence


@dataclass(frozen=True)
class Completion:
    seq_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "auto"
    device: str = "cpu"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    mode: str = "colocated"
    quantize: str | None = None  # the linear layers' weights: None (full precision), "int8" or "int4"
    prefill_chunk: int = 2048  # prompt tokens per step next to the decode batch (scheduler.SchedulerConfig); 0: off
    cuda_graphs: bool | None = None  # decode from captured CUDA graphs (engine.graphs); None: on CUDA where possible


class LLM:
    """Loads ``model`` whole (a checkpoint directory, or a Hub id ``org/name[@revision]`` fetched into the
    Hub cache first: ``engine.hub``) and generates with continuous batching.

    ``quantize`` ("int8" or "int4") quantizes the linear layers' weights as they load (engine.quant).
    ``generate`` runs a list of prompts to completion; ``add_request`` and ``step`` expose the loop for
    callers that feed requests over time.
    """

    def __init__(self, model: str | Path, config: EngineConfig | None = None, **overrides: Any) -> None:
        config = dataclasses.replace(config or EngineConfig(), **overrides)
        check_scheme(config.quantize)
        model_dir = local_model(model) if isinstance(model, str) else model
        self.config = config
        self.model_config: ModelConfig = load_config(model_dir)
        mc = self.model_config
        device = torch.device(config.device)
        self.runner = ModelRunner(
            model_dir,
            mc,
            Shard(0, mc.num_layers, mc.num_layers),
            resolve_dtype(config.dtype, mc, device),
            device,
            config.cache,
            allocate=False,
            quantize=config.quantize,
        )
        # sized after the weights are in, from a profiled max-batch forward on CUDA (engine.memory)
        self.runner.allocate_cache(self.runner.blocks_that_fit(config.max_num_batched_tokens, config.max_num_seqs))
        self._maybe_capture(config, device)
        self.max_model_len = min(config.max_model_len or mc.max_position, mc.max_position)
        self.block_manager = BlockManager(self.runner.num_blocks, self.runner.block_size, self.runner.kv_window)
        self.tokenizer = None
        if (Path(model_dir) / "tokenizer.json").exists():
            from hexgen.engine.tokenizer import Tokenizer  # jinja2 and tokenizers only where there is one

            self.tokenizer = Tokenizer.from_dir(model_dir)
        eos = self.tokenizer.eos_token_ids if self.tokenizer else mc.eos_token_ids
        scheduler_config = SchedulerConfig(
            config.max_num_seqs, config.max_num_batched_tokens, config.mode, config.prefill_chunk
        )
        self.scheduler = Scheduler(scheduler_config, self.block_manager, eos)

    def _maybe_capture(self, config: EngineConfig, device: torch.device) -> None:
        """Decode graphs where asked for, or by default on CUDA with an attention path that allows them."""
        wanted = config.cuda_graphs
        if wanted is None:
            wanted = device.type == "cuda" and unsupported(self.runner) is None and not config.quantize
        if not wanted:
            return
        if device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        self.runner.enable_graphs(cuda_capture(), config.max_num_seqs).capture_all()  # pragma: no cover - CUDA

    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json; pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def add_request(self, prompt: str | Seq[int], sampling: SamplingParams | None = None) -> Sequence:
        """Queue one request; raises ValueError for a prompt that cannot be served."""
        ids = self.encode(prompt)
        sampling = sampling or SamplingParams()
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room within max_model_len {self.max_model_len}")
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.model_config.vocab_size})")
        room = self.max_model_len - len(ids)
        if sampling.max_tokens > room:
            sampling = dataclasses.replace(sampling, max_tokens=room)
        seq = Sequence(ids, sampling)
        self.scheduler.add(seq)
        return seq

    def step(self) -> list[Sequence]:
        """Run one scheduled batch; returns the sequences that finished in it."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        logits = self.runner.run(batch.seqs, batch.is_prefill, num_new_tokens=batch.num_new_tokens)
        assert logits is not None  # one process holds the whole model, so it is the last stage and TP rank 0
        sampling = batch.sampling_seqs
        return self.scheduler.postprocess(batch, sample(logits, sampling) if sampling else [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def generate(
        self, prompts: Iterable[str | Seq[int]], sampling: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[Completion]:
        prompts = list(prompts)
        params = sampling if isinstance(sampling, list | tuple) else [sampling or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        seqs = [self.add_request(p, s) for p, s in zip(prompts, params, strict=True)]
        while self.has_unfinished():
            self.step()
        return [self.completion(seq) for seq in seqs]

    def completion(self, seq: Sequence) -> Completion:
        ids = seq.completion_token_ids
        text = self.tokenizer.decode(ids) if self.tokenizer else ""
        return Completion(seq.seq_id, seq.prompt_token_ids, ids, text, seq.finish_reason or "length")
