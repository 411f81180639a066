"""A network partition: six daemons in network namespaces, three on each side of a cable that the test cuts
and reconnects. Each side keeps a coordinator and a plan for its own members while cut off, and once
healed the swarm settles on one coordinator and one plan, with no two coordinators' plans in conflict."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from hexgen.testing.daemon_harness import Daemon, converged, open_client, statuses, wait_until
from hexgen.testing.netns import Lab, Namespace, open_lab, start_daemon, started_daemons

pytestmark = pytest.mark.trio

GPUS = ("A100", "H100", "L40")  # per side
CONVERGE_S = 40.0
SPLIT_S = 30.0
HEAL_S = 40.0
PLAN_TEXT = re.compile(r"(published|adopted) plan epoch \d+ of term \d+ \((\d+) members\)")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with open_lab(per_side=3) as lab:
        yield lab


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """The started daemons, killed at teardown (before ``lab`` removes their namespaces)."""
    with started_daemons() as started:
        yield started


def start_swarm(lab: Lab, root: Path, started: list[Daemon]) -> dict[str, list[Daemon]]:
    """One daemon per namespace, all bootstrapped from the first; the rest start in parallel (python's start-up
    is most of it). Returns side -> daemons."""
    spaces = lab.namespaces
    first = start_daemon(spaces[0], root, "a1", gpu=GPUS[0])
    started.append(first)

    def one(ns: Namespace) -> Daemon:
        name = f"{ns.side.lower()}{(ns.index - 1) % lab.per_side + 1}"
        return start_daemon(ns, root, name, bootstrap=[first.addr], gpu=GPUS[(ns.index - 1) % len(GPUS)])

    with ThreadPoolExecutor(len(spaces) - 1) as pool:
        futures = [pool.submit(one, ns) for ns in spaces[1:]]
        for future in futures:  # record every one that started before raising for any that did not
            if future.exception() is None:
                started.append(future.result())
        for future in futures:
            future.result()
    by_ns = dict(zip(spaces, started, strict=True))
    return {side: [by_ns[ns] for ns in lab.side(side)] for side in ("A", "B")}


def own_plan(view: dict[str, Any], ids: set[str]) -> bool:
    """Every daemon of ``view`` (one side) adopted one plan for exactly ``ids`` from one coordinator, one of
    ``ids``. Plans, not peer tables: only the coordinator watches members, so the members on its side keep
    the other side in their tables while cut off, and those entries change no plan."""
    states = list(view.values())
    if any(s is None or s["plan"] is None for s in states):
        return False
    plans = {(s["plan"]["term"], s["plan"]["epoch"], s["plan"]["coordinator"]) for s in states}
    return (
        len(plans) == 1
        and all(set(s["plan"]["members"]) == ids for s in states)
        and {s["coordinator"] for s in states} == {states[0]["plan"]["coordinator"]}
        and states[0]["plan"]["coordinator"] in ids
    )


async def wait_split(client: Any, sides: dict[str, list[Daemon]]) -> tuple[dict[str, Any], dict[str, float]]:
    """Poll until both sides hold their own plan at once; returns the last view and, per side, the seconds
    until it first did."""
    everyone = [d for ds in sides.values() for d in ds]
    start, first = time.monotonic(), {}
    view: dict[str, Any] = {}
    with trio.move_on_after(SPLIT_S):
        while True:
            view = await statuses(client, everyone)
            holding = []
            for side, ds in sides.items():
                ids = {d.peer_id for d in ds}
                if own_plan({d.peer_id: view[d.peer_id] for d in ds}, ids):
                    first.setdefault(side, time.monotonic() - start)
                    holding.append(side)
            if len(holding) == len(sides):
                return view, first
            await trio.sleep(0.2)
    raise AssertionError(f"the sides did not each plan for themselves within {SPLIT_S} s: {_brief(view)}")


def _brief(view: dict[str, Any]) -> dict[str, Any]:
    return {
        pid[-6:]: s and (len(s["members"]), (s["coordinator"] or "")[-6:], s["term"], s["plan"] and s["plan"]["epoch"])
        for pid, s in view.items()
    }


@dataclass(frozen=True)
class PlanRecord:
    """One ``plan`` event of one daemon, with the coordinator the daemon followed when it logged it."""

    daemon: str
    t: float
    term: int
    epoch: int
    coordinator: str | None
    members: int
    published: bool


def plan_records(daemon: str, events: list[dict[str, Any]]) -> list[PlanRecord]:
    """Replays a daemon's events: ``coordinator`` events name the holder it follows, ``election`` events
    make itself the holder, and a plan is adopted only from the holder (the daemon refuses any other)."""
    holder: str | None = None
    out = []
    for event in events:
        if event["kind"] == "coordinator":
            holder = event["peer"]
        elif event["kind"] == "election":
            holder = daemon
        elif event["kind"] == "plan":
            match = PLAN_TEXT.match(event["text"])
            assert match, event
            published = match.group(1) == "published"
            out.append(
                PlanRecord(
                    daemon,
                    event["t"],
                    event["term"],
                    event["epoch"],
                    daemon if published else holder,
                    int(match.group(2)),
                    published,
                )
            )
    return out


def check_one_plan_wins(view: dict[str, Any], healed_at: float) -> int:
    """The plans published or adopted after the heal (daemon clocks; one machine, one clock) do not conflict.

    A plan is named by its (term, epoch). For every name that any daemon logged at or after ``healed_at``:
    exactly one daemon published a plan of that name over the whole run (two coordinators never publish
    the same name), and every daemon that adopted it attributes it to that publisher with the same member
    count (so a name means one plan everywhere). Per daemon, after the heal, terms never go down and the
    coordinators it follows never come back once left (no flip-flop between two plans: one plan wins).
    Returns how many distinct plans were logged after the heal."""
    records = [r for pid, s in view.items() for r in plan_records(pid, s["events"])]
    late = {(r.term, r.epoch) for r in records if r.t >= healed_at}
    for name in late:
        same = [r for r in records if (r.term, r.epoch) == name]
        publishers = {r.daemon for r in same if r.published}
        assert len(publishers) == 1, f"plan {name} published by {publishers or 'nobody'}"
        assert {(r.coordinator, r.members) for r in same} == {(publishers.pop(), same[0].members)}, same
    for pid in view:
        mine = [r for r in records if r.daemon == pid and r.t >= healed_at]
        terms = [r.term for r in mine]
        assert terms == sorted(terms), f"{pid} went back to an older term after the heal: {mine}"
        followed = [c for i, c in enumerate(r.coordinator for r in mine) if i == 0 or mine[i - 1].coordinator != c]
        assert len(followed) == len(set(followed)), f"{pid} went back to a coordinator it had left: {mine}"
    return len(late)


def apart(sides: dict[str, list[Daemon]]) -> Any:
    """Every daemon's peer table holds exactly its own side."""

    def check(view: dict[str, Any]) -> bool:
        return all(
            view[d.peer_id] is not None and set(view[d.peer_id]["members"]) == {e.peer_id for e in ds}
            for ds in sides.values()
            for d in ds
        )

    return check


