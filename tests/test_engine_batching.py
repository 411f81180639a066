"""Continuous batching: requests arriving over time, and a cache small enough to force preemption, give
the same tokens as each request run alone."""

from __future__ import annotations

import random

from hexgen.engine.llm import LLM
from hexgen.engine.model_runner import CacheConfig
from hexgen.engine.sequence import SamplingParams, Sequence
from hexgen.testing.checkpoints import random_prompts

VOCAB = 251


def _workload(seed: int) -> tuple[list[list[int]], list[SamplingParams], list[int]]:
    rng = random.Random(seed)
    prompts = random_prompts(32, VOCAB, seed=seed, low=2, high=60)
    params = [SamplingParams(max_tokens=rng.randint(1, 40)) for _ in prompts]
    arrival_steps = sorted(rng.randint(0, 60) for _ in prompts)
    return prompts, params, arrival_steps


def _alone(model_dir, prompts, params) -> list[list[int]]:
    llm = LLM(model_dir)
    return [llm.generate([p], s)[0].token_ids for p, s in zip(prompts, params, strict=True)]


def _over_time(llm: LLM, prompts, params, arrival_steps) -> list[list[int]]:
    seqs = []
    step = 0
    pending = list(zip(arrival_steps, prompts, params, strict=True))
    while pending or llm.has_unfinished():
        while pending and pending[0][0] <= step:
            _, prompt, sampling = pending.pop(0)
            seqs.append(llm.add_request(prompt, sampling))
        llm.step()
        step += 1
    return [seq.completion_token_ids for seq in seqs]


def test_arrivals_over_time_match_running_alone(tiny_models):
    model_dir = tiny_models["llama-gqa"]
    prompts, params, arrivals = _workload(seed=3)
    llm = LLM(model_dir, max_num_seqs=16, max_num_batched_tokens=256)
    assert _over_time(llm, prompts, params, arrivals) == _alone(model_dir, prompts, params)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_preemption_keeps_tokens(tiny_models):
    model_dir = tiny_models["opt"]
    prompts, params, _ = _workload(seed=4)
    small = CacheConfig(block_size=8, num_blocks=24)
    llm = LLM(model_dir, cache=small, max_num_batched_tokens=512)
    assert _over_time(llm, prompts, params, [0] * len(prompts)) == _alone(model_dir, prompts, params)
    assert llm.scheduler.num_preemptions > 0
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_seeded_sampling_survives_preemption(tiny_models):
    model_dir = tiny_models["llama-gqa"]
    prompts = random_prompts(12, VOCAB, seed=5, low=10, high=40)
    params = [SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, top_k=50, seed=i) for i in range(len(prompts))]
    roomy = LLM(model_dir).generate(prompts, params)
    tight = LLM(model_dir, cache=CacheConfig(block_size=8, num_blocks=16))
    squeezed = tight.generate(prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in roomy]


def test_shared_prefix_blocks_give_the_same_tokens(tiny_models):
    """A sequence that reuses another's full KV blocks prefills only its suffix, attending to the shared prefix."""
    model_dir = tiny_models["llama-gqa"]
    prefix = random_prompts(1, VOCAB, seed=9, low=32, high=33)[0]
    prompt = [*prefix, 7, 8, 9, 10, 11]
    expected = LLM(model_dir).generate([prompt], SamplingParams(max_tokens=20))[0].token_ids
    llm = LLM(model_dir, cache=CacheConfig(block_size=16, num_blocks=64))
    owner = llm.add_request(prefix, SamplingParams(max_tokens=1))
    llm.step()
    assert owner.finished
    owner_blocks = Sequence(prefix)
    llm.block_manager.allocate(owner_blocks)
    # Fill the owner's blocks again with the prefix's KV, then hand the full blocks to the new sequence.
    llm.runner.run([owner_blocks], is_prefill=True)
    sharer = Sequence(list(prompt), SamplingParams(max_tokens=20))
    llm.block_manager.share(owner_blocks, sharer, 32)
    llm.scheduler.add(sharer)
    while llm.has_unfinished():
        llm.step()
    assert sharer.num_prompt_tokens == len(prompt)
    assert sharer.completion_token_ids == expected
