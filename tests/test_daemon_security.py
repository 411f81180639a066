"""Hostile input against real daemons: forged and stale envelopes, non-members of a private swarm, and
malformed bytes on every protocol. Each is rejected with a reason and leaves the swarm as it was."""

from __future__ import annotations

import contextlib
import os
import struct
import time

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings

from hexgen.daemon.envelope import seal, to_wire
from hexgen.daemon.gossip import CONTROL_TOPIC
from hexgen.daemon.hardware_profile import HardwareProfile
from hexgen.daemon.host import GOSSIP_PROTOCOL, new_identity, open_host
from hexgen.daemon.node_key import peer_id_of
from hexgen.daemon.probe import PROBE_PROTOCOL
from hexgen.daemon.rpc import PLAN_PROTOCOL, STATUS_PROTOCOL, SYNC_PROTOCOL, query_status
from hexgen.daemon.wire import encode_frame
from hexgen.testing.daemon_harness import Swarm, converged, open_client, serving, statuses, wait_until
from hexgen.testing.plans import json_like

pytestmark = pytest.mark.trio


@pytest.fixture
def swarm(tmp_path):
    s = Swarm(tmp_path)
    yield s
    s.close()


def _identity_above(peer_ids: list[str]):
    """A key whose peer id sorts after every daemon's, so it never wins the election legitimately."""
    while True:
        key = new_identity()
        if peer_id_of(key) > max(peer_ids):
            return key


def _state(statuses) -> set[tuple]:
    return {
        (s["coordinator"], s["term"], s["plan"]["epoch"], tuple(sorted(s["plan"]["members"])))
        for s in statuses.values()
    }


async def _publish_until_rejected(
    host, client, daemons, make_envelopes, reason: str, timeout: float = 15.0, topic: str = CONTROL_TOPIC, request=None
) -> None:
    """Publish freshly sealed envelopes until every daemon counted one more rejection for ``reason``."""
    first = await statuses(client, daemons, request)
    before = {pid: (s or {}).get("rejections", {}).get(reason, 0) for pid, s in first.items()}
    with trio.fail_after(timeout):
        while True:
            data = msgpack.packb([to_wire(e) for e in make_envelopes()], use_bin_type=True)
            await host.pubsub.publish(topic, data)
            await trio.sleep(0.3)
            now = await statuses(client, daemons, request)
            if all(s and s["rejections"].get(reason, 0) > before[pid] for pid, s in now.items()):
                return


