"""Serving across hosts: one daemon per network namespace (its own address on a bridge, its own hostname that
resolves to 127.0.0.1, no interface named for gloo), stories260K against transformers. Every layout here
puts a torch.distributed world or a KV hand-off across two hosts, except the planner's own plan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio

from hexgen.daemon.generate_protocol import generate
from hexgen.testing.checkpoints import random_prompts, reference_greedy
from hexgen.testing.daemon_harness import Daemon, open_client, serving, wait_until
from hexgen.testing.netns import Lab, Namespace, on_host, open_lab, start_daemon, started_daemons

pytestmark = pytest.mark.trio

GPUS = ("H100", "A100", "L40", "A6000")
MAX_TOKENS = 16
FORM_S = 90.0  # a generous bound on a loaded 2-core machine; the closing figures are a few seconds


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with open_lab(per_side=4, sides=("A",)) as lab:
        yield lab


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """The started daemons, killed at teardown (before ``lab`` removes their namespaces)."""
    with started_daemons() as started:
        yield started


@pytest.fixture(scope="module")
def prompts_and_reference(stories_dir: Path) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [[1, 403, 407, 261, 378], *random_prompts(7, 512, seed=23, low=3, high=24)]
    return prompts, reference_greedy(stories_dir, prompts, MAX_TOKENS)


def start_hosts(
    lab: Lab, root: Path, started: list[Daemon], model: Path, *, pinned: str | None = None, port: int = 0
) -> list[Daemon]:
    """One daemon per namespace (host ``hK`` in namespace K), bootstrapped from the first; the rest start in
    parallel. ``pinned``: a pinned-plan TOML every daemon serves."""
    extra: list[str] = []
    if pinned is not None:
        path = root / "pinned.toml"
        path.write_text(pinned)
        extra = ["--pin-plan", str(path)]

    def one(ns: Namespace, bootstrap: list[str]) -> Daemon:
        gpu = GPUS[(ns.index - 1) % len(GPUS)]
        return start_daemon(
            ns, root, f"h{ns.index}", model=str(model), gpu=gpu, port=port, extra=extra, bootstrap=bootstrap
        )

    first = one(lab.namespaces[0], [])
    started.append(first)
    with ThreadPoolExecutor(len(lab.namespaces) - 1) as pool:
        futures = [pool.submit(one, ns, [first.addr]) for ns in lab.namespaces[1:]]
        for future in futures:  # record every one that started before raising for any that did not
            if future.exception() is None:
                started.append(future.result())
        for future in futures:
            future.result()
    return started


async def complete(client: Any, entry: Daemon, tokens: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    out: list[int] = []
    with trio.fail_after(120):
        async for frame in generate(client, entry.peer_id, {"tokens": tokens, "max_tokens": max_tokens}):
            assert "error" not in frame, frame
            if "token" in frame:
                out.append(frame["token"])
    return out


async def first_token_s(client: Any, entry: Daemon, tokens: list[int]) -> float:
    start = time.monotonic()
    with trio.fail_after(120):
        async for frame in generate(client, entry.peer_id, {"tokens": tokens, "max_tokens": 1}):
            assert "error" not in frame, frame
            if "token" in frame:
                return time.monotonic() - start
    raise AssertionError("the stream ended without a token")


def plan_shape(view: dict[str, Any]) -> list[tuple[str, list[list[str]]]]:
    """Each group of the adopted plan: its role and, per stage, the hosts of its GPUs."""
    body = next(s for s in view.values() if s is not None)["plan"]["body"]
    hosts = {int(index): peer for index, (peer, _) in body["gpus"].items()}
    names = {s["peer_id"]: s["host"] for s in view.values() if s is not None}
    return [
        (group["role"], [[names.get(hosts[g], "?") for g in stage["gpus"]] for stage in group["stages"]])
        for group in body["plan"]["groups"]
    ]


async def serve_and_check(
    case: str, daemons: list[Daemon], prompts_and_reference: tuple[list[list[int]], list[list[int]]]
) -> dict[str, Any]:
    """Wait for the swarm to serve, then check every prompt through every entry, one by one and all at once,
    against transformers; prints the time to form and to the first token. Returns the statuses."""
    prompts, reference = prompts_and_reference
    ids = {d.peer_id for d in daemons}
    async with open_client() as client:
        view, formed_s = await wait_until(client, daemons, serving(ids), timeout=FORM_S, what="serving")
        first_s = await first_token_s(client, daemons[-1], prompts[0])
        for i, prompt in enumerate(prompts[:4]):
            entry = daemons[i % len(daemons)]
            assert await complete(client, entry, prompt) == reference[i], f"prompt {i} via {entry.name}"
        results: dict[int, list[int]] = {}

        async def one(i: int) -> None:
            results[i] = await complete(client, daemons[i % len(daemons)], prompts[i])

        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(one, i)
        assert [results[i] for i in range(len(prompts))] == reference
    print(f"\ncase={case} serving_after_s={formed_s:.2f} first_token_s={first_s:.3f}")
    return view


def group(role: str, *stages: str) -> str:
    return f'[[groups]]\nrole = "{role}"\nstages = [{", ".join(stages)}]\n'


def stage(hosts: list[str], layers: tuple[int, int] = (0, 5)) -> str:
    return "{ gpus = [" + ", ".join(f'"{h}"' for h in hosts) + f"], layers = [{layers[0]}, {layers[1]}] }}"


LAYOUTS = {
    "tp2": group("colocated", stage(["h1", "h2"])),
    "pp2xtp2": group("colocated", stage(["h1", "h2"], (0, 3)), stage(["h3", "h4"], (3, 5))),
    "prefill-decode": group("prefill", stage(["h1"])) + group("decode", stage(["h2"])),
    "tp2-prefill-pp2-decode": group("prefill", stage(["h1", "h2"]))
    + group("decode", stage(["h3"], (0, 3)), stage(["h4"], (3, 5))),
}
SHAPES = {
    "tp2": [("colocated", [["h1", "h2"]])],
    "pp2xtp2": [("colocated", [["h1", "h2"], ["h3", "h4"]])],
    "prefill-decode": [("prefill", [["h1"]]), ("decode", [["h2"]])],
    "tp2-prefill-pp2-decode": [("prefill", [["h1", "h2"]]), ("decode", [["h3"], ["h4"]])],
}


async def test_the_planner_s_own_plan_on_four_hosts(lab, daemons, tmp_path, stories_dir, prompts_and_reference):
    start_hosts(lab, tmp_path, daemons, stories_dir)
    await serve_and_check("planner", daemons, prompts_and_reference)


# TP across hosts and PP across hosts each alone are parts of pp2xtp2, so they are not served on their own here
SERVED = ("pp2xtp2", "prefill-decode", "tp2-prefill-pp2-decode")


@pytest.mark.parametrize("case", SERVED)
async def test_pinned_layouts_across_hosts(lab, daemons, tmp_path, stories_dir, prompts_and_reference, case):
    start_hosts(lab, tmp_path, daemons, stories_dir, pinned=LAYOUTS[case])
    view = await serve_and_check(case, daemons, prompts_and_reference)
    assert plan_shape(view) == SHAPES[case]


async def test_a_host_killed_mid_stream(lab, daemons, tmp_path, stories_dir):
    """Prefill on h1, decode on h2: h2 is SIGKILLed while it streams a long answer to a client entering at h3;
    the entry re-submits prompt plus the tokens so far, the swarm re-plans on the three hosts left, and the
    stream completes exactly."""
    prompt = [1, 403, 407, 261, 378]
    long = 120
    (expected,) = reference_greedy(stories_dir, [prompt], long)
    start_hosts(lab, tmp_path, daemons, stories_dir, pinned=LAYOUTS["prefill-decode"])
    ids = {d.peer_id for d in daemons}
    victim, entry = daemons[1], daemons[2]
    async with open_client() as client:
        await wait_until(client, daemons, serving(ids), timeout=FORM_S, what="serving")
        out: list[int] = []
        with trio.fail_after(180):
            async for frame in generate(client, entry.peer_id, {"tokens": prompt, "max_tokens": long}):
                assert "error" not in frame, frame
                if "token" in frame:
                    out.append(frame["token"])
                    if len(out) == 3:
                        os.kill(victim.proc.pid, signal.SIGKILL)
        assert out == expected
        rest = [d for d in daemons if d is not victim]
        view, _ = await wait_until(client, rest, serving({d.peer_id for d in rest}), timeout=FORM_S, what="re-planned")
        assert all(s is not None and victim.peer_id not in s["members"] for s in view.values())
        assert not victim.alive()


async def test_daemons_see_each_other_at_their_lab_addresses(lab, daemons, tmp_path, stories_dir):
    """The lab is what it claims: each daemon listens on its own namespace's address, not on loopback, and its
    host's name resolves to 127.0.0.1 (what broke worlds across hosts)."""
    resolve = [
        sys.executable,
        "-c",
        "import socket; print(socket.gethostname(), socket.gethostbyname(socket.gethostname()))",
    ]
    for ns in lab.namespaces:
        out = subprocess.run(on_host(ns, resolve), capture_output=True, text=True, timeout=30, check=True).stdout
        assert out.split() == [ns.hostname, "127.0.0.1"]
    start_hosts(lab, tmp_path, daemons, stories_dir)
    async with open_client() as client:
        view, _ = await wait_until(client, daemons, lambda v: None not in v.values(), timeout=30, what="answering")
    for ns, daemon in zip(lab.namespaces, daemons, strict=True):
        assert all(f"/ip4/{ns.ip}/" in addr for addr in daemon.addrs), daemon.addrs
        assert view[daemon.peer_id]["host"] == daemon.name


