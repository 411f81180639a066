"""NAT traversal: the NAT lab itself, daemons at two homes behind masquerading routers joining through a relay
(and the relay refusing garbage while it keeps serving), a private swarm's relay refusing non-members, and
the pure pieces (circuit addresses, slot renewal, relays learned from the swarm, the relay command's settings)."""

from __future__ import annotations

import collections
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.utils.varint import encode_uvarint
from multiaddr import Multiaddr

from hexgen.daemon.hardware import simulated_profile
from hexgen.daemon.host import Host, new_identity, open_host
from hexgen.daemon.messages import Advert, MessageError
from hexgen.daemon.nat_check import (
    beyond_lan_first,
    choose_servers,
    dial_back_ports,
    lan_neighbour,
    listener_answers,
    verdict,
)
from hexgen.daemon.node_key import peer_id_of
from hexgen.daemon.relay import (
    HOP_PROTOCOL,
    MEMBERSHIP_WAIT_S,
    RelayError,
    RelayGate,
    Relaying,
    circuit_address,
    dial_circuit,
    reserve,
    split_circuit,
)
from hexgen.daemon.relay_slots import MAX_LEARNED_RELAYS, MIN_RENEW_S, RelaySlots, renew_after, swarm_relays
from hexgen.daemon.splice import TOKEN_BYTES, SpliceError, register
from hexgen.daemon.swarm_state import Pulse
from hexgen.testing.daemon_harness import Daemon, Swarm, converged, open_client, statuses, wait_until
from hexgen.testing.nat_lab import CONVERGE_S, NatLab, View, converge, link, open_nat_lab, peer_entry
from hexgen.testing.netns import open_lab, start_daemon, started_daemons


def test_autonat_dials_back_only_tcp_ports_and_one_success_proves_reachability() -> None:
    def raw(addr: str) -> bytes:
        return Multiaddr(addr).to_bytes()

    addrs = [raw("/ip4/10.0.0.1/tcp/4001"), raw("/ip4/10.0.0.2/tcp/4001"), raw("/ip4/10.0.0.1/udp/9")]
    relay = f"/ip4/10.0.0.9/tcp/7/p2p/{peer_id_of(new_identity())}"
    addrs.append(raw(circuit_address(relay, peer_id_of(new_identity()))))  # the relay's port, not the peer's
    assert dial_back_ports([*addrs, b"garbage", raw("/ip4/10.0.0.1/tcp/4002")]) == [4001, 4002]
    assert dial_back_ports([raw(f"/ip4/10.0.0.1/tcp/{p}") for p in range(1, 10)]) == [1, 2, 3, 4]
    assert verdict([None, False, True]) == "public"
    assert verdict([False, None]) == "private"
    assert verdict([None]) == verdict([]) == "unknown"
    said = {"p1": "public", "p2": "private", "p3": "public", "r": "public"}
    links = {"p1": "direct", "p2": "direct", "p3": "direct", "r": "relayed"}
    for _ in range(5):
        order = choose_servers(said, links)
        assert set(order[:2]) == {"p1", "p3"} and order[2:] == ["p2"]


@pytest.mark.trio
async def test_autonat_dial_back_needs_a_libp2p_listener() -> None:
    async with open_client() as host:
        port = int(host.addrs[0].split("/")[4])
        assert await listener_answers("127.0.0.1", port)
        with trio.socket.socket() as silent:  # a port that accepts but never speaks multistream
            await silent.bind(("127.0.0.1", 0))
            silent.listen()
            assert not await listener_answers("127.0.0.1", silent.getsockname()[1], seconds=0.5)
        with trio.socket.socket() as closed:
            await closed.bind(("127.0.0.1", 0))
            assert not await listener_answers("127.0.0.1", closed.getsockname()[1], seconds=0.5)


