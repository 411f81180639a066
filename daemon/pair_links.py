"""The kind of link between each pair of peers, from what both ends advertise, and which pairs a plan uses.

Worlds (gloo/NCCL) open their own TCP connections between hosts, so only a direct link carries them. A
relayed pair has no TCP path at all; a hole-punched pair has one, but it is the libp2p connection the punch
opened through both NATs, not a port a worker can dial; an outbound pair's connection was dialled by a host
behind NAT to a public one, which cannot dial back (``outbound_pairs``): none of them carries a world. All
carry messages over the daemons' libp2p streams: KV hand-offs, so a plan whose ranks sit on such a pair moves
its epoch's hand-offs that way (``exchange_transport``), and the stage boundaries of a group spanning one,
whose stages are then each a world of their own (``bridged_groups``). A relayed pair's bytes also cross its
relay (``pair_relays``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from hexgen.coordinator.plan import Group, Plan
from hexgen.daemon.messages import UNKNOWN_LINK, PlanLink

Pair = tuple[str, str]

DIRECTNESS = {"relayed": 0, "hole-punched": 1, "direct": 2}
NO_WORLDS = {
    "relayed": "only through a relay",
    "hole-punched": "only by a hole-punched libp2p connection, which workers cannot dial",
    "outbound": "only by a connection the private one dialled out of its NAT, which the public one cannot dial back",
}
# GB/s the planner assumes for a pair of a kind in NO_WORLDS that no probe has measured yet, instead of the
# 10 Gbit/s default of a direct link: the KV of such a pair crosses NATs (hole-punched) or a relay's uplink,
# shared with everything else the relay carries, and nothing is known of either until the pair's KV link is
# probed (``daemon.path_probes``); a link that cannot be set up leaves the KV on libp2p streams, which moved
# 13-23 MiB/s through a relay (../shared/notes/nat.md). A probe's figure replaces these as soon as there is one.
UNMEASURED_GB_S = {"relayed": 0.015, "hole-punched": 0.1, "outbound": 0.1}
CIRCUIT = "/p2p-circuit"  # RELAY_ADDR/p2p/RELAY_ID/p2p-circuit/p2p/PEER_ID


def _pair(a: str, b: str) -> Pair:
    return (a, b) if a < b else (b, a)


def pair_kinds(reports: Mapping[str, Mapping[str, str]]) -> dict[Pair, str]:
    """Each pair (lower id, higher id) -> its kind of link, from ``reports`` (each peer -> the kind of its
    link to each peer it is connected to, as its advert says). One connection serves both ends, so the ends
    disagree only while it changes: the more direct report wins. O(reports)."""
    kinds: dict[Pair, str] = {}
    for seer, seen in reports.items():
        for peer, kind in seen.items():
            if peer == seer or kind not in DIRECTNESS:
                continue
            key = _pair(seer, peer)
            if key not in kinds or DIRECTNESS[kind] > DIRECTNESS[kinds[key]]:
                kinds[key] = kind
    return kinds


def outbound_pairs(kinds: Mapping[Pair, str], reachability: Mapping[str, str]) -> dict[Pair, str]:
    """``kinds`` with each direct pair one of whose ends is "public" and the other "private" (``reachability``:
    peer -> what its signed advert says, from AutoNAT) made "outbound": the private end dialled the public one
    out of its NAT, and nothing at the public end can dial it back, so no world spans the pair (a world's
    store sits at one end, and a gloo pair connects in whichever direction the two addresses sort). Two private
    ends linked directly share a LAN; an end that does not know is taken as dialable. O(pairs)."""
    out = dict(kinds)
    for pair, kind in kinds.items():
        if kind == "direct" and {reachability.get(pair[0]), reachability.get(pair[1])} == {"public", "private"}:
            out[pair] = "outbound"
    return out


def worldless_pairs(kinds: Mapping[Pair, str], peers: Iterable[str]) -> list[tuple[Pair, str]]:
    """The pairs of ``peers`` whose link cannot carry a world (but can carry KV hand-offs and bridged stage
    boundaries over libp2p), each with why, sorted. O(pairs)."""
    present = set(peers)
    return [
        (pair, f"peers {pair[0]} and {pair[1]} are linked {NO_WORLDS[kind]}; a stage's world needs direct TCP")
        for pair, kind in sorted(kinds.items())
        if kind in NO_WORLDS and set(pair) <= present
    ]


def pair_relays(kinds: Mapping[Pair, str], addrs: Mapping[str, Iterable[str]]) -> dict[Pair, str]:
    """Each relayed pair of ``kinds`` -> the peer relaying it, where the ends' advertised addresses (``addrs``:
    peer -> its advert's) narrow it to one: the one relay both ends hold a slot on, else the only relay either
    does. A relayed connection runs through a relay one of its ends holds a slot on, but no advert says which,
    so a pair with more candidates is left out. O(pairs + addresses)."""
    slots = {peer: {_relay_of(addr) for addr in found} - {""} for peer, found in addrs.items()}
    relays: dict[Pair, str] = {}
    for pair, kind in sorted(kinds.items()):
        x, y = slots.get(pair[0], set()), slots.get(pair[1], set())
        candidates = (x & y) or (x | y)
        if kind == "relayed" and len(candidates) == 1:
            relays[pair] = min(candidates)
    return relays


def _relay_of(addr: str) -> str:
    """The relay's peer id in a circuit address; "" for any other address. O(len(addr))."""
    relay_part, sep, _ = addr.partition(CIRCUIT)
    return relay_part.rpartition("/p2p/")[2] if sep and "/p2p/" in relay_part else ""


