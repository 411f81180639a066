"""Engine benchmark: hexgen's engine against transformers `generate`, same model, machine, dtype and threads.

Two metrics per model, both systems in one process, warmed up once, medians over --repeats:

* offline throughput: requests whose prompt and output lengths are sampled (seeded) from the Azure
  conversation trace and scaled by one common factor so the longest fits the model's context; random
  prompt token ids; useful output tokens/s (only the tokens each request asked for). hexgen runs one
  ``generate`` over all of them; transformers runs static batches in request order, left-padded, each
  for the longest output of its batch with EOS disabled.
* batch-1 decode latency: ms per output token without prefill, (t_N - t_1) / (N - 1) from one short prompt.

On CUDA it also reports batch-1 decode as a fraction of the HBM roofline and the attention backend.

--quantize none int8 int4 measures weight-only quantization (engine.quant) instead: per model and scheme, the
greedy tokens matching the unquantized engine's before the first divergence and the largest logit error
(teacher-forced on the unquantized tokens, so every step sees the same context), the weights' bytes per
replica, batch-1 decode ms/token, and which matmul path the linear layers ran.
--quick: 16 requests scaled into 512 tokens of context, N=64, one repeat, one thread unless --threads.

--device cuda (without --models or --quantize) runs issue 19's device check instead (bench/engine_cuda.py):
a Llama-3-8B-shaped bf16 model, batch-1 decode against the HBM roofline, batch-64 throughput against
transformers' static-cache generate, 2,048-token prefill TFLOP/s against the measured matmul rate, per
attention path, under --budget-s; JSON under bench/results/. --device-check --device cpu is its smoke test.

    python bench/engine.py [--quick] [--json OUT] [--threads N] [--device cpu|cuda] [--dtype D] [--repeats N]
                           [--hbm-gbs GB/s] [--models NAME ...] [--quantize none|int8|int4 ...]
                           [--device-check] [--budget-s S]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hexgen_shim  # noqa: F401 - before any hexgen import: the device machine has a plain checkout
import torch
from engine_cuda import run_device_check  # bench/ is on sys.path as the script's folder
from gpu_check import LLAMA_1B as RANDOM_1B

from hexgen.coordinator.workload import Request, WorkloadError, load_trace
from hexgen.engine.attention import flash_available
from hexgen.engine.config import ModelConfig, load_config
from hexgen.engine.llm import LLM
from hexgen.engine.loader import quantized_linears
from hexgen.engine.model_runner import DTYPES, CacheConfig, resolve_dtype
from hexgen.engine.quant import SCHEMES, paths, weight_bytes
from hexgen.engine.sequence import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
TRACE = SHARED / "data" / "AzureLLMInferenceTrace_conv.csv"
OUT_DIR = ROOT / "bench" / "out"
RESULTS_DIR = ROOT / "bench" / "results"
DEVICE_CHECK_BUDGET_S = 420.0  # the device check's whole run, so that it fits one 8-minute call

RANDOM_SMALL = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
MODELS = ("llama-random-256", "stories260K", "llama-random-1b")
DEFAULT_MODELS = {"cpu": ("llama-random-256", "stories260K"), "cuda": ("llama-random-1b",)}
HBM_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}

SEED = 0
PROMPT_LEN = 16  # the batch-1 decode prompt
CONTEXT_MARGIN = 0.9  # the longest request uses at most this share of max_position_embeddings
TF_BATCH = 16  # transformers' static batch size
QUICK_CONTEXT = 512  # --quick scales lengths to this context (or the model's, if shorter)
# --quick's default thread count: 2 OpenMP threads on a 2-core machine shared with another job stall on
# every small op (10-20x slower), which would break its one-minute budget. The full run keeps torch's default.
QUICK_THREADS = 1
THROUGHPUT_TARGET = 2.0  # hexgen / transformers, at least
LATENCY_TARGET = 0.7  # hexgen ms / transformers ms, at most


@dataclass(frozen=True)
class Settings:
    quick: bool
    repeats: int
    device: torch.device
    dtype: str
    requests: int
    decode_tokens: int
    context_cap: int | None
    hbm_gbs: float | None


# ---------------------------------------------------------------------------------------------- inputs


def write_random_llama(out: Path, spec: dict[str, int], dtype: torch.dtype, device: torch.device) -> Path:
    """A random-weight Llama (transformers' default init) saved as safetensors in ``dtype``."""
    import transformers

    config = transformers.LlamaConfig(
        **spec, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    torch.manual_seed(SEED)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


def scaled_requests(trace: tuple[Request, ...], count: int, max_position: int) -> tuple[list[tuple[int, int]], float]:
    """``count`` (prompt, output) lengths sampled from the trace, scaled by one factor (never up) so the
    longest prompt + output is at most CONTEXT_MARGIN of ``max_position``; at least 1 token each."""
    chosen = random.Random(SEED).sample(trace, count)
    longest = max(r.prompt_tokens + r.output_tokens for r in chosen)
    factor = min(1.0, CONTEXT_MARGIN * max_position / longest)
    lengths = [(max(1, int(r.prompt_tokens * factor)), max(1, int(r.output_tokens * factor))) for r in chosen]
    return lengths, factor


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


# --------------------------------------------------------------------------------------------- systems


class Hexgen:
    """hexgen's engine, one LLM with a KV cache sized to hold every request at once."""

    name = "hexgen"

    def __init__(
        self, model_dir: Path, settings: Settings, total_tokens: int, count: int, quantize: str | None = None
    ) -> None:
        block = CacheConfig().resolved_block_size(settings.device)
        blocks = math.ceil(total_tokens / block) + 2 * count + 8
        self.llm = LLM(
            model_dir,
            max_num_seqs=64,
            max_num_batched_tokens=4096,
            cache=CacheConfig(block_size=block, num_blocks=blocks),
            dtype=settings.dtype,
            device=settings.device.type,
            quantize=quantize,
        )

    def offline(self, prompts: list[list[int]], outputs: list[int]) -> int:
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in outputs]
        done = self.llm.generate(prompts, params)
        return sum(min(len(c.token_ids), n) for c, n in zip(done, outputs, strict=True))

    def decode(self, prompt: list[int], n: int) -> list[int]:
        return self.llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0].token_ids