def test_circuit_addresses_split_into_relay_and_target() -> None:
    relay = "/ip4/10.79.1.11/tcp/4001/p2p/12D3KooWRelay"
    addr = circuit_address(relay, "12D3KooWTarget")
    assert split_circuit(addr) == (relay, "12D3KooWRelay", "12D3KooWTarget")
    for bad in (relay, f"{relay}/p2p-circuit", "/p2p-circuit/p2p/X", f"{relay}/p2p-circuit/p2p/X/tcp/1"):
        with pytest.raises(RelayError):
            split_circuit(bad)


def test_a_slot_is_renewed_at_half_its_life_and_never_in_a_tight_loop() -> None:
    assert renew_after(1000.0 + 900.0, 1000.0) == 450.0
    assert renew_after(1000.0 + 1.0, 1000.0) == MIN_RENEW_S
    assert renew_after(900.0, 1000.0) == MIN_RENEW_S


def test_a_node_learns_public_relays_from_the_swarm_keeps_those_it_holds_and_drops_those_gone() -> None:
    def member(port: int, relay: bool, *, circuit_first: bool = False) -> Advert:
        addrs = [f"/ip4/10.0.0.{port}/tcp/{port}"]
        if circuit_first:
            addrs.insert(0, circuit_address("/ip4/10.0.0.99/tcp/1/p2p/R", f"P{port}"))
        return Advert(tuple(addrs), simulated_profile("A100"), f"h{port}", relay=relay)

    members = {
        f"P{n}": (member(n, relay=n != 5, circuit_first=n == 4), "private" if n == 3 else "public") for n in range(1, 7)
    }
    addr = {p: f"{a.addrs[-1]}/p2p/{p}" for p, (a, _) in members.items()}
    # P3 is private and P5 relays for no one; P1 is a --relay-peer already
    assert swarm_relays(members, skip={"P1"}, keeping=set()) == (addr["P2"], addr["P4"])
    assert len(swarm_relays(members, skip=set(), keeping=set(), cap=9)) == 4
    held = swarm_relays(members, skip={"P1"}, keeping={"P6"})
    assert held == (addr["P6"], addr["P2"]) and len(held) == MAX_LEARNED_RELAYS
    gone = {p: m for p, m in members.items() if p != "P6"}  # P6 left the swarm: the next relay by id replaces it
    assert swarm_relays(gone, skip={"P1"}, keeping={"P6"}) == (addr["P2"], addr["P4"])
    assert swarm_relays({}, skip=set(), keeping={"P6"}) == ()
    assert Advert.from_wire(members["P2"][0].to_wire()).relay and not Advert.from_wire(member(7, False).to_wire()).relay
    with pytest.raises(MessageError, match="relay"):
        Advert.from_wire(member(8, True).to_wire() | {"relay": "yes"})


@pytest.mark.trio
async def test_relay_slots_start_a_keeper_for_each_relay_named_and_stop_one_no_longer_named() -> None:
    """A slot on a relay appears in the node's circuit addresses once named and leaves them once not."""
    named: list[tuple[str, ...]] = [()]
    pulse, changes = Pulse(), Pulse()
    async with open_host(new_identity()) as relay_host, open_host(new_identity()) as home:
        gate = RelayGate(lambda peer: True, pulse.wait)
        async with Relaying(relay_host, gate, hop=True).running(), Relaying(home, gate, hop=False).running():
            relay = relay_host.addrs[0]
            slots = RelaySlots(home, lambda: named[0], pulse.wait, changes.fire)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(slots.run)
                with trio.fail_after(10):
                    named[0] = (relay,)
                    pulse.fire()
                    while home.circuits != [circuit_address(relay, home.peer_id)]:
                        await changes.wait()
                    named[0] = ()
                    pulse.fire()
                    while home.circuits:
                        await changes.wait()
                nursery.cancel_scope.cancel()


