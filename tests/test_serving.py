"""Serving across the swarm: real daemons, real worker processes (gloo), stories260K against transformers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from hexgen.daemon.generate_protocol import GENERATE_PROTOCOL, GenerateDone, GenerateError, GenerateToken, replies
from hexgen.daemon.hop import REPLICA_PROTOCOL, HopError, HopRequest, event_from_wire
from hexgen.daemon.wire import FrameReader, encode_frame
from hexgen.engine.sequence import SamplingParams
from hexgen.testing.checkpoints import random_prompts, reference_greedy
from hexgen.testing.daemon_harness import Swarm, descendants, open_client, serving, wait_until, zombie

pytestmark = pytest.mark.trio

GPUS = ["H100", "A100", "L40", "A6000"]
MAX_TOKENS = 24


@pytest.fixture
def swarm(tmp_path, stories_dir):
    s = Swarm(tmp_path, model=str(stories_dir))
    yield s
    s.close()


@pytest.fixture(scope="module")
def prompts_and_reference(stories_dir) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [[1, 403, 407, 261, 378], *random_prompts(49, 512, seed=11, low=3, high=30)]
    return prompts, reference_greedy(stories_dir, prompts, MAX_TOKENS)


async def complete(client: Any, peer_id: str, tokens: list[int]) -> list[int]:
    out: list[int] = []
    with trio.fail_after(120):
        async for reply in replies(client, peer_id, {"tokens": tokens, "max_tokens": MAX_TOKENS}):
            assert not isinstance(reply, GenerateError), reply
            if isinstance(reply, GenerateToken):
                out.append(reply.token)
            elif isinstance(reply, GenerateDone):
                assert reply.completion_tokens == len(out)
    return out


@pytest.fixture(scope="module")
def four(tmp_path_factory, stories_dir):
    """Four daemons with simulated H100, A100, L40 and A6000 serving stories260K as the planner decides."""
    s = Swarm(tmp_path_factory.mktemp("four"), model=str(stories_dir))
    try:
        yield s.start_many(4, gpus=GPUS)
    finally:
        s.close()


async def stream(
    client: Any, peer_id: str, tokens: list[int], max_tokens: int, at_third: Callable[[], object]
) -> list[int]:
    """The tokens of one streamed request; ``at_third`` runs once the third token has arrived (mid-request)."""
    out: list[int] = []
    with trio.fail_after(180):
        async for reply in replies(client, peer_id, {"tokens": tokens, "max_tokens": max_tokens}):
            assert not isinstance(reply, GenerateError), reply
            if isinstance(reply, GenerateToken):
                out.append(reply.token)
                if len(out) == 3:
                    at_third()
    return out


async def test_four_heterogeneous_daemons_serve_reference_tokens(four, prompts_and_reference):
    prompts, reference = prompts_and_reference
    daemons = four
    ids = {d.peer_id for d in daemons}
    async with open_client() as client:
        await wait_until(client, daemons, serving(ids), timeout=120, what="serving")
        for i, prompt in enumerate(prompts[:20]):
            entry = daemons[i % len(daemons)]
            assert await complete(client, entry.peer_id, prompt) == reference[i], f"prompt {i} via {entry.name}"
        results: dict[int, list[int]] = {}

        async def one(i: int) -> None:
            results[i] = await complete(client, daemons[i % len(daemons)].peer_id, prompts[i])

        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(one, i)
        assert [results[i] for i in range(len(prompts))] == reference


async def test_bad_requests_and_cancellation_harm_no_other_work(four, prompts_and_reference):
    prompts, reference = prompts_and_reference
    daemons = four
    ids = {d.peer_id for d in daemons}
    target = daemons[1]
    async with open_client() as client:
        await wait_until(client, daemons, serving(ids), timeout=120, what="serving")
        bad_requests = [
            {"tokens": []},
            {"tokens": [1, 2], "max_tokens": -3},
            {"prompt": 17},
            {"tokens": [1] * 600, "max_tokens": 4},
            {"tokens": [1, 2], "unknown": 1},
        ]
        for request in bad_requests:
            answers = [reply async for reply in replies(client, target.peer_id, request)]
            assert len(answers) == 1 and isinstance(answers[0], GenerateError), (request, answers)
        raw = [os.urandom(64), struct.pack(">I", 1 << 30), encode_frame([1, 2]), b""]
        for protocol in (GENERATE_PROTOCOL, REPLICA_PROTOCOL):
            for payload in [
                *raw,
                encode_frame({"id": 1, "term": 1, "epoch": 1, "replica": 99, "tokens": [1], "sampling": {}}),
            ]:
                stream = await client.open_stream(target.peer_id, protocol)
                with trio.fail_after(15):
                    if payload:
                        await stream.write(payload)
                    await stream.close()
                    with contextlib.suppress(Exception):
                        await FrameReader(stream).read()
        # well-formed hops that do not fit the plan are refused before they reach a worker
        view, _ = await wait_until(client, daemons, serving(ids), timeout=30, what="serving")
        plan = view[target.peer_id]["plan"]
        local = next(iter(view[target.peer_id]["serving"]["workers"].values()))["replica"]
        hop = HopRequest(5, plan["term"], plan["epoch"], local, (1, 2), SamplingParams(max_tokens=2), src=local)
        stream = await client.open_stream(target.peer_id, REPLICA_PROTOCOL)
        with trio.fail_after(15):
            await stream.write(encode_frame(hop.to_wire()))
            refusal = event_from_wire(await FrameReader(stream).read())
            assert isinstance(refusal, HopError) and "import goes to a decode replica" in refusal.error
        # a client that walks away mid-stream: its work is freed everywhere
        with trio.fail_after(60):
            async for reply in replies(client, target.peer_id, {"tokens": prompts[0], "max_tokens": 400}):
                if isinstance(reply, GenerateToken):
                    break
        await wait_until(
            client,
            daemons,
            lambda view: all(s is not None and s["serving"]["in_flight"] == 0 for s in view.values()),
            timeout=30,
            what="every request freed",
        )
        assert await complete(client, target.peer_id, prompts[1]) == reference[1]


def prefill_on_n0_n1(decode_stages: str) -> str:
    """A pinned layout: TP=2 prefill on n0 and n1, and one decode group of the given stages."""
    return (
        '[[groups]]\nrole = "prefill"\nstages = [{ gpus = ["n0", "n1"], layers = [0, 5] }]\n\n'
        f'[[groups]]\nrole = "decode"\nstages = [{decode_stages}]\n'
    )


PINNED = prefill_on_n0_n1('{ gpus = ["n2"], layers = [0, 3] }, { gpus = ["n3"], layers = [3, 5] }')


async def test_prefill_and_decode_sharded_differently(swarm, prompts_and_reference, tmp_path):
    """TP=2 prefill hands every sequence's KV to a PP=2 decode group on other daemons."""
    prompts, reference = prompts_and_reference
    pinned = tmp_path / "pinned.toml"
    pinned.write_text(PINNED)
    daemons = swarm.start_many(4, gpus=GPUS, extra=["--pin-plan", str(pinned)])
    ids = {d.peer_id for d in daemons}
    async with open_client() as client:
        statuses, _ = await wait_until(client, daemons, serving(ids), timeout=120, what="serving")
        plan = next(iter(statuses.values()))["plan"]["body"]["plan"]
        assert [(g["role"], [len(s["gpus"]) for s in g["stages"]]) for g in plan["groups"]] == [
            ("prefill", [2]),
            ("decode", [1, 1]),
        ]
        results: dict[int, list[int]] = {}

        async def one(i: int) -> None:
            results[i] = await complete(client, daemons[i % len(daemons)].peer_id, prompts[i])

        for i in range(4):
            await one(i)
        async with trio.open_nursery() as nursery:
            for i in range(4, 20):
                nursery.start_soon(one, i)
        assert [results[i] for i in range(20)] == reference[:20]


