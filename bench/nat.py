"""NAT benchmark: joining through a relay, hole punching, and KV hand-offs through the daemons' KV links
(direct, hole-punched, relayed) against torch.distributed and raw TCP sockets on the same links, in one run.

Two labs of network namespaces (root and iptables), one after the other, each serving a random-weight Llama
written for the run (``nat_handoffs.KvModel``: float32, 128 KiB of KV per token) with a pinned layout:

1. NAT lab (``hexgen.testing.nat_lab``): a relay daemon (``join --relay``) on the public network, and homes
   behind masquerading routers whose daemons have ``--relay-peer``. Prefill at h11 (home 1); decode at h12
   (home 1's LAN: direct), h21 (home 2, endpoint-independent NAT: hole-punched) and h31 (home 3, symmetric
   NAT: relayed). The hand-offs to h21 and h31 go worker -> daemon -> KV link -> daemon -> worker (the plan's
   transport: libp2p), the link set up over libp2p and carried, as h11's status reports, by a hole-punched
   TCP connection (h21) or a TCP splice through the relay (h31), sealed with AES-GCM (``daemon.kv_link``);
   h11 and h12 share a gloo group (torch). From the moment every home daemon printed its ready line:
   ``join_via_relay_s`` (every daemon sees every other, one plan), ``hole_punch_s`` (h11-h21 reported
   hole-punched), ``first_token_via_relay_s`` (a client on the public network entering h11 through the relay
   gets a first token; re-sent until one comes, so it includes planning and starting the workers).
2. Flat lab (``hexgen.testing.netns``, one bridge, direct links): prefill at h1, decode at h2; the hand-offs
   use the gloo exchange group (torch).

Hand-offs (``nat_handoffs``): requests through the prefill host, one at a time, with a 1,024-token prompt
(128 MiB of KV) and 32 output tokens; the entry picks the decode replica at random and reports it. The gap
from the first token (prefill) to the second (KV at the decode replica, then one decode step), less the
median gap between later tokens (TPOT), is the hand-off; KV bytes / hand-off is ``mib_s``. A 16-token prompt
gives the fixed cost of a hand-off, and ``marginal_mib_s`` the rate of the bytes between the two.

Probes (``nat_probes``), after each lab's daemons stopped, the same bytes on the same links: raw TCP on the
home LAN and the flat bridge, raw TCP through both NATs (a TCP simultaneous open, as a hole punch makes it),
raw TCP to a port that home 2's router forwards to h21 (``port-forwarded``: a direct link across the same two
routers, what the punch spares an operator from setting up; hole-punched against it is the punch's own cost,
apart from what the lab's software routers cost), raw TCP through a user-space forwarder on the relay host (a
stand-in for a relay, labelled so); the data path's own transport on the same links, a KV link's sealed
records (``daemon.sealed``, 512 KiB records, AES-GCM; relayed: spliced by hexgen's splicer, ``daemon.splice``),
transport ``kv-link``; a bare libp2p stream between two hexgen Hosts on the home LAN, and torch gloo
send/recv on the flat bridge.

``planner_links``: what h11's link probes (at the daemons' default interval, during the run) told the planner
of each decode host's link: GB/s, RTT and the path probed (``daemon.path_probes``).

Medians over at least 3 requests per decode replica and 5 probes per link (3 of the libp2p stream); the JSON
keeps every sample, the machine, and the 1-minute load average every 5 s (other users of the machine).
Targets from issue 17: the data path >= 0.5x raw TCP on the same link (``kv_link_vs_tcp``, and each whole
hand-off's ``handoff_vs_tcp``); hole-punched within 10 % of direct (hand-offs against the gloo one on home 1's
LAN; links, and the hole-punched hand-off, against the port-forwarded link, ``hole_punched_vs_port_forwarded``).

    python bench/nat.py [--quick] [--link-mbit N] [--json OUT] [--keep DIR]     # as root

``--link-mbit N`` shapes every home router's link to N Mbit/s each way (a token bucket on both its interfaces),
as a home connection is: the routers' links, not the machine's cores, then bound what crosses them (home 1's
LAN and the relay host stay unshaped).

``--quick`` (under a minute): homes 1 and 2 only (no relayed hand-off), a 4-layer model and a 256-token prompt
(16 MiB of KV), 8 output tokens, one request per decode replica, one probe per link, no flat lab. ``--keep``
works in DIR and keeps it (the daemons' logs, the checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio
from nat_handoffs import (
    MIB,
    KvModel,
    first_token_s,
    marginal_mib_s,
    pinned_plan,
    random_prompt,
    sample_handoffs,
    summarize,
)
from nat_probes import (
    Spot,
    forwarded_tcp_mib_s,
    gloo_mib_s,
    libp2p_mib_s,
    punched_tcp_mib_s,
    spliced_mib_s,
    tcp_mib_s,
)

from hexgen.daemon import swarm_view
from hexgen.daemon.relay import circuit_address
from hexgen.daemon.rpc import query_status
from hexgen.testing.daemon_harness import Daemon, open_client, serving, wait_until
from hexgen.testing.nat_lab import NatLab, View, check_nat_available, converge, link
from hexgen.testing.netns import Lab, NetnsUnavailable, start_daemon, stop_daemons

REQUEST_TIMEOUT_S = "300"  # a relayed hand-off keeps the decode driver quiet: no failover mid-transfer
SERVE_S = 180.0
OWN_LINKS_S = 60.0
FORWARDED_PORTS = (47501, 47502)  # raw TCP, sealed: forwarded to h21 by home 2's router for the probes
SHORT_PROMPT, SHORT_TOKENS = 16, 8  # a hand-off of 16 tokens' KV: its fixed cost
DECODES = {1: ("direct", "h12"), 2: ("hole-punched", "h21"), 3: ("relayed", "h31")}
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """What one run does: the homes of the NAT lab, the prompt, the tokens per request, the requests per
    decode replica, the probes per link (at most 3 of a libp2p stream), whether the flat lab runs, the model."""

    quick: bool
    homes: tuple[int, ...]
    symmetric: tuple[bool, ...]
    prompt: int
    max_tokens: int
    repeats: int
    probes: int
    flat: bool
    model: KvModel
    link_mbit: int | None = None  # every home router's link shaped to this each way (None: as fast as the machine)

    @staticmethod
    def of(quick: bool) -> Settings:
        if quick:
            return Settings(True, (2, 1), (), 256, 8, 1, 1, False, KvModel(layers=4))
        return Settings(False, (2, 1, 1), (False, False, True), 1024, 32, 5, 5, True, KvModel())

    @property
    def decodes(self) -> dict[int, tuple[str, str]]:
        return {i: kind for i, kind in DECODES.items() if i <= len(self.homes)}

    @property
    def kv_bytes(self) -> int:
        return self.prompt * self.model.bytes_per_token


# -- the NAT lab -------------------------------------------------------------------------------------------


def start_nat_daemons(lab: NatLab, root: Path, ckpt: Path, plan: Path, started: list[Daemon]) -> list[Daemon]:
    """The relay on the public network and a daemon at every home host, all serving ``ckpt`` with ``plan``;
    returns [relay, h11, ...]."""
    common = ["--pin-plan", str(plan), "--request-timeout", REQUEST_TIMEOUT_S]
    relay = start_daemon(lab.hosts["p1"], root, "relay", model=str(ckpt), extra=["--relay", *common])
    started.append(relay)
    names = sorted(name for name in lab.hosts if name.startswith("h"))

    def home(name: str) -> Daemon:
        extra = ["--relay-peer", relay.addr, *common]
        return start_daemon(lab.hosts[name], root, name, model=str(ckpt), gpu="H100", extra=extra)

    with ThreadPoolExecutor(len(names)) as pool:
        futures = [pool.submit(home, name) for name in names]
        started.extend(f.result() for f in futures if f.exception() is None)
        return [relay, *(f.result() for f in futures)]


def handoff_links(view: View) -> list[dict[frozenset[str], tuple[str, str]]]:
    """Each daemon's adopted plan's hand-off links: the pair of peers -> (kind of link, transport)."""
    bodies = [((s or {}).get("plan") or {}).get("body") or {} for s in view.values()]
    return [
        {
            frozenset(x["peers"]): (x["kind"], x.get("transport", "torch"))
            for x in b.get("links", [])
            if x["use"] == "handoff"
        }
        for b in bodies
    ]


def serving_knowing(ids: set[str], kinds: dict[frozenset[str], str]) -> Any:
    """Every daemon serves one plan, made knowing each hand-off link's kind (``kinds``)."""

    def check(view: View) -> bool:
        found = handoff_links(view)
        return swarm_view.serving(view, ids) and all({p: k for p, (k, _) in f.items()} == kinds for f in found)

    return check