def test_the_relay_command_relays_offers_no_gpus_and_dials_its_relays(tmp_path: Path) -> None:
    from hexgen.cli.join import JoinError, join_options, layered_args
    from hexgen.cli.node import build_parser
    from hexgen.daemon.config import NodeConfig

    def node(*argv: str) -> NodeConfig:
        args = build_parser().parse_args([*argv, "--key-file", str(tmp_path / "k")])
        layered_args(args)
        return join_options(args).node

    relay = "/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWDbVcVh5L4CPWF3pzNiQbQsA3SLRhtLZbAXfgdEoJpmLv"
    assert node("relay").relay and node("relay").relay_only
    joined = node("join", "--relay-peer", relay)
    assert not joined.relay and joined.relay_peers == (relay,) and relay in joined.bootstrap
    with pytest.raises(JoinError, match="--relay-peer"):
        node("join", "--relay-peer", "/ip4/10.0.0.1/tcp/1")


def test_the_nat_lab_masquerades_and_lets_nothing_in() -> None:
    with open_nat_lab(homes=(1, 1), symmetric=(False, True)) as lab:
        port = 5555
        listeners = [_listen(lab, name, port) for name in ("p1", "h11", "h21")]
        try:
            assert lab.reaches("h11", "p1", port) and lab.reaches("h21", "p1", port)
            assert not lab.reaches("p1", "h11", port)
            assert not lab.reaches("h11", "h21", port) and not lab.reaches("h21", "h11", port)
        finally:
            for proc in listeners:
                proc.kill()
                proc.wait(timeout=10)


def test_a_port_forwarded_at_a_home_router_reaches_its_host_from_another_home_and_no_other_port_does() -> None:
    with open_nat_lab(homes=(1, 1)) as lab:
        lab.forward("h21", (5555, 5556))
        listeners = [_listen(lab, "h21", port) for port in (5555, 5557)]
        try:
            assert lab.reaches("h11", "h21", 5555, at=lab.public_ip(2))
            assert not lab.reaches("h11", "h21", 5557, at=lab.public_ip(2))
            assert not lab.reaches("h11", "h21", 5555)
        finally:
            for proc in listeners:
                proc.kill()
                proc.wait(timeout=10)
        with pytest.raises(ValueError, match="not a home host"):
            lab.forward("p1", (5555, 5555))


def test_a_home_router_shapes_its_link_both_ways() -> None:
    import subprocess

    with open_nat_lab(homes=(1,)) as lab:
        lab.shape(1, 250)
        router = f"{lab.hosts['h11'].name.rsplit('-', 1)[0]}-r1"
        for dev in ("pub0", "home0"):
            shown = subprocess.run(
                ["ip", "netns", "exec", router, "tc", "qdisc", "show", "dev", dev], capture_output=True, text=True
            ).stdout
            assert "tbf" in shown and "250Mbit" in shown, shown
        with pytest.raises(ValueError, match="at least 1 Mbit"):
            lab.shape(1, 0)


