"""KV hand-offs timed from a client, for bench/nat.py: a random-weight Llama whose KV is large enough to time,
the pinned prefill/decode layout that serves it, and requests whose token arrival times give each hand-off's
duration and the decode replica's time per output token.

A request with a long prompt and a few output tokens: its first token comes from the prefill replica; its
second needs the whole KV at the decode replica and one decode step there. So the gap between the two, less
the median gap between later tokens (one decode step each, TPOT), is the hand-off: KV bytes / that time is
the hand-off's effective throughput (gather, worker -> daemon -> link -> daemon -> worker, scatter). Every
token reaches the client by the same path from the entry daemon, so that path's delay cancels out.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from hexgen.daemon.generate_protocol import generate

MIB = 1 << 20
REQUEST_S = 180.0
FIRST_TOKEN_S = 180.0


@dataclass(frozen=True)
class KvModel:
    """A random-weight Llama (float32) shaped for a large KV per token and a cheap forward pass: few layers,
    many KV heads of 128, a narrow residual stream and MLP."""

    layers: int = 8
    kv_heads: int = 16
    head_dim: int = 128
    hidden: int = 256
    vocab: int = 512

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token: K and V of every layer and KV head, float32."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 4

    def write(self, out: Path, seed: int = 0) -> Path:
        """Save the checkpoint to ``out`` with transformers, and a word-level tokenizer (``t0`` ... ``t511``)
        that the daemon loads; requests carry token ids."""
        import tokenizers
        import torch
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=2 * self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.kv_heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,  # no stop token: every request runs to its max_tokens
            pad_token_id=None,
        )
        torch.manual_seed(seed)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
        words = tokenizers.models.WordLevel({f"t{i}": i for i in range(self.vocab)}, unk_token="t0")
        tokenizer = tokenizers.Tokenizer(words)
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
        tokenizer.save(str(out / "tokenizer.json"))
        return out


def pinned_plan(prefill: str, decodes: list[str], layers: int) -> str:
    """A pinned-plan TOML: one prefill replica on host ``prefill``, one decode replica on each of ``decodes``
    (replica indices 1, 2, ... in that order), every replica holding all ``layers``."""

    def group(role: str, host: str) -> str:
        return f'[[groups]]\nrole = "{role}"\nstages = [{{ gpus = ["{host}"], layers = [0, {layers}] }}]\n'

    return "\n".join([group("prefill", prefill), *(group("decode", host) for host in decodes)])


@dataclass(frozen=True)
class Timed:
    """One request: when each token arrived (seconds after it was sent) and the replica of the role asked for
    that served it (None: none did)."""

    times: tuple[float, ...]
    replica: int | None

    @property
    def tpot_s(self) -> float:
        """Median gap between tokens after the second: one decode step (and the tokens' way back) each."""
        gaps = [b - a for a, b in zip(self.times[1:], self.times[2:], strict=False)]
        return statistics.median(gaps)

    @property
    def handoff_s(self) -> float:
        """Time from the first token to the second, less one decode step."""
        return self.times[1] - self.times[0] - self.tpot_s


async def timed_request(client: Any, entry: str, tokens: list[int], max_tokens: int, role: str = "decode") -> Timed:
    """Send ``tokens`` to daemon ``entry`` and time every token frame, noting the replica of ``role`` that
    served it; RuntimeError on an error frame."""
    start = time.perf_counter()
    times: list[float] = []
    replica = None
    with trio.fail_after(REQUEST_S):
        async for frame in generate(client, entry, {"tokens": tokens, "max_tokens": max_tokens}):
            if "error" in frame:
                raise RuntimeError(f"the request failed: {frame['error']}")
            if "token" in frame:
                times.append(time.perf_counter() - start)
            for served in frame.get("served_by", []):
                if served.get("role") == role:
                    replica = served.get("replica")
    return Timed(tuple(times), replica)


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    """``length`` random token ids (distinct prompts: no cached prefix helps a request)."""
    return [rng.randrange(3, vocab) for _ in range(length)]


async def sample_handoffs(
    client: Any,
    entry: str,
    prompt_len: int,
    max_tokens: int,
    want: Mapping[int, int],
    cap: int,
    vocab: int,
    seed: int = 17,
) -> dict[int, list[Timed]]:
    """Requests one after another through ``entry`` until each decode replica of ``want`` served its count, or
    ``cap`` requests were sent (the entry picks the decode replica at random); ``seed`` picks the prompts.
    Returns the timed requests of each decode replica."""
    rng = random.Random(seed)
    out: dict[int, list[Timed]] = {replica: [] for replica in want}
    for _ in range(cap):
        if all(len(out[r]) >= n for r, n in want.items()):
            break
        timed = await timed_request(client, entry, random_prompt(rng, prompt_len, vocab), max_tokens)
        if timed.replica in out and len(timed.times) == max_tokens:
            out[timed.replica].append(timed)
    return out


async def first_token_s(client: Any, entry: str, tokens: list[int], since: float) -> float:
    """Seconds from ``since`` (a ``time.monotonic``) until a request to ``entry`` streams its first token,
    re-sent whenever one fails (no plan yet, workers still starting); TooSlowError after FIRST_TOKEN_S."""
    with trio.fail_after(FIRST_TOKEN_S):
        while True:
            try:
                async for frame in generate(client, entry, {"tokens": tokens, "max_tokens": 1}):
                    if "token" in frame:
                        return time.monotonic() - since
            except Exception:  # the entry not reachable yet, or its stream reset: ask again
                pass
            await trio.sleep(0.2)


def summarize(samples: list[Timed], kv_bytes: int) -> dict[str, Any]:
    """Medians over ``samples`` (one link): hand-off seconds, KV MiB/s (each request's own rate), TPOT ms."""
    if not samples:
        return {"n": 0, "mib_s": None, "handoff_s": None, "tpot_ms": None, "handoffs_s": []}
    return {
        "n": len(samples),
        "mib_s": round(statistics.median(kv_bytes / MIB / max(t.handoff_s, 1e-6) for t in samples), 1),
        "handoff_s": round(statistics.median(t.handoff_s for t in samples), 3),
        "tpot_ms": round(1000 * statistics.median(t.tpot_s for t in samples), 1),
        "handoffs_s": [round(t.handoff_s, 3) for t in samples],
    }


def marginal_mib_s(long: dict[str, Any], short: dict[str, Any], extra_bytes: int) -> float | None:
    """MiB/s of the ``extra_bytes`` a long prompt's hand-off moves beyond a short one's (``summarize``'s medians
    of each): the link's rate with the hand-off's fixed cost taken out."""
    if long["handoff_s"] is None or short["handoff_s"] is None or long["handoff_s"] <= short["handoff_s"]:
        return None
    return round(extra_bytes / MIB / (long["handoff_s"] - short["handoff_s"]), 1)