def first_leave(view: dict[str, Any], since: float, sides: dict[str, list[Daemon]]) -> float:
    """When the first daemon dropped a peer of the other side (daemon clock)."""
    side_of = {d.peer_id: side for side, ds in sides.items() for d in ds}
    times = [
        e["t"]
        for pid, s in view.items()
        for e in s["events"]
        if e["kind"] == "leave" and e["t"] >= since and side_of.get(e.get("peer")) not in (None, side_of[pid])
    ]
    assert times, "no daemon dropped a peer of the other side"
    return min(times)


@pytest.mark.parametrize("lasting", [False, True], ids=["brief", "lasting"])
async def test_partition_splits_and_heals_to_one_plan(
    lab: Lab, daemons: list[Daemon], tmp_path: Path, lasting: bool
) -> None:
    """Converge; cut the cable; each side plans for itself (the side without the coordinator elects one in a
    higher term); heal; all six converge on one plan, and no two plans conflict (``check_one_plan_wins``).
    A ``lasting`` partition also loses every connection between the sides before the heal, as one that
    outlasts TCP's retransmissions does, so only dialling lost members again brings the sides together.
    Prints when the split was first detected, when each side held its own plan, and when the heal converged,
    each in seconds after the cut or the heal."""
    sides = start_swarm(lab, tmp_path, daemons)
    ids = {d.peer_id for d in daemons}
    async with open_client() as client:
        view, took = await wait_until(client, daemons, converged(ids), timeout=CONVERGE_S, what="converged")
        before = next(iter(view.values()))
        print(f"\n6 daemons converged in {took:.2f} s (term {before['term']}, epoch {before['plan']['epoch']})")

        cut_at = time.time()
        lab.partition()
        view, first = await wait_split(client, sides)
        detected = first_leave(view, cut_at, sides) - cut_at
        print(
            f"split detected after {detected:.2f} s; side A on its own plan after {first['A']:.2f} s, B {first['B']:.2f} s"
        )
        split = {side: view[ds[0].peer_id] for side, ds in sides.items()}
        assert split["A"]["coordinator"] != split["B"]["coordinator"]
        old_side = next(side for side, ds in sides.items() if before["coordinator"] in {d.peer_id for d in ds})
        new_side = "B" if old_side == "A" else "A"
        assert split[new_side]["term"] > before["term"], "the side without the coordinator kept its term"
        for side, status in split.items():  # each side keeps serving what it can: a real plan of its own GPUs
            assert status["plan"]["body"]["plan"] is not None, (side, status["plan"]["body"].get("error"))
        if lasting:
            if lab.drop_connections():
                pytest.skip("this kernel cannot abort TCP connections (ss -K needs CONFIG_INET_DIAG_DESTROY)")
            _, took = await wait_until(client, daemons, apart(sides), timeout=SPLIT_S, what="apart")
            print(f"connections between the sides dropped; every daemon knows only its side after {took:.2f} s")

        healed_at = time.time()
        lab.heal()
        view, took = await wait_until(client, daemons, converged(ids), timeout=HEAL_S, what="re-converged")
        print(f"healed: all 6 on one plan after {took:.2f} s")

    finals = {(s["plan"]["term"], s["plan"]["epoch"], s["plan"]["coordinator"]) for s in view.values()}
    assert len(finals) == 1, finals
    assert all(set(s["plan"]["members"]) == ids for s in view.values())
    late = check_one_plan_wins(view, healed_at)
    term, epoch, coordinator = finals.pop()
    print(f"one plan won: term {term} epoch {epoch} by {coordinator[-6:]}; {late} plan(s) logged after the heal")
    assert all(d.alive() for d in daemons)
