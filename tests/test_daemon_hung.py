"""A daemon stopped with SIGSTOP keeps its connections open; heartbeats find it, the swarm re-plans without it,
and it rejoins as soon as it resumes. The same for a stopped coordinator."""

from __future__ import annotations

import os
import signal
import time

import pytest
import trio

from hexgen.daemon.generate_protocol import generate
from hexgen.daemon.host import HostConfig
from hexgen.testing.checkpoints import random_prompts, reference_greedy
from hexgen.testing.daemon_harness import Daemon, Swarm, converged, open_client, serving, wait_until

pytestmark = pytest.mark.trio

DETECT_WITHIN_S = 3.0


@pytest.fixture
def swarm(tmp_path):
    s = Swarm(tmp_path)
    yield s
    for d in s.daemons:  # never leave a stopped process behind
        if d.alive():
            os.kill(d.proc.pid, signal.SIGCONT)
    s.close()


def planned_without(gone: str, ids: set[str]):
    """Every queried daemon adopted one plan for exactly ``ids`` minus ``gone``, with one coordinator among them."""

    def check(view) -> bool:
        states = list(view.values())
        if any(s is None or s["plan"] is None for s in states):
            return False
        plans = {(s["plan"]["term"], s["plan"]["epoch"]) for s in states}
        return (
            len(plans) == 1
            and all(set(s["plan"]["members"]) == ids - {gone} for s in states)
            and len({s["coordinator"] for s in states}) == 1
            and states[0]["coordinator"] != gone
        )

    return check


def detected_at(view, gone: str) -> float:
    """When the first daemon logged that ``gone`` went silent (daemon clock, seconds since the epoch)."""
    times = [
        e["t"]
        for s in view.values()
        if s is not None
        for e in s["events"]
        if e.get("peer") == gone and "heartbeats" in e["text"]
    ]
    assert times, f"no daemon reported {gone} silent"
    return min(times)


async def stop_and_resume(client, daemons: list[Daemon], victim: Daemon) -> float:
    ids = {d.peer_id for d in daemons}
    others = [d for d in daemons if d is not victim]
    stopped = time.time()
    os.kill(victim.proc.pid, signal.SIGSTOP)
    view, _ = await wait_until(client, others, planned_without(victim.peer_id, ids), timeout=20, what="re-planned")
    detection = detected_at(view, victim.peer_id) - stopped
    print(f"detected {victim.name} silent after {detection:.2f} s")
    os.kill(victim.proc.pid, signal.SIGCONT)
    await wait_until(client, daemons, converged(ids), timeout=30, what="rejoined")
    return detection


async def test_stopped_member_and_coordinator_are_detected_and_rejoin(swarm):
    daemons = swarm.start_many(4, gpus=["A100", "H100", "L40", "A6000"])
    ids = {d.peer_id for d in daemons}
    async with open_client() as client:
        view, _ = await wait_until(client, daemons, converged(ids), timeout=30, what="converged")
        coordinator = next(iter(view.values()))["coordinator"]
        member = next(d for d in daemons if d.peer_id != coordinator)
        assert await stop_and_resume(client, daemons, member) < DETECT_WITHIN_S
        view, _ = await wait_until(client, daemons, converged(ids), timeout=30, what="converged")
        leader = next(d for d in daemons if d.peer_id == next(iter(view.values()))["coordinator"])
        assert await stop_and_resume(client, daemons, leader) < DETECT_WITHIN_S
    assert all(d.alive() for d in daemons)


async def test_requests_held_by_a_stopped_peer_move_to_the_others(tmp_path, stories_dir):
    """A stopped daemon keeps its streams open, so a request routed to it would wait for the connection's
    health check (HostConfig.health_check_s twice over) to give up. Once the plan drops the peer, the entry
    takes the hop back and re-submits it elsewhere: every request ends with the reference tokens long before."""
    max_tokens, count = 24, 12
    prompts = random_prompts(count, 512, seed=5, low=3, high=20)
    reference = reference_greedy(stories_dir, prompts, max_tokens)
    swarm = Swarm(tmp_path, model=str(stories_dir))
    try:
        daemons = swarm.start_many(3, gpus=["H100", "A100", "A100"])
        entry, ids = daemons[0], {d.peer_id for d in daemons}
        async with open_client() as client:
            view, _ = await wait_until(client, daemons, serving(ids), timeout=120, what="serving")
            victim = next(d for d in daemons[1:] if view[d.peer_id]["roles"])
            outputs: dict[int, list[int]] = {}
            resubmitted: list[int] = []

            async def one(i: int) -> None:
                out: list[int] = []
                async for frame in generate(client, entry.peer_id, {"tokens": prompts[i], "max_tokens": max_tokens}):
                    assert "error" not in frame, frame
                    if "token" in frame:
                        out.append(frame["token"])
                    elif frame.get("done") and len({hop["epoch"] for hop in frame["served_by"]}) > 1:
                        resubmitted.append(i)
                outputs[i] = out

            stopped = time.time()
            os.kill(victim.proc.pid, signal.SIGSTOP)
            try:
                with trio.fail_after(2 * HostConfig.health_check_s):
                    async with trio.open_nursery() as nursery:
                        for i in range(count):
                            nursery.start_soon(one, i)
                took = time.time() - stopped
            finally:
                os.kill(victim.proc.pid, signal.SIGCONT)
            print(f"{count} requests done {took:.2f} s after the stop; re-submitted: {sorted(resubmitted)}")
            assert [outputs[i] for i in range(count)] == reference
            assert resubmitted, "no request was routed to the stopped peer's replica: the test proved nothing"
            await wait_until(client, daemons, converged(ids), timeout=30, what="rejoined")
    finally:
        for d in swarm.daemons:
            if d.alive():
                os.kill(d.proc.pid, signal.SIGCONT)
        swarm.close()
