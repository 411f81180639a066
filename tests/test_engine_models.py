"""Greedy tokens of the single-process engine equal transformers', token for token."""

from __future__ import annotations

import pytest

from hexgen.engine.llm import LLM
from hexgen.engine.sequence import SamplingParams
from hexgen.testing.checkpoints import TINY_CONFIGS, random_prompts, reference_greedy

STORIES_PROMPTS = ["Once upon a time", "Lily and Tom went to the park.", "The little dog", "One day, a big"]


def test_stories_reference_text(stories_dir):
    llm = LLM(stories_dir)
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=60))[0]
    assert out.prompt_token_ids == [1, 403, 407, 261, 378]
    expected = (
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she "
        "saw a big, red ball. She wanted to play with it, but it was too high. Lily"
    )
    # The README folds the model's newline into a space.
    assert " ".join(("Once upon a time" + out.text).split()) == expected


def test_stories_matches_transformers(stories_dir):
    llm = LLM(stories_dir)
    prompts = [llm.encode(p) for p in STORIES_PROMPTS]
    ours = llm.generate(prompts, SamplingParams(max_tokens=100))
    assert [o.token_ids for o in ours] == reference_greedy(stories_dir, prompts, 100)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_random_weights_match_transformers(tiny_models, name):
    model_dir = tiny_models[name]
    prompts = random_prompts(6, TINY_CONFIGS[name]["vocab_size"], seed=1)
    llm = LLM(model_dir)
    ours = llm.generate(prompts, SamplingParams(max_tokens=40))
    assert [o.token_ids for o in ours] == reference_greedy(model_dir, prompts, 40)
