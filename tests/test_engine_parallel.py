"""TP, PP, TP x PP and disaggregated (prefill TP=2 -> decode PP=2) replicas, served by the daemon's worker
processes (hexgen.testing.replica_driver drives them as the supervisor does), give transformers' greedy
tokens, also with prompts prefilled in chunks."""

from __future__ import annotations

import math

import pytest
import torch

from hexgen.daemon.worker_frames import GenerateFrame, StepFrame
from hexgen.engine.layout import uniform_layout
from hexgen.engine.sequence import SamplingParams
from hexgen.engine.tokenizer import Tokenizer
from hexgen.testing.checkpoints import TINY_CONFIGS, random_prompts, reference_greedy
from hexgen.testing.replica_driver import generate, generate_disaggregated, settings_for, stages, started

# (pp, tp, prefill chunk): pipelines prefill their prompts in chunks of 4 tokens, so a stage takes each
# step's token count from the batch (a random prompt of 40 tokens is ten chunks); tp2 whole prompts
LAYOUTS = {"tp2": (1, 2, 0), "pp2": (2, 1, 4), "tp2xpp2": (2, 2, 4)}
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
    pp, tp, chunk = LAYOUTS[layout]
    params = SamplingParams(max_tokens=max_tokens)
    out = generate(model_dir, uniform_layout(layers, pp, tp), prompts, params, prefill_chunk=chunk)
    assert out == expected


def test_disaggregated_tp2_to_pp2(case):
    """The prefill replica prefills in chunks of 4 tokens and hands a sequence off only once its prompt is
    whole: a KV handed over any earlier would decode other tokens."""
    model_dir, layers, prompts, max_tokens, expected = case
    out = generate_disaggregated(
        model_dir,
        uniform_layout(layers, 1, 2),
        uniform_layout(layers, 2, 1),
        prompts,
        SamplingParams(max_tokens=max_tokens),
        prefill_chunk=4,
    )
    assert out == expected


@pytest.mark.parametrize("name", ["llama3-rope", "opt-postnorm-proj"])
def test_disaggregated_other_configs(tiny_models, name):
    model_dir, layers, prompts, max_tokens, expected = _random_case(tiny_models, name)
    prefill = uniform_layout(layers, 2, 2)
    decode = uniform_layout(layers, 1, 2)
    out = generate_disaggregated(model_dir, prefill, decode, prompts, SamplingParams(max_tokens=max_tokens))
    assert out == expected


CHUNK = 8  # the 45-token prompt below takes at least six steps


@pytest.fixture(scope="module")
def chunked_case(stories_dir):
    """A prompt longer than several chunks and a short one (stories260K), and transformers' tokens."""
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (45, 6)]
    return prompts, reference_greedy(stories_dir, prompts, 20)


def test_decode_keeps_stepping_while_a_long_prompt_is_chunked(stories_dir, chunked_case):
    """A short and a long request arrive together (one write): the short prompt fits the first step and
    decodes from the next, one token every step while the long prompt is prefilled in chunks; the long
    request gets no token until its prompt is whole."""
    (long, short), (long_expected, short_expected) = chunked_case
    settings, _ = settings_for(stories_dir, prefill_chunk=CHUNK)
    params = SamplingParams(max_tokens=20)
    with started(settings, [("colocated", stages(uniform_layout(5, 1, 1)))], 120.0) as (workers, deployment):
        driver = workers.driver(deployment.replicas[0])
        driver.channel.send_all(
            [GenerateFrame(1, tuple(short), params).to_wire(), GenerateFrame(0, tuple(long), params).to_wire()]
        )
        steps: list[dict[int, int]] = []  # each step's tokens by request id
        for _, frame in workers.frames():
            if isinstance(frame, StepFrame):
                steps.append({token.id: token.token for token in frame.tokens})
                if sum(0 in step for step in steps) == len(long_expected):
                    break
        workers.shutdown(10.0)
    first_long = next(i for i, step in enumerate(steps) if 0 in step)
    assert first_long >= math.ceil(len(long) / CHUNK), "the long prompt was prefilled in fewer steps than chunks"
    assert all(1 in step for step in steps[: first_long + 1]), "a step ran without the decoding request"
    assert [step[1] for step in steps if 1 in step] == short_expected
    assert [step[0] for step in steps if 0 in step] == long_expected