def _worldless_among(peers: set[str], kinds: Mapping[Pair, str]) -> bool:
    """Whether two of ``peers`` are linked only through a relay or a hole punch. O(pairs)."""
    return any(kind in NO_WORLDS and set(pair) <= peers for pair, kind in kinds.items())


def bridged_groups(plan: Plan | None, gpu_peer: Mapping[int, str], kinds: Mapping[Pair, str]) -> tuple[int, ...]:
    """The ids of ``plan``'s groups that span a worldless pair (two of their peers are linked only through a
    relay or a hole punch), sorted: each stage of such a group is a world of its own and the daemons carry
    everything between its stages. A planned group's stages never span one (``fallback.needs_pair``). None
    for no plan. ``gpu_peer``: the peer of each planner GPU. O(GPUs + groups x pairs)."""
    if plan is None:
        return ()
    return tuple(
        sorted(group.id for group in plan.groups if _worldless_among({gpu_peer[g] for g in group.gpus}, kinds))
    )


def exchange_transport(plan: Plan | None, gpu_peer: Mapping[int, str], kinds: Mapping[Pair, str]) -> str:
    """How ``plan``'s epoch moves its KV hand-offs and bridged stage boundaries (one of ``EXCHANGE_TRANSPORTS``):
    "libp2p" when some group is bridged (``bridged_groups``: the daemons' KV channel carries the bridge), or
    when it has a prefill group and some two peers hosting its ranks are linked only through a relay or a hole
    punch (the exchange group of every rank could not form); else "torch". ``gpu_peer``: the peer of each
    planner GPU. O(GPUs + groups x pairs)."""
    if plan is None:
        return "torch"
    if bridged_groups(plan, gpu_peer, kinds):
        return "libp2p"
    if not any(group.role == "prefill" for group in plan.groups):
        return "torch"
    hosting = {gpu_peer[g] for group in plan.groups for g in group.gpus}
    return "libp2p" if _worldless_among(hosting, kinds) else "torch"


