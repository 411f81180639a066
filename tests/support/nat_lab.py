"""A NAT lab of network namespaces: a "public" bridge with public hosts (a relay), and home networks, each
behind its own router namespace that masquerades (no port forwarding, no inbound route).

Layout (names start with ``hxp`` and the tag of ``netns``, so its leftover sweep removes them too)::

    ns hxp<tag>-p1 ─┐                                 ┌─ router hxp<tag>-r1 ─ bridge hxp<tag>H1 ─ ns hxp<tag>-h11, -h12
                    ├─ bridge hxp<tag>P (10.79.T.0/24) ┤
    root (.1) ──────┘                                 └─ router hxp<tag>-r2 ─ bridge hxp<tag>H2 ─ ns hxp<tag>-h21

A router has ``pub0`` on the public bridge and ``home0`` on its home bridge (10.8K.T.0/24, K the home), forwards
with ``MASQUERADE`` on ``pub0`` (``--random-fully`` for a symmetric NAT: a new random source port for every
connection, which defeats hole punching) and silently drops every packet coming in on ``pub0`` that is not
part of a connection from inside (a refusal would be a RST, which breaks TCP simultaneous open). Home hosts route
everything through their router; public hosts route only the public /24, so nothing public reaches a home
address except as a reply. The root namespace has an address on the public bridge: the test's client is a
public host, which polls the daemons' statuses (``statuses``, ``converge``), those at home through the relay.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from hexgen.daemon import swarm_view
from hexgen.daemon.host import Host
from hexgen.daemon.relay import connect_address
from hexgen.daemon.rpc import query_status
from hexgen.testing.netns import (
    PREFIX,
    Namespace,
    NetnsUnavailable,
    _base36,
    _ip,
    check_available,
    remove_leftovers,
)


def _free_subnet(seed: int) -> int:
    """A T for which 10.79.T.0/24 (public) and the homes' 10.8K.T.0/24 are unused by root routes."""
    routes = _ip("-o", "route", "show", check=False).stdout
    for offset in range(250):
        t = 1 + (seed + offset) % 250
        if not any(f"10.{net}.{t}." in routes for net in (79, 81, 82, 83, 84)):
            return t
    raise NetnsUnavailable("no free 10.79.T.0/24 subnet")


