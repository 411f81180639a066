"""TP, PP, TP x PP and disaggregated (prefill TP=2 -> decode PP=2) replicas, served by the daemon's worker
processes (hexgen.testing.replica_driver drives them as the supervisor does), give transformers' greedy
tokens."""

from __future__ import annotations

import pytest

from hexgen.engine.layout import uniform_layout
from hexgen.engine.sequence import SamplingParams
from hexgen.engine.tokenizer import Tokenizer
from hexgen.testing.checkpoints import TINY_CONFIGS, random_prompts, reference_greedy
from hexgen.testing.replica_driver import generate, generate_disaggregated

LAYOUTS = {"tp2": (1, 2), "pp2": (2, 1), "tp2xpp2": (2, 2)}
STORIES_PROMPTS = ["Once upon a time", "The little dog", "One day, a big"]


@pytest.fixture(scope="module")
def stories_case(stories_dir):
    prompts = [Tokenizer.from_dir(stories_dir).encode(p) for p in STORIES_PROMPTS]
    return stories_dir, 5, prompts, 100, reference_greedy(stories_dir, prompts, 100)


def _random_case(tiny_models, name: str, layers: int = 4):
    model_dir = tiny_models[name]
    prompts = random_prompts(3, TINY_CONFIGS[name]["vocab_size"], seed=7)
    return model_dir, layers, prompts, 24, reference_greedy(model_dir, prompts, 24)


@pytest.fixture(scope="module", params=["stories", "llama-gqa", "opt"])
def case(request, tiny_models):
    if request.param == "stories":
        return request.getfixturevalue("stories_case")
    return _random_case(tiny_models, request.param)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parallel_layouts(case, layout):
    model_dir, layers, prompts, max_tokens, expected = case
    pp, tp = LAYOUTS[layout]
    out = generate(model_dir, uniform_layout(layers, pp, tp), prompts, SamplingParams(max_tokens=max_tokens))
    assert out == expected


def test_disaggregated_tp2_to_pp2(case):
    model_dir, layers, prompts, max_tokens, expected = case
    out = generate_disaggregated(
        model_dir,
        uniform_layout(layers, 1, 2),
        uniform_layout(layers, 2, 1),
        prompts,
        SamplingParams(max_tokens=max_tokens),
    )
    assert out == expected


@pytest.mark.parametrize("name", ["llama3-rope", "opt-postnorm-proj"])
def test_disaggregated_other_configs(tiny_models, name):
    model_dir, layers, prompts, max_tokens, expected = _random_case(tiny_models, name)
    prefill = uniform_layout(layers, 2, 2)
    decode = uniform_layout(layers, 1, 2)
    out = generate_disaggregated(model_dir, prefill, decode, prompts, SamplingParams(max_tokens=max_tokens))
    assert out == expected
