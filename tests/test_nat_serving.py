"""Serving across NATs: prefill at one home, decode at two others, the KV handed off through the daemons'
libp2p streams (hole-punched to one home, relayed to the other), stories260K against transformers."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio

from hexgen.daemon.generate_protocol import generate
from hexgen.daemon.relay import circuit_address
from hexgen.testing.checkpoints import random_prompts, reference_greedy
from hexgen.testing.daemon_harness import Daemon, open_client
from hexgen.testing.nat_lab import NatLab, View, converge, link, open_nat_lab
from hexgen.testing.netns import start_daemon, started_daemons

pytestmark = pytest.mark.trio

MAX_TOKENS = 12
PINNED = """
[[groups]]
role = "prefill"
stages = [{ gpus = ["h11"], layers = [0, 5] }]

[[groups]]
role = "decode"
stages = [{ gpus = ["h21"], layers = [0, 5] }]

[[groups]]
role = "decode"
stages = [{ gpus = ["h31"], layers = [0, 5] }]
"""


@pytest.fixture
def nat_lab() -> Iterator[NatLab]:
    """Three homes: two behind endpoint-independent NATs, the third behind a symmetric one."""
    with open_nat_lab(homes=(1, 1, 1), symmetric=(False, False, True)) as lab:
        yield lab


def _serving_relayed(a: str, b: str, c: str) -> Any:
    def check(view: View) -> bool:
        """a-b hole-punched, c relayed; every daemon on one plan that hands KV off over libp2p, all ready."""
        bodies = [((s or {}).get("plan") or {}).get("body") or {} for s in view.values()]
        workers = [((s or {}).get("serving") or {}).get("workers") or {} for s in view.values()]
        return (
            link(view, a, b) == "hole-punched"
            and link(view, a, c) == "relayed"
            and len({(body.get("term"), body.get("epoch")) for body in bodies}) == 1
            and all(body.get("exchange") == "libp2p" and body.get("plan") for body in bodies)
            and sum(len(w) for w in workers) == 3
            and all(state.get("state") == "ready" for w in workers for state in w.values())
        )

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


async def test_prefill_at_one_home_hands_kv_to_decode_at_two_others_through_libp2p(
    nat_lab: NatLab, tmp_path: Path, stories_dir: Path
) -> None:
    """No pair of homes can open a TCP connection to each other, so no gloo exchange group can form: the plan
    says its hand-offs go over libp2p, and every request, prefilled at home 1 and decoded at home 2 (a
    hole-punched link) or home 3 (relayed, symmetric NAT), streams transformers' greedy tokens."""
    pinned = tmp_path / "pinned.toml"
    pinned.write_text(PINNED)
    model = ["--pin-plan", str(pinned)]
    with started_daemons() as started:
        relay = start_daemon(nat_lab.hosts["p1"], tmp_path, "relay", model=str(stories_dir), extra=["--relay", *model])
        started.append(relay)

        def home(name: str) -> Daemon:
            extra = ["--relay-peer", relay.addr, *model]
            return start_daemon(nat_lab.hosts[name], tmp_path, name, model=str(stories_dir), gpu="H100", extra=extra)

        with ThreadPoolExecutor(3) as pool:
            homes = list(pool.map(home, ("h11", "h21", "h31")))
        started.extend(homes)
        addrs = {relay.peer_id: relay.addr} | {d.peer_id: circuit_address(relay.addr, d.peer_id) for d in homes}
        a, b, c = (d.peer_id for d in homes)
        prompts = [[1, 403, 407, 261, 378], *random_prompts(5, 512, seed=41, low=3, high=20)]
        reference = reference_greedy(stories_dir, prompts, MAX_TOKENS)
        async with open_client() as client:
            view = await converge(client, addrs, _serving_relayed(a, b, c))
            body = next(s for s in view.values() if s is not None)["plan"]["body"]
            handoffs = {frozenset(x["peers"]): x["kind"] for x in body["links"] if x["use"] == "handoff"}
            assert handoffs == {frozenset((a, b)): "hole-punched", frozenset((a, c)): "relayed"}
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