async def test_forged_and_stale_messages_are_rejected(swarm):
    daemons = swarm.start_many(3, gpus=["A100", "A100", "H100"])
    key = _identity_above([d.peer_id for d in daemons])
    attacker_id = peer_id_of(key)
    ids = {d.peer_id for d in daemons} | {attacker_id}
    no_gpus = HardwareProfile(gpus=(), cpu_count=1, memory_gb=1.0).to_dict()
    async with open_client() as client, open_host(key) as attacker, trio.open_nursery() as nursery:
        subscription = await attacker.pubsub.subscribe(CONTROL_TOPIC)
        for d in daemons:
            await attacker.connect(d.addr)

        async def announce() -> None:
            while True:
                advert = seal("advert", {"addrs": attacker.addrs, "hardware": no_gpus, "host": "attacker"}, key, 6.0)
                await attacker.pubsub.publish(CONTROL_TOPIC, msgpack.packb([to_wire(advert)], use_bin_type=True))
                await trio.sleep(0.5)

        async def drain() -> None:
            while True:
                await subscription.get()

        nursery.start_soon(announce)
        nursery.start_soon(drain)
        settled, _ = await wait_until(client, daemons, converged(ids), timeout=30, what="converged with the member")
        before = _state(settled)
        status = next(iter(settled.values()))
        term, epoch = status["term"], status["plan"]["epoch"]
        other = new_identity()

        cases = {
            "signer-mismatch": lambda: [seal("advert", {"addrs": [], "hardware": no_gpus, "host": "x"}, other, 6.0)],
            "expired": lambda: [
                seal("lease", {"holder": attacker_id, "term": term + 1}, key, 1.0, now=time.time() - 30)
            ],
            "stale-term": lambda: [
                seal("plan", {"term": term - 1, "epoch": epoch + 50, "members": [attacker_id]}, key, 60.0)
            ],
            "not-coordinator": lambda: [
                seal("plan", {"term": term, "epoch": epoch + 50, "members": [attacker_id]}, key, 60.0)
            ],
        }
        for reason, make in cases.items():
            await _publish_until_rejected(attacker, client, daemons, make, reason)
        after = await statuses(client, daemons)
        assert _state(after) == before, "rejected messages must not change the coordinator, term or plan"
        assert peer_id_of(other) not in next(iter(after.values()))["members"]

        # A live member claiming a higher term is refused; the holder answers by raising its own term
        # (the same move that settles two holders after a partition), so coordinator and members stay.
        hijack = [seal("lease", {"holder": attacker_id, "term": term + 5}, key, 3.0)]
        await _publish_until_rejected(attacker, client, daemons, lambda: hijack, "not-candidate")
        cases["not-candidate"] = hijack
        final, _ = await wait_until(client, daemons, converged(ids), timeout=15, what="settled after the hijack")
        assert {(s["coordinator"], tuple(sorted(s["plan"]["members"]))) for s in final.values()} == {
            (status["coordinator"], tuple(sorted(ids)))
        }
        logs = "".join(d.log() for d in daemons)
        for reason in cases:
            assert f"({reason})" in logs, f"no logged rejection for {reason}"
        nursery.cancel_scope.cancel()


async def test_private_swarm_ignores_non_members(swarm, tmp_path):
    from hexgen.daemon.certificates import (
        create_swarm_key,
        issue_certificate,
        load_certificate,
        load_swarm_key,
        write_certificate,
    )
    from hexgen.daemon.node_key import load_or_create_key, peer_id_of

    swarm_key = tmp_path / "swarm.key"
    create_swarm_key(swarm_key)
    other_swarm_key = tmp_path / "other.key"
    create_swarm_key(other_swarm_key)

    def certificate(key_path, peer: str) -> bytes:
        return issue_certificate(load_swarm_key(key_path), peer, 3600.0)

    def admitted(name: str, key_path) -> list[str]:
        peer = peer_id_of(load_or_create_key(tmp_path / f"{name}.key"))
        path = tmp_path / f"{name}.cert"
        write_certificate(path, certificate(key_path, peer))
        return ["--swarm-cert", str(path)]

    first = swarm.start("p0", gpu="A100", extra=admitted("p0", swarm_key))
    members = [first] + [
        swarm.start(f"p{i}", bootstrap=[first.addr], extra=admitted(f"p{i}", swarm_key)) for i in (1, 2)
    ]
    outsider = swarm.start("o1", bootstrap=[first.addr], gpu="H100")
    impostor = swarm.start("o2", bootstrap=[first.addr], gpu="H100", extra=admitted("o2", other_swarm_key))
    ids = {d.peer_id for d in members}
    topic = f"{CONTROL_TOPIC}/{load_certificate(tmp_path / 'p0.cert').swarm_id}"
    client_key = new_identity()
    ask = {"cert": certificate(swarm_key, peer_id_of(client_key))}
    attacker_key = new_identity()
    attacker_id = peer_id_of(attacker_key)
    no_gpus = HardwareProfile(gpus=(), cpu_count=1, memory_gb=1.0).to_dict()

    def advert(cert: bytes | None):
        body = {"addrs": [], "hardware": no_gpus, "host": "attacker"}
        return lambda: [seal("advert", body if cert is None else {**body, "cert": cert}, attacker_key, 6.0)]

    async with open_client(client_key) as client, open_host(attacker_key) as attacker:
        await wait_until(client, members, converged(ids), timeout=30, what="converged without outsiders", request=ask)
        before = _state(await statuses(client, members, ask))
        await attacker.pubsub.subscribe(topic)
        for d in members:
            await attacker.connect(d.addr)
        stolen = load_certificate(tmp_path / "p1.cert").to_bytes()
        for cert in (None, certificate(other_swarm_key, attacker_id), stolen):
            await _publish_until_rejected(
                attacker, client, members, advert(cert), "not-member", topic=topic, request=ask
            )
        after = await statuses(client, members, ask)
        assert _state(after) == before
        assert all(attacker_id not in s["members"] for s in after.values())
    async with open_client() as stranger:
        await stranger.connect(first.addr)
        assert (await query_status(stranger, first.peer_id)).get("error") == "not a member of this swarm"
        await stranger.connect(outsider.addr)
        assert (await query_status(stranger, outsider.peer_id))["members"] == [outsider.peer_id]
    assert impostor.alive() and outsider.alive()
    log = first.log()
    for reason in ("carries no swarm certificate", "other swarm", "other-peer"):
        assert reason in log or reason.replace(" ", "-") in log, f"no logged rejection mentioning {reason!r}"