async def test_worker_killed_mid_request_still_gives_reference_tokens(swarm, stories_dir, tmp_path):
    """The decode group's driver is SIGKILLed while it streams; the entry re-submits prompt plus the tokens
    so far, the coordinator rebuilds the world in a new epoch, and the client's stream completes exactly."""
    long = 200
    prompt = [1, 403, 407, 261, 378]
    (expected,) = reference_greedy(stories_dir, [prompt], long)
    pinned = tmp_path / "pinned.toml"
    pinned.write_text(PINNED)
    daemons = swarm.start_many(4, gpus=GPUS, extra=["--pin-plan", str(pinned)])
    ids = {d.peer_id for d in daemons}
    async with open_client() as client:
        statuses, _ = await wait_until(client, daemons, serving(ids), timeout=120, what="serving")
        epoch = next(iter(statuses.values()))["plan"]["epoch"]
        victim = statuses[daemons[3].peer_id]["serving"]["workers"]
        (pid,) = [w["pid"] for w in victim.values()]
        out = await stream(client, daemons[0].peer_id, prompt, long, at_third=lambda: os.kill(pid, signal.SIGKILL))
        assert out == expected
        after, _ = await wait_until(client, daemons, serving(ids), timeout=60, what="serving again")
        assert next(iter(after.values()))["plan"]["epoch"] > epoch, "the failure should have rebuilt the world"