class Transformers:
    """transformers ``generate`` as a user runs it: static batches, left padding, greedy, EOS disabled."""

    name = "transformers"

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device) -> None:
        import transformers

        self.device = device
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        gen = self.model.generation_config
        gen.eos_token_id = None  # every row runs max_new_tokens
        gen.pad_token_id = 0
        gen.do_sample = False

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], max_new_tokens: int) -> torch.Tensor:
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        out = self.model.generate(
            ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_new_tokens, do_sample=False
        )
        return out[:, width:]

    def offline(self, prompts: list[list[int]], outputs: list[int]) -> int:
        useful = 0
        for start in range(0, len(prompts), TF_BATCH):
            wanted = outputs[start : start + TF_BATCH]
            out = self._generate(prompts[start : start + TF_BATCH], max(wanted))
            useful += sum(min(out.shape[1], n) for n in wanted)
        return useful

    def decode(self, prompt: list[int], n: int) -> list[int]:
        return self._generate([prompt], n)[0].tolist()


System = Hexgen | Transformers


# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def throughput(system: System, prompts: list[list[int]], outputs: list[int], device: torch.device) -> float:
    seconds, useful = timed(lambda: system.offline(prompts, outputs), device)
    return useful / seconds


def decode_seconds(system: System, prompt: list[int], n: int, device: torch.device) -> tuple[float, list[int]]:
    """Seconds per decode step at batch 1, (t_n - t_1) / (n - 1), and the n tokens generated."""
    t1, _ = timed(lambda: system.decode(prompt, 1), device)
    tn, tokens = timed(lambda: system.decode(prompt, n), device)
    return max(tn - t1, 0.0) / (n - 1), tokens