async def test_malformed_input_on_every_protocol(swarm):
    daemons = swarm.start_many(2, gpus=["A100", "H100"])
    ids = {d.peer_id for d in daemons}
    target = daemons[0]
    async with open_client() as client:
        await wait_until(client, daemons, converged(ids), timeout=30, what="converged")
        await client.pubsub.subscribe(CONTROL_TOPIC)
        raw_inputs = [
            os.urandom(64),
            struct.pack(">I", 50) + b"\x81\xa1",  # truncated frame
            struct.pack(">I", 1 << 30),  # oversized declared length
            encode_frame([1, 2, 3]),  # wrong type
            encode_frame({"cert_ok": "yes", "x": [None] * 10}),
            encode_frame({"push": [b"not an envelope", {"kind": "plan"}]}),
            encode_frame({"push": "lease and plan"}),
            b"",
        ]
        for protocol in (STATUS_PROTOCOL, PLAN_PROTOCOL, SYNC_PROTOCOL, PROBE_PROTOCOL):
            for payload in raw_inputs:
                stream = await client.open_stream(target.peer_id, protocol)
                with trio.fail_after(10):
                    if payload:
                        await stream.write(payload)
                    await stream.close()
        # A pubsub RPC that is not protobuf (py-libp2p's reader lets DecodeError stop the whole host).
        garbled = b"\x0a\xff\xff\xff\xff\x0f"
        stream = await client.open_stream(target.peer_id, GOSSIP_PROTOCOL)
        with trio.fail_after(10):
            await stream.write(bytes([len(garbled)]) + garbled)
            with contextlib.suppress(Exception):
                await stream.read(1)  # the daemon resets the stream
        gossip_inputs = [os.urandom(200), msgpack.packb({"a": 1}), msgpack.packb([{"kind": "advert"}] * 3), b"\xc1"]
        for data in gossip_inputs:
            await client.pubsub.publish(CONTROL_TOPIC, data)
        await _hypothesis_gossip(client)
        after, _ = await wait_until(client, daemons, converged(ids), timeout=15, what="still converged")
        assert all(s["rejections"].get("malformed", 0) > 0 for s in after.values())
    assert all(d.alive() for d in daemons)


async def _hypothesis_gossip(client) -> None:
    """Publish hypothesis-generated msgpack values; the daemons must shrug them off."""
    samples: list[bytes] = []

    @settings(max_examples=40, suppress_health_check=list(HealthCheck), database=None)
    @given(json_like)
    def collect(value) -> None:
        samples.append(msgpack.packb(value, use_bin_type=True))

    collect()
    for data in samples:
        await client.pubsub.publish(CONTROL_TOPIC, data)