async def test_nodes_serving_another_model_are_not_members(swarm, stories_dir, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(stories_dir, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps(config | {"rope_theta": 20000.0}))
    first = swarm.start("n0", gpu="A100")
    other = swarm.start("n1", gpu="L40", bootstrap=[first.addr], extra=["--model", str(changed)])
    async with open_client() as client:

        def apart(view) -> bool:
            return all(
                s is not None and s["members"] == [pid] and s["rejections"].get("model-mismatch", 0) > 0
                for pid, s in view.items()
            )

        await wait_until(client, [first, other], apart, timeout=30, what="refusing each other's model")


PINNED_THREE = prefill_on_n0_n1('{ gpus = ["n2"], layers = [0, 5] }')


async def test_unchanged_groups_keep_serving_across_a_new_epoch(swarm, stories_dir, tmp_path):
    """A node joins (it is not in the pinned layout): the plan's epoch moves on, every worker carries on in
    the new epoch's exchange group, and a request decoding meanwhile finishes without a re-submission."""
    long = 200
    prompt = [1, 403, 407, 261, 378]
    (expected,) = reference_greedy(stories_dir, [prompt], long)
    pinned = tmp_path / "pinned.toml"
    pinned.write_text(PINNED_THREE)
    daemons = swarm.start_many(3, gpus=GPUS, extra=["--pin-plan", str(pinned)])
    async with open_client() as client:
        before, _ = await wait_until(client, daemons, serving({d.peer_id for d in daemons}), 120, "serving")
        epoch = next(iter(before.values()))["plan"]["epoch"]
        formed = {pid: [w["formed"] for w in s["serving"]["workers"].values()] for pid, s in before.items()}
        extra = ["--pin-plan", str(pinned)]
        out = await stream(
            client,
            daemons[0].peer_id,
            prompt,
            long,
            at_third=lambda: daemons.append(swarm.start("n3", gpu="A6000", bootstrap=[daemons[0].addr], extra=extra)),
        )
        assert out == expected
        after, _ = await wait_until(client, daemons, serving({d.peer_id for d in daemons}), 60, "serving with n3")
        assert next(iter(after.values()))["plan"]["epoch"] > epoch
        assert {pid: [w["formed"] for w in after[pid]["serving"]["workers"].values()] for pid in formed} == formed
        assert "re-submitted" not in daemons[0].log()
        prompts = random_prompts(6, 512, seed=5)
        for p, ref in zip(prompts, reference_greedy(stories_dir, prompts, MAX_TOKENS), strict=True):
            assert await complete(client, daemons[3].peer_id, p) == ref


async def test_no_process_outlives_a_killed_daemon(swarm):
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("this kernel does not list /proc/PID/task/TID/children")
    daemon = swarm.start("n0", gpu="A100")
    async with open_client() as client:
        await wait_until(client, [daemon], serving({daemon.peer_id}), timeout=120, what="serving")
    below = descendants(daemon.proc.pid)
    assert len(below) >= 2, "a serving daemon runs at least a worker and a store"
    swarm.kill(daemon)
    with trio.fail_after(30):
        while left := {pid for pid in below if Path(f"/proc/{pid}").exists() and not zombie(pid)}:
            await trio.sleep(0.1)
    assert not left