def decode_weight_bytes(config: ModelConfig, itemsize: int) -> int:
    """Weight bytes one decode step reads: every matrix and norm except the untied embedding table."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    per_layer += 2 * c.hidden_size
    return itemsize * (c.num_layers * per_layer + c.vocab_size * c.hidden_size + c.hidden_size)


# ---------------------------------------------------------------------------------------------- a model


def row(model: str, metric: str, unit: str, samples: dict[str, list[float]], lower_is_better: bool) -> dict:
    hx, tf = statistics.median(samples["hexgen"]), statistics.median(samples["transformers"])
    target = f"<= {LATENCY_TARGET}" if lower_is_better else f">= {THROUGHPUT_TARGET}"
    if metric.startswith("decode HBM"):
        target = ""
    return {
        "model": model,
        "metric": metric,
        "unit": unit,
        "hexgen": hx,
        "transformers": tf,
        "ratio": hx / tf if tf else float("nan"),
        "target": target,
        "samples": samples,
    }


def bench_model(name: str, model_dir: Path, settings: Settings, trace: tuple[Request, ...]) -> tuple[list[dict], dict]:
    device = settings.device
    config = load_config(model_dir)
    dtype = resolve_dtype(settings.dtype, config, device)
    context = min(config.max_position, settings.context_cap or config.max_position)
    lengths, factor = scaled_requests(trace, settings.requests, context)
    prompts = random_prompts([p for p, _ in lengths], config.vocab_size, SEED + 1)
    outputs = [o for _, o in lengths]
    short = random_prompts([PROMPT_LEN], config.vocab_size, SEED + 2)[0]
    n = settings.decode_tokens

    started = time.perf_counter()
    systems: list[System] = [
        Hexgen(model_dir, settings, sum(p + o for p, o in lengths), len(lengths)),
        Transformers(model_dir, dtype, device),
    ]
    load_s = time.perf_counter() - started
    for system in systems:  # warm-up: both code paths once, small
        system.offline(prompts[:2], [min(4, o) for o in outputs[:2]])
        system.decode(short, 4)

    tput: dict[str, list[float]] = {s.name: [] for s in systems}
    step: dict[str, list[float]] = {s.name: [] for s in systems}
    tokens: dict[str, list[int]] = {}
    for _ in range(settings.repeats):
        for system in systems:
            tput[system.name].append(throughput(system, prompts, outputs, device))
        for system in systems:
            seconds, tokens[system.name] = decode_seconds(system, short, n, device)
            step[system.name].append(seconds)

    rows = [
        row(name, "offline throughput", "output tok/s", tput, lower_is_better=False),
        row(name, "batch-1 decode latency", "ms/token", {k: [1e3 * s for s in v] for k, v in step.items()}, True),
    ]
    meta: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."),
        "scale_factor": factor,
        "max_position_embeddings": config.max_position,
        "context_budget": context,
        "requests": len(lengths),
        "mean_prompt_tokens": statistics.mean(p for p, _ in lengths),
        "mean_output_tokens": statistics.mean(outputs),
        "max_prompt_plus_output": max(p + o for p, o in lengths),
        "useful_output_tokens": sum(outputs),
        "transformers_padded_output_tokens": sum(
            max(outputs[i : i + TF_BATCH]) * len(outputs[i : i + TF_BATCH]) for i in range(0, len(outputs), TF_BATCH)
        ),
        "batch1_greedy_tokens_equal": tokens["hexgen"] == tokens["transformers"],
        "load_seconds": load_s,
        "flash_available": flash_available(device),
        "attention_backend": systems[0].llm.runner.attention.backend,
    }
    if device.type == "cuda" and settings.hbm_gbs:
        weight_bytes = decode_weight_bytes(config, dtype.itemsize)
        bandwidth = settings.hbm_gbs * 1e9
        roof = {k: [weight_bytes / s / bandwidth if s > 0 else math.nan for s in v] for k, v in step.items()}
        rows.append(row(name, "decode HBM roofline fraction", "of peak", roof, lower_is_better=False))
        meta["decode_weight_bytes"] = weight_bytes
    return rows, meta


# ------------------------------------------------------------------------------------------ quantization


def forced_greedy(llm: LLM, prompt: list[int], n: int, forced: list[int] | None) -> tuple[list[int], torch.Tensor]:
    """Each step's argmax token and logits [n, vocab] over ``n`` decode steps from ``prompt``; the sequence
    continues with ``forced``'s tokens when given (teacher forcing), else with its own."""
    llm.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    picks: list[int] = []
    rows: list[torch.Tensor] = []
    while llm.has_unfinished():
        batch = llm.scheduler.schedule()
        assert batch is not None  # one sequence in a cache that holds it
        logits = llm.runner.run(batch.seqs, batch.is_prefill)
        assert logits is not None  # the whole model in one process
        rows.append(logits[0].float().cpu())
        picks.append(int(rows[-1].argmax()))
        llm.scheduler.postprocess(batch, [forced[len(picks) - 1] if forced else picks[-1]])
    return picks, torch.stack(rows)