def certificate(swarm_key, peer: str) -> bytes:
    from hexgen.daemon.certificates import issue_certificate, load_swarm_key

    return issue_certificate(load_swarm_key(swarm_key), peer, 3600.0)


def admitted(tmp_path, name: str, swarm_key) -> list[str]:
    """The join flags of daemon ``name`` (its key in the harness's place) with a certificate of the swarm."""
    from hexgen.daemon.certificates import write_certificate
    from hexgen.daemon.node_key import load_or_create_key, peer_id_of

    node_key = load_or_create_key(tmp_path / f"{name}.key")
    write_certificate(tmp_path / f"{name}.cert", certificate(swarm_key, peer_id_of(node_key)))
    return ["--swarm-cert", str(tmp_path / f"{name}.cert")]


async def test_private_swarm_serves_member_clients_only(tmp_path, stories_dir):
    """A private swarm requires member clients: a stranger's generate request, or one presenting a certificate
    of another swarm or of another peer, is refused with a reason; a client with its own certificate gets the
    reference tokens."""
    from hexgen.daemon.certificates import create_swarm_key
    from hexgen.daemon.generate_protocol import generate
    from hexgen.testing.checkpoints import reference_greedy

    swarm_key, other_key = tmp_path / "swarm.key", tmp_path / "other.key"
    create_swarm_key(swarm_key)
    create_swarm_key(other_key)
    swarm = Swarm(tmp_path, model=str(stories_dir))
    try:
        daemon = swarm.start("p0", gpu="A100", extra=admitted(tmp_path, "p0", swarm_key))
        prompt = [1, 403, 407, 261, 378]
        (reference,) = reference_greedy(stories_dir, [prompt], 8)
        member_key, stranger_key = new_identity(), new_identity()
        own = certificate(swarm_key, peer_id_of(member_key))

        async def frames(key, cert: bytes | None) -> list[dict]:
            request = {"tokens": prompt, "max_tokens": 8} | ({} if cert is None else {"cert": cert})
            async with open_client(key) as client:
                await client.connect(daemon.addr)
                with trio.fail_after(60):
                    return [f async for f in generate(client, daemon.peer_id, request)]

        async with open_client(member_key) as client:
            ask = {"cert": own}
            await wait_until(client, [daemon], serving({daemon.peer_id}), timeout=120, what="serving", request=ask)
        for cert in (None, certificate(other_key, peer_id_of(stranger_key)), own):
            (answer,) = await frames(stranger_key, cert)
            assert answer == {"error": "not a member of this swarm"}, answer
        tokens = [f["token"] for f in await frames(member_key, own) if "token" in f]
        assert tokens == reference
    finally:
        swarm.close()


