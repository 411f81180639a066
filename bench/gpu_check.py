"""One device check of the engine on a GPU, prepared to run in a single call of at most 8 minutes.

Needs torch and transformers, and for the worker processes of (b) the small wheels msgpack (the frames),
psutil (daemon.interfaces) and cryptography (the sealed rendezvous store): carry them along where the
machine lacks them. No trio, no libp2p, no flash-attn, no network. Models are built from
configs with random weights. Checks, each a row of the table and an entry of the JSON:

(a) ``engine-vs-hf``: a random-weight Llama of about 1B parameters with GQA, the engine on the device in
    bf16 against transformers on the same device: greedy tokens equal, or where they differ, the
    engine's token's logit (teacher-forced, transformers' logits) within ``--tolerance`` of the top one.
(b) ``prefill->decode``: a prefill replica and a decode replica as two worker processes on the one device,
    the daemon's own (``python -m hexgen.daemon.worker_process``, configured and driven as the supervisor
    does by ``hexgen.testing.replica_driver``): the KV goes over the epoch's gloo exchange group, so a CUDA
    cache takes the host staging path of engine.kv_transfer. Same check.
(c) ``attention``: which attention path the engine chose, and why.

    python bench/gpu_check.py [--device cuda|cpu] [--quick] [--out PATH] [--budget-s S]

``--device cpu --quick`` is the smoke test with a tiny model (under a minute on a laptop core). A time
guard skips what no longer fits and, past the budget, writes what it has and exits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
LLAMA_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 256,
}


def ensure_hexgen_importable() -> None:
    """On the device machine the repository is a plain checkout, not an installed package: expose its
    engine, daemon and test support as ``hexgen.engine``, ``hexgen.daemon`` and ``hexgen.testing`` through
    symlinks, on ``PYTHONPATH`` too, for the worker and store processes (bench/hexgen_shim.py)."""
    import hexgen_shim

    hexgen_shim.install("hexgen.testing.replica_driver")


@dataclass
class Check:
    name: str
    ok: bool | None = None  # None: skipped
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Report:
    started: str
    device: str
    quick: bool
    environment: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    engine_imports: dict[str, bool] = field(default_factory=dict)
    finished: bool = False

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, default=str))
        tmp.replace(path)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "machine": platform.node(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "capability": list(torch.cuda.get_device_capability(0))}
        env["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
    try:
        import flash_attn  # noqa: F401

        env["flash_attn"] = True
    except ImportError:
        env["flash_attn"] = False
    return env


def build_checkpoint(config: dict[str, Any], out: Path, dtype: Any, device: str) -> Any:
    """A random-weight Llama saved as safetensors for the engine; returns transformers' model, on
    ``device`` in ``dtype``, for the reference."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        **config, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    model.save_pretrained(out, safe_serialization=True)
    return model