LIBP2P_PORT = 4001  # every lab host has its own port space, so all daemons can take the same port


async def test_a_world_that_cannot_connect_is_replaced_by_a_served_fallback(
    lab, daemons, tmp_path, stories_dir, prompts_and_reference
):
    """h2's firewall lets only libp2p through, silently (a dropped SYN, no refusal): the pinned TP=2 world of h1
    and h2 cannot connect. The swarm serves a fallback plan whose error names the blocked pair and an address,
    a request sent meanwhile ends (tokens or a clear error) instead of waiting, and the fallback gives the
    reference tokens."""
    prompts, reference = prompts_and_reference
    lab.firewall(lab.namespaces[1], LIBP2P_PORT)
    start_hosts(lab, tmp_path, daemons, stories_dir, pinned=LAYOUTS["tp2"], port=LIBP2P_PORT)
    started = time.monotonic()
    ids = {d.peer_id for d in daemons}

    def fallen_back(view: dict[str, Any]) -> bool:
        if not serving(ids)(view):
            return False
        error = next(iter(view.values()))["plan"]["body"].get("error") or ""
        return "cannot form a world" in error

    async with open_client() as client:
        early: list[dict[str, Any]] = []

        async def ask_early() -> None:
            with trio.fail_after(FORM_S):
                async for frame in generate(client, daemons[3].peer_id, {"tokens": prompts[0], "max_tokens": 4}):
                    early.append(frame)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask_early)
            view, _ = await wait_until(client, daemons, fallen_back, timeout=FORM_S, what="serving a fallback")
        fallback_s = time.monotonic() - started
        error = next(iter(view.values()))["plan"]["body"]["error"]
        assert "h1 (" in error and "h2 (" in error, error
        assert lab.namespaces[0].ip in error or lab.namespaces[1].ip in error, error
        assert early and ("error" in early[-1] or early[-1].get("done")), early
        assert plan_shape(view) != SHAPES["tp2"]
        for i, prompt in enumerate(prompts[:4]):
            assert await complete(client, daemons[i], prompt) == reference[i]
    print(f"\ncase=blocked fallback_served_after_s={fallback_s:.2f} error={error!r}")
