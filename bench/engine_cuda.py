"""The engine's device check (issue 19): a Llama-3-8B-shaped random-weight model in bf16 on one GPU.

Measured in one run, each figure guarded so that one failure loses only itself, under a wall-clock
budget (default 420 s on an H200) that skips whatever no longer fits:

* the machine: copy bandwidth (a 2 GiB device-to-device copy, bytes read + written per second) and the
  bf16 matrix rate (8192^3 matmuls);
* per attention path (the engine's choice first, then the others this machine has: flash-attn,
  FlexAttention paged decode, SDPA gather): batch-1 decode tokens/s and its fraction of the HBM roofline
  (weight bytes per token / time, against the measured copy bandwidth), offline throughput of 64
  requests with Azure-trace lengths, prefill TFLOP/s of a 2,048-token prompt against the measured matrix
  rate, whether decode replayed CUDA graphs;
* transformers ``generate`` with a static cache on the same GPU and model: the same 64 requests in one
  batch (left padded, each row running the longest output), and its batch-1 greedy tokens, which the
  engine's are compared with.

``--device-check --device cpu`` runs the same code on a tiny model (the smoke test of this file). The CUDA
path was written without a GPU to run it on.
"""

from __future__ import annotations

import gc
import math
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from gpu_check import LLAMA_TINY

from hexgen.coordinator.workload import Request
from hexgen.engine.attention import attention_for, flash_available
from hexgen.engine.config import ModelConfig, load_config
from hexgen.engine.llm import LLM
from hexgen.engine.model_runner import CacheConfig
from hexgen.engine.paged import flex_installed
from hexgen.engine.sequence import SamplingParams

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
TARGETS = {"decode_roofline_fraction": 0.80, "throughput_vs_transformers": 3.0, "prefill_fraction_of_matmul": 0.5}


@dataclass(frozen=True)
class Shape:
    """What the check runs: the model, the batch, the lengths; ``full`` on CUDA, a tiny one on CPU."""

    spec: dict[str, Any]
    batch: int
    decode_tokens: int
    prefill_tokens: int
    context: int
    copy_bytes: int
    matmul: int


FULL = Shape(LLAMA3_8B, batch=64, decode_tokens=128, prefill_tokens=2048, context=4096, copy_bytes=2 << 30, matmul=8192)
SMOKE = Shape(LLAMA_TINY, batch=4, decode_tokens=8, prefill_tokens=64, context=200, copy_bytes=1 << 20, matmul=64)


