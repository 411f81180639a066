"""Serving across NATs: prefill at one home, decode at two others, the KV handed off through the daemons'
libp2p streams (hole-punched to one home, relayed to the other), and a pipeline whose stages sit at two
homes, stories260K against transformers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio

from hexgen.daemon.generate_protocol import generate
from hexgen.daemon.relay import circuit_address
from hexgen.daemon.rpc import query_status
from hexgen.engine.tokenizer import Tokenizer
from hexgen.testing.checkpoints import random_prompts, reference_greedy
from hexgen.testing.daemon_harness import Daemon, open_client
from hexgen.testing.nat_lab import NatLab, View, converge, open_nat_lab
from hexgen.testing.netns import on_host, start_daemon, started_daemons

pytestmark = pytest.mark.trio

MAX_TOKENS = 12
REPLAN_S = 90.0


def pinned(prefill: str, *decode: str) -> str:
    """A pinned plan: a one-GPU prefill group on host ``prefill``, a one-GPU decode group on each of ``decode``."""
    groups = [("prefill", prefill), *(("decode", host) for host in decode)]
    stage = 'stages = [{{ gpus = ["{}"], layers = [0, 5] }}]'
    return "".join(f'[[groups]]\nrole = "{role}"\n{stage.format(host)}\n\n' for role, host in groups)


THREE_HOMES = pinned("h11", "h21", "h31")


@pytest.fixture
def nat_lab() -> Iterator[NatLab]:
    """Three homes: two behind endpoint-independent NATs, the third behind a symmetric one."""
    with open_nat_lab(homes=(1, 1, 1), symmetric=(False, False, True)) as lab:
        yield lab


# A hole punch between two endpoint-independent NATs usually succeeds, but not always on a loaded machine (it
# races two TCP opens): a hand-off that the punch would make direct may stay relayed, and still goes over libp2p.
OVER_LIBP2P = {("hole-punched", "libp2p"), ("relayed", "libp2p")}
CONVERGE_SERVING_S = 120.0  # four daemons loading a model and hole-punching on a 2-core machine
OWN_LINKS_S = 60.0
PROBING = ("--probe-interval", "1")
PROBED_S = 60.0  # every pair's turn comes within a few rounds of probes


def _serving_relayed(handoffs: dict[frozenset[str], set[tuple[str, str]]], gloo: list[int], workers: int) -> Any:
    def check(view: View) -> bool:
        """Every daemon on one plan that relays KV, made knowing each hand-off's kind of link (a change of link
        kinds re-plans) and recording its transport (one of those ``handoffs`` allows for its pair), with
        ``gloo`` its gloo groups, and ``workers`` workers all ready."""
        bodies = [((s or {}).get("plan") or {}).get("body") or {} for s in view.values()]
        ready = [((s or {}).get("serving") or {}).get("workers") or {} for s in view.values()]
        kinds = [
            {frozenset(x["peers"]): (x["kind"], x["transport"]) for x in b.get("links", []) if x["use"] == "handoff"}
            for b in bodies
        ]
        return (
            all(found.keys() == handoffs.keys() and all(v in handoffs[k] for k, v in found.items()) for found in kinds)
            and len({(body.get("term"), body.get("epoch")) for body in bodies}) == 1
            and all(body.get("exchange") == "libp2p" and body.get("gloo_groups") == gloo for body in bodies)
            and sum(len(w) for w in ready) == workers
            and all(state.get("state") == "ready" for w in ready for state in w.values())
        )

    return check


@pytest.fixture
def lan_and_home() -> Iterator[NatLab]:
    """Two hosts on one home LAN, a third behind another endpoint-independent NAT."""
    with open_nat_lab(homes=(2, 1)) as lab:
        yield lab


async def _own_links(
    client: Any, entry: str, peers: tuple[str, ...], serve: Callable[[], Awaitable[None]]
) -> dict[str, dict[str, Any]]:
    """What carries the KV ``entry`` relays to each of ``peers`` (its status's ``kv``), once the workers hold
    links of their own to each in the current plan (``worker_links``, by kind); ``serve`` sends a request
    meanwhile (a route asks for its link with its first part through the daemons, so a re-plan's new routes
    need requests of their own)."""
    with trio.fail_after(OWN_LINKS_S):
        while True:
            kv = {p["peer_id"]: p.get("kv") or {} for p in (await query_status(client, entry))["peers"]}
            if all((kv.get(peer) or {}).get("worker_links") for peer in peers):
                return {peer: kv[peer] for peer in peers}
            await serve()


def _probed(entry: str, paths: dict[str, str]) -> Callable[[View], bool]:
    """Whether ``entry``'s status shows the latest probe of its link to each peer of ``paths`` taken over the
    path given (``tcp``: a connection to it, as gloo's; ``kv-link``: hole-punched or spliced by the relay)."""

    def check(view: View) -> bool:
        peers = {p["peer_id"]: p.get("measured") or {} for p in (view.get(entry) or {}).get("peers", [])}
        return all(peers.get(peer, {}).get("path") == path and peers[peer]["gb_s"] > 0 for peer, path in paths.items())

    return check


async def _complete(client: Any, entry: str, tokens: list[int], decoders: set[int]) -> list[int]:
    """The tokens of one request; adds the decode replica that served it to ``decoders``."""
    out: list[int] = []
    with trio.fail_after(120):
        async for frame in generate(client, entry, {"tokens": tokens, "max_tokens": MAX_TOKENS}):
            assert "error" not in frame, frame
            if "token" in frame:
                out.append(frame["token"])
            decoders.update(s["replica"] for s in frame.get("served_by", []) if s["role"] == "decode")
    return out


def _start_homes(
    lab: NatLab,
    root: Path,
    model: Path,
    started: list[Daemon],
    plan: str,
    homes: tuple[str, ...],
    extra: tuple[str, ...] = (),
) -> tuple[Daemon, list[Daemon]]:
    """A relay on the public network and a daemon at each of ``homes``, all serving ``model`` with the pinned
    ``plan`` (and ``extra`` flags)."""
    path = root / "pinned.toml"
    path.write_text(plan)
    pin = ["--pin-plan", str(path), *extra]
    relay = start_daemon(lab.hosts["p1"], root, "relay", model=str(model), extra=["--relay", *pin])
    started.append(relay)

    def home(name: str) -> Daemon:
        extra = ["--relay-peer", relay.addr, *pin]
        return start_daemon(lab.hosts[name], root, name, model=str(model), gpu="H100", extra=extra)

    with ThreadPoolExecutor(len(homes)) as pool:
        futures = [pool.submit(home, name) for name in homes]
        started.extend(f.result() for f in futures if f.exception() is None)
        return relay, [f.result() for f in futures]


def _circuits(relay: Daemon, homes: list[Daemon]) -> dict[str, str]:
    return {relay.peer_id: relay.addr} | {d.peer_id: circuit_address(relay.addr, d.peer_id) for d in homes}


async def test_prefill_at_one_home_hands_kv_to_decode_at_two_others_through_libp2p(
    nat_lab: NatLab, tmp_path: Path, stories_dir: Path
) -> None:
    """No pair of homes can open a TCP connection to each other, so no gloo exchange group can form: the plan
    says its hand-offs go over libp2p, and every request, prefilled at home 1 and decoded at home 2 (a
    hole-punched link) or home 3 (relayed, symmetric NAT), streams transformers' greedy tokens. The probes of
    home 1's links to the others go over KV links, the path their KV takes."""
    with started_daemons() as started:
        homes_named = ("h11", "h21", "h31")
        relay, homes = _start_homes(nat_lab, tmp_path, stories_dir, started, THREE_HOMES, homes_named, PROBING)
        a, b, c = (d.peer_id for d in homes)
        prompts = [[1, 403, 407, 261, 378], *random_prompts(5, 512, seed=41, low=3, high=20)]
        reference = reference_greedy(stories_dir, prompts, MAX_TOKENS)
        async with open_client() as client:
            kinds = {frozenset((a, b)): OVER_LIBP2P, frozenset((a, c)): {("relayed", "libp2p")}}
            await converge(client, _circuits(relay, homes), _serving_relayed(kinds, [], 3), CONVERGE_SERVING_S)
            results: dict[int, list[int]] = {}
            decoders: set[int] = set()

            async def one(i: int) -> None:
                results[i] = await _complete(client, a, prompts[i], decoders)

            async with trio.open_nursery() as nursery:
                for i in range(len(prompts)):
                    nursery.start_soon(one, i)
            assert [results[i] for i in range(len(prompts))] == reference
            for _ in range(30):  # hand-offs split evenly: both decode replicas serve within a few requests
                if decoders == {1, 2}:
                    break
                assert await _complete(client, a, prompts[0], decoders) == reference[0]
            assert decoders == {1, 2}

            # the KV went on sealed TCP links set up through the relay, not on libp2p streams: hole-punched to
            # home 2 (endpoint-independent NAT), spliced by the relay to home 3 (symmetric NAT); first between
            # the daemons, then on links of the workers' own, which carry every hand-off from then on
            async def another() -> None:
                assert await _complete(client, a, prompts[0], decoders) == reference[0]

            carriers = await _own_links(client, a, (b, c), another)
            own = {peer: carriers[peer].pop("worker_links") for peer in (b, c)}
            assert set(own[b]) <= {"direct", "splice"} and set(own[c]) == {"splice"}, own
            assert carriers[b] == {"carrier": "direct", "relay": relay.peer_id}, carriers
            assert carriers[c] == {"carrier": "splice", "relay": relay.peer_id}, carriers
            decoders.clear()
            for _ in range(30):
                assert await _complete(client, a, prompts[1], decoders) == reference[1]
                if decoders == {1, 2}:
                    break
            assert decoders == {1, 2}
            await converge(client, _circuits(relay, homes), _probed(a, {b: "kv-link", c: "kv-link"}), PROBED_S)


BRIDGED = """[[groups]]
role = "colocated"
stages = [{ gpus = ["h11"], layers = [0, 2] }, { gpus = ["h21"], layers = [2, 5] }]
"""


@pytest.fixture
def two_homes() -> Iterator[NatLab]:
    """Two homes, the second behind a symmetric NAT: no hole punch, everything between them goes by the relay."""
    with open_nat_lab(homes=(1, 1), symmetric=(False, True)) as lab:
        yield lab


def _bridged(stage_pair: frozenset[str]) -> Any:
    serving = _serving_relayed({}, [], 2)

    def check(view: View) -> bool:
        """Serving (two workers ready) a plan whose group 0 is bridged across ``stage_pair``, its stage
        boundary there recorded as going over libp2p."""
        bodies = [((s or {}).get("plan") or {}).get("body") or {} for s in view.values()]
        stages = [
            {frozenset(x["peers"]): x["transport"] for x in b.get("links", []) if x["use"] == "stage"} for b in bodies
        ]
        return (
            serving(view)
            and all(body.get("bridged_groups") == [0] for body in bodies)
            and all(found.get(stage_pair) == "libp2p" for found in stages)
        )

    return check


async def test_a_pipeline_across_two_homes_streams_transformers_tokens_through_the_relay(
    two_homes: NatLab, tmp_path: Path, stories_dir: Path
) -> None:
    """One replica, layers 0-1 at home 1 and 2-4 at home 2, whose homes cannot open a TCP connection to each
    other: each stage is a world of its own and the hidden states, the driver's broadcasts and the all-reduces
    between them travel through the daemons, on a sealed link the relay splices. Concurrent requests stream
    transformers' greedy tokens."""
    with started_daemons() as started:
        relay, homes = _start_homes(two_homes, tmp_path, stories_dir, started, BRIDGED, ("h11", "h21"))
        a, b = (d.peer_id for d in homes)
        prompts = [[1, 403, 407, 261, 378], *random_prompts(3, 512, seed=47, low=3, high=20)]
        reference = reference_greedy(stories_dir, prompts, MAX_TOKENS)
        async with open_client() as client:
            await converge(client, _circuits(relay, homes), _bridged(frozenset((a, b))), CONVERGE_SERVING_S)
            results: dict[int, list[int]] = {}

            async def one(i: int) -> None:
                results[i] = await _complete(client, a, prompts[i], set())

            async with trio.open_nursery() as nursery:
                for i in range(len(prompts)):
                    nursery.start_soon(one, i)
            assert [results[i] for i in range(len(prompts))] == reference

            async def another() -> None:
                assert await _complete(client, a, prompts[0], set()) == reference[0]

            carriers = await _own_links(client, a, (b,), another)
            assert set(carriers[b].pop("worker_links")) == {"splice"}, carriers
            assert carriers[b] == {"carrier": "splice", "relay": relay.peer_id}, carriers
            for i, prompt in enumerate(prompts):  # the stages now speak on their workers' own link
                assert await _complete(client, a, prompt, set()) == reference[i]


BRIDGED_PREFILL = """[[groups]]
role = "prefill"
stages = [{ gpus = ["h11"], layers = [0, 2] }, { gpus = ["h21"], layers = [2, 5] }]

[[groups]]
role = "decode"
stages = [{ gpus = ["h31"], layers = [0, 5] }]
"""


async def test_a_prefill_pipeline_across_two_homes_hands_its_kv_to_a_third(
    nat_lab: NatLab, tmp_path: Path, stories_dir: Path
) -> None:
    """A prefill replica bridged across homes 1 and 2 hands each stage's KV through the daemons to a decode
    replica at home 3, and the tokens are transformers'."""
    with started_daemons() as started:
        relay, homes = _start_homes(nat_lab, tmp_path, stories_dir, started, BRIDGED_PREFILL, ("h11", "h21", "h31"))
        a = homes[0].peer_id
        prompts = [[1, 403, 407, 261, 378], *random_prompts(3, 512, seed=53, low=3, high=20)]
        reference = reference_greedy(stories_dir, prompts, MAX_TOKENS)
        async with open_client() as client:
            serving = _serving_relayed({k: OVER_LIBP2P for k in _handoff_pairs(homes)}, [], 3)

            def bridged(view: View) -> bool:
                bodies = [((s or {}).get("plan") or {}).get("body") or {} for s in view.values()]
                return serving(view) and all(body.get("bridged_groups") == [0] for body in bodies)

            await converge(client, _circuits(relay, homes), bridged, CONVERGE_SERVING_S)
            decoders: set[int] = set()
            for i, prompt in enumerate(prompts):
                assert await _complete(client, a, prompt, decoders) == reference[i]
            assert decoders == {1}


def _handoff_pairs(homes: list[Daemon]) -> list[frozenset[str]]:
    """The pairs a hand-off from the prefill stages at homes 1 and 2 to the decode replica at home 3 crosses."""
    return [frozenset((homes[0].peer_id, homes[2].peer_id)), frozenset((homes[1].peer_id, homes[2].peer_id))]


@contextlib.contextmanager
def _client_at(
    lab: NatLab, home: str, entry: Daemon, prompt: str, max_tokens: int, *json_out: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``hexgen-client generate`` on the lab host ``home``, asking ``entry``; killed on the way out."""
    command = [sys.executable, "-m", "hexgen.cli.client", "generate", prompt, "--peer", entry.addr]
    command += ["--max-tokens", str(max_tokens), "--timeout", "150", *json_out]
    client = subprocess.Popen(on_host(lab.hosts[home], command), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield client
    finally:
        if client.poll() is None:
            client.kill()
        client.communicate()


def _plans(daemon: Daemon) -> list[tuple[int, int]]:
    """(epoch, members) of every plan ``daemon`` adopted or published, in order, as its log says."""
    found = re.findall(r"(?:adopted|published) plan epoch (\d+) of term \d+ \((\d+) members\)", daemon.log())
    return [(int(epoch), int(members)) for epoch, members in found]


def _kill_after_first_text(client: subprocess.Popen[bytes], victim: Daemon) -> bytes:
    """The client's whole output; ``victim`` is SIGKILLed as soon as the client printed some text."""
    assert client.stdout is not None
    head = client.stdout.read1(64)  # type: ignore[attr-defined]  # a BufferedReader: returns what arrived
    os.kill(victim.proc.pid, signal.SIGKILL)
    rest, err = client.communicate(timeout=180)
    assert client.returncode == 0, err.decode()
    return head + rest


async def test_the_relay_killed_mid_stream_loses_no_token_and_the_swarm_replans(
    lan_and_home: NatLab, tmp_path: Path, stories_dir: Path
) -> None:
    """A client at home 1 streams a long answer from its own daemon h11 (prefill there; decode at h12 on the
    same LAN, KV over gloo, or at h21 behind another NAT, KV over libp2p) and the relay is SIGKILLed once text
    flows: the stream finishes with transformers' text, no token missing or repeated (the hop re-submitted if
    its route died), and the swarm re-plans without the relay and serves on."""
    prompt = "Once upon a time"
    long = 160
    tokenizer = Tokenizer.from_dir(stories_dir)
    (expected,) = reference_greedy(stories_dir, [tokenizer.encode(prompt)], long)
    names = ("h11", "h12", "h21")
    with started_daemons() as started:
        relay, homes = _start_homes(lan_and_home, tmp_path, stories_dir, started, pinned(*names), names)
        a, b, c = (d.peer_id for d in homes)
        kinds = {frozenset((a, b)): {("direct", "torch")}, frozenset((a, c)): OVER_LIBP2P}
        async with open_client() as client:
            await converge(client, _circuits(relay, homes), _serving_relayed(kinds, [0, 1], 3), CONVERGE_SERVING_S)
        before = len(_plans(homes[0]))
        with _client_at(lan_and_home, "h11", homes[0], prompt, long) as streaming:
            text = await trio.to_thread.run_sync(_kill_after_first_text, streaming, relay)
        assert text.decode().rstrip("\n") == tokenizer.decode(expected)
        assert not relay.alive()
        with trio.fail_after(REPLAN_S):  # a plan without the relay (and without h21, unless it hole-punched)
            while not any(members < 4 for _, members in _plans(homes[0])[before:]):
                await trio.sleep(0.2)
        with _client_at(lan_and_home, "h11", homes[0], prompt, MAX_TOKENS, "--json") as after:
            out, err = await trio.to_thread.run_sync(lambda: after.communicate(timeout=180))
        assert after.returncode == 0, err.decode()
        reply = json.loads(out)
        assert reply["tokens"] == expected[:MAX_TOKENS]
        # served on a plan without the relay: that one, or a later one (h21 may come back by a hole punch)
        without = min(epoch for epoch, members in _plans(homes[0])[before:] if members < 4)
        assert all(group["epoch"] >= without for group in reply["served_by"]), reply


async def test_hosts_linked_directly_keep_gloo_for_their_hand_offs_while_others_are_relayed(
    lan_and_home: NatLab, tmp_path: Path, stories_dir: Path
) -> None:
    """Prefill at h11, decode at h12 on the same LAN (direct) and at h21 behind another NAT (hole-punched):
    h11 and h12 form a gloo exchange group and hand KV over it, while h21's KV goes through the daemons; both
    routes give transformers' tokens. h11 and h12, each able to dial the other on their LAN, still find
    themselves private: a LAN neighbour's dial-back proves nothing about the NAT. h11 probes its link to h12
    over a TCP connection of its own (gloo's path) and its link to h21 over a KV link (the KV's path)."""
    with started_daemons() as started:
        plan, named = pinned("h11", "h12", "h21"), ("h11", "h12", "h21")
        relay, homes = _start_homes(lan_and_home, tmp_path, stories_dir, started, plan, named, PROBING)
        a, b, c = (d.peer_id for d in homes)
        kinds = {frozenset((a, b)): {("direct", "torch")}, frozenset((a, c)): OVER_LIBP2P}
        prompts = random_prompts(4, 512, seed=43, low=3, high=20)
        reference = reference_greedy(stories_dir, prompts, MAX_TOKENS)
        async with open_client() as client:
            await converge(client, _circuits(relay, homes), _serving_relayed(kinds, [0, 1], 3), CONVERGE_SERVING_S)

            def behind_the_router(view: View) -> bool:
                return all((view.get(peer) or {}).get("reachability") == "private" for peer in (a, b))

            await converge(client, _circuits(relay, homes), behind_the_router, CONVERGE_SERVING_S)
            decoders: set[int] = set()
            for i, prompt in enumerate(prompts):
                assert await _complete(client, a, prompt, decoders) == reference[i]
            for _ in range(30):  # hand-offs split evenly: both decode replicas serve within a few requests
                if decoders == {1, 2}:
                    break
                assert await _complete(client, a, prompts[0], decoders) == reference[0]
            assert decoders == {1, 2}
            await converge(client, _circuits(relay, homes), _probed(a, {b: "tcp", c: "kv-link"}), PROBED_S)


async def test_a_bridged_replica_losing_its_first_stage_finishes_its_stream_on_the_next_plan(
    two_homes: NatLab, tmp_path: Path, stories_dir: Path
) -> None:
    """Home 1, holding the first stage, is SIGKILLed while a client of home 2 streams a long answer: the request
    is re-submitted on the plan without home 1 (stories260K fits home 2 alone) and finishes with transformers'
    tokens, none missing or repeated. The relay stays up: it no longer dials the lost home's circuit address,
    which runs through itself."""
    tokens = [1, 403, 407]
    (expected,) = reference_greedy(stories_dir, [tokens], 200)
    with started_daemons() as started:
        relay, homes = _start_homes(two_homes, tmp_path, stories_dir, started, BRIDGED, ("h11", "h21"))
        a, b = (d.peer_id for d in homes)
        async with open_client() as client:
            await converge(client, _circuits(relay, homes), _bridged(frozenset((a, b))), CONVERGE_SERVING_S)
            out: list[int] = []
            with trio.fail_after(120):
                async for frame in generate(client, b, {"tokens": tokens, "max_tokens": 200}):
                    assert "error" not in frame, frame
                    if "token" in frame:
                        out.append(frame["token"])
                        if homes[0].alive():
                            os.kill(homes[0].proc.pid, signal.SIGKILL)
            assert out == expected
            assert len({served["epoch"] for served in frame["served_by"]}) > 1, frame  # re-submitted
            assert relay.alive()


@pytest.fixture
def one_home() -> Iterator[NatLab]:
    """One home behind an endpoint-independent NAT, beside the public network."""
    with open_nat_lab(homes=(1,)) as lab:
        yield lab


async def test_a_public_host_and_one_behind_nat_that_dialled_it_hand_kv_through_the_daemons(
    one_home: NatLab, tmp_path: Path, stories_dir: Path
) -> None:
    """Prefill on the public relay host, decode at home 1: their libp2p link is direct (home 1 dialled out),
    but nothing on the public network can dial home 1. Once both know their reachability the plan says the
    link is outbound, its hand-offs go through the daemons (a gloo exchange group tried before then cannot
    form, and its block binds no plan), and requests stream transformers' greedy tokens."""
    with started_daemons() as started:
        relay, homes = _start_homes(one_home, tmp_path, stories_dir, started, pinned("relay", "h11"), ("h11",))
        (a,) = (d.peer_id for d in homes)
        prompts = random_prompts(3, 512, seed=47, low=3, high=20)
        reference = reference_greedy(stories_dir, prompts, MAX_TOKENS)
        async with open_client() as client:
            kinds = {frozenset((relay.peer_id, a)): {("outbound", "libp2p")}}
            await converge(client, _circuits(relay, homes), _serving_relayed(kinds, [], 2), CONVERGE_SERVING_S)
            decoders: set[int] = set()
            for i, prompt in enumerate(prompts):
                assert await _complete(client, relay.peer_id, prompt, decoders) == reference[i]
            assert decoders == {1}
