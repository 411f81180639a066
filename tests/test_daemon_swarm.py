"""Real daemons as separate processes on loopback: membership, election, failover, joins and leaves."""

from __future__ import annotations

import pytest
import trio

from hexgen.daemon.rpc import query_status
from hexgen.testing.daemon_harness import Swarm, converged, open_client, wait_until

pytestmark = pytest.mark.trio


@pytest.fixture
def swarm(tmp_path):
    s = Swarm(tmp_path)
    yield s
    s.close()


async def test_five_daemons_agree_on_one_coordinator_and_one_plan(swarm):
    daemons = swarm.start_many(5, gpus=["A100", "H100", "L40x2", "A6000x2", "A100x2"])
    ids = {d.peer_id for d in daemons}
    async with open_client() as client:
        statuses, _ = await wait_until(client, daemons, converged(ids), timeout=30, what="converged")
        brief = await query_status(client, daemons[0].peer_id, {"brief": True})
    view = next(iter(statuses.values()))
    assert view["coordinator"] in ids
    full = statuses[daemons[0].peer_id]
    assert brief == {k: full[k] for k in brief} | {"plan": {k: full["plan"][k] for k in brief["plan"]}}
    assert set(brief) == {"peer_id", "coordinator", "term", "is_coordinator", "members", "plan"}
    assert set(brief["plan"]) == {"term", "epoch", "coordinator", "members"}
    body = view["plan"]["body"]
    assert body["error"] is None and body["plan"]["groups"], "the plan should place the 7B model on these GPUs"
    placed = {
        body["gpus"][str(g)][0] for group in body["plan"]["groups"] for stage in group["stages"] for g in stage["gpus"]
    }
    assert placed <= ids


async def test_failover_join_and_clean_leave(swarm):
    # A long peer timeout: a clean leave must show at once, not when the timeout fires.
    extra = ["--peer-timeout", "60"]
    first = swarm.start("n0", gpu="A100", extra=extra)
    daemons = [first] + [swarm.start(f"n{i}", bootstrap=[first.addr], gpu="A100", extra=extra) for i in range(1, 4)]
    ids = {d.peer_id for d in daemons}
    async with open_client() as client:
        statuses, _ = await wait_until(client, daemons, converged(ids), timeout=30, what="converged")
        old = next(iter(statuses.values()))
        coordinator = next(d for d in daemons if d.peer_id == old["coordinator"])

        swarm.kill(coordinator)
        daemons.remove(coordinator)
        ids.discard(coordinator.peer_id)
        statuses, failover_s = await wait_until(client, daemons, converged(ids), timeout=15, what="failed over")
        new = next(iter(statuses.values()))
        assert new["coordinator"] != coordinator.peer_id
        assert new["term"] > old["term"] and new["plan"]["epoch"] > old["plan"]["epoch"]
        assert failover_s < 5.0

        anchor = daemons[0]
        joiner = swarm.start("n9", bootstrap=[anchor.addr], gpu="H100", extra=extra)
        daemons.append(joiner)
        ids.add(joiner.peer_id)
        statuses, _ = await wait_until(client, daemons, converged(ids), timeout=15, what="replanned with the joiner")
        assert any(v[0] == joiner.peer_id for v in next(iter(statuses.values()))["plan"]["body"]["gpus"].values())

        leaver = next(d for d in daemons if d.peer_id != new["coordinator"])
        with trio.fail_after(15):
            assert await trio.to_thread.run_sync(swarm.stop, leaver) == 0
        daemons.remove(leaver)
        ids.discard(leaver.peer_id)
        _, leave_s = await wait_until(client, daemons, converged(ids), timeout=10, what="replanned without the leaver")
        assert leave_s < 5.0, "a clean leave must not wait for the 60 s peer timeout"


async def test_links_are_probed_and_reach_the_coordinator(swarm):
    extra = ["--probe-interval", "0.5"]
    first = swarm.start("n0", gpu="A100", extra=extra)
    daemons = [first] + [swarm.start(f"n{i}", bootstrap=[first.addr], gpu="L40", extra=extra) for i in (1, 2)]
    ids = {d.peer_id for d in daemons}

    def every_pair_measured(statuses) -> bool:
        if not converged(ids)(statuses):
            return False
        coordinator = next(iter(statuses.values()))["coordinator"]
        links = statuses[coordinator]["links"]
        pairs = {frozenset((m["a"], m["b"])) for m in links if m["gb_s"] > 0 and m["rtt_ms"] > 0}
        return len(pairs) == 3

    def over_tcp(statuses) -> bool:  # directly linked daemons probe the path their workers' gloo takes
        coordinator = next(iter(statuses.values()))["coordinator"]
        return {m["path"] for m in statuses[coordinator]["links"]} == {"tcp"}

    async with open_client() as client:
        statuses, _ = await wait_until(client, daemons, every_pair_measured, timeout=30, what="probed every link")
        assert over_tcp(statuses), [m for s in statuses.values() if s for m in s["links"]]
