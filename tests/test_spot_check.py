"""Result spot-checks: the verdict logic on its own, then a swarm where one daemon flips the tokens it returns
and the entry's spot-checks flag it, after which the coordinator plans without it."""

from __future__ import annotations

import pytest
import trio

from hexgen.daemon import spot_check
from hexgen.daemon.deployment import Deployment, Replica
from hexgen.daemon.generate_protocol import generate
from hexgen.daemon.swarm_view import wire_assignments
from hexgen.engine.sequence import SamplingParams
from hexgen.testing.checkpoints import random_prompts, reference_greedy
from hexgen.testing.daemon_harness import Swarm, open_client, serving, statuses, wait_until

TRUTH, LIE = [5, 6, 7], [6, 7, 8]


def replica(index: int, role: str, peer: str) -> Replica:
    return Replica(index, index, role, ((0, 5, 1),), index, ((peer, 0),))


def deployment(*replicas: Replica, hand_off: dict[int, tuple[tuple[int, float], ...]] | None = None) -> Deployment:
    entry = tuple((r.index, 1.0) for r in replicas if r.role != "decode")
    return Deployment(1, 1, replicas, entry, hand_off or {}, ("127.0.0.1", 1), ())


def colocated(*peers: str) -> Deployment:
    return deployment(*(replica(i, "colocated", p) for i, p in enumerate(peers)))


def runner(answers: dict[str, list[int]], asked: list[str]):
    async def run(route: spot_check.Route) -> list[int]:
        (peer,) = route.peers
        asked.append(peer)
        return answers[peer]

    return run


def judge(world: Deployment, served: str, produced: list[int], answers: dict[str, list[int]]) -> tuple:
    asked: list[str] = []
    verdict = trio.run(spot_check.check, world, frozenset({served}), produced, runner(answers, asked))
    return verdict.outcome, set(verdict.accused), asked


def test_agreement_asks_one_other_route():
    assert judge(colocated("a", "b", "c"), "a", TRUTH, {"b": TRUTH, "c": TRUTH}) == ("agreed", set(), ["b"])


def test_the_outvoted_route_is_accused_whichever_answered_first():
    assert judge(colocated("a", "b", "c"), "a", LIE, {"b": TRUTH, "c": TRUTH}) == ("accused", {"a"}, ["b", "c"])
    assert judge(colocated("a", "b", "c"), "a", TRUTH, {"b": LIE, "c": TRUTH}) == ("accused", {"b"}, ["b", "c"])


def test_no_tie_breaker_or_three_answers_accuse_nobody():
    assert judge(colocated("a", "b"), "a", LIE, {"b": TRUTH})[:2] == ("undecided", set())
    assert judge(colocated("a", "b", "c"), "a", [1], {"b": [2], "c": [3]})[:2] == ("undecided", set())
    assert judge(colocated("a"), "a", TRUTH, {})[:2] == ("unchecked", set())


def test_routes_pair_prefill_with_its_decode_replicas_and_skip_shared_peers():
    world = deployment(
        replica(0, "prefill", "a"),
        replica(1, "decode", "b"),
        replica(2, "decode", "c"),
        replica(3, "colocated", "b"),
        hand_off={0: ((1, 1.0), (2, 1.0))},
    )
    routes = spot_check.routes(world)
    assert [(r.entry, r.dst, set(r.peers)) for r in routes] == [
        (0, 1, {"a", "b"}),
        (0, 2, {"a", "c"}),
        (3, None, {"b"}),
    ]
    assert spot_check.disjoint(routes, frozenset({"a"})) == routes[2]
    assert spot_check.disjoint(routes, frozenset({"b"})) == routes[1]
    assert spot_check.disjoint(routes, frozenset({"a", "b"})) is None


def test_only_deterministic_requests_are_checked():
    assert spot_check.checkable(SamplingParams(temperature=0.0))
    assert spot_check.checkable(SamplingParams(temperature=0.8, seed=3))
    assert not spot_check.checkable(SamplingParams(temperature=0.8))


@pytest.mark.trio
@pytest.mark.timeout(300)
async def test_a_peer_that_flips_tokens_is_flagged_and_planned_without(tmp_path, stories_dir):
    """Four daemons serve stories260K, each GPU its own replica; n3 answers replica hops with every token plus
    one. The entry n0 spot-checks every request: the first check n3 takes part in, as the route that served or
    as the one re-running it, outvotes n3 two to one; n3 is flagged in every daemon's status, and the next plan
    gives it no GPU; requests then get the reference tokens."""
    max_tokens = 12
    prompts = random_prompts(60, 512, seed=11, low=3, high=20)
    reference = reference_greedy(stories_dir, prompts, max_tokens)
    swarm = Swarm(tmp_path, model=str(stories_dir))
    try:
        first = swarm.start("n0", gpu="H100", extra=["--verify-fraction", "1"])
        others = [swarm.start(f"n{i}", bootstrap=[first.addr], gpu="A100") for i in (1, 2)]
        liar = swarm.start("n3", bootstrap=[first.addr], gpu="A100", extra=["--tamper-tokens"])
        daemons = [first, *others, liar]
        ids = {d.peer_id for d in daemons}
        async with open_client() as client:
            view, _ = await wait_until(client, daemons, serving(ids), timeout=120, what="serving")
            body = next(iter(view.values()))["plan"]["body"]
            assert liar.peer_id in wire_assignments(body), "the liar should serve a replica before it is caught"

            async def ask(i: int) -> list[int]:
                request = {"tokens": prompts[i], "max_tokens": max_tokens}
                with trio.fail_after(60):
                    return [f["token"] async for f in generate(client, first.peer_id, request) if "token" in f]

            for i in range(len(prompts)):
                await ask(i)
                entry = (await statuses(client, [first]))[first.peer_id] or {}
                if liar.peer_id in entry.get("flagged", {}):
                    break
            assert liar.peer_id in entry.get("flagged", {}), entry.get("spot_checks")
            assert entry["spot_checks"].get("accused", 0) >= 1

            def without_liar(view) -> bool:
                states = [s for s in view.values() if s is not None]
                return (
                    serving(ids)(view)
                    and all(liar.peer_id in s["flagged"] for s in states)
                    and liar.peer_id not in wire_assignments(states[0]["plan"]["body"])
                )

            await wait_until(client, daemons, without_liar, timeout=60, what="re-planned without the liar")
            assert [await ask(i) for i in range(6)] == reference[:6]
    finally:
        swarm.close()
