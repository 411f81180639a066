"""Serving across the swarm: real daemons, real worker processes (gloo), stories260K against transformers."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import trio
from checkpoints import random_prompts, reference_greedy
from daemon_harness import Swarm, converged, open_client, wait_until

from hexgen.daemon.router import generate

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


def serving(ids: set[str]):
    """Converged, and every worker of the adopted epoch is ready."""
    agreed = converged(ids)

    def check(statuses) -> bool:
        if not agreed(statuses):
            return False
        epochs = {s["plan"]["epoch"] for s in statuses.values()}
        return all(
            s["serving"]["epoch"] in epochs and all(w["state"] == "ready" for w in s["serving"]["workers"].values())
            for s in statuses.values()
        )

    return check


async def complete(client: Any, peer_id: str, tokens: list[int]) -> list[int]:
    out: list[int] = []
    with trio.fail_after(120):
        async for frame in generate(client, peer_id, {"tokens": tokens, "max_tokens": MAX_TOKENS}):
            assert "error" not in frame, frame
            if "token" in frame:
                out.append(frame["token"])
            elif frame.get("done"):
                assert frame["completion_tokens"] == len(out)
    return out


async def test_four_heterogeneous_daemons_serve_reference_tokens(swarm, prompts_and_reference):
    prompts, reference = prompts_and_reference
    daemons = swarm.start_many(4, gpus=GPUS)
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


PINNED = """
[[groups]]
role = "prefill"
stages = [{ gpus = ["n0", "n1"], layers = [0, 5] }]

[[groups]]
role = "decode"
stages = [{ gpus = ["n2"], layers = [0, 3] }, { gpus = ["n3"], layers = [3, 5] }]
"""


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
        out: list[int] = []
        with trio.fail_after(180):
            async for frame in generate(client, daemons[0].peer_id, {"tokens": prompt, "max_tokens": long}):
                assert "error" not in frame, frame
                if "token" in frame:
                    out.append(frame["token"])
                    if len(out) == 3:
                        os.kill(pid, signal.SIGKILL)
        assert out == expected
        after, _ = await wait_until(client, daemons, serving(ids), timeout=60, what="serving again")
        assert next(iter(after.values()))["plan"]["epoch"] > epoch, "the failure should have rebuilt the world"