def prompts_for(vocab: int, count: int, low: int, high: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(low, high, (count,), generator=gen).tolist()
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def hf_greedy(model: Any, prompts: list[list[int]], max_tokens: int, device: str) -> list[list[int]]:
    import torch

    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            gen = model.generate(
                ids, max_new_tokens=max_tokens, do_sample=False, attention_mask=torch.ones_like(ids), min_length=0
            )
            out.append(gen[0, len(prompt) :].tolist())
    return out


def teacher_forced_gaps(model: Any, prompt: list[int], tokens: list[int], device: str) -> list[float]:
    """For each generated token: transformers' top logit minus its logit for that token, given the
    prompt and the tokens before it (0 where the token is transformers' own choice)."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt + tokens[:-1]], device=device)
        logits = model(ids).logits[0, len(prompt) - 1 :].float()
    chosen = logits.gather(1, torch.tensor(tokens, device=device).unsqueeze(1)).squeeze(1)
    return (logits.max(dim=1).values - chosen).tolist()


def compare(
    model: Any, prompts: list[list[int]], got: list[list[int]], expected: list[list[int]], tol: float, device: str
) -> tuple[bool, dict[str, Any]]:
    equal = sum(g == e for g, e in zip(got, expected, strict=True))
    worst = 0.0
    for prompt, tokens, ref in zip(prompts, got, expected, strict=True):
        if tokens != ref and tokens:
            worst = max(worst, max(teacher_forced_gaps(model, prompt, tokens, device)))
    ok = all(len(g) == len(e) for g, e in zip(got, expected, strict=True)) and worst <= tol
    return ok, {"prompts": len(prompts), "identical": equal, "worst_logit_gap": round(worst, 5), "tolerance": tol}


def run_checks(args: argparse.Namespace, report: Report, out: Path, budget: Budget) -> None:
    import torch

    from hexgen.daemon.worker_setup import CacheSetup
    from hexgen.engine.layout import uniform_layout
    from hexgen.engine.llm import LLM
    from hexgen.engine.model_runner import CacheConfig
    from hexgen.engine.sequence import SamplingParams
    from hexgen.testing.replica_driver import generate_disaggregated

    device = "cuda:0" if args.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    dtype_name = "bfloat16" if args.device == "cuda" else "float32"
    config = LLAMA_TINY if args.quick and args.device == "cpu" else LLAMA_1B
    count, max_tokens = (2, 8) if args.quick else (4, 32)
    prompts = prompts_for(config["vocab_size"], count, 5, 40 if args.quick else 200)
    sampling = SamplingParams(max_tokens=max_tokens)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        started = time.monotonic()
        model = build_checkpoint(config, Path(tmp), dtype, device)
        expected = hf_greedy(model, prompts, max_tokens, device)
        report.environment["reference_seconds"] = round(time.monotonic() - started, 1)

        # (a) and (c): the engine in this process
        check = Check("engine-vs-hf")
        report.checks.append(check)
        started = time.monotonic()
        try:
            cache = CacheConfig(gpu_memory_utilization=0.5) if args.device == "cuda" else CacheConfig()
            llm = LLM(tmp, dtype=dtype_name, device=device, cache=cache)
            got = [c.token_ids for c in llm.generate(prompts, sampling)]
            check.ok, check.detail = compare(model, prompts, got, expected, args.tolerance, device)
            check.detail["kv_blocks"] = llm.runner.num_blocks
            check.detail["block_size"] = llm.runner.block_size
            if llm.runner.memory_profile is not None:
                check.detail["memory_profile"] = asdict(llm.runner.memory_profile)
            attention = Check("attention", ok=True, detail=asdict(llm.runner.attention))
            report.checks.append(attention)
            del llm
            gc.collect()  # the engine's 0.5 of the device must be free before (b)
        except Exception:
            check.ok, check.error = False, traceback.format_exc()[-3000:]
        check.seconds = round(time.monotonic() - started, 1)
        report.write(out)
        if args.device == "cuda":
            torch.cuda.empty_cache()

        # (b): prefill and decode workers as two processes on the one device
        check = Check("prefill->decode")
        report.checks.append(check)
        left = budget.left() - 20
        if left < 60:
            check.error = f"skipped: {budget.left():.0f} s left of the budget"
        else:
            started = time.monotonic()
            try:
                layout = uniform_layout(config["num_hidden_layers"], 1, 1)
                got = generate_disaggregated(
                    tmp,
                    layout,
                    layout,
                    prompts,
                    sampling,
                    timeout_s=left,
                    device=device,
                    dtype=dtype_name,
                    # two processes share the device: a fixed cache each, not a fraction of its memory
                    cache=CacheSetup(num_blocks=256),
                )
                check.ok, check.detail = compare(model, prompts, got, expected, args.tolerance, device)
                from hexgen.engine.kv_transfer import needs_staging

                staged = needs_staging(torch.device(device), "gloo")
                check.detail["transport"] = "gloo, staged through host memory" if staged else "gloo"
            except Exception:
                check.ok, check.error = False, traceback.format_exc()[-3000:]
            check.seconds = round(time.monotonic() - started, 1)
        del model


def table(report: Report) -> str:
    rows = [f"{'check':<18} {'result':<8} {'secs':>6}  detail"]
    for c in report.checks:
        result = "skipped" if c.ok is None else "ok" if c.ok else "FAIL"
        detail = c.error.strip().splitlines()[-1] if c.error else json.dumps(c.detail)
        rows.append(f"{c.name:<18} {result:<8} {c.seconds:>6.1f}  {detail[:160]}")
    return "\n".join(rows)


def default_out(device: str) -> Path:
    machine = re.sub(r"[^A-Za-z0-9_.-]+", "-", platform.node() or "unknown")[:40]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M")  # noqa: UP017 - the device machine may run an older Python
    return ROOT / "bench" / "results" / f"gpu_check-{stamp}-{device}-{machine}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer prompts and tokens (tiny model on CPU)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default under bench/results)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting work after this (s)")
    parser.add_argument("--tolerance", type=float, default=1e-2, help="logit gap allowed where tokens differ")
    args = parser.parse_args(argv)
    if args.budget_s <= 0 or args.tolerance < 0:
        parser.error("--budget-s must be positive and --tolerance not negative")
    out = args.out or default_out(args.device)
    report = Report(dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), args.device, args.quick)  # noqa: UP017 - the device machine may run an older Python
    budget = Budget(args.budget_s)

    def guard() -> None:  # past the budget and a grace period: keep what was measured and leave
        time.sleep(max(0.0, budget.left()) + 45)
        report.write(out)
        print(table(report), f"\ntime guard: stopped after {args.budget_s + 45:.0f} s; report in {out}", flush=True)
        os._exit(3)

    threading.Thread(target=guard, daemon=True).start()
    try:
        ensure_hexgen_importable()
        import torch

        import hexgen.engine.llm
        import hexgen.testing.replica_driver  # noqa: F401

        # what the engine itself needs: the device machine has no trio, libp2p or flash-attn
        report.engine_imports = {m: m in sys.modules for m in ("trio", "libp2p", "cryptography", "jinja2")}

        if args.device == "cuda" and not torch.cuda.is_available():
            print("gpu_check: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
        torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
        report.environment |= environment(args.device)
        run_checks(args, report, out, budget)
    except Exception:
        report.checks.append(Check("setup", ok=False, error=traceback.format_exc()[-3000:]))
    report.environment["imported_at_end"] = {m: m in sys.modules for m in ("trio", "libp2p", "flash_attn")}
    report.finished = True
    report.write(out)
    print(table(report))
    print(f"report: {out}")
    return 0 if all(c.ok is not False for c in report.checks) and report.checks else 1


if __name__ == "__main__":
    sys.exit(main())