def _in(ns: str, *command: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", ns, *command], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"in {ns}: {' '.join(command)}: {done.stderr.strip()}")


def check_nat_available() -> None:
    """Raise NetnsUnavailable unless namespaces can be made and ``iptables`` (the Makefile's sysdeps) runs."""
    check_available()
    if shutil.which("iptables") is None:
        raise NetnsUnavailable("no `iptables` on PATH (`make sysdeps` installs it)")


@dataclass
class NatLab:
    """``homes[k]`` hosts behind router k+1 (``symmetric[k]``: ``--random-fully``), ``public`` hosts beside the
    routers; ``close`` removes all of it, and is safe after a failed ``open`` and twice."""

    homes: tuple[int, ...] = (1, 1)
    public: int = 1
    symmetric: tuple[bool, ...] = ()
    tag: str = field(default_factory=lambda: _base36(os.getpid()))
    subnet: int = -1
    hosts: dict[str, Namespace] = field(default_factory=dict)

    def name(self, kind: str, suffix: object = "") -> str:
        out = f"{PREFIX}{self.tag}{kind}{suffix}"
        assert len(out) <= 15, out  # IFNAMSIZ - 1
        return out

    @property
    def root_ip(self) -> str:
        return f"10.79.{self.subnet}.1"

    def open(self) -> NatLab:
        remove_leftovers(self.tag)
        self.subnet = _free_subnet(os.getpid())
        bridge = self.name("P")
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{self.root_ip}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for k in range(1, self.public + 1):
            self._host(f"p{k}", f"10.79.{self.subnet}.{10 + k}", bridge, None)
        for home, count in enumerate(self.homes, start=1):
            symmetric = home <= len(self.symmetric) and self.symmetric[home - 1]
            self._home(home, count, symmetric)
        return self

    def _namespace(self, label: str) -> str:
        ns = f"{PREFIX}{self.tag}-{label}"
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def _leg(self, ns: str, inside: str, bridge: str, address: str) -> None:
        """A veth from ``bridge`` into ``ns``, named ``inside`` there, with ``address`` (CIDR)."""
        outside = self.name("V", f"{ns.rsplit('-', 1)[1]}{inside[0]}")
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", ns)
        _ip("link", "set", outside, "master", bridge, "up")
        _ip("-n", ns, "addr", "add", address, "dev", inside)
        _ip("-n", ns, "link", "set", inside, "up")

    def _host(self, label: str, ip: str, bridge: str, gateway: str | None) -> Namespace:
        ns = self._namespace(label)
        host = Namespace(ns, label, ip, len(self.hosts) + 1)
        self.hosts[label] = host
        etc = os.path.join("/etc/netns", ns)
        os.makedirs(etc, exist_ok=True)
        with open(os.path.join(etc, "hosts"), "w") as hosts:
            hosts.write(f"127.0.0.1 localhost\n127.0.0.1 {host.hostname}\n")
        self._leg(ns, "data0", bridge, f"{ip}/24")
        if gateway is not None:
            _ip("-n", ns, "route", "add", "default", "via", gateway)
        return host

    def _home(self, home: int, count: int, symmetric: bool) -> None:
        lan = f"10.{80 + home}.{self.subnet}"
        bridge = self.name("H", home)
        _ip("link", "add", bridge, "type", "bridge")
        _ip("link", "set", bridge, "up")
        router = self._namespace(f"r{home}")
        self._leg(router, "pub0", self.name("P"), f"{self.public_ip(home)}/24")
        self._leg(router, "home0", bridge, f"{lan}.1/24")
        _in(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        masquerade = ["-t", "nat", "-A", "POSTROUTING", "-o", "pub0", "-j", "MASQUERADE"]
        _in(router, "iptables", *masquerade, *(["--random-fully"] if symmetric else []))
        established = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
        for chain in ("FORWARD", "INPUT"):  # unsolicited packets vanish, as at a home router: no RST
            _in(router, "iptables", "-A", chain, "-i", "pub0", *established)
            _in(router, "iptables", "-A", chain, "-i", "pub0", "-j", "DROP")
        for k in range(1, count + 1):
            self._host(f"h{home}{k}", f"{lan}.{10 + k}", bridge, f"{lan}.1")

    def public_ip(self, home: int) -> str:
        """Router ``home``'s address on the public bridge: what its home's hosts are seen at from outside."""
        return f"10.79.{self.subnet}.{200 + home}"

    def forward(self, target: str, ports: tuple[int, int]) -> None:
        """Forward TCP ports ``ports`` (first, last) of home host ``target``'s router's public address to it, as
        an operator forwards ports on a home router: a connection from outside reaches ``target`` through the
        same NATs a hole-punched one crosses, with no punch."""
        router = self._router(target)
        span = f"{ports[0]}:{ports[1]}"
        ip = self.hosts[target].ip
        tcp = ["-i", "pub0", "-p", "tcp", "--dport", span]
        _in(router, "iptables", "-t", "nat", "-A", "PREROUTING", *tcp, "-j", "DNAT", "--to-destination", ip)
        _in(router, "iptables", "-I", "FORWARD", "1", *tcp, "-d", ip, "-j", "ACCEPT")

    def shape(self, home: int, mbit: int) -> None:
        """Limit router ``home``'s link to ``mbit`` Mbit/s each way (a token bucket on its public and its home
        interface), as a home connection is: what crosses it is bounded by the link, not by the machine."""
        if mbit < 1:
            raise ValueError(f"a link carries at least 1 Mbit/s, not {mbit}")
        burst = max(32 << 10, mbit * 1_000_000 // 8 // 100)  # 10 ms at the rate
        router = f"{PREFIX}{self.tag}-r{home}"
        for dev in ("pub0", "home0"):
            rate = ["rate", f"{mbit}mbit", "burst", str(burst), "latency", "50ms"]
            _in(router, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", *rate)

    def _router(self, host: str) -> str:
        if not (host.startswith("h") and host in self.hosts):
            raise ValueError(f"{host} is not a home host of this lab")
        return f"{PREFIX}{self.tag}-r{host[1]}"

    def reaches(self, source: str, target: str, port: int, at: str | None = None) -> bool:
        """Whether a TCP connection from host ``source`` to ``target``'s address (or ``at``) on ``port`` opens
        (1 s)."""
        code = (
            "import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), 1).close()\n"
            "except OSError:\n sys.exit(1)"
        )
        ns, ip = self.hosts[source].name, at or self.hosts[target].ip
        command = ["ip", "netns", "exec", ns, sys.executable, "-c", code, ip, str(port)]
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0

    def close(self) -> None:
        remove_leftovers(self.tag)
        self.hosts.clear()


@contextlib.contextmanager
def open_nat_lab(
    homes: tuple[int, ...] = (1, 1), public: int = 1, symmetric: tuple[bool, ...] = ()
) -> Iterator[NatLab]:
    """A NAT lab for a test, removed afterwards whatever happens; skips the test where it cannot be made."""
    import pytest

    try:
        check_nat_available()
    except NetnsUnavailable as exc:
        pytest.skip(f"no NAT lab: {exc}")
    lab = NatLab(homes=homes, public=public, symmetric=symmetric)
    try:
        lab.open()
        yield lab
    finally:
        lab.close()


View = dict[str, dict[str, Any] | None]  # peer id -> its status (None: no answer)
CONVERGE_S = 60.0


async def statuses(client: Host, addrs: dict[str, str]) -> View:
    """Each daemon's status, dialled at ``addrs[peer]`` (a relayed address for a daemon at home)."""
    out: View = {}

    async def ask(peer: str, addr: str) -> None:
        out[peer] = None
        try:
            with trio.fail_after(5.0):
                await connect_address(client, addr)
                out[peer] = await query_status(client, peer)
        except Exception:
            pass

    async with trio.open_nursery() as nursery:
        for peer, addr in addrs.items():
            nursery.start_soon(ask, peer, addr)
    return out


async def converge(
    client: Host, addrs: dict[str, str], linked: Callable[[View], bool] = bool, timeout: float = CONVERGE_S
) -> View:
    """Poll the daemons at ``addrs`` until the swarm converged (every daemon sees every other, one plan) and
    ``linked(view)`` holds; AssertionError after ``timeout`` seconds."""
    last: View = {}
    with trio.move_on_after(timeout):
        while not (swarm_view.converged(last, set(addrs)) and linked(last)):
            last = await statuses(client, addrs)
            await trio.sleep(0.2)
        return last
    members = {peer[-6:]: None if s is None else len(s["members"]) for peer, s in last.items()}
    raise AssertionError(f"not converged through the relay within {timeout} s: {members}")


def peer_entry(view: View, seer: str, peer: str) -> dict[str, Any]:
    """``peer`` as daemon ``seer``'s status shows it (its advertised addresses, the link between them)."""
    status = view.get(seer)
    return next((p for p in status["peers"] if p["peer_id"] == peer), {}) if status is not None else {}


def link(view: View, seer: str, peer: str) -> str | None:
    """How ``seer`` is connected to ``peer``: "direct", "hole-punched", "relayed", or None."""
    return peer_entry(view, seer, peer).get("link")