def agreement(reference: list[int], ours: list[int]) -> int:
    """Tokens equal before the first difference."""
    return next((i for i, (a, b) in enumerate(zip(reference, ours, strict=True)) if a != b), len(reference))


def bench_quantized(name: str, model_dir: Path, settings: Settings, schemes: list[str]) -> tuple[list[dict], dict]:
    """One row per scheme ("none" first, the reference): agreement, logit error, weight bytes, decode speed."""
    config = load_config(model_dir)
    short = random_prompts([PROMPT_LEN], config.vocab_size, SEED + 2)[0]
    n = settings.decode_tokens
    reference: tuple[list[int], torch.Tensor] | None = None
    rows = []
    for scheme in ["none", *[s for s in schemes if s != "none"]]:
        system = Hexgen(model_dir, settings, 2 * (PROMPT_LEN + n), 2, None if scheme == "none" else scheme)
        system.decode(short, 4)  # warm-up
        picks, logits = forced_greedy(system.llm, short, n, reference[0] if reference else None)
        if reference is None:
            reference = (picks, logits)
        steps = [decode_seconds(system, short, n, settings.device)[0] for _ in range(settings.repeats)]
        model = system.llm.runner.model
        rows.append(
            {
                "model": name,
                "quantize": scheme,
                "agreement": agreement(reference[0], picks),
                "tokens": n,
                "max_logit_error": float((logits - reference[1]).abs().max()),
                "logit_scale": float(reference[1].abs().max()),
                "weight_bytes": weight_bytes(model),
                "linear_bytes": sum(weight_bytes(linear) for linear in quantized_linears(model).values()),
                "decode_ms": 1e3 * statistics.median(steps),
                "decode_samples_ms": [1e3 * s for s in steps],
                "paths": paths(model),
            }
        )
    return rows, {"dtype": str(resolve_dtype(settings.dtype, config, settings.device)).removeprefix("torch.")}


def print_quant_table(rows: list[dict], meta: dict) -> None:
    print(
        f"weight-only quantization, hexgen engine (torch {meta['torch_version']}), {meta['device_name']}, "
        f"{meta['threads']} thread(s), repeats {meta['repeats']}{', QUICK' if meta['quick'] else ''}"
    )
    print(f"batch 1, {PROMPT_LEN}-token random prompt, N={meta['decode_tokens']} greedy tokens, logits teacher-forced")
    head = (
        f"{'model':<18} {'quantize':<8} {'agree':>9} {'max |dlogit|':>12} {'logit max':>9} {'weights MiB':>11} "
        f"{'linears MiB':>11} {'x none':>6} {'ms/token':>8} {'x none':>6}  matmul path"
    )
    print(head)
    print("-" * len(head))
    base: dict[str, dict] = {}
    for r in rows:
        ref = base.setdefault(r["model"], r)
        path = ", ".join(f"{k} {v}" for k, v in sorted(r["paths"].items())) or "F.linear"
        print(
            f"{r['model']:<18} {r['quantize']:<8} {r['agreement']:>4}/{r['tokens']:<4} {r['max_logit_error']:>12.4f} "
            f"{r['logit_scale']:>9.2f} {r['weight_bytes'] / 2**20:>11.3f} {r['linear_bytes'] / 2**20:>11.3f} "
            f"{r['linear_bytes'] / ref['linear_bytes']:>6.2f} "
            f"{r['decode_ms']:>8.2f} {r['decode_ms'] / ref['decode_ms']:>6.2f}  {path}"
        )
    print(
        "weights: every parameter and quantized buffer of the replica (embeddings, norms and head stay in full "
        "precision); linears: the q/k/v/o and MLP weights alone, codes with their scales and offsets"
    )


# ----------------------------------------------------------------------------------------------- output