def _listen(lab: NatLab, host: str, port: int) -> Any:
    """A TCP listener on ``host``'s address, ready when this returns."""
    import subprocess
    import sys

    code = (
        "import socket,sys\ns=socket.socket();s.bind((sys.argv[1],int(sys.argv[2])));s.listen()\n"
        "print('up',flush=True)\nwhile True: s.accept()[0].close()"
    )
    ns = lab.hosts[host]
    command = ["ip", "netns", "exec", ns.name, sys.executable, "-c", code, ns.ip, str(port)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    return proc


@pytest.fixture
def nat_lab() -> Iterator[NatLab]:
    """Three homes: two behind endpoint-independent NATs, the third behind a symmetric one."""
    with open_nat_lab(homes=(1, 1, 1), symmetric=(False, False, True)) as lab:
        yield lab


async def _fuzz_hop(client: Host, relay: str) -> None:
    """Garbage, an oversized length prefix, a truncated frame and messages of the wrong type on the relay's
    hop protocol; each stream is answered with a refusal or closed, never hangs."""
    frames = [
        b"\xff\xff\xff\xff\x0f",  # a 4 GiB length prefix
        encode_uvarint(1 << 20) + b"x" * 1024,  # 1 MiB announced, 1 KiB sent
        encode_uvarint(5) + b"\x08\x07\x12\x01",  # a truncated frame
        encode_uvarint(3) + b"\xde\xad\xbe",  # not a protobuf
    ]
    for frame in frames:
        stream = await client.open_stream(relay, HOP_PROTOCOL)
        with trio.fail_after(20.0):
            await stream.write(frame)
            await stream.close()
            reply = await read_delimited_msg(stream, HopMessage)
        assert reply.type == HopMessage.STATUS and reply.status != 100
    for kind in (HopMessage.STATUS, HopMessage.CONNECT):  # a STATUS request; a CONNECT naming no peer
        stream = await client.open_stream(relay, HOP_PROTOCOL)
        with trio.fail_after(20.0):
            await write_delimited_msg(stream, HopMessage(type=kind))
            reply = await read_delimited_msg(stream, HopMessage)
        assert reply.status != 100
        await stream.reset()


@pytest.mark.trio
async def test_daemons_at_home_join_through_a_relay_hole_punch_and_the_relay_refuses_garbage(
    nat_lab: NatLab, tmp_path: Path
) -> None:
    """Three homes behind masquerading routers, whose daemons cannot dial each other, join through a daemon
    that relays on the public network: the swarm converges (every daemon sees every other, one plan); each
    daemon learns whether it can be dialled and its peers see it in its signed advert; the two homes behind
    endpoint-independent NATs hole-punch a direct link, the one behind the symmetric NAT stays relayed to both,
    and it, given the relay only to bootstrap from, reserves a slot on the relay it learns from the swarm; once a hole punch of it failed the swarm still holds. The test's client reaches each home daemon only
    through the relay; garbage on the relay's hop protocol is refused while it keeps serving (a fresh
    reservation, and the swarm still converged)."""
    with started_daemons() as started:
        relay = start_daemon(nat_lab.hosts["p1"], tmp_path, "relay", extra=["--relay"])
        started.append(relay)

        def home(name: str) -> Daemon:
            # the third home is only told to bootstrap from the relay: it learns from the swarm that it relays
            flag = "--bootstrap" if name == "h31" else "--relay-peer"
            return start_daemon(nat_lab.hosts[name], tmp_path, name, gpu="H100", extra=[flag, relay.addr])

        with ThreadPoolExecutor(3) as pool:
            homes = list(pool.map(home, ("h11", "h21", "h31")))
        started.extend(homes)
        addrs = {relay.peer_id: relay.addr} | {d.peer_id: circuit_address(relay.addr, d.peer_id) for d in homes}
        a, b, c = (d.peer_id for d in homes)

        def linked(view: View) -> bool:
            """a and b hole-punched, c relayed to both, and no group of the plan spans any of the three pairs;
            each daemon knows whether it can be dialled (AutoNAT), and its peers know it from its signed advert."""
            reach = {peer: (status or {}).get("reachability") for peer, status in view.items()}
            said = {peer: peer_entry(view, relay.peer_id if peer != relay.peer_id else a, peer) for peer in view}
            plans = [((status or {}).get("plan") or {}).get("body") or {} for status in view.values()]
            return (
                link(view, a, b) == link(view, b, a) == "hole-punched"
                # no world is planned over a link that is not direct TCP; KV hand-offs cross it over libp2p
                and _worldless_respected(plans, [(a, b), (a, c), (b, c)])
                and all(link(view, x, y) == "relayed" for x, y in ((a, c), (c, a), (b, c), (c, b)))
                and reach == {relay.peer_id: "public", a: "private", b: "private", c: "private"}
                and all(said[peer].get("reachability") == reach[peer] for peer in view)
            )

        async with open_client() as client:
            view = await converge(client, addrs, linked)
            for d in homes:  # its advert names its relayed address, which is how the others dialled it
                assert addrs[d.peer_id] in peer_entry(view, relay.peer_id, d.peer_id)["addrs"]
                assert link(view, relay.peer_id, d.peer_id) == "direct"  # it dialled out to the relay

            def failed(x: Daemon, y: Daemon) -> bool:
                """A hole punch between x and y failed, as the side that started it logs."""
                return f"hole punch to {y.peer_id} failed" in x.log() or f"hole punch to {x.peer_id} failed" in y.log()

            with trio.fail_after(CONVERGE_S):  # the symmetric NAT defeats c's hole punches
                while not (failed(homes[2], homes[0]) or failed(homes[2], homes[1])):
                    await trio.sleep(0.2)
            await _fuzz_hop(client, relay.peer_id)
            assert relay.alive()
            assert await reserve(client, relay.addr) > time.time()
            await converge(client, addrs, linked)
            stranger = peer_id_of(new_identity())  # no slot: no circuit to it
            with pytest.raises(RelayError, match="NO_RESERVATION"):
                await dial_circuit(client, circuit_address(relay.addr, stranger))


def _worldless_respected(bodies: list[dict[str, Any]], worldless: list[tuple[str, str]]) -> bool:
    """Whether some daemon adopted a plan body (wire form), and in each adopted one there is a plan, none of
    its groups spans a ``worldless`` pair, none of them is blocked, and its exchange is libp2p exactly when it
    has a prefill group (its ranks then sit on two homes, a worldless pair here)."""
    pairs = {frozenset(pair) for pair in worldless}
    bodies = [body for body in bodies if body]
    for body in bodies:
        plan = body.get("plan")
        if not plan:
            return False
        gpus = body.get("gpus", {})
        spans = [{gpus[str(g)][0] for st in group["stages"] for g in st["gpus"]} for group in plan["groups"]]
        prefill = any(group["role"] == "prefill" for group in plan["groups"])
        if any(pair <= span for pair in pairs for span in spans) or pairs & {
            frozenset(b["peers"]) for b in body.get("blocked", [])
        }:
            return False
        if body.get("exchange") != ("libp2p" if prefill else "torch"):
            return False
    return bool(bodies)


@pytest.mark.trio
async def test_a_private_swarm_relay_refuses_non_members(tmp_path: Path) -> None:
    """A member relays for a member; a stranger can neither reserve a slot on it, nor open a circuit through it
    to that member, nor register a KV splice on it."""
    admitted = _private_swarm(tmp_path)
    swarm = Swarm(tmp_path)
    try:
        relay = swarm.start("relay", extra=["--relay", *admitted("relay")])
        member = swarm.start("member", extra=["--relay-peer", relay.addr, *admitted("member")])
        with trio.fail_after(30.0):
            while "holding a slot on relay" not in member.log():
                await trio.sleep(0.1)
        async with open_client() as stranger:
            await stranger.connect(relay.addr)
            started = trio.current_time()
            with trio.fail_after(MEMBERSHIP_WAIT_S + 10.0):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_refused, reserve(stranger, relay.addr))
                    nursery.start_soon(_refused, dial_circuit(stranger, circuit_address(relay.addr, member.peer_id)))
            assert trio.current_time() - started >= MEMBERSHIP_WAIT_S  # it waited for an advert that never came
            assert member.peer_id not in stranger.connected_peers()
            with pytest.raises(SpliceError, match="not a member of this swarm"):  # nor a KV splice
                await register(stranger, relay.peer_id, secrets.token_bytes(TOKEN_BYTES))
        assert relay.log().count("not a member of this swarm") >= 2
    finally:
        swarm.close()


