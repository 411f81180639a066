"""Worlds that cannot form: the cause a worker reports, the failure report gossiped for it, and the
memory of peer pairs whose link cannot carry a world.

A worker whose replica world or exchange group cannot connect says which world and which address it
could not reach (``WorldFailure``). Its daemon gossips a ``FailureReport`` naming the world's peers; every
node maps the address back to a peer of that world (``blocked_pair``) and remembers the pair
(``BlockedLinks``) until either peer's advert changes its addresses or ``BLOCK_TTL_S`` passes, and the
coordinator plans without it. Only a failure naming the address it could not reach blocks a pair: a bare
timeout (a peer that crashed or was slow) says nothing about the link.
Bad input never raises anything but ValueError from the parsers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

WORLDS = ("replica world", "exchange group")
STAGES = ("arrive", "connect")
MAX_ERROR_CHARS = 500
MAX_PEERS = 1024
# A blocked pair may be tried again after this long: a host that restarts with the same addresses, or a
# network fixed in place, would otherwise stay blocked on every node for good.
BLOCK_TTL_S = 600.0


@dataclass(frozen=True)
class WorldFailure:
    """Why a world did not form: which one, at which step, and the address gloo could not reach."""

    world: str
    stage: str
    remote: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"world": self.world, "stage": self.stage, "remote": self.remote}

    @staticmethod
    def from_dict(raw: Any) -> WorldFailure:
        """Raises ValueError for anything but a cause as ``to_dict`` writes it."""
        if not isinstance(raw, dict) or raw.get("world") not in WORLDS or raw.get("stage") not in STAGES:
            raise ValueError("a world failure names its world and stage")
        remote = raw.get("remote")
        if remote is not None and not _is_address(remote):
            raise ValueError("a world failure's remote is an IP address")
        return WorldFailure(raw["world"], raw["stage"], remote)


def _is_address(text: Any) -> bool:
    if not isinstance(text, str) or len(text) > 64:
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class FailureReport:
    """A member's worker failed in plan (term, epoch); ``peers`` and ``cause`` say so when its world could
    not form (the peers of that world, the reporter among them)."""

    term: int
    epoch: int
    rank: int
    error: str
    peers: tuple[str, ...] = ()
    cause: WorldFailure | None = None

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"term": self.term, "epoch": self.epoch, "rank": self.rank, "error": self.error}
        if self.cause is not None:
            body |= {"peers": list(self.peers), "cause": self.cause.to_dict()}
        return body

    @staticmethod
    def from_wire(body: Any) -> FailureReport:
        """The report in a gossiped body; raises ValueError for a malformed one."""
        if not isinstance(body, dict):
            raise ValueError("a failure report is a map")
        for key in ("term", "epoch", "rank"):
            if type(body.get(key)) is not int:
                raise ValueError(f"a failure report needs an integer {key}")
        error = body.get("error")
        error = error[:MAX_ERROR_CHARS] if isinstance(error, str) else ""
        cause = None if body.get("cause") is None else WorldFailure.from_dict(body["cause"])
        peers = body.get("peers", [])
        if not isinstance(peers, list) or len(peers) > MAX_PEERS or not all(isinstance(p, str) for p in peers):
            raise ValueError("a failure report's peers are a list of peer ids")
        return FailureReport(body["term"], body["epoch"], body["rank"], error, tuple(peers), cause)


def blocked_pair(
    reporter: str, report: FailureReport, addresses: Mapping[str, Iterable[str]]
) -> tuple[str, str] | None:
    """The pair of peers whose link could not carry ``report``'s world, or None when the report does not
    say (not a connect failure, no address named, or the address fits no single peer). ``addresses``:
    each peer's IPs from its advert. The peer at the unreachable address is the other end; in a world of two
    peers (on one machine, or behind NAT) an address that fits no single peer still names the other one.
    O(peers x addresses)."""
    cause = report.cause
    if cause is None or cause.stage != "connect" or cause.remote is None:
        return None
    others = sorted(set(report.peers) - {reporter})
    at = [p for p in others if cause.remote in set(addresses.get(p, ()))]
    if len(at) == 1:
        return _pair(reporter, at[0])
    return _pair(reporter, others[0]) if len(others) == 1 else None


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


@dataclass(frozen=True)
class BlockedLink:
    """Why a pair cannot carry a world, and each peer's addresses when it was found out."""

    pair: tuple[str, str]
    reason: str
    addresses: tuple[tuple[str, ...], tuple[str, ...]]
    until: float = float("inf")  # when it may be tried again


@dataclass
class BlockedLinks:
    """Peer pairs that cannot carry a world, each until either peer advertises other addresses or
    ``ttl_s`` passes."""

    links: dict[tuple[str, str], BlockedLink] = field(default_factory=dict)
    ttl_s: float = BLOCK_TTL_S

    def block(self, pair: tuple[str, str], reason: str, addresses: Mapping[str, Iterable[str]], now: float) -> bool:
        """Remember ``pair`` (the first reason stays: plans already quote it); True when it is new."""
        pair = _pair(*pair)
        if pair in self.links and self.links[pair].until > now:
            return False
        ips = tuple(tuple(sorted(addresses.get(p, ()))) for p in pair)
        self.links[pair] = BlockedLink(pair, reason, ips, now + self.ttl_s)  # type: ignore[arg-type]
        return True

    def refresh(self, addresses: Mapping[str, Iterable[str]], now: float) -> list[tuple[str, str]]:
        """Forget every pair whose block expired or one of whose peers now advertises other addresses (it
        moved, or a fixed network came back under a new address); returns the pairs forgotten. A peer
        absent from ``addresses`` (gone for now) keeps its pairs until they expire."""
        forgotten = []
        for pair, link in list(self.links.items()):
            if link.until <= now:
                forgotten.append(pair)
                del self.links[pair]
                continue
            for peer, then in zip(pair, link.addresses, strict=True):
                if peer in addresses and tuple(sorted(addresses[peer])) != then:
                    forgotten.append(pair)
                    del self.links[pair]
                    break
        return forgotten

    def among(self, peers: Iterable[str]) -> list[BlockedLink]:
        """The blocked pairs both of whose peers are in ``peers``, in a stable order."""
        present = set(peers)
        return [link for pair, link in sorted(self.links.items()) if set(pair) <= present]


def advert_ips(addrs: Iterable[Any]) -> list[str]:
    """The IP addresses in a peer's advertised multiaddrs (``/ip4/ADDR/...``, ``/ip6/ADDR/...``)."""
    ips = []
    for addr in addrs:
        parts = addr.split("/") if isinstance(addr, str) else []
        if len(parts) > 2 and parts[1] in ("ip4", "ip6") and _is_address(parts[2]):
            ips.append(parts[2])
    return sorted(set(ips))
