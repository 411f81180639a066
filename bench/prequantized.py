"""Pre-quantized checkpoints: hexgen's engine on GPTQ and AWQ checkpoints against the same engine on the
full-precision weights they stand for, in one process, same machine, dtype and threads.

A random Llama (transformers' init, float32) is packed by hexgen.testing.gptq's reference packer as GPTQ
(4 bits in order, 4 bits act order, 8 bits) and AWQ (4 bits), groups of 128, each beside a float32 checkpoint
of exactly the weights it dequantizes to. Per format: greedy tokens of the packed checkpoint matching the
dequantized checkpoint's before the first divergence and the largest logit error (teacher-forced on the
reference's tokens), bytes of the linear weights, batch-1 decode ms/token of both (median over --repeats,
(t_N - t_1) / (N - 1)), and the matmul path the packed linears run. The first row is the engine's own
--quantize int4 (groups of 32) on the original weights, for scale.
--quick: a 256-wide model, N=32, one repeat (under 60 s on one thread); else 1024 wide, N=48, 3 repeats.

    python bench/prequantized.py [--quick] [--json OUT] [--threads N] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import hexgen_shim  # noqa: F401 - before any hexgen import: the device machine has a plain checkout
import torch

from engine import PROMPT_LEN, SEED, Hexgen, Settings, agreement, decode_seconds, forced_greedy, random_prompts
from hexgen.engine.loader import quantized_linears
from hexgen.engine.quant import paths, weight_bytes
from hexgen.testing.gptq import Variant, write_prequantized

OUT = Path(__file__).resolve().parent / "out" / "prequantized.json"
SIZES = {
    "quick": {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 8},
    "full": {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16},
}
FORMATS = {
    "gptq int4 g128": Variant(group=128),
    "gptq int4 g128 act-order": Variant(group=128, act_order=True),
    "gptq int8 g128": Variant(bits=8, group=128),
    "awq int4 g128": Variant(method="awq", group=128),
}


def write_source(out: Path, size: dict[str, int]) -> Path:
    import transformers

    spec = size | {"num_hidden_layers": 4, "num_key_value_heads": size["num_attention_heads"] // 2}
    config = transformers.LlamaConfig(
        **spec, vocab_size=32000, max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    torch.manual_seed(SEED)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    return out


def measure(model_dir: Path, settings: Settings, forced: list[int] | None, quantize: str | None = None) -> dict:
    """Greedy picks and logits (forced onto ``forced`` when given), linear bytes, decode ms/token, paths."""
    system = Hexgen(model_dir, settings, 4 * (PROMPT_LEN + settings.decode_tokens), 2, quantize)
    prompt = random_prompts([PROMPT_LEN], 32000, SEED + 2)[0]
    system.decode(prompt, 4)  # warm-up
    picks, logits = forced_greedy(system.llm, prompt, settings.decode_tokens, forced)
    steps = [
        decode_seconds(system, prompt, settings.decode_tokens, settings.device)[0] for _ in range(settings.repeats)
    ]
    model = system.llm.runner.model
    linears = quantized_linears(model).values()
    return {
        "picks": picks,
        "logits": logits,
        "linear_bytes": sum(weight_bytes(linear) for linear in linears),
        "decode_ms": 1e3 * statistics.median(steps),
        "paths": paths(model),
    }


def compare(name: str, packed: Path, plain: Path, settings: Settings, quantize: str | None = None) -> dict[str, Any]:
    """``packed`` (loaded with ``quantize``) against ``plain`` in full precision."""
    reference = measure(plain, settings, None)
    ours = measure(packed, settings, reference["picks"], quantize)
    return {
        "format": name,
        "agreement": agreement(reference["picks"], ours["picks"]),
        "tokens": settings.decode_tokens,
        "max_logit_error": float((ours["logits"] - reference["logits"]).abs().max()),
        "linear_bytes": ours["linear_bytes"],
        "reference_linear_bytes": reference["linear_bytes"],
        "decode_ms": ours["decode_ms"],
        "reference_decode_ms": reference["decode_ms"],
        "paths": ours["paths"],
    }


def print_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    print(
        f"pre-quantized checkpoints, hexgen engine (torch {meta['torch_version']}), {meta['device']}, "
        f"{meta['threads']} thread(s), repeats {meta['repeats']}{', QUICK' if meta['quick'] else ''}"
    )
    print(
        f"random Llama {meta['model']}; batch 1, {PROMPT_LEN}-token prompt, N={meta['decode_tokens']}; reference: "
        "the same engine on the float32 weights the checkpoint dequantizes to (int4: the original weights)"
    )
    head = (
        f"{'format':<26} {'agree':>9} {'max |dlogit|':>12} {'linears MiB':>11} {'x ref':>6} "
        f"{'ms/token':>8} {'ref ms':>7}  matmul path"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        path = ", ".join(f"{k} {v}" for k, v in sorted(r["paths"].items()))
        print(
            f"{r['format']:<26} {r['agreement']:>4}/{r['tokens']:<4} {r['max_logit_error']:>12.2e} "
            f"{r['linear_bytes'] / 2**20:>11.3f} {r['linear_bytes'] / r['reference_linear_bytes']:>6.3f} "
            f"{r['decode_ms']:>8.2f} {r['reference_decode_ms']:>7.2f}  {path}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=0, help="default 1 with --quick, else 3")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    tokens = 32 if args.quick else 48
    settings = Settings(args.quick, repeats, torch.device("cpu"), "float32", 0, tokens, None, None)
    size = SIZES["quick" if args.quick else "full"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = write_source(Path(tmp) / "source", size)
        rows.append(compare("engine --quantize int4 g32", source, source, settings, "int4"))
        for name, variant in FORMATS.items():
            packed, plain = Path(tmp) / name.replace(" ", "-"), Path(tmp) / f"{name.replace(' ', '-')}-plain"
            write_prequantized(source, packed, plain, variant)
            rows.append(compare(name, packed, plain, settings))
    meta = {
        "torch_version": torch.__version__,
        "device": platform.processor() or "cpu",
        "threads": args.threads,
        "repeats": repeats,
        "quick": args.quick,
        "model": f"hidden {size['hidden_size']}, intermediate {size['intermediate_size']}, 4 layers",
        "decode_tokens": tokens,
    }
    print_table(rows, meta)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