def transports(view: View, entry: str, decodes: dict[int, tuple[str, str]], peers: dict[str, str]) -> dict[int, str]:
    """What carries the KV from ``entry`` to each decode replica's host, as the adopted plan records it."""
    links = next(iter(handoff_links(view)), {})
    return {i: links.get(frozenset((entry, peers[host])), ("", "?"))[1] for i, (_, host) in decodes.items()}


async def nat_phase(lab: NatLab, root: Path, ckpt: Path, run: Settings) -> dict[str, Any]:
    """Join, hole punch, first token, then the hand-offs of every decode replica; the daemons are stopped on
    the way out."""
    plan = root / "nat-plan.toml"
    plan.write_text(pinned_plan("h11", [host for _, host in run.decodes.values()], run.model.layers))
    started: list[Daemon] = []
    try:
        relay, *homes = start_nat_daemons(lab, root, ckpt, plan, started)
        ready = time.monotonic()
        return await _nat_measure(relay, homes, ready, run)
    finally:
        stop_daemons(started)


async def _nat_measure(relay: Daemon, homes: list[Daemon], ready: float, run: Settings) -> dict[str, Any]:
    by_name = {d.name: d.peer_id for d in homes}
    addrs = {relay.peer_id: relay.addr} | {d.peer_id: circuit_address(relay.addr, d.peer_id) for d in homes}
    a = by_name["h11"]
    out: dict[str, Any] = {}
    async with open_client() as client:

        async def joined_then_first_token() -> None:
            await converge(client, addrs, timeout=SERVE_S)
            out["join_via_relay_s"] = round(time.monotonic() - ready, 2)
            prompt = random_prompt(random.Random(0), 16, run.model.vocab)
            out["first_token_via_relay_s"] = round(await first_token_s(client, a, prompt, ready), 2)

        async def punched() -> None:
            b = by_name["h21"]
            await converge(client, addrs, lambda v: link(v, a, b) == link(v, b, a) == "hole-punched", SERVE_S)
            out["hole_punch_s"] = round(time.monotonic() - ready, 2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(joined_then_first_token)
            nursery.start_soon(punched)
        expected = {frozenset((a, by_name[host])): kind for kind, host in run.decodes.values()}
        view = await converge(client, addrs, serving_knowing(set(addrs), expected), SERVE_S)
        out["serving_after_s"] = round(time.monotonic() - ready, 2)
        if "h31" in by_name:
            c = by_name["h31"]
            out["symmetric_stays_relayed"] = link(view, a, c) == "relayed"
        carried = transports(view, a, run.decodes, by_name)
        relayed = [by_name[host] for i, (_, host) in run.decodes.items() if carried[i] == "libp2p"]
        out["handoffs"] = await _handoffs(client, a, run, run.decodes, carried, relayed)
        links = await kv_links(client, a)
        for kind, host in run.decodes.values():
            out["handoffs"][kind]["carrier"] = links.get(by_name[host], "gloo")
        out["planner_links"] = await probed_links(
            client, a, {kind: by_name[host] for kind, host in run.decodes.values()}
        )
    return out


async def probed_links(client: Any, entry: str, peers: dict[str, str]) -> dict[str, Any]:
    """What the planner was told of ``entry``'s link to each of ``peers`` (kind -> peer id) by the probes that
    ran meanwhile at the daemons' default interval (``measured`` in its status: GB/s, RTT, the path probed);
    None for a link not probed yet."""
    found = {p["peer_id"]: p.get("measured") for p in (await query_status(client, entry)).get("peers") or []}
    return {kind: found.get(peer) for kind, peer in peers.items()}


async def kv_links(client: Any, entry: str) -> dict[str, str]:
    """What carries the KV ``entry`` relays to each peer (``direct``: a hole-punched sealed TCP link, ``splice``:
    a sealed TCP splice through the relay, ``stream``: a libp2p stream; ``own direct``, ``own splice``: such
    links of the workers' own), as its status says; peers it hands KV to over gloo are not named."""
    peers = (await query_status(client, entry)).get("peers") or []
    return {p["peer_id"]: _carrier(p["kv"]) for p in peers if isinstance(p.get("kv"), dict)}


def _carrier(kv: dict[str, Any]) -> str:
    own = sorted(kv.get("worker_links") or {})
    return " + ".join(f"own {kind}" for kind in own) if own else str(kv.get("carrier"))


async def own_links(client: Any, entry: str, peers: list[str]) -> bool:
    """Whether ``entry``'s workers hold links of their own to each of ``peers`` within OWN_LINKS_S (a route asks
    for one with its first message through the daemons)."""
    found = False
    with trio.move_on_after(OWN_LINKS_S):
        while not found:
            links = await kv_links(client, entry)
            found = all(links.get(p, "").startswith("own") for p in peers)
            if not found:
                await trio.sleep(0.2)
    return found


async def _handoffs(
    client: Any,
    entry: str,
    run: Settings,
    decodes: dict[int, tuple[str, str]],
    carried: dict[int, str],
    relayed: list[str],
) -> dict[str, Any]:
    """Hand-off figures of each decode replica, keyed by its link kind: the long prompt's, a short prompt's
    (mostly the fixed cost of a hand-off: the hop, the import, scheduling) and the rate of the bytes between.
    Timed once the workers hold their own links to the ``relayed`` peers, where they can."""
    want = dict.fromkeys(decodes, run.repeats)
    cap, vocab = 8 * run.repeats * len(want), run.model.vocab
    # untimed: a link's first hand-off also grows the heaps of the workers and daemons on its way
    await sample_handoffs(client, entry, run.prompt, run.max_tokens, dict.fromkeys(decodes, 1), cap, vocab, seed=1)
    if not await own_links(client, entry, relayed):
        print(f"no links of the workers' own to all of {relayed} within {OWN_LINKS_S:g} s", file=sys.stderr)
    long = await sample_handoffs(client, entry, run.prompt, run.max_tokens, want, cap, vocab)
    short = await sample_handoffs(client, entry, SHORT_PROMPT, SHORT_TOKENS, want, cap, vocab)
    short_bytes = SHORT_PROMPT * run.model.bytes_per_token
    out = {}
    for i, (kind, _) in decodes.items():
        figures, fixed = summarize(long[i], run.kv_bytes), summarize(short[i], short_bytes)
        rate = marginal_mib_s(figures, fixed, run.kv_bytes - short_bytes)
        out[kind] = figures | {"transport": carried[i], "short": fixed, "marginal_mib_s": rate}
    return out


def nat_probes(lab: NatLab, size: int, reps: int, relayed: bool) -> dict[str, Any]:
    """On the NAT lab's links, MiB/s: raw TCP on home 1's LAN, through both NATs (hole-punched, and to a port
    forwarded at home 2's router: a direct link across the same routers) and through a forwarder on the relay
    host; a KV link's sealed stream on the same links (relayed: through hexgen's splicer); a bare libp2p stream
    (hexgen's Host) on home 1's LAN."""
    hosts = lab.hosts

    def spot(name: str, public: bool = False) -> Spot:
        home = int(name[1])
        return Spot(hosts[name].name, f"10.79.{lab.subnet}.{200 + home}" if public else hosts[name].ip)

    lab.forward("h21", FORWARDED_PORTS)
    forwarded = lab.public_ip(2)
    tcp = {
        "direct": tcp_mib_s(spot("h11"), spot("h12"), size, reps),
        "hole-punched": punched_tcp_mib_s(spot("h11", True), spot("h21", True), size, reps),
        "port-forwarded": tcp_mib_s(spot("h11"), spot("h21"), size, reps, port=FORWARDED_PORTS[0], dial=forwarded),
    }
    sealed = {
        "direct": tcp_mib_s(spot("h11"), spot("h12"), size, reps, port=47051, sealed=True),
        "hole-punched": punched_tcp_mib_s(spot("h11", True), spot("h21", True), size, reps, port=47151, sealed=True),
        "port-forwarded": tcp_mib_s(
            spot("h11"), spot("h21"), size, reps, port=FORWARDED_PORTS[1], sealed=True, dial=forwarded
        ),
    }
    if relayed:
        tcp["relayed"] = forwarded_tcp_mib_s(spot("h11"), spot("h31"), spot("p1"), size, reps)
        sealed["relayed"] = spliced_mib_s(spot("h11"), spot("h31"), spot("p1"), size, reps)
    stream = libp2p_mib_s(spot("h11"), spot("h12"), size, min(reps, 3))
    return {"tcp": tcp, "sealed": sealed, "libp2p_stream": stream}


# -- the flat lab ------------------------------------------------------------------------------------------


def start_flat_daemons(lab: Lab, root: Path, ckpt: Path, plan: Path, started: list[Daemon]) -> None:
    """A daemon at h1 and one at h2 (bootstrapped from h1) on the flat lab's bridge, serving ``ckpt`` with
    ``plan``; both go into ``started``."""
    extra = ["--pin-plan", str(plan), "--request-timeout", REQUEST_TIMEOUT_S]
    first, second = lab.namespaces
    started.append(start_daemon(first, root, "h1", model=str(ckpt), gpu="H100", extra=extra))
    boot = [started[0].addr]
    started.append(start_daemon(second, root, "h2", model=str(ckpt), gpu="H100", extra=extra, bootstrap=boot))


async def flat_phase(lab: Lab, root: Path, ckpt: Path, run: Settings) -> dict[str, Any]:
    """The same layout on one bridge: prefill at h1, decode at h2, hand-offs over the gloo exchange."""
    plan = root / "flat-plan.toml"
    plan.write_text(pinned_plan("h1", ["h2"], run.model.layers))
    started: list[Daemon] = []
    try:
        start_flat_daemons(lab, root, ckpt, plan, started)
        async with open_client() as client:
            view, _ = await wait_until(client, started, serving({d.peer_id for d in started}), SERVE_S, "serving")
            exchange = next(s for s in view.values() if s is not None)["plan"]["body"].get("exchange")
            decodes, peers = {1: ("direct", "h2")}, {"h2": started[1].peer_id}
            carried = transports(view, started[0].peer_id, decodes, peers)
            handoffs = await _handoffs(client, started[0].peer_id, run, decodes, carried, [])
        return {"exchange": exchange, "handoffs": handoffs}
    finally:
        stop_daemons(started)


def flat_probes(lab: Lab, size: int, reps: int) -> dict[str, list[float]]:
    first, second = (Spot(ns.name, ns.ip) for ns in lab.namespaces)
    return {"tcp": tcp_mib_s(first, second, size, reps), "torch": gloo_mib_s(first, second, size, reps)}


# -- the run -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def load_samples(every_s: float = 5.0) -> Iterator[list[float]]:
    """The 1-minute load average every ``every_s`` seconds while the block runs (other users of the machine)."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            samples.append(round(os.getloadavg()[0], 2))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "virtual_machine": "hypervisor" in Path("/proc/cpuinfo").read_text(),
        "gpu": None,
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "libp2p": importlib.metadata.version("libp2p"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def run_labs(run: Settings, root: Path) -> dict[str, Any]:
    """Both labs, one after the other, each removed afterwards; the seconds each phase took in ``phases_s``."""
    clock, phases = time.monotonic(), {}

    def lap(name: str) -> None:
        nonlocal clock
        phases[name], clock = round(time.monotonic() - clock, 1), time.monotonic()

    ckpt = run.model.write(root / "model")
    lap("checkpoint")
    nat_lab = NatLab(homes=run.homes, symmetric=run.symmetric)
    try:
        nat_lab.open()
        for home in range(1, len(run.homes) + 1):
            if run.link_mbit is not None:
                nat_lab.shape(home, run.link_mbit)
        nat = trio.run(nat_phase, nat_lab, root, ckpt, run)
        lap("nat_serving")
        nat["probes"] = nat_probes(nat_lab, run.kv_bytes, run.probes, relayed=3 in run.decodes)
        lap("nat_probes")
    finally:
        nat_lab.close()
    flat: dict[str, Any] = {}
    if run.flat:
        flat_lab = Lab(per_side=2, sides=("A",))
        try:
            flat_lab.open()
            flat = trio.run(flat_phase, flat_lab, root, ckpt, run)
            lap("flat_serving")
            flat["probes"] = flat_probes(flat_lab, run.kv_bytes, run.probes)
            lap("flat_probes")
        finally:
            flat_lab.close()
    return {"nat": nat, "flat": flat, "phases_s": phases}


def _median(rates: list[float] | None) -> float | None:
    return round(statistics.median(rates), 1) if rates else None


def _row(link: str, transport: str, mib_s: float | None, what: str, where: str, **extra: Any) -> dict[str, Any]:
    return {"link": link, "transport": transport, "mib_s": mib_s, "what": what, "where": where} | extra


def _rates(rates: list[float]) -> list[float]:
    return [round(r, 1) for r in rates]


def _handoff_extra(figures: dict[str, Any]) -> dict[str, Any]:
    return {
        "carrier": figures.get("carrier", "gloo"),
        "marginal_mib_s": figures["marginal_mib_s"],
        "handoff_s": figures["handoffs_s"],
        "short_handoff_s": figures["short"]["handoffs_s"],
        "tpot_ms": figures["tpot_ms"],
    }


def throughput_rows(nat: dict[str, Any], flat: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's ``throughput`` list: one row per link, transport and what was timed."""
    where = {
        "direct": "home 1 LAN, h11 -> h12",
        "hole-punched": "h11 -> h21",
        "port-forwarded": "h11 -> h21 at a port forwarded by home 2's router",
        "relayed": "h11 -> h31 via p1",
    }
    rows = [
        _row(
            kind, f["transport"], f["mib_s"], f"KV hand-off ({CARRIED[f['carrier']]})", where[kind], **_handoff_extra(f)
        )
        for kind, f in nat["handoffs"].items()
    ]
    stream = nat["probes"]["libp2p_stream"]
    what = "bare stream between two hexgen Hosts (Noise, yamux)"
    rows.append(_row("direct", "libp2p", _median(stream), what, where["direct"], samples_mib_s=_rates(stream)))
    labels = {
        "direct": "socket",
        "hole-punched": "socket, a TCP simultaneous open through both NATs",
        "port-forwarded": "socket through both NATs, dialled at a forwarded port (no punch)",
    }
    for kind, rates in nat["probes"]["tcp"].items():
        what = labels.get(kind, "socket through a user-space TCP forwarder on the relay host (not the libp2p relay)")
        rows.append(_row(kind, "tcp", _median(rates), what, where[kind], samples_mib_s=_rates(rates)))
    for kind, rates in nat["probes"]["sealed"].items():
        what = "a KV link's sealed records (AES-GCM, 512 KiB)" + (", hexgen's splicer" if kind == "relayed" else "")
        rows.append(_row(kind, "kv-link", _median(rates), what, where[kind], samples_mib_s=_rates(rates)))
    if flat:
        f, flat_where = flat["handoffs"]["direct"], "flat bridge, h1 -> h2"
        what = "KV hand-off, flat network"
        rows.append(_row("direct", f["transport"], f["mib_s"], what, flat_where, **_handoff_extra(f)))
        for transport, what in (("torch", "gloo send/recv"), ("tcp", "socket")):
            rates = flat["probes"][transport]
            rows.append(_row("direct", transport, _median(rates), what, flat_where, samples_mib_s=_rates(rates)))
    return rows


CARRIED = {
    "gloo": "gloo",
    "direct": "sealed hole-punched TCP",
    "splice": "sealed TCP spliced by the relay",
    "stream": "libp2p stream",
    "own direct": "sealed hole-punched TCP, worker to worker",
    "own splice": "sealed TCP spliced by the relay, worker to worker",
}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def targets(nat: dict[str, Any]) -> dict[str, Any]:
    """A KV link's sealed stream against raw TCP on each link (relayed: hexgen's splicer against a plain
    forwarder), and hole-punched against direct; each hand-off against raw TCP on its link; hole-punched against
    direct (hand-offs, whatever carries them, and raw TCP); a bare libp2p stream against raw TCP on the LAN."""
    handoffs = nat["handoffs"]
    tcp = {kind: _median(rates) for kind, rates in nat["probes"]["tcp"].items()}
    vs_tcp = {k: {"transport": f["transport"], "ratio": _ratio(f["mib_s"], tcp.get(k))} for k, f in handoffs.items()}
    libp2p = [r["ratio"] for r in vs_tcp.values() if r["transport"] == "libp2p"]
    punched, direct = handoffs.get("hole-punched", {}), handoffs.get("direct", {})
    handoff_ratio = _ratio(punched.get("mib_s"), direct.get("mib_s"))
    sealed = {kind: _median(rates) for kind, rates in nat["probes"]["sealed"].items()}
    link_vs_tcp = {kind: _ratio(rate, tcp.get(kind)) for kind, rate in sealed.items()}
    return {
        "kv_link_vs_tcp": link_vs_tcp,
        "kv_link_at_least_half_of_tcp": all(r is not None and r >= 0.5 for r in link_vs_tcp.values()),
        "kv_link_hole_punched_vs_direct": _ratio(sealed.get("hole-punched"), sealed.get("direct")),
        "hole_punched_vs_port_forwarded": {
            "tcp": _ratio(tcp.get("hole-punched"), tcp.get("port-forwarded")),
            "kv_link": _ratio(sealed.get("hole-punched"), sealed.get("port-forwarded")),
            "handoff_vs_tcp": _ratio(punched.get("mib_s"), tcp.get("port-forwarded")),
        },
        "handoff_vs_tcp": vs_tcp,
        "libp2p_at_least_half_of_tcp": bool(libp2p) and all(r is not None and r >= 0.5 for r in libp2p),
        "hole_punched_vs_direct": {
            "handoff": handoff_ratio,
            "handoff_transports": f"{punched.get('transport')} vs {direct.get('transport')}",
            "tcp": _ratio(tcp.get("hole-punched"), tcp.get("direct")),
        },
        "hole_punched_within_10pct": handoff_ratio is not None and handoff_ratio >= 0.9,
        "libp2p_stream_vs_tcp_direct": _ratio(_median(nat["probes"]["libp2p_stream"]), tcp.get("direct")),
    }


def result_json(run: Settings, labs: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    nat, flat = labs["nat"], labs["flat"]
    tpot = {kind.replace("-", "_"): f["tpot_ms"] for kind, f in nat["handoffs"].items()}
    keys = ("join_via_relay_s", "first_token_via_relay_s", "hole_punch_s", "serving_after_s")
    return {k: nat.get(k) for k in keys} | {
        "throughput": throughput_rows(nat, flat),
        "tpot_ms": {
            "flat": flat["handoffs"]["direct"]["tpot_ms"] if flat else None,
            "relayed": tpot.get("relayed"),
            "hole_punched": tpot.get("hole_punched"),
            "direct_home_lan": tpot.get("direct"),
        },
        "targets": targets(nat),
        "planner_links": nat.get("planner_links"),
        "symmetric_stays_relayed": nat.get("symmetric_stays_relayed"),
        "flat_exchange": flat.get("exchange"),
        "kv": {
            "prompt_tokens": run.prompt,
            "max_tokens": run.max_tokens,
            "kv_mib": round(run.kv_bytes / MIB, 1),
            "bytes_per_token": run.model.bytes_per_token,
            "model": vars(run.model),
        },
        "requests_per_link": run.repeats,
        "link_mbit": run.link_mbit,
        "phases_s": labs["phases_s"],
        "quick": run.quick,
        "machine": meta,
    }


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(result: dict[str, Any]) -> None:
    for key in ("join_via_relay_s", "hole_punch_s", "first_token_via_relay_s", "serving_after_s"):
        print(f"{key:<26} {result[key]}")
    print(f"\nKV hand-off of {result['kv']['kv_mib']} MiB ({result['kv']['prompt_tokens']} tokens)")
    print(f"{'link':<14} {'transport':<10} {'MiB/s':>8} {'marginal':>9}  what (where)")
    for row in result["throughput"]:
        mib_s, extra = (_cell(row.get(key)) for key in ("mib_s", "marginal_mib_s"))
        print(f"{row['link']:<14} {row['transport']:<10} {mib_s:>8} {extra:>9}  {row['what']} ({row['where']})")
    print("\nTPOT ms: " + ", ".join(f"{k} {v}" for k, v in result["tpot_ms"].items()))
    if result["link_mbit"] is not None:
        print(f"home links shaped to {result['link_mbit']} Mbit/s each way")
    print("targets: " + json.dumps(result["targets"]))
    print("the planner's figures (h11's probes): " + json.dumps(result["planner_links"]))
    machine = result["machine"]
    loads = machine["load_samples"] or [machine["load_average_start"][0]]
    print(f"machine: {machine['cpu_count']} cores, no GPU; 1-minute load {min(loads)}-{max(loads)} during the run")


def lab_args(doc: str, quick: str, shaping: bool = False) -> argparse.Namespace:
    """The command line of a benchmark in the labs: ``--quick`` (what ``quick`` says), ``--json``, ``--keep``,
    and with ``shaping`` ``--link-mbit``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    parser.add_argument("--keep", metavar="DIR", type=Path, help="work in DIR and keep it (daemon logs, checkpoint)")
    if shaping:
        help = "shape every home router's link to MBIT Mbit/s each way, as a home connection (default: unshaped)"
        parser.add_argument("--link-mbit", metavar="MBIT", type=_mbit, help=help)
    return parser.parse_args()


def _mbit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100_000:
        raise argparse.ArgumentTypeError(f"a link's Mbit/s is a whole number from 1 to 100000, not {text!r}")
    return int(text)


def in_labs(what: str, keep: Path | None, run: Callable[[Path], T]) -> tuple[T, dict[str, Any]] | None:
    """``run(root)`` in a working directory (``keep``, or a temporary one), with the machine's description and
    its load sampled meanwhile; None, having said why, when no lab can be built here."""
    try:
        check_nat_available()
    except NetnsUnavailable as exc:
        print(f"{what}: cannot build the labs: {exc}", file=sys.stderr)
        return None
    meta = machine()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        root = keep or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        loads = stack.enter_context(load_samples())
        labs = run(root)
    meta |= {"load_average_end": [round(x, 2) for x in os.getloadavg()], "load_samples": loads}
    meta["wall_s"] = round(time.monotonic() - started)
    return labs, meta


def write_json(out: str | None, result: dict[str, Any]) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")


def main() -> int:
    args = lab_args(__doc__, "two homes, 16 MiB of KV, no flat lab (under a minute)", shaping=True)
    run = dataclasses.replace(Settings.of(args.quick), link_mbit=args.link_mbit)
    ran = in_labs("nat benchmark", args.keep, lambda root: run_labs(run, root))
    if ran is None:
        return 2
    result = result_json(run, *ran)
    print_table(result)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
