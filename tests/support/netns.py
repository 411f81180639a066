"""Network namespaces as hosts: one daemon per namespace, each with its own address on a bridge, ``lo`` up and
no route out; for partition tests, two bridged groups of one /24 with a cable between them that a test cuts
and reconnects; and a management link from the root namespace to each namespace.

Layout (every name starts with ``hxp`` and a tag, the creating process id in base 36)::

    ns hxp<tag>-1 data0 ─┐                                            ┌─ data0 ns hxp<tag>-4
    ns hxp<tag>-2 data0 ─┼─ bridge hxp<tag>BA ══ cable ══ bridge hxp<tag>BB ─┼─ data0 ns hxp<tag>-5
    ns hxp<tag>-3 data0 ─┘     (hxp<tag>LA ══ hxp<tag>LB, a veth pair)     └─ data0 ns hxp<tag>-6

Daemons listen on their ``data0`` address (10.77.T.x/24). Cutting the cable (both ends ``down``) is a
partition: packets between the sides are dropped silently, as when a switch uplink fails, while each side
still reaches itself. The test's libp2p client runs in the root namespace and reaches every namespace over
that namespace's own point-to-point management veth (``mgmt0``, a /30, and a /32 route in the root
namespace to the data address), so it watches both sides while they are cut off. Those links never join the
sides: a namespace routes only its management /30 over ``mgmt0``, everything in the /24 goes over ``data0``.

A lab of one side (``Lab(per_side=4, sides=("A",))``) is four hosts on one bridge, for serving across hosts.
Each host has its own hostname (a UTS namespace per daemon) that resolves to 127.0.0.1 in its own
``/etc/hosts`` (``/etc/netns/NAME/hosts``, which ``ip netns exec`` mounts over it), as on many Linux
machines: nothing that works in the lab depends on the hostname resolving to a routable address.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hexgen.testing.daemon_harness import READY_TIMEOUT_S, Daemon, _read_ready

PREFIX = "hxp"
SIDES = ("A", "B")
# what an operator may set to name the data plane's interface; the lab's daemons must do without
INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TP_SOCKET_IFNAME")


class NetnsUnavailable(Exception):
    """Namespaces cannot be created here; the message says why (a test skips with it)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def _tag(name: str) -> str | None:
    """The tag of one of this module's names: ``hxp``, the lower-case tag, then an upper-case kind letter
    (links) or ``-`` (namespaces); None for any other name."""
    found = re.match(rf"{PREFIX}([0-9a-z]+)[A-Z-]", name)
    return found.group(1) if found else None


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]


def _links() -> list[str]:
    """Root-namespace interface names (a veth shows as ``name@peer``)."""
    out = []
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append(parts[1].strip().split("@")[0])
    return out