def met(r: dict) -> str:
    if not r["target"] or math.isnan(r["ratio"]):
        return ""
    ok = r["ratio"] <= LATENCY_TARGET if r["target"].startswith("<=") else r["ratio"] >= THROUGHPUT_TARGET
    return "yes" if ok else "NO"


def print_table(rows: list[dict], meta: dict) -> None:
    print(
        f"hexgen engine vs transformers {meta['transformers_version']} (torch {meta['torch_version']}), "
        f"{meta['device_name']}, {meta['threads']} thread(s), repeats {meta['repeats']}"
        f"{', QUICK' if meta['quick'] else ''}"
    )
    print(
        f"offline: {meta['request_count']} trace requests, hexgen one generate call; transformers static batches "
        f"of {meta['transformers_batch_size']}; decode: batch 1, {PROMPT_LEN}-token prompt, N={meta['decode_tokens']}"
    )
    head = f"{'model':<18} {'metric':<29} {'unit':<13} {'hexgen':>10} {'transformers':>12} {'ratio':>7} {'target':>7} {'met':>4}"
    print(head)
    print("-" * len(head))
    for r in rows:
        fmt = ".3f" if r["unit"] == "of peak" else ".2f" if r["unit"] == "ms/token" else ".1f"
        print(
            f"{r['model']:<18} {r['metric']:<29} {r['unit']:<13} {r['hexgen']:>10{fmt}} {r['transformers']:>12{fmt}} "
            f"{r['ratio']:>7.2f} {r['target']:>7} {met(r):>4}"
        )
    print(
        f"targets: throughput ratio (hexgen/transformers) >= {THROUGHPUT_TARGET}, "
        f"decode latency ratio (hexgen ms / transformers ms) <= {LATENCY_TARGET}"
    )
    for model, info in meta["models"].items():
        if "skipped" in info:
            print(f"  {model}: skipped ({info['skipped']})")
            continue
        print(
            f"  {model}: {info['dtype']}, lengths x{info['scale_factor']:.3f}, mean prompt {info['mean_prompt_tokens']:.0f}"
            f" / output {info['mean_output_tokens']:.0f}, attention {info['attention_backend']}, "
            f"batch-1 greedy tokens equal: {info['batch1_greedy_tokens_equal']}"
        )


# ------------------------------------------------------------------------------------------------- main


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"16 requests within {QUICK_CONTEXT} tokens, N=64, 1 repeat: under a minute",
    )
    parser.add_argument("--json", type=Path, help="write results here (default bench/out/engine[-quick].json)")
    parser.add_argument(
        "--threads",
        type=positive_int,
        help=f"torch.set_num_threads for both systems (default torch's; --quick: {QUICK_THREADS})",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), help="default float32 on cpu, bf16 on cuda")
    parser.add_argument("--repeats", type=positive_int, help="timed runs per measurement (default 3, quick 1)")
    parser.add_argument("--hbm-gbs", type=positive_float, help="GPU memory bandwidth, GB/s (default by GPU name)")
    parser.add_argument("--models", nargs="+", choices=MODELS, help="default: cpu the two small ones, cuda the 1B")
    parser.add_argument("--trace", type=Path, default=TRACE, help="Azure conversation trace CSV")
    parser.add_argument(
        "--quantize",
        nargs="+",
        choices=("none", *SCHEMES),
        help="measure these weight quantizations against the unquantized engine instead of transformers",
    )
    parser.add_argument(
        "--device-check",
        action="store_true",
        help="issue 19's device check (the default for --device cuda without --models or --quantize)",
    )
    parser.add_argument(
        "--budget-s", type=positive_float, default=DEVICE_CHECK_BUDGET_S, help="the device check's time budget"
    )
    args = parser.parse_args(argv)
    args.device_check = args.device_check or (args.device == "cuda" and not args.models and not args.quantize)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    try:
        args.trace_requests = load_trace(args.trace)
    except WorkloadError as exc:
        parser.error(str(exc))
    return args


def default_hbm(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbs for key, gbs in HBM_GBS.items() if key in name), None)


def settings_from(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device)
    return Settings(
        quick=args.quick,
        repeats=args.repeats or (1 if args.quick else 3),
        device=device,
        dtype=args.dtype or ("bf16" if device.type == "cuda" else "float32"),
        requests=16 if args.quick else 64,
        decode_tokens=64 if args.quick else 128,
        context_cap=QUICK_CONTEXT if args.quick else None,
        hbm_gbs=args.hbm_gbs or default_hbm(device),
    )


