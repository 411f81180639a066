"""Sliding-window KV cache benchmark: the cache trimmed to the window against the same engine keeping every block.

A random-weight Mistral (every layer windowed) serves long generations from a cache far smaller than their
whole KV, once with the blocks behind every window returned to the pool (the engine's default) and once with
trimming off (``BlockManager.window`` 0, what the engine did before), side by side in one process. Per run:
the peak and mean blocks held per running sequence, the most sequences running at once, preemptions,
sequences cut short by the cache ("length" before their max_tokens), output tokens/s, and whether the
greedy tokens of the sequences both runs completed agree.

    python bench/window_cache.py [--quick] [--json OUT] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hexgen.engine.llm import LLM
from hexgen.engine.model_runner import CacheConfig
from hexgen.engine.sequence import SamplingParams

SEED = 0
SHAPE = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4}
SHAPE |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}


@dataclass(frozen=True)
class Setting:
    """The workload: ``sequences`` prompts of ``prompt_tokens`` each generating ``output_tokens``."""

    window: int
    block_size: int
    num_blocks: int
    sequences: int
    prompt_tokens: int
    output_tokens: int
    prefill_chunk: int


SETTINGS = {"quick": Setting(64, 16, 48, 8, 48, 200, 32), "full": Setting(256, 16, 320, 16, 200, 1000, 64)}


@dataclass(frozen=True)
class Run:
    """One engine run's figures."""

    cache: str
    seconds: float
    output_tokens_per_s: float
    peak_blocks_per_seq: int
    mean_blocks_per_seq: float
    max_running: int
    preemptions: int
    cut_by_cache: int


def write_random_mistral(out: Path, window: int) -> Path:
    """A random-weight Mistral with ``window`` on every layer, saved as safetensors."""
    import transformers

    config = transformers.MistralConfig(**SHAPE, sliding_window=window, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(SEED)
    transformers.MistralForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    return out


def serve(model_dir: Path, setting: Setting, trimmed: bool) -> tuple[Run, list[list[int] | None]]:
    """Generate every sequence to the end, stepping the engine by hand to watch its blocks; returns the
    figures and each sequence's tokens (None where the cache cut it short). O(steps x sequences)."""
    cache = CacheConfig(block_size=setting.block_size, num_blocks=setting.num_blocks)
    llm = LLM(model_dir, cache=cache, prefill_chunk=setting.prefill_chunk)
    max_tokens = setting.output_tokens
    if not trimmed:
        llm.block_manager.window = 0  # the reference: every block kept, as before trimming existed
    gen = torch.Generator().manual_seed(SEED)
    vocab, shape = SHAPE["vocab_size"], (setting.prompt_tokens,)
    prompts = [torch.randint(0, vocab, shape, generator=gen).tolist() for _ in range(setting.sequences)]
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    seqs = [llm.add_request(p, sampling) for p in prompts]
    peak, held_sum, samples, max_running = 0, 0, 0, 0
    start = time.perf_counter()
    while llm.has_unfinished():
        llm.step()
        running = llm.scheduler.running
        max_running = max(max_running, len(running))
        for seq in running:
            held = llm.block_manager.live_blocks(seq)
            peak, held_sum, samples = max(peak, held), held_sum + held, samples + 1
    seconds = time.perf_counter() - start
    out_tokens = sum(seq.num_completion_tokens for seq in seqs)
    run = Run(
        "trimmed to the window" if trimmed else "every block kept",
        round(seconds, 3),
        round(out_tokens / seconds, 1),
        peak,
        round(held_sum / max(samples, 1), 2),
        max_running,
        llm.scheduler.num_preemptions,
        sum(seq.num_completion_tokens < max_tokens for seq in seqs),
    )
    return run, [seq.completion_token_ids if seq.num_completion_tokens == max_tokens else None for seq in seqs]


def agreement(a: list[list[int] | None], b: list[list[int] | None]) -> str:
    both = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    same = sum(x == y for x, y in both)
    return f"{same}/{len(both)} sequences completed by both runs give the same tokens"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small setting, under a minute on a CPU")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = "quick" if args.quick else "full"
    st = SETTINGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_random_mistral(Path(tmp), st.window)
        trimmed, trimmed_tokens = serve(model_dir, st, trimmed=True)
        kept, kept_tokens = serve(model_dir, st, trimmed=False)
    whole = -(-(st.prompt_tokens + st.output_tokens) // st.block_size)
    print(
        f"{st.sequences} sequences of {st.prompt_tokens} + {st.output_tokens} tokens ({whole} blocks each "
        f"untrimmed), window {st.window}, blocks of {st.block_size}, a cache of {st.num_blocks} blocks, prefill "
        f"chunks of {st.prefill_chunk}, {args.threads} thread(s), CPU"
    )
    header = f"{'cache':<22} {'s':>7} {'out tok/s':>10} {'peak blk/seq':>12} {'mean blk/seq':>12}"
    print(header + f" {'max running':>11} {'preempted':>9} {'cut':>4}")
    for run in (trimmed, kept):
        print(
            f"{run.cache:<22} {run.seconds:>7.2f} {run.output_tokens_per_s:>10.1f} {run.peak_blocks_per_seq:>12} "
            f"{run.mean_blocks_per_seq:>12.2f} {run.max_running:>11} {run.preemptions:>9} {run.cut_by_cache:>4}"
        )
    agree = agreement(trimmed_tokens, kept_tokens)
    print(agree)
    if args.json:
        result = {"setting": name, **asdict(st), "machine": platform.machine(), "threads": args.threads}
        result |= {"runs": [asdict(trimmed), asdict(kept)], "agreement": agree}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