def check_available() -> None:
    """Raise NetnsUnavailable unless this process can create a namespace and a veth pair into it."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("no `ip` binary (iproute2) on PATH")
    tag = _base36(os.getpid())
    probe = f"{PREFIX}{tag}-probe"
    try:
        added = _ip("netns", "add", probe, check=False)
        if added.returncode != 0:
            raise NetnsUnavailable(f"`ip netns add` failed: {added.stderr.strip()}")
        veth = _ip("link", "add", f"{PREFIX}{tag}P", "type", "veth", "peer", "name", "p0", "netns", probe, check=False)
        if veth.returncode != 0:
            raise NetnsUnavailable(f"cannot create a veth pair: {veth.stderr.strip()}")
    finally:
        _ip("netns", "del", probe, check=False)  # the veth pair goes with it


def _delete_namespace(name: str) -> None:
    """Kill what still runs in the namespace (a daemon orphaned by a crashed run), then delete it: its veth
    pairs, their root-side ends and routes go with it."""
    for pid in _ip("netns", "pids", name, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", name, check=False)
    shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def remove_leftovers(tag: str) -> None:
    """Delete every namespace and link of ``tag``, and those of tags whose process is gone (a crash, a
    kill -9 of an earlier run); labs of other live processes are left alone."""

    def stale(name: str) -> bool:
        found = _tag(name)
        return found is not None and (found == tag or not Path(f"/proc/{int(found, 36)}").exists())

    for name in filter(stale, _namespaces()):
        _delete_namespace(name)
    for name in filter(stale, _links()):
        _ip("link", "del", name, check=False)


def _free_subnet(seed: int) -> int:
    """A T for 10.77.T.0/24 (data) and 10.78.T.0/24 (management) that no root-namespace route uses yet, so
    labs of parallel runs do not clash."""
    routes = _ip("-o", "route", "show", check=False).stdout
    for offset in range(250):
        t = 1 + (seed + offset) % 250
        if f"10.77.{t}." not in routes and f"10.78.{t}." not in routes:
            return t
    raise NetnsUnavailable("no free 10.77.T.0/24 subnet")


@dataclass(frozen=True)
class Namespace:
    name: str
    side: str
    ip: str  # the data-plane address daemons listen on
    index: int  # 1-based, across both sides

    @property
    def hostname(self) -> str:
        return f"host{self.index}"


@dataclass
class Lab:
    """Two sides of ``per_side`` namespaces each (one lab per process at a time); ``close`` removes all of
    it, and is safe after a failed ``open`` and twice."""

    per_side: int = 3
    sides: tuple[str, ...] = SIDES
    tag: str = field(default_factory=lambda: _base36(os.getpid()))
    subnet: int = -1
    namespaces: list[Namespace] = field(default_factory=list)

    def name(self, kind: str, suffix: object = "") -> str:
        out = f"{PREFIX}{self.tag}{kind}{suffix}"
        assert len(out) <= 15, out  # IFNAMSIZ - 1
        return out

    def side(self, side: str) -> list[Namespace]:
        return [ns for ns in self.namespaces if ns.side == side]

    def cable(self) -> tuple[str, str]:
        return self.name("L", "A"), self.name("L", "B")

    def open(self) -> Lab:
        remove_leftovers(self.tag)
        self.subnet = _free_subnet(os.getpid())
        for side in self.sides:
            _ip("link", "add", self.name("B", side), "type", "bridge")
            _ip("link", "set", self.name("B", side), "up")
        if len(self.sides) == 2:
            a, b = self.cable()
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            for end, side in zip((a, b), self.sides, strict=True):
                _ip("link", "set", end, "master", self.name("B", side), "up")
        for i in range(len(self.sides) * self.per_side):
            self._add_namespace(i + 1, self.sides[i // self.per_side])
        return self

    def _add_namespace(self, k: int, side: str) -> None:
        ns = Namespace(f"{PREFIX}{self.tag}-{k}", side, f"10.77.{self.subnet}.{10 + k}", k)
        _ip("netns", "add", ns.name)
        self.namespaces.append(ns)
        etc = Path("/etc/netns") / ns.name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.0.1 {ns.hostname}\n")
        data, mgmt = self.name("D", k), self.name("M", k)
        root_ip, ns_ip = f"10.78.{self.subnet}.{4 * k + 1}", f"10.78.{self.subnet}.{4 * k + 2}"
        _ip("link", "add", data, "type", "veth", "peer", "name", "data0", "netns", ns.name)
        _ip("link", "add", mgmt, "type", "veth", "peer", "name", "mgmt0", "netns", ns.name)
        _ip("link", "set", data, "master", self.name("B", side), "up")
        _ip("addr", "add", f"{root_ip}/30", "dev", mgmt)
        _ip("link", "set", mgmt, "up")
        _ip("route", "add", f"{ns.ip}/32", "dev", mgmt, "src", root_ip)
        for args in (
            ["link", "set", "lo", "up"],
            ["addr", "add", f"{ns.ip}/24", "dev", "data0"],
            ["link", "set", "data0", "up"],
            ["addr", "add", f"{ns_ip}/30", "dev", "mgmt0"],
            ["link", "set", "mgmt0", "up"],
        ):
            _ip("-n", ns.name, *args)

    def partition(self) -> None:
        """Cut the cable between the sides: from now on their packets are dropped, silently."""
        for end in self.cable():
            _ip("link", "set", end, "down")

    def drop_connections(self) -> int:
        """Abort every TCP connection between the sides, at both ends, as retransmissions giving up during a
        long partition would (``ss -K``: the kernel needs CONFIG_INET_DIAG_DESTROY); returns how many are
        still established afterwards (0 where it worked)."""
        left = 0
        for ns in self.namespaces:
            for other in self.namespaces:
                if other.side == ns.side:
                    continue
                ss = ["ip", "netns", "exec", ns.name, "ss", "-H", "-t", "state", "established", "dst", other.ip]
                subprocess.run([*ss[:5], "-K", *ss[5:]], capture_output=True, text=True, timeout=30)
                left += len(subprocess.run(ss, capture_output=True, text=True, timeout=30).stdout.splitlines())
        return left

    def heal(self) -> None:
        for end in self.cable():
            _ip("link", "set", end, "up")

    def firewall(self, ns: Namespace, open_port: int) -> None:
        """Drop every new TCP connection into or out of ``ns`` over its data link except to ``open_port`` (the
        lab's daemons' libp2p port): the control plane still works, but no world or KV hand-off can connect
        to or from this host, and a dropped SYN is silence, not a refusal."""
        if shutil.which("iptables") is None:
            raise NetnsUnavailable("no `iptables` on PATH (the Makefile's sysdeps install it)")
        for chain, way in (("INPUT", "-i"), ("OUTPUT", "-o")):
            rule = ["-A", chain, way, "data0", "-p", "tcp", "--syn", "!", "--dport", str(open_port), "-j", "DROP"]
            subprocess.run(["ip", "netns", "exec", ns.name, "iptables", *rule], check=True, timeout=30)

    def close(self) -> None:
        remove_leftovers(self.tag)
        self.namespaces.clear()


def on_host(ns: Namespace, command: list[str]) -> list[str]:
    """``command`` as run on the lab host ``ns``: in its network namespace, under its own hostname."""
    script = f"hostname {shlex.quote(ns.hostname)} && exec {shlex.join(command)}"
    return ["ip", "netns", "exec", ns.name, "unshare", "--uts", "sh", "-c", script]


@contextlib.contextmanager
def open_lab(per_side: int, sides: tuple[str, ...] = SIDES) -> Iterator[Lab]:
    """A lab for a test, removed afterwards whatever happens; skips the test where namespaces cannot be made."""
    import pytest

    try:
        check_available()
    except NetnsUnavailable as exc:
        pytest.skip(f"no network namespaces: {exc}")
    lab = Lab(per_side=per_side, sides=sides)
    try:
        try:
            lab.open()
        except NetnsUnavailable as exc:
            pytest.skip(f"no network namespaces: {exc}")
        yield lab
    finally:
        lab.close()


@contextlib.contextmanager
def started_daemons() -> Iterator[list[Daemon]]:
    """A list the test fills with the daemons it starts; each is killed afterwards."""
    started: list[Daemon] = []
    try:
        yield started
    finally:
        stop_daemons(started)


def start_daemon(
    ns: Namespace,
    root: Path,
    name: str,
    *,
    bootstrap: list[str] | None = None,
    gpu: str = "A100",
    model: str = "llama-2-7b",
    port: int = 0,
    extra: list[str] | None = None,
) -> Daemon:
    """A daemon (``model``: a checkpoint directory serves it, a spec name plans only; simulated GPU) inside
    ``ns``, listening on its data address, with the namespace's hostname in a UTS namespace of its own and no
    interface named for gloo or NCCL. ``ip netns exec``, ``unshare`` and the shell each exec the next command
    in place, so ``Daemon.proc`` is the python process itself (checked): killing it kills the daemon."""
    key = root / f"{name}.key"
    command = [sys.executable, "-m", "hexgen.cli.node", "join", "--key-file", str(key), "--model", model]
    command += ["--listen", f"{ns.ip}:{port}", "--simulate-gpu", gpu, "--host-name", name]
    for addr in bootstrap or []:
        command += ["--bootstrap", addr]
    command += extra or []
    args = on_host(ns, command)
    log_path = root / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k not in INTERFACE_VARIABLES} | {"PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, env=env)
    daemon = Daemon(name, proc, log_path)
    ready = _read_ready(proc, READY_TIMEOUT_S)
    if ready is None:
        stop_daemons([daemon])
        raise RuntimeError(f"daemon {name} did not start in {ns.name}:\n{daemon.log()[-3000:]}")
    daemon.peer_id, daemon.addrs, daemon.http = ready["peer_id"], ready["addrs"], ready.get("http")
    if b"hexgen.cli.node" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        stop_daemons([daemon])
        raise RuntimeError("the namespace wrappers did not exec the daemon in place: its pid is a wrapper's")
    return daemon


def stop_daemons(daemons: list[Daemon]) -> None:
    for daemon in daemons:
        if daemon.alive():
            daemon.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.proc.wait(timeout=10)
        if daemon.proc.stdout:
            daemon.proc.stdout.close()