def model_dir_for(name: str, settings: Settings, tmp: Path) -> Path | str:
    """The checkpoint directory, or a reason to skip the model."""
    if name == "stories260K":
        return STORIES if (STORIES / "config.json").exists() else f"not found at {STORIES}"
    spec = RANDOM_SMALL if name == "llama-random-256" else RANDOM_1B
    dtype = torch.bfloat16 if name == "llama-random-1b" else torch.float32
    return write_random_llama(tmp / name, spec, dtype, settings.device)


def run_meta(args: argparse.Namespace, settings: Settings) -> dict:
    import transformers

    device = settings.device
    return {
        "threads": torch.get_num_threads(),
        "threads_from": "--threads" if args.threads else "quick default" if args.quick else "torch default",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg()[0],
        "quick": settings.quick,
        "repeats": settings.repeats,
        "dtype_flag": settings.dtype,
        "request_count": settings.requests,
        "quick_context_cap": settings.context_cap,
        "transformers_batch_size": TF_BATCH,
        "transformers_batching": "static batches in request order, left padding, max_new_tokens = longest output "
        "in the batch, eos disabled, greedy; useful tokens only",
        "decode_tokens": settings.decode_tokens,
        "decode_prompt_tokens": PROMPT_LEN,
        "trace": str(args.trace),
        "seed": SEED,
        "hbm_gbs": settings.hbm_gbs,
        "gpu_path_note": "the CUDA path (bf16 1B model, HBM roofline, flash-attn) was written without a GPU to test on"
        if device.type == "cuda"
        else None,
        "models": {},
    }


def device_check(args: argparse.Namespace, settings: Settings) -> int:
    """Issue 19's device check: figures per attention path, printed and written under bench/results/."""
    result = run_device_check(settings.device, args.trace_requests, args.budget_s)
    result["meta"] = run_meta(args, settings)
    for path, figures in result["figures"].get("summary", {}).get("by_attention", {}).items():
        shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        print(f"{path:<11} {shown}")
    print(f"targets: {DEVICE_TARGETS_LINE}")
    for name, error in result["errors"].items():
        print(f"FAILED {name}: {error.splitlines()[0]}", file=sys.stderr)
    for name, why in result["skipped"].items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    out = args.json or RESULTS_DIR / f"engine-device-check-{settings.device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out} ({result['figures'].get('wall_s', 0.0):.1f} s)")
    return 0


DEVICE_TARGETS_LINE = "decode roofline >= 0.80, throughput vs transformers >= 3.0, prefill of matmul rate >= 0.5"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or (QUICK_THREADS if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    settings = settings_from(args)
    if args.device_check:
        return device_check(args, settings)
    torch.manual_seed(SEED)
    import transformers

    transformers.logging.set_verbosity_error()
    meta = run_meta(args, settings)
    if settings.device.type == "cuda" and not settings.hbm_gbs:
        print(f"unknown bandwidth for {meta['device_name']}: pass --hbm-gbs for the roofline row", file=sys.stderr)
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hexgen-bench-") as tmp:
        for name in args.models or DEFAULT_MODELS[settings.device.type]:
            model_dir = model_dir_for(name, settings, Path(tmp))
            if isinstance(model_dir, str):
                print(f"skipping {name}: {model_dir}", file=sys.stderr)
                meta["models"][name] = {"skipped": model_dir}
                continue
            if args.quantize:
                model_rows, meta["models"][name] = bench_quantized(name, model_dir, settings, args.quantize)
            else:
                model_rows, meta["models"][name] = bench_model(name, model_dir, settings, args.trace_requests)
            rows.extend(model_rows)
    meta["wall_seconds"] = time.perf_counter() - started
    meta["load_average_end"] = os.getloadavg()[0]
    (print_quant_table if args.quantize else print_table)(rows, meta)
    stem = "engine-quant" if args.quantize else "engine"
    out = args.json or OUT_DIR / (f"{stem}-quick.json" if settings.quick else f"{stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "meta": meta}, indent=1))
    print(f"wrote {out} ({meta['wall_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