def gloo_groups(plan: Plan | None, gpu_peer: Mapping[int, str], kinds: Mapping[Pair, str]) -> tuple[int, ...]:
    """The groups of ``plan`` whose hand-offs among themselves go over a gloo exchange group when its epoch
    relays KV: groups whose hosts are all pairwise known to be linked directly, taken greedily, those with the
    fewest other partners first (ties in plan order); every other group's hand-offs go through the daemons,
    as a bridged group's always do (its hosts are not all linked directly). Sorted ids; none when fewer than two
    groups could share one. O(groups^2 x GPUs^2)."""
    if plan is None:
        return ()
    bridged = set(bridged_groups(plan, gpu_peer, kinds))
    hosts = {group.id: {gpu_peer[g] for g in group.gpus} for group in plan.groups if group.id not in bridged}

    def apart(a: set[str], b: set[str]) -> bool:
        # a pair no end reported yet may be anything: only a known direct link is trusted with a gloo group
        return any(kinds.get(_pair(x, y)) != "direct" for x in a for y in b if x != y)

    partners = {g: sum(apart(hosts[g], hosts[o]) for o in hosts if o != g) for g in hosts}
    chosen: list[int] = []
    for group in sorted(hosts, key=lambda g: (partners[g], g)):
        if not any(apart(hosts[group], hosts[other]) for other in chosen):
            chosen.append(group)
    return tuple(sorted(chosen)) if len(chosen) > 1 else ()


def with_transports(
    links: Iterable[PlanLink], exchange: str, gloo: Iterable[int], bridged: Iterable[int] = ()
) -> tuple[PlanLink, ...]:
    """``links`` with the transport of each: a stage boundary's is torch (a replica's own world) unless it
    crosses a worldless pair or its group is in ``bridged`` (``bridged_groups``: every stage a world of its
    own), then libp2p; a hand-off's is torch unless the epoch relays KV (``exchange`` "libp2p") and one of
    its groups is outside ``gloo``. O(links + groups)."""
    members, bridges = set(gloo), set(bridged)

    def over_libp2p(link: PlanLink) -> bool:
        if link.use == "stage":
            return link.kind in NO_WORLDS or link.groups[0] in bridges
        return exchange == "libp2p" and not set(link.groups) <= members

    return tuple(dataclasses.replace(link, transport="libp2p") if over_libp2p(link) else link for link in links)


def plan_links(plan: Plan, gpu_peer: Mapping[int, str], kinds: Mapping[Pair, str]) -> tuple[PlanLink, ...]:
    """Every pair of different peers ``plan`` moves model data between, with its kind of link: consecutive
    stages of a group (activations), and the stages of a prefill and a decode group a flow joins that hold
    the same layers (KV). ``gpu_peer``: the peer of each planner GPU. O(groups x stages^2 x GPUs^2)."""
    found: dict[tuple[str, Pair, tuple[int, int]], None] = {}
    for group in plan.groups:
        for left, right in zip(group.stages, group.stages[1:], strict=False):
            for pair in _crossings(left.gpus, right.gpus, gpu_peer):
                found["stage", pair, (group.id, group.id)] = None
    ids = {group.id: group for group in plan.groups}
    for flow in plan.flows:
        src = ids.get(flow.src) if isinstance(flow.src, int) else None
        dst = ids.get(flow.dst) if isinstance(flow.dst, int) else None
        if src is None or dst is None or src.role != "prefill":
            continue
        for pair in _handoffs(src, dst, gpu_peer):
            found["handoff", pair, (src.id, dst.id)] = None
    return tuple(PlanLink(pair, use, kinds.get(pair, UNKNOWN_LINK), groups) for use, pair, groups in found)


def _crossings(left: Iterable[int], right: Iterable[int], gpu_peer: Mapping[int, str]) -> list[Pair]:
    """The pairs of different peers between two sets of GPUs, sorted. O(GPUs^2)."""
    return sorted({_pair(gpu_peer[a], gpu_peer[b]) for a in left for b in right if gpu_peer[a] != gpu_peer[b]})


def _handoffs(prefill: Group, decode: Group, gpu_peer: Mapping[int, str]) -> list[Pair]:
    """The pairs a KV hand-off from ``prefill`` to ``decode`` crosses: stages holding common layers."""
    pairs: list[Pair] = []
    for p in prefill.stages:
        for d in decode.stages:
            if max(p.layers[0], d.layers[0]) < min(p.layers[1], d.layers[1]):
                pairs.extend(pair for pair in _crossings(p.gpus, d.gpus, gpu_peer) if pair not in pairs)
    return pairs