@dataclass
class Check:
    """The running record: figures by name, errors by figure, and the budget's clock."""

    device: torch.device
    budget_s: float
    started: float = field(default_factory=time.perf_counter)
    figures: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def guarded(self, name: str, fn: Callable[[], Any], needs_s: float = 0.0) -> Any:
        """``fn()`` recorded under ``name``; an exception is recorded instead (the run goes on), and a
        figure whose expected ``needs_s`` no longer fits the budget is skipped."""
        if self.left() < needs_s:
            self.skipped[name] = f"{self.left():.0f} s left of the budget, it needs about {needs_s:.0f} s"
            return None
        try:
            value = fn()
        except Exception as exc:  # any failure of one figure must leave the others measured
            self.errors[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
            return None
        self.figures[name] = value
        return value


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    """The median wall time of ``fn`` over ``repeats`` runs after one warm-up, synchronized around each."""
    fn()
    runs = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def once(fn: Callable[[], Any], device: torch.device) -> float:
    """The wall time of one run of ``fn`` (warm it up with a smaller call first)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / seconds(lambda: dst.copy_(src), device, repeats=10)


def matmul_rate(device: torch.device, n: int) -> float:
    """bf16 FLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    return 2 * n**3 / seconds(lambda: a @ b, device, repeats=10)


def decode_weight_bytes(c: ModelConfig, itemsize: int) -> int:
    """Weight bytes a decode step reads: every matrix and norm but the embedding table."""
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    return itemsize * (c.num_layers * per_layer + c.vocab_size * c.hidden_size + c.hidden_size)


def prefill_flops(c: ModelConfig, tokens: int) -> float:
    """Matmul FLOPs of a causal prefill of ``tokens``: 2 per weight per token, plus QK^T and PV over half
    the square."""
    weights = decode_weight_bytes(c, 1) - c.hidden_size * (2 * c.num_layers + 1)
    attention = 2 * 2 * c.num_layers * c.num_heads * c.head_dim * tokens * tokens / 2
    return 2.0 * weights * tokens + attention


def random_checkpoint(out: Path, spec: dict[str, Any], device: torch.device) -> Path:
    """A random-weight Llama in bf16 (transformers' init, made on ``device``), saved as safetensors."""
    import transformers

    config = transformers.LlamaConfig(
        **spec, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


def requests(trace: tuple[Request, ...], count: int, context: int) -> list[tuple[int, int]]:
    """``count`` (prompt, output) lengths from the trace (seeded), scaled down together to fit ``context``."""
    import random

    chosen = random.Random(0).sample(trace, count)
    factor = min(1.0, 0.9 * context / max(r.prompt_tokens + r.output_tokens for r in chosen))
    return [(max(1, int(r.prompt_tokens * factor)), max(1, int(r.output_tokens * factor))) for r in chosen]


def prompts_of(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def engine_figures(
    check: Check, model_dir: Path, shape: Shape, attention: str, work: dict[str, Any], config: ModelConfig
) -> dict[str, Any]:
    """One attention path's figures; each guarded, the engine freed afterwards."""
    device = check.device
    total = sum(p + o for p, o in work["lengths"]) + shape.prefill_tokens + 64 * shape.batch
    block = CacheConfig(attention=attention).resolved_block_size(device)
    cache = CacheConfig(attention=attention, num_blocks=math.ceil(total / block) + 2 * shape.batch + 8)
    llm = LLM(
        model_dir,
        dtype="bf16",
        device=device.type,
        cache=cache,
        max_num_seqs=shape.batch,
        max_num_batched_tokens=max(8192, shape.prefill_tokens),
        prefill_chunk=shape.prefill_tokens,  # the prefill figure is of whole 2,048-token prompts
    )
    out: dict[str, Any] = {
        "backend": llm.runner.attention.backend,
        "reason": llm.runner.attention.reason,
        "block_size": llm.runner.block_size,
        "decode_graphs": llm.runner.graphs is not None,
    }
    greedy = SamplingParams(max_tokens=shape.decode_tokens, ignore_eos=True)

    def decode() -> dict[str, Any]:
        one = SamplingParams(max_tokens=1, ignore_eos=True)
        first = seconds(lambda: llm.generate([work["short"]], one), device)
        every = seconds(lambda: llm.generate([work["short"]], greedy), device)
        step = max(every - first, 1e-9) / (shape.decode_tokens - 1)
        work.setdefault("engine_tokens", {})[attention] = llm.generate([work["short"]], greedy)[0].token_ids
        bandwidth = check.figures.get("copy_bandwidth_Bps")
        roof = work["weight_bytes"] / step / bandwidth if bandwidth else None
        return {"ms_per_token": 1e3 * step, "tokens_per_s": 1 / step, "hbm_roofline_fraction": roof}

    def throughput() -> dict[str, Any]:
        params = [SamplingParams(max_tokens=o, ignore_eos=True) for o in work["outputs"]]
        llm.generate(work["prompts"][:4], SamplingParams(max_tokens=4, ignore_eos=True))
        took = once(lambda: llm.generate(work["prompts"], params), device)
        return {"output_tokens_per_s": sum(work["outputs"]) / took, "seconds": took}

    def prefill() -> dict[str, Any]:
        one = SamplingParams(max_tokens=1, ignore_eos=True)
        took = seconds(lambda: llm.generate([work["long"]], one), device)
        rate = prefill_flops(config, shape.prefill_tokens) / took
        peak = check.figures.get("matmul_flops")
        return {"seconds": took, "tflops": rate / 1e12, "fraction_of_matmul": rate / peak if peak else None}

    for name, fn, needs in (("decode_batch1", decode, 20), ("throughput", throughput, 40), ("prefill", prefill, 10)):
        out[name] = check.guarded(f"{attention}/{name}", fn, needs)
    return out  # the engine goes with this frame (free_memory)


def transformers_figures(check: Check, model_dir: Path, shape: Shape, work: dict[str, Any]) -> dict[str, Any]:
    """transformers generate with a static cache: the batch in one call, and batch-1 greedy tokens."""
    import transformers

    device = check.device
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.do_sample = None, 0, False

    @torch.inference_mode()
    def generate(prompts: list[list[int]], new: int) -> torch.Tensor:
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1
        out = model.generate(
            ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, cache_implementation="static"
        )
        return out[:, width:]

    def throughput() -> dict[str, Any]:
        generate(work["prompts"][:2], 4)  # warm-up (and any compilation of the static-cache forward)
        took = once(lambda: generate(work["prompts"], max(work["outputs"])), device)
        return {"output_tokens_per_s": sum(work["outputs"]) / took, "seconds": took}

    def tokens() -> list[int]:
        return generate([work["short"]], shape.decode_tokens)[0].tolist()

    out = {
        "throughput": check.guarded("transformers/throughput", throughput, 60),
        "batch1_tokens": check.guarded("transformers/batch1_tokens", tokens, 10),
    }
    return out


def free_memory(device: torch.device) -> None:
    """Give back what the last system held, before the next loads."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summary(check: Check, work: dict[str, Any]) -> dict[str, Any]:
    """The issue's figures against its targets, from what was measured."""
    runs, tf = check.figures.get("engine", {}), check.figures.get("transformers", {})
    reference = tf.get("batch1_tokens") or []
    out: dict[str, Any] = {}
    for attention, run in runs.items():
        decode, tput, prefill = run.get("decode_batch1") or {}, run.get("throughput") or {}, run.get("prefill") or {}
        ours = work.get("engine_tokens", {}).get(attention, [])
        tf_tput = (tf.get("throughput") or {}).get("output_tokens_per_s")
        out[attention] = {
            "backend": run.get("backend"),
            "decode_graphs": run.get("decode_graphs"),
            "decode_tokens_per_s": decode.get("tokens_per_s"),
            "decode_roofline_fraction": decode.get("hbm_roofline_fraction"),
            "throughput_vs_transformers": tput["output_tokens_per_s"] / tf_tput if tput and tf_tput else None,
            "prefill_tflops": prefill.get("tflops"),
            "prefill_fraction_of_matmul": prefill.get("fraction_of_matmul"),
            "greedy_tokens_equal_before_divergence": next(
                (i for i, (a, b) in enumerate(zip(reference, ours, strict=False)) if a != b),
                min(len(reference), len(ours)),
            )
            if reference and ours
            else None,
        }
    return {"by_attention": out, "targets": TARGETS}


def attention_paths(device: torch.device) -> list[str]:
    """The engine's own choice first, then the other paths this machine can run."""
    chosen = attention_for(device, torch.bfloat16).backend
    others = [
        p for p, ok in (("flash-attn", flash_available(device)), ("flex", flex_installed()), ("sdpa", True)) if ok
    ]
    return [chosen, *(p for p in others if p != chosen)]


def run_device_check(device: torch.device, trace: tuple[Request, ...], budget_s: float) -> dict[str, Any]:
    """Every figure of the device check on ``device`` (FULL on CUDA, SMOKE on CPU), as one JSON-able dict."""
    shape = FULL if device.type == "cuda" else SMOKE
    check = Check(device, budget_s)
    check.guarded("copy_bandwidth_Bps", lambda: copy_bandwidth(device, shape.copy_bytes))
    check.guarded("matmul_flops", lambda: matmul_rate(device, shape.matmul))
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() and device.type == "cuda" else None
    with tempfile.TemporaryDirectory(prefix="hexgen-check-", dir=root) as tmp:
        model_dir = check.guarded("checkpoint", lambda: str(random_checkpoint(Path(tmp) / "m", shape.spec, device)))
        if model_dir is None:
            return {"figures": check.figures, "errors": check.errors, "skipped": check.skipped}
        config = load_config(model_dir)
        lengths = requests(trace, shape.batch, min(shape.context, config.max_position))
        work: dict[str, Any] = {
            "lengths": lengths,
            "prompts": prompts_of([p for p, _ in lengths], config.vocab_size, 1),
            "outputs": [o for _, o in lengths],
            "short": prompts_of([16], config.vocab_size, 2)[0],
            "long": prompts_of([shape.prefill_tokens], config.vocab_size, 3)[0],
            "weight_bytes": decode_weight_bytes(config, 2),
        }
        runs: dict[str, Any] = {}
        check.figures["engine"] = runs
        check.figures["engine_choice"] = attention_for(device, torch.bfloat16).reason
        paths = attention_paths(device)  # the engine's choice, then transformers, then the other paths

        def engine_path(attention: str) -> None:
            runs[attention] = check.guarded(
                f"engine/{attention}",
                lambda: engine_figures(check, Path(model_dir), shape, attention, work, config),
                60,
            )
            free_memory(device)

        engine_path(paths[0])
        check.figures["transformers"] = check.guarded(
            "transformers", lambda: transformers_figures(check, Path(model_dir), shape, work), 60
        )
        free_memory(device)
        for attention in paths[1:]:
            engine_path(attention)
        check.figures["summary"] = summary(check, work)
    check.figures["wall_s"] = time.perf_counter() - check.started
    return {"figures": check.figures, "errors": check.errors, "skipped": check.skipped, "shape": shape.spec}