async def test_a_world_s_store_secret_goes_to_its_members_only(tmp_path, stories_dir):
    """Two daemons of a private swarm serve one TP=2 replica: p1's worker got the secret of p0's store (the
    reference tokens come back). p0 refuses that secret to a stranger (not a member of the swarm) and to a
    member client that is not in the world, counting each refusal."""
    from hexgen.daemon.certificates import create_swarm_key
    from hexgen.daemon.deployment import deployment_from_plan, replica_prefix
    from hexgen.daemon.generate_protocol import generate
    from hexgen.daemon.messages import PlanBody
    from hexgen.daemon.rpc import RENDEZVOUS_PROTOCOL, call
    from hexgen.testing.checkpoints import reference_greedy

    swarm_key = tmp_path / "swarm.key"
    create_swarm_key(swarm_key)
    pinned = tmp_path / "pinned.toml"
    pinned.write_text('[[groups]]\nrole = "colocated"\nstages = [{ gpus = ["p0", "p1"], layers = [0, 5] }]\n')
    swarm = Swarm(tmp_path, model=str(stories_dir))
    try:
        pin = ["--pin-plan", str(pinned)]
        head = swarm.start("p0", gpu="A100", extra=admitted(tmp_path, "p0", swarm_key) + pin)
        other = swarm.start("p1", bootstrap=[head.addr], extra=admitted(tmp_path, "p1", swarm_key) + pin)
        member_key, stranger_key = new_identity(), new_identity()
        ask = {"cert": certificate(swarm_key, peer_id_of(member_key))}
        prompt = [1, 403, 407, 261, 378]
        (reference,) = reference_greedy(stories_dir, [prompt], 8)
        async with open_client(member_key) as client:
            ids = {head.peer_id, other.peer_id}
            view, _ = await wait_until(client, [head, other], serving(ids), timeout=120, what="serving", request=ask)
            state = view[head.peer_id]
            with trio.fail_after(60):
                request = {"tokens": prompt, "max_tokens": 8} | ask
                tokens = [f["token"] async for f in generate(client, other.peer_id, request) if "token" in f]
            assert tokens == reference
            body = PlanBody.from_wire(state["plan"]["body"])
            (replica,) = deployment_from_plan(body, {p: ("x", 1) for p in ids}).replicas
            assert replica.head == head.peer_id
            formed = {w["formed"] for w in state["serving"]["workers"].values()}
            prefix = replica_prefix(state["plan"]["term"], formed.pop(), replica)
            with trio.fail_after(20):
                refused = await call(client, head.peer_id, RENDEZVOUS_PROTOCOL, ask | {"prefix": prefix})
            assert "secret" not in refused and "as a member" in refused["error"], refused
        async with open_client(stranger_key) as stranger:
            await stranger.connect(head.addr)
            with trio.fail_after(20):
                refused = await call(stranger, head.peer_id, RENDEZVOUS_PROTOCOL, {"prefix": prefix})
            assert refused == {"error": "not a member of this swarm"}
        async with open_client(member_key) as client:
            state = (await statuses(client, [head], ask))[head.peer_id]
        assert state["rejections"].get("not-in-world") == 1 and state["rejections"].get("not-member", 0) >= 1
    finally:
        swarm.close()


async def test_a_peer_over_its_request_rate_is_refused_with_the_wait_and_others_are_served(tmp_path, stories_dir):
    """``--max-request-rate 1`` (bursts of 5): eight requests at once from one peer get at least five answers,
    all the reference, and refusals that name the seconds to wait; another peer is served meanwhile."""
    from hexgen.daemon.generate_protocol import generate
    from hexgen.testing.checkpoints import reference_greedy

    prompt = [1, 403, 407, 261, 378]
    (reference,) = reference_greedy(stories_dir, [prompt], 6)
    swarm = Swarm(tmp_path, model=str(stories_dir))
    try:
        daemon = swarm.start("r0", extra=["--max-request-rate", "1"])
        async with open_client() as flooder, open_client() as other:
            await wait_until(flooder, [daemon], serving({daemon.peer_id}), timeout=120, what="serving")
            await other.connect(daemon.addr)
            outcomes: list[dict] = []

            async def ask(client) -> dict:
                tokens: list[int] = []
                with trio.fail_after(60):
                    async for frame in generate(client, daemon.peer_id, {"tokens": prompt, "max_tokens": 6}):
                        if "error" in frame:
                            return frame
                        tokens += [frame["token"]] if "token" in frame else []
                return {"tokens": tokens}

            async def flood() -> None:
                outcomes.append(await ask(flooder))

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(flood)
            answered = [o["tokens"] for o in outcomes if "tokens" in o]
            refused = [o for o in outcomes if "error" in o]
            assert len(answered) >= 5 and all(t == reference for t in answered), outcomes
            assert refused and all("rate limited" in o["error"] and o["retry_after_s"] > 0 for o in refused)
            assert await ask(other) == {"tokens": reference}
    finally:
        swarm.close()
