"""Sampler: greedy argmax, top-k/top-p filtering, temperature, and seeds that depend only on (seed, position)."""

from __future__ import annotations

import collections
import math
from typing import Any

import pytest
import torch

from hexgen.engine.sampler import sample
from hexgen.engine.sequence import SamplingParams, Sequence

VOCAB = 50


def _seq(length: int = 3, **sampling: Any) -> Sequence:
    return Sequence(list(range(length)), SamplingParams(**sampling))


def _logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])


def _draws(logits: torch.Tensor, count: int, **sampling: Any) -> collections.Counter[int]:
    """One seeded draw per seed, so the counts are reproducible."""
    return collections.Counter(sample(logits, [_seq(seed=seed, **sampling)])[0] for seed in range(count))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[2, 7] = logits[2, 11] = logits[2].max() + 1  # a tie: the first index wins, as in torch.argmax
    seqs = [_seq() for _ in range(6)]
    tokens = sample(logits, seqs)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert tokens[2] == 7


def test_top_k_one_is_greedy_even_with_temperature() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    seqs = [_seq(temperature=1.5, top_k=1, seed=s) for s in range(4)]
    assert sample(logits, seqs) == logits.argmax(dim=-1).tolist()


def test_greedy_rows_of_a_mixed_batch_take_argmax() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(2))
    seqs = [_seq(), _seq(temperature=1.0, seed=5), _seq(temperature=2.0, top_k=1), _seq(temperature=1.0)]
    tokens = sample(logits, seqs)
    argmax = logits.argmax(dim=-1).tolist()
    assert tokens[0] == argmax[0] and tokens[2] == argmax[2]
    assert tokens[1] == sample(logits[1:2], [seqs[1]])[0]  # the seeded row ignores its neighbours
    assert all(0 <= t < VOCAB for t in tokens)


def test_seeded_draws_repeat_and_ignore_the_global_rng() -> None:
    logits = torch.zeros(1, VOCAB)  # uniform: the token reveals the random draw
    first = [sample(logits, [_seq(length=n, temperature=1.0, seed=42)])[0] for n in range(1, 30)]
    torch.manual_seed(1234)
    torch.rand(100)
    again = [sample(logits, [_seq(length=n, temperature=1.0, seed=42)])[0] for n in range(1, 30)]
    assert first == again
    assert len(set(first)) > 10  # the position changes the draw
    other_seed = [sample(logits, [_seq(length=n, temperature=1.0, seed=43)])[0] for n in range(1, 30)]
    assert other_seed != first


def test_seeded_draw_depends_only_on_seed_and_length() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))
    prompt_a = Sequence([1, 2, 3, 4], SamplingParams(temperature=1.0, seed=7))
    prompt_b = Sequence([9, 8, 7, 6], SamplingParams(temperature=1.0, seed=7, max_tokens=99))
    assert sample(logits, [prompt_a]) == sample(logits, [prompt_b])


def test_a_seeded_draw_ignores_the_rest_of_the_batch() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(8))
    neighbours = [_seq(), _seq(temperature=1.0), _seq(temperature=0.7, top_k=4), _seq(temperature=1.2, top_p=0.8)]
    for subject in (_seq(temperature=1.0, seed=s) for s in range(10)):
        alone = sample(logits, [subject])[0]
        for neighbour in neighbours:
            for batch in ([subject, neighbour], [neighbour, subject]):
                tokens = sample(logits.expand(2, VOCAB), batch)
                assert tokens[batch.index(subject)] == alone
    for subject in (_seq(temperature=1.0, top_p=0.9, top_k=20, seed=s) for s in range(10)):
        alone = sample(logits, [subject])[0]
        for neighbour in neighbours:
            assert sample(logits.expand(2, VOCAB), [neighbour, subject])[1] == alone


def test_filtered_and_plain_rows_in_one_batch() -> None:
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(9))
    top3 = set(logits[0].topk(3).indices.tolist())
    seen = set()
    for seed in range(200):
        tokens = sample(logits, [_seq(temperature=2.0, top_k=3, seed=seed), _seq(temperature=2.0, seed=seed)])
        assert tokens[0] in top3
        seen.add(tokens[1])
    assert len(seen) > 10  # the plain row draws from the whole vocabulary


def test_unseeded_draws_follow_the_torch_default_rng() -> None:
    logits = torch.zeros(3, VOCAB)
    seqs = [_seq(temperature=1.0) for _ in range(3)]
    torch.manual_seed(0)
    first = sample(logits, seqs)
    torch.manual_seed(0)
    assert sample(logits, seqs) == first


def test_tiny_top_p_keeps_only_the_argmax() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(4))
    argmax = int(logits.argmax())
    assert set(_draws(logits, 100, temperature=5.0, top_p=1e-6)) == {argmax}
    tied = torch.zeros(1, VOCAB)
    tied[0, 9] = tied[0, 3] = 1.0
    assert set(_draws(tied, 50, temperature=1.0, top_p=1e-6)) == {3}


@pytest.mark.parametrize(("top_p", "kept"), [(0.45, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_it(top_p: float, kept: set[int]) -> None:
    logits = _logits_from_probs([0.5, 0.3, 0.15, 0.05])
    assert set(_draws(logits, 600, temperature=1.0, top_p=top_p)) == kept


def test_top_k_keeps_the_k_most_likely() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(5))
    top3 = set(logits.topk(3).indices[0].tolist())
    assert set(_draws(logits, 300, temperature=3.0, top_k=3)) == top3


def test_top_p_applies_to_what_top_k_left() -> None:
    # After top_k=2 the two survivors have 0.4/0.7 and 0.3/0.7; 0.57 alone reaches top_p 0.5.
    logits = _logits_from_probs([0.4, 0.3, 0.2, 0.1])
    assert set(_draws(logits, 100, temperature=1.0, top_k=2, top_p=0.5)) == {0}


def test_draw_frequencies_follow_the_distribution() -> None:
    probs = [0.6, 0.25, 0.1, 0.05]
    counts = _draws(_logits_from_probs(probs), 4000, temperature=1.0)
    for token, p in enumerate(probs):
        assert abs(counts[token] / 4000 - p) < 0.03


def test_temperature_sharpens_and_flattens() -> None:
    logits = _logits_from_probs([0.6, 0.4])
    cold = _draws(logits, 2000, temperature=0.25)  # 0.6^4 : 0.4^4 -> about 0.84
    hot = _draws(logits, 2000, temperature=4.0)  # about 0.525
    assert abs(cold[0] / 2000 - 0.835) < 0.04
    assert abs(hot[0] / 2000 - 0.525) < 0.04


def test_masked_tokens_are_never_drawn_and_tiny_temperatures_are_greedy() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 10:] = float("-inf")
    assert set(_draws(logits, 300, temperature=50.0)) <= set(range(10))
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(6)) * 100
    assert set(_draws(logits, 20, temperature=1e-300)) == {int(logits.argmax())}


def test_low_precision_logits_are_sampled_in_float32() -> None:
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(7))
    seqs = [_seq(temperature=0.8, top_p=0.9, seed=11), _seq(temperature=1.3, top_k=5, seed=12)]
    halves = logits.to(torch.bfloat16)
    assert sample(halves, seqs) == sample(halves.float(), seqs)


@pytest.mark.parametrize("temperature", [-0.5, float("nan"), float("inf")])
def test_temperature_is_validated_by_sampling_params(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=temperature)


def test_logits_must_match_the_batch() -> None:
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(2, VOCAB), [_seq()])
    assert sample(torch.zeros(0, VOCAB), []) == []
