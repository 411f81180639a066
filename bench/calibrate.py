"""Calibration of the planner's cost model: its prefill and decode efficiencies fitted from measured engine runs.

The cost model prices a prefill as FLOPs over (peak FLOP/s x ``compute_efficiency``) and a decode step as
bytes read over (peak memory bandwidth x ``memory_efficiency``). This script measures, on one device, the
peaks (a matmul rate and a copy bandwidth, ``daemon/calibration.py``) and hexgen's engine on a random-weight
Llama: a batch of prompts prefilled (FLOPs counted by the cost model's own formula) and batch-1 decode (the
bytes every step reads). On CPU the peaks are torch's own matmul and copy on the engine's threads. The efficiencies are achieved over measured peak, medians over ``--repeats``;
over a GPU's spec-sheet figures as well when the device is a known GPU type. JSON for
``CostParams.from_calibration`` and the planner bench's ``--calibration``.

    python bench/calibrate.py [--quick] [--device cpu|cuda] [--repeats N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hexgen.coordinator.specs import ModelSpec, resolve_model
from hexgen.daemon.calibration import cuda_calibrate
from hexgen.engine.llm import LLM
from hexgen.engine.sequence import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from engine import write_random_llama

SHAPES = {
    "quick": {
        "num_hidden_layers": 4,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 8000,
        "max_position_embeddings": 2048,
    },
    "full": {
        "num_hidden_layers": 8,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
}


def prefill_flops(m: ModelSpec, lengths: list[int]) -> float:
    """FLOPs of prefilling prompts of these lengths, as ``cost.prefill_stage`` counts them (all layers,
    plus the head once per request). O(len(lengths))."""
    tokens, tokens_sq = sum(lengths), sum(n * n for n in lengths)
    return m.layers * (2 * m.active_layer_params * tokens + 2 * tokens_sq * m.hidden) + 2 * m.vocab * m.hidden * len(
        lengths
    )


def decode_bytes(m: ModelSpec) -> float:
    """Bytes one batch-1 decode step reads: every layer and the head (the cost model's decode memory term)."""
    return m.layers * m.layer_bytes + (m.head_params or m.embedding_params) * m.bytes_per_param


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(llm: LLM, prompts: list[list[int]], max_tokens: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    sync(device)
    return time.perf_counter() - start


def measure(model_dir: Path, device: torch.device, quick: bool, repeats: int) -> dict[str, float]:
    """Median prefill seconds of a batch and decode seconds per step at batch 1."""
    llm = LLM(model_dir, device=str(device))
    vocab = llm.model_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    batch, length, steps = (4, 256, 32) if quick else (8, 512, 64)
    prompts = [torch.randint(3, vocab, (length,), generator=generator).tolist() for _ in range(batch)]
    timed_generate(llm, prompts[:1], 2, device)  # warm-up
    prefill = [timed_generate(llm, prompts, 1, device) for _ in range(repeats)]
    one = [timed_generate(llm, prompts[:1], 1, device) for _ in range(repeats)]
    many = [timed_generate(llm, prompts[:1], steps, device) for _ in range(repeats)]
    return {
        "prefill_s": statistics.median(prefill),
        "decode_step_s": max(statistics.median(many) - statistics.median(one), 1e-9) / (steps - 1),
        "batch": batch,
        "prompt_tokens": length,
        "decode_steps": steps,
    }


def peaks(device: torch.device, seconds: float) -> tuple[float, float, str]:
    """Measured (FLOP/s, bytes/s) of the device and what measured them."""
    if device.type == "cuda":
        tflops, gb_s = cuda_calibrate(torch, device.index or 0, seconds)
        if tflops is None or gb_s is None:
            raise RuntimeError("the CUDA calibration failed (out of memory or a busy device)")
        return tflops * 1e12, gb_s * 1e9, "bf16 4096^3 matmul and a 1 GiB device copy, CUDA events"
    n, size = 1024, 64 << 20
    a, b = torch.randn(n, n), torch.randn(n, n)
    src, dst = torch.empty(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
    flop_s = 2.0 * n**3 / best_seconds(lambda: torch.matmul(a, b), seconds / 2)
    byte_s = 2.0 * size / best_seconds(lambda: dst.copy_(src), seconds / 2)
    return flop_s, byte_s, f"float32 {n}^3 torch matmul and a 64 MiB copy, same threads, best of {seconds / 2:g} s"


def best_seconds(op: Callable[[], object], seconds: float) -> float:
    """The fastest of repeated calls of ``op`` within about ``seconds`` (one warm-up call first)."""
    op()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        op()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and one repeat: under a minute")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per figure (default 1 quick, 3 full)")
    parser.add_argument("--json", type=Path, help="write the fit here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/calibrate.py: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    repeats = args.repeats if args.repeats > 0 else (1 if args.quick else 3)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES["quick" if args.quick else "full"]
    torch.set_num_threads(1 if args.quick else torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_random_llama(Path(tmp) / "model", shape, dtype, device)
        spec = resolve_model(str(model_dir))
        measured = measure(model_dir, device, args.quick, repeats)
    flop_s, byte_s, how = peaks(device, 1.0 if args.quick else 3.0)
    lengths = [measured["prompt_tokens"]] * measured["batch"]
    achieved_flop_s = prefill_flops(spec, lengths) / measured["prefill_s"]
    achieved_byte_s = decode_bytes(spec) / measured["decode_step_s"]
    fit = {
        "compute_efficiency": achieved_flop_s / flop_s,
        "memory_efficiency": achieved_byte_s / byte_s,
    }
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "model": {k: v for k, v in shape.items()},
        "measured": measured,
        "peak_flop_s": flop_s,
        "peak_byte_s": byte_s,
        "peaks_from": how,
        "achieved_flop_s": achieved_flop_s,
        "achieved_byte_s": achieved_byte_s,
        "fit": fit,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"device {result['device']} ({result['dtype']}, {result['threads']} threads); peaks from {how}")
    print(f"{'':24}{'achieved':>14}{'measured peak':>16}{'efficiency':>12}")
    print(f"{'prefill FLOP/s':24}{achieved_flop_s:14.3e}{flop_s:16.3e}{fit['compute_efficiency']:12.2f}")
    print(f"{'decode bytes/s':24}{achieved_byte_s:14.3e}{byte_s:16.3e}{fit['memory_efficiency']:12.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