async def _refused(call: Any) -> None:
    with pytest.raises(RelayError, match="PERMISSION_DENIED"):
        await call


def _private_swarm(root: Path) -> Callable[[str], list[str]]:
    """A new swarm key under ``root``; the returned function gives daemon ``name`` (its key file
    ``root/name.key``, as the harnesses place it) a certificate and returns its join flags."""
    from hexgen.daemon.certificates import create_swarm_key, issue_certificate, load_swarm_key, write_certificate
    from hexgen.daemon.node_key import load_or_create_key

    create_swarm_key(root / "swarm.key")

    def admitted(name: str) -> list[str]:
        peer = peer_id_of(load_or_create_key(root / f"{name}.key"))
        cert = issue_certificate(load_swarm_key(root / "swarm.key"), peer, 3600.0)
        write_certificate(root / f"{name}.cert", cert)
        return ["--swarm-cert", str(root / f"{name}.cert")]

    return admitted


@pytest.mark.trio
async def test_daemons_on_one_lan_find_each_other_with_no_bootstrap(tmp_path: Path) -> None:
    """Four hosts on one bridge and no --bootstrap: the two members of a private swarm find each other by
    mDNS and converge; a daemon without a certificate, heard too, is not admitted; a member started with
    --no-mdns is found by no one and finds no one."""
    from hexgen.daemon.certificates import issue_certificate, load_swarm_key

    admitted = _private_swarm(tmp_path)
    with open_lab(per_side=4, sides=("A",)) as lab, started_daemons() as started:
        hosts = lab.namespaces

        def start(index: int, name: str, extra: list[str]) -> Daemon:
            return start_daemon(hosts[index], tmp_path, name, extra=extra)

        plan = [(0, "m1", admitted("m1")), (1, "m2", admitted("m2")), (2, "out", []), (3, "q", admitted("q"))]
        plan[3][2].append("--no-mdns")
        with ThreadPoolExecutor(4) as pool:
            daemons = list(pool.map(lambda item: start(*item), plan))
        started.extend(daemons)
        m1, m2, out, q = daemons
        client_key = new_identity()
        ask = {"cert": issue_certificate(load_swarm_key(tmp_path / "swarm.key"), peer_id_of(client_key), 3600.0)}
        members = {m1.peer_id, m2.peer_id}
        async with open_client(client_key) as client:
            await wait_until(client, [m1, m2], converged(members), CONVERGE_S, "converged by mDNS", request=ask)
            found = await statuses(client, [m1, m2, q], ask)
        assert found[q.peer_id] is not None and found[q.peer_id]["members"] == [q.peer_id]
        assert any("found" in d.log() and "on the LAN" in d.log() for d in (m1, m2))  # one dialled the other
        assert any("not-member" in d.log() or "no swarm certificate" in d.log() for d in (m1, m2))
        assert out.peer_id not in str(found) and "on the LAN" not in q.log()


def test_servers_beyond_the_lan_judge_reachability_before_lan_neighbours() -> None:
    # a LAN neighbour dialled back, the relay beyond the home router could not: private
    assert verdict(beyond_lan_first([(True, True), (False, False)])) == "private"
    assert verdict(beyond_lan_first([(True, True), (None, False)])) == "public"  # nobody beyond answered
    assert verdict(beyond_lan_first([(True, False), (False, True)])) == "public"
    assert verdict(beyond_lan_first([])) == "unknown"


def test_lan_neighbours_are_found_by_this_host_s_own_subnets() -> None:
    Entry = collections.namedtuple("Entry", "family address netmask")
    table = {
        "lo": [Entry(socket.AF_INET, "127.0.0.1", "255.0.0.0")],
        "eth0": [Entry(socket.AF_INET, "10.81.7.11", "255.255.255.0"), Entry(socket.AF_INET6, "fe80::1", "ffff::")],
    }
    assert lan_neighbour("10.81.7.12", table)  # behind the same home router
    assert not lan_neighbour("10.79.7.11", table)  # the relay, across the NAT
    assert not lan_neighbour("127.0.0.1", table)  # one machine: loopback swarms keep their verdicts
    assert not lan_neighbour("not an address", table)
