"""Token sampling: greedy argmax, or temperature, top-k and top-p (nucleus) with per-sequence reproducible seeds."""

from __future__ import annotations

import torch

from hexgen.engine.sequence import Sequence

_MASK64 = (1 << 64) - 1
# Dividing by a smaller temperature would underflow float32 to 0; at this one the draw is already greedy.
_MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def _mix_seed(seed: int, position: int) -> int:
    """A 64-bit generator seed from (seed, position), splitmix64-style so nearby inputs give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + position) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """One next token per row of ``logits`` ([len(seqs), vocab]), following each sequence's SamplingParams.

    A seeded sequence's draw depends only on (seed, len(seq)) and its own logits, never on the rest of the
    batch, so it repeats after a preemption and recompute or on another machine. Its uniform variate comes
    from a CPU generator for that reason; the token is found by inverse CDF over the filtered distribution.
    """
    if logits.dim() != 2 or logits.shape[0] != len(seqs):
        raise ValueError(f"logits must be [{len(seqs)}, vocab], got {list(logits.shape)}")
    if not seqs:
        return []
    sampled = [(row, seq) for row, seq in enumerate(seqs) if not seq.sampling.greedy]
    if not sampled:
        return logits.argmax(dim=-1).tolist()

    vocab_size = logits.shape[1]
    num_unseeded = sum(1 for _, seq in sampled if seq.sampling.seed is None)
    unseeded_uniforms = iter(torch.rand(num_unseeded, dtype=torch.float64).tolist())
    generator: torch.Generator | None = None
    # Rows with top_k or top_p draw over the vocabulary sorted by logit, the rest in vocabulary order (no sort
    # to pay for); which one is a property of the row alone, so a seeded draw ignores its batch neighbours.
    plain_rows: list[int] = []
    plain_params: list[list[float]] = []
    filtered_rows: list[int] = []
    filtered_params: list[list[float]] = []
    for row, seq in sampled:
        sampling = seq.sampling
        if sampling.seed is None:
            uniform = next(unseeded_uniforms)
        else:
            if generator is None:
                generator = torch.Generator()
            generator.manual_seed(_mix_seed(sampling.seed, len(seq)))
            uniform = torch.rand((), dtype=torch.float64, generator=generator).item()
        top_k = sampling.top_k if 0 < sampling.top_k < vocab_size else vocab_size
        params = [max(sampling.temperature, _MIN_TEMPERATURE), sampling.top_p, float(top_k), uniform]
        if top_k < vocab_size or sampling.top_p < 1.0:
            filtered_rows.append(row)
            filtered_params.append(params)
        else:
            plain_rows.append(row)
            plain_params.append(params)

    groups = [
        group for group in ((filtered_rows, filtered_params, True), (plain_rows, plain_params, False)) if group[0]
    ]
    if len(groups) == 1 and len(sampled) == len(seqs):
        _, params, sort = groups[0]
        return _draw(logits.float(), params, sort).tolist()
    tokens = logits.argmax(dim=-1)
    for rows, params, sort in groups:
        row_index = torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)
        tokens.index_copy_(0, row_index, _draw(logits.index_select(0, row_index).float(), params, sort))
    return tokens.tolist()


def _draw(logits: torch.Tensor, params: list[list[float]], sort: bool) -> torch.Tensor:
    """Inverse-CDF draws for float32 ``logits`` rows; ``params`` rows: temperature, top_p, top_k, uniform."""
    param_table = torch.tensor(params, dtype=torch.float32).to(logits.device, non_blocking=True)
    temperature, top_p, top_k, uniform = param_table.unbind(dim=1)
    # top_k and top_p each keep a prefix of the tokens sorted by logit (temperature keeps the order). The sort
    # is stable so that tied tokens keep index order, as argmax does.
    candidate_tokens: torch.Tensor | None = None
    if sort:
        logits, candidate_tokens = torch.sort(logits, dim=-1, descending=True, stable=True)
        row_max = logits[:, :1]
    else:
        row_max = logits.amax(dim=-1, keepdim=True)
    # Shifting the max to 0 first keeps a tiny temperature from turning logits into inf - inf.
    probs = torch.softmax((logits - row_max) / temperature.unsqueeze(1), dim=-1)
    cumulative = torch.cumsum(probs, dim=-1)
    top_k_index = (top_k.long() - 1).unsqueeze(1)
    top_k_mass = cumulative.gather(1, top_k_index)
    # top_p applies to the distribution top_k left, renormalised: keep the fewest tokens reaching top_p of it.
    top_p_index = torch.searchsorted(cumulative, top_p.unsqueeze(1) * top_k_mass)
    kept_mass = cumulative.gather(1, torch.minimum(top_k_index, top_p_index))
    # The first token reaching the kept mass: any kept tokens after it have underflowed to probability 0.
    last_kept = torch.searchsorted(cumulative, kept_mass)
    drawn = torch.searchsorted(cumulative, uniform.unsqueeze(1) * kept_mass, right=True)
    drawn = torch.minimum(drawn, last_kept)
    if candidate_tokens is not None:
        drawn = candidate_tokens.gather(1, drawn)
    return drawn.squeeze(1)
