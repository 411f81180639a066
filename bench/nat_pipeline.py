"""Pipeline benchmark: one replica whose two stages sit at two homes (a bridged pipeline: each stage a world of
its own, everything between them carried by the daemons on a KV link) against the same layout across two
hosts of one LAN (one gloo world), in one run.

1. NAT lab (``hexgen.testing.nat_lab``): a relay daemon on the public network; homes 1 and 2 behind
   endpoint-independent NATs, home 3 behind a symmetric one. Replica 0: layers [0, L/2) at h11, the rest at
   h21 (the daemons' link hole-punched); replica 1: h12 then h31 (spliced by the relay). The plan is pinned;
   the coordinator marks both groups bridged.
2. Flat lab (``hexgen.testing.netns``, one bridge): the same layout, h1 then h2, one gloo world.

Each replica serves requests one after another through the daemon of its first stage, a 64-token prompt and
32 output tokens each: TTFT (the prompt's hidden states cross the link once) and TPOT (every decode step
crosses it: the driver's header and sampled tokens to the first stage, its hidden states back). Medians per
replica over the requests; the JSON keeps every sample, the carrier the first stage's daemon reports for its
link to the second, the machine and its load.

    python bench/nat_pipeline.py [--quick] [--json OUT] [--keep DIR]     # as root

``--quick`` (under a minute): the relayed replica only (homes 1 and 2, the second symmetric), 8 requests of 16
output tokens, no flat lab.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio
from nat import (
    SERVE_S,
    in_labs,
    kv_links,
    lab_args,
    own_links,
    start_flat_daemons,
    start_nat_daemons,
    write_json,
)
from nat_handoffs import KvModel, Timed, random_prompt, timed_request

from hexgen.daemon import swarm_view
from hexgen.daemon.relay import circuit_address
from hexgen.testing.daemon_harness import Daemon, open_client, wait_until
from hexgen.testing.nat_lab import NatLab, View, converge
from hexgen.testing.netns import Lab, stop_daemons

PROMPT = 64


@dataclass(frozen=True)
class Settings:
    """The NAT lab's homes, the replicas there ((link kind, first host, second host) each), the requests per
    replica and their output tokens, whether the flat lab runs, the model."""

    homes: tuple[int, ...]
    symmetric: tuple[bool, ...]
    replicas: tuple[tuple[str, str, str], ...]
    requests: int
    max_tokens: int
    flat: bool
    model: KvModel

    @staticmethod
    def of(quick: bool) -> Settings:
        if quick:
            return Settings((1, 1), (False, True), (("relayed", "h11", "h21"),), 8, 16, False, KvModel())
        pairs = (("hole-punched", "h11", "h21"), ("relayed", "h12", "h31"))
        return Settings((2, 1, 1), (False, False, True), pairs, 12, 32, True, KvModel())


def bridged_plan(pairs: list[tuple[str, str]], layers: int) -> str:
    """A pinned-plan TOML: one colocated replica per (first host, second host), layers split in half."""
    half = layers // 2
    stage = '{{ gpus = ["{}"], layers = [{}, {}] }}'
    return "\n".join(
        f'[[groups]]\nrole = "colocated"\nstages = [{stage.format(a, 0, half)}, {stage.format(b, half, layers)}]\n'
        for a, b in pairs
    )


async def sample(client: Any, entries: dict[int, str], run: Settings) -> dict[int, dict[str, Any]]:
    """``run.requests`` requests to each replica, one after another, through the daemon of its first stage
    (which routes a request to a replica at random among those it may enter: kept only when it is that one)."""
    rng = random.Random(23)
    got: dict[int, list[Timed]] = {i: [] for i in entries}
    for _ in range(4 * run.requests * len(entries)):
        short = [i for i, samples in got.items() if len(samples) < run.requests]
        if not short:
            break
        prompt = random_prompt(rng, PROMPT, run.model.vocab)
        one = await timed_request(client, entries[short[0]], prompt, run.max_tokens, role="colocated")
        if one.replica in got and len(one.times) == run.max_tokens:
            got[one.replica].append(one)
    return {i: summary(samples) for i, samples in got.items()}


def summary(samples: list[Timed]) -> dict[str, Any]:
    if not samples:
        return {"n": 0, "ttft_ms": None, "tpot_ms": None}
    return {
        "n": len(samples),
        "ttft_ms": round(1000 * statistics.median(t.times[0] for t in samples), 1),
        "tpot_ms": round(1000 * statistics.median(t.tpot_s for t in samples), 1),
        "tpot_samples_ms": [round(1000 * t.tpot_s, 1) for t in samples],
    }


def bridging(ids: set[str], groups: list[int]) -> Any:
    def check(view: View) -> bool:
        bodies = [((s or {}).get("plan") or {}).get("body") or {} for s in view.values()]
        return swarm_view.serving(view, ids) and all(b.get("bridged_groups") == groups for b in bodies)

    return check


async def nat_phase(lab: NatLab, root: Path, ckpt: Path, run: Settings) -> dict[str, Any]:
    plan = root / "nat-plan.toml"
    plan.write_text(bridged_plan([(a, b) for _, a, b in run.replicas], run.model.layers))
    started: list[Daemon] = []
    try:
        relay, *homes = start_nat_daemons(lab, root, ckpt, plan, started)
        ready = time.monotonic()
        ids = {d.name: d.peer_id for d in homes}
        addrs = {relay.peer_id: relay.addr} | {d.peer_id: circuit_address(relay.addr, d.peer_id) for d in homes}
        async with open_client() as client:
            await converge(client, addrs, bridging(set(addrs), list(range(len(run.replicas)))), SERVE_S)
            serving_after_s = round(time.monotonic() - ready, 1)
            entries = {i: ids[a] for i, (_, a, _) in enumerate(run.replicas)}
            await sample(client, entries, replace(run, requests=1))  # untimed: each route asks for its own link
            for _, a, b in run.replicas:
                if not await own_links(client, ids[a], [ids[b]]):
                    print(f"{a}'s workers hold no link of their own to {b}'s", file=sys.stderr)
            figures = await sample(client, entries, run)
            out = {}
            for i, (kind, a, b) in enumerate(run.replicas):
                carrier = (await kv_links(client, ids[a])).get(ids[b], "?")
                out[kind] = figures[i] | {"stages": [a, b], "carrier": carrier}
        return {"serving_after_s": serving_after_s, "replicas": out}
    finally:
        stop_daemons(started)


async def flat_phase(lab: Lab, root: Path, ckpt: Path, run: Settings) -> dict[str, Any]:
    plan = root / "flat-plan.toml"
    plan.write_text(bridged_plan([("h1", "h2")], run.model.layers))
    started: list[Daemon] = []
    try:
        start_flat_daemons(lab, root, ckpt, plan, started)
        async with open_client() as client:
            ids = {d.peer_id for d in started}
            await wait_until(client, started, bridging(ids, []), SERVE_S, "serving one world")
            figures = await sample(client, {0: started[0].peer_id}, run)
        return figures[0] | {"stages": ["h1", "h2"], "carrier": "gloo"}
    finally:
        stop_daemons(started)


def run_labs(run: Settings, root: Path) -> dict[str, Any]:
    ckpt = run.model.write(root / "model")
    lab = NatLab(homes=run.homes, symmetric=run.symmetric)
    try:
        lab.open()
        nat = trio.run(nat_phase, lab, root, ckpt, run)
    finally:
        lab.close()
    flat: dict[str, Any] | None = None
    if run.flat:
        flat_lab = Lab(per_side=2, sides=("A",))
        try:
            flat_lab.open()
            flat = trio.run(flat_phase, flat_lab, root, ckpt, run)
        finally:
            flat_lab.close()
    return {"nat": nat, "flat": flat}


def print_table(result: dict[str, Any]) -> None:
    print(f"pipeline of {result['model']['layers']} layers in two stages, {PROMPT}-token prompts")
    print(f"{'link between the stages':<26} {'carrier':<8} {'n':>3} {'TTFT ms':>9} {'TPOT ms':>9}")
    for name, row in result["rows"].items():
        print(f"{name:<26} {row['carrier']:<8} {row['n']:>3} {row['ttft_ms']!s:>9} {row['tpot_ms']!s:>9}")
    loads = result["machine"]["load_samples"] or [result["machine"]["load_average_start"][0]]
    print(f"machine: {result['machine']['cpu_count']} cores, no GPU; 1-minute load {min(loads)}-{max(loads)}")


def main() -> int:
    args = lab_args(__doc__, "the relayed replica only, no flat lab")
    run = Settings.of(args.quick)
    ran = in_labs("pipeline benchmark", args.keep, lambda root: run_labs(run, root))
    if ran is None:
        return 2
    labs, meta = ran
    rows = {f"{kind} (bridged)": row for kind, row in labs["nat"]["replicas"].items()}
    if labs["flat"] is not None:
        rows["direct (one world)"] = labs["flat"]
    result = {
        "model": {"layers": run.model.layers, "hidden": run.model.hidden},
        "prompt_tokens": PROMPT,
        "max_tokens": run.max_tokens,
        "serving_after_s": labs["nat"]["serving_after_s"],
        "rows": rows,
        "tpot_ms": {name: row["tpot_ms"] for name, row in rows.items()},
        "machine": meta,
        "quick": args.quick,
    }
    print_table(result)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
