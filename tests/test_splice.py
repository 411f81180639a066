"""Sealed records and the relay's TCP splices: what a KV link between two homes is made of (daemon.sealed,
daemon.splice, daemon.kv_link). Real sockets on loopback; the lab tests in test_nat_serving.py run them
across NATs."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import pytest
import trio
import trio.testing

from hexgen.daemon.kv_link import (
    LINK_PROTOCOL,
    KvLink,
    LinkError,
    LinkOffer,
    SpliceRoutes,
    accept_link,
    address_ip,
    open_link,
    punch,
)
from hexgen.daemon.kv_relay import KvRelay
from hexgen.daemon.sealed import MAX_RECORD, SealedStream, SealError, new_key
from hexgen.daemon.splice import (
    HELLO,
    MAX_TOKENS,
    SPLICE_PROTOCOL,
    TOKEN_BYTES,
    SpliceError,
    Splicer,
    dial,
    reusable_socket,
)
from hexgen.daemon.supervisor import Supervisor
from hexgen.daemon.wire import FrameReader, MalformedFrame, write_frame
from hexgen.testing.daemon_harness import open_client


def sealed_pair(key: bytes, reader_key: bytes | None = None) -> tuple[SealedStream, SealedStream]:
    left, right = trio.testing.memory_stream_pair()
    return SealedStream(left, key), SealedStream(right, reader_key or key)


async def read_all(stream: SealedStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.read_record()
        if chunk is None:
            break
        data += chunk
    return data


@pytest.mark.trio
async def test_sealed_records_carry_bytes_and_end_cleanly() -> None:
    writer, reader = sealed_pair(new_key())
    # smaller after larger: records are sealed and opened in buffers kept from the one before
    payloads = [os.urandom(n) for n in (1, 1000, 300_000, MAX_RECORD - 16, 5, 300_000)]
    async with trio.open_nursery() as nursery:

        async def write() -> None:
            for payload in payloads:
                await writer.write(payload)
            await writer.write(b"")  # nothing: an empty record would read as the end
            await writer.aclose()

        nursery.start_soon(write)
        got = await read_all(reader, sum(map(len, payloads)) + 1)
    assert got == b"".join(payloads)
    assert await reader.read_record() is None


@pytest.mark.trio
async def test_a_second_task_writing_a_sealed_stream_meanwhile_is_refused_and_the_first_record_arrives() -> None:
    left, right = trio.testing.lockstep_stream_pair()  # a write waits for its reader
    writer, reader = SealedStream(left, b"k" * 32), SealedStream(right, b"k" * 32)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.write, b"first")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await writer.write(b"second")
        assert bytes(await reader.read_record() or b"") == b"first"


@pytest.mark.trio
async def test_a_record_altered_dropped_or_under_another_key_does_not_open() -> None:
    key = new_key()
    # altered: flip one bit of the ciphertext on the way
    left, right = trio.testing.memory_stream_pair()
    writer = SealedStream(left, key)
    await writer.write(b"x" * 100)
    raw = bytearray(await right.receive_some(1 << 16))
    raw[50] ^= 1
    tampered_left, tampered_right = trio.testing.memory_stream_pair()
    await tampered_left.send_all(bytes(raw))
    with pytest.raises(SealError, match="does not open"):
        await SealedStream(tampered_right, key).read_record()
    # dropped: the second record read first
    left, right = trio.testing.memory_stream_pair()
    writer = SealedStream(left, key)
    await writer.write(b"first")
    first = await right.receive_some(1 << 16)
    await writer.write(b"second")
    second = await right.receive_some(1 << 16)
    assert first != second
    skipped_left, skipped_right = trio.testing.memory_stream_pair()
    await skipped_left.send_all(second)
    with pytest.raises(SealError, match="out of order"):
        await SealedStream(skipped_right, key).read_record()
    # another key
    writer, reader = sealed_pair(key, new_key())
    await writer.write(b"secret")
    with pytest.raises(SealError):
        await reader.read_record()


@pytest.mark.trio
async def test_a_sealed_stream_refuses_oversized_and_truncated_records() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all((MAX_RECORD + 1).to_bytes(4, "big"))
    with pytest.raises(SealError, match="not between"):
        await SealedStream(right, new_key()).read_record()
    with pytest.raises(SealError, match="over the limit"):
        await SealedStream(left, new_key()).write(b"x" * MAX_RECORD)
    left, right = trio.testing.memory_stream_pair()
    await left.send_all((100).to_bytes(4, "big") + b"y" * 40)
    await left.aclose()
    with pytest.raises(SealError, match="ended inside"):
        await SealedStream(right, new_key()).read_record()
    with pytest.raises(ValueError, match="32 bytes"):
        SealedStream(left, b"short")


async def running_splicer(nursery: trio.Nursery, admits: bool = True) -> Splicer:
    splicer = Splicer(lambda peer: admits and peer != "stranger", "127.0.0.1", 0)
    await nursery.start(splicer.run)
    return splicer


@pytest.mark.trio
async def test_two_connections_naming_a_registered_token_are_spliced_both_ways() -> None:
    async with trio.open_nursery() as nursery:
        splicer = await running_splicer(nursery)
        token = os.urandom(TOKEN_BYTES)
        assert splicer.register("member", token) is None
        ends: list[trio.SocketStream] = []

        async def join() -> None:
            spliced = await dial("127.0.0.1", splicer.port, token)
            ends.append(spliced.stream)
            assert spliced.partner is not None
            seen.append((spliced.local_port, spliced.partner[1]))

        seen: list[tuple[int, int]] = []

        with trio.fail_after(10):
            async with trio.open_nursery() as both:
                both.start_soon(join)
                both.start_soon(join)
            key = new_key()
            a, b = SealedStream(ends[0], key), SealedStream(ends[1], key)
            payload = os.urandom(3 << 20)
            async with trio.open_nursery() as transfer:

                async def send() -> None:
                    for at in range(0, len(payload), 1 << 19):
                        await a.write(payload[at : at + (1 << 19)])

                transfer.start_soon(send)
                assert await read_all(b, len(payload)) == payload
            reply_key = new_key()
            await SealedStream(ends[1], reply_key).write(b"back")
            assert await SealedStream(ends[0], reply_key).read_record() == b"back"
            assert splicer.splices == 1
            # each end was told the port the other left from, as the relay saw it
            assert {seen[0][0], seen[1][1]} == {seen[0][0]} and seen[1][0] == seen[0][1]
            await ends[0].aclose()
            assert await ends[1].receive_some(10) == b""  # one end closed: the relay closes the other
            with pytest.raises(SpliceError):  # spent: a third connection naming it is not paired
                await dial("127.0.0.1", splicer.port, token)
        nursery.cancel_scope.cancel()


async def closed_unpaired(port: int, garbage: bytes) -> None:
    """The relay closes a connection that sent ``garbage`` without pairing it: an end of stream, or a reset
    where it closed with some of those bytes unread."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        try:
            await stream.send_all(garbage)
            await stream.send_eof()
            assert await stream.receive_some(10) == b""
        except trio.BrokenResourceError:
            pass


@pytest.mark.trio
async def test_the_splicer_refuses_strangers_unknown_tokens_and_garbage_and_keeps_splicing() -> None:
    async with trio.open_nursery() as nursery:
        splicer = await running_splicer(nursery)
        assert splicer.register("stranger", os.urandom(TOKEN_BYTES)) == "not a member of this swarm"
        assert splicer.refused == 1
        assert "bytes" in (splicer.register("member", b"short") or "")
        expired = os.urandom(TOKEN_BYTES)
        assert splicer.register("member", expired) is None
        splicer.tokens[expired] = trio.current_time() - 1.0
        rng = random.Random(7)
        with trio.fail_after(20):
            for token in (os.urandom(TOKEN_BYTES), expired):
                with pytest.raises(SpliceError, match="without pairing"):
                    await dial("127.0.0.1", splicer.port, token)
            for garbage in (b"", b"GET / HTTP/1.1\r\n\r\n" * 3, bytes(rng.randrange(256) for _ in range(5000))):
                await closed_unpaired(splicer.port, garbage)
            assert all(splicer.register("member", os.urandom(TOKEN_BYTES)) is None for _ in range(MAX_TOKENS))
            assert splicer.register("member", os.urandom(TOKEN_BYTES)) == "too many splices waiting"
            splicer.tokens.clear()
            token = os.urandom(TOKEN_BYTES)
            assert splicer.register("member", token) is None
            async with trio.open_nursery() as both:  # still splicing
                for _ in range(2):
                    both.start_soon(dial, "127.0.0.1", splicer.port, token)
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_lone_splice_connection_waits_for_its_partner_no_longer_than_its_token_lives(
    autojump_clock: trio.testing.MockClock,
) -> None:
    splicer = Splicer(lambda peer: True, "127.0.0.1", 0)
    left, right = trio.testing.memory_stream_pair()
    token = os.urandom(TOKEN_BYTES)
    splicer.listening.set()
    assert splicer.register("member", token) is None
    await left.send_all(HELLO + token)
    with trio.fail_after(60):
        await splicer._serve_connection(right)  # type: ignore[arg-type]  # a memory stream stands for the socket
    assert not splicer.waiting
    assert await left.receive_some(10) == b""


def test_a_link_offer_is_parsed_strictly() -> None:
    offer = LinkOffer(os.urandom(TOKEN_BYTES), new_key(), "12D3KooWrelay", 4001, True)
    assert LinkOffer.from_wire(offer.to_wire()) == offer
    probe = LinkOffer(os.urandom(TOKEN_BYTES), new_key(), "12D3KooWrelay", 4001, True, probe=True)
    assert LinkOffer.from_wire(probe.to_wire()) == probe
    for bad in (
        {**offer.to_wire(), "probe": 1},
        {**probe.to_wire(), "route": ["hexgen/1/1/exchange/", 0, 1]},
        {**offer.to_wire(), "token": b"short"},
        {**offer.to_wire(), "key": b"k" * 16},
        {**offer.to_wire(), "port": 0},
        {**offer.to_wire(), "port": 70000},
        {**offer.to_wire(), "relay": ""},
        {**offer.to_wire(), "port": "4001"},
        {**offer.to_wire(), "punch": 1},
        None,
        [1, 2],
    ):
        with pytest.raises(MalformedFrame):
            LinkOffer.from_wire(bad)


@pytest.mark.trio
async def test_a_punch_dials_again_until_the_other_end_answers_then_gives_up_in_time() -> None:
    """A hole punch from a bound port: its first SYNs are refused (nothing answers yet, as when they reach the
    other NAT before its host's SYN left), it dials again, and connects once the other end is there; with
    nobody there it gives up after its time. (The simultaneous open itself crosses NATs in test_nat_serving.)"""
    ours, theirs = reusable_socket(), reusable_socket()
    port, their_port = ours.getsockname()[1], theirs.getsockname()[1]
    ours.close()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            made: list[trio.SocketStream | None] = []

            async def dial_out() -> None:
                made.append(await punch(port, ("127.0.0.1", their_port), seconds=10.0))

            nursery.start_soon(dial_out)
            await trio.sleep(0.3)  # refused a few times meanwhile
            theirs.listen(1)
            accepted, _ = await theirs.accept()
        assert made[0] is not None and made[0].socket.getsockname()[1] == port
        await made[0].send_all(b"punched")
        assert await accepted.recv(100) == b"punched"
        accepted.close()
        await made[0].aclose()
        theirs.close()
        assert await punch(port, ("127.0.0.1", their_port), seconds=0.5) is None


def test_address_ip_reads_a_multiaddr_host() -> None:
    assert address_ip("/ip4/203.0.113.5/tcp/4001/p2p/12D3") == "203.0.113.5"
    assert address_ip("/ip6/::1/tcp/1") == "::1"
    assert address_ip("/dns4/relay.example/tcp/1") is None
    assert address_ip("") is None


# -- the link handshake, between real libp2p hosts on loopback ---------------------------------------------


@pytest.mark.trio
async def test_a_kv_link_is_offered_spliced_sealed_and_refused_when_it_should_be() -> None:
    """Three hexgen hosts: a relay splicing for members, a sender and a receiver. An accepted offer becomes a
    sealed spliced link (no punch asked: on loopback there is no NAT to punch); a refusal, a bad offer and a
    relay no one can reach end in ``LinkError`` naming why, and the relay still splices."""
    async with open_client() as relay_host, open_client() as sender, open_client() as receiver:
        for host in (sender, receiver):
            await host.connect(f"{relay_host.addrs[0]}/p2p/{relay_host.peer_id}")
        await sender.connect(f"{receiver.addrs[0]}/p2p/{receiver.peer_id}")
        async with trio.open_nursery() as nursery:
            splicer = Splicer(lambda peer: peer != "nobody", "127.0.0.1", 0)
            await nursery.start(splicer.run)
            relay_host.handle(SPLICE_PROTOCOL, splicer.serve_register)
            routes = SpliceRoutes(lambda: [relay_host.peer_id], lambda relay: ["127.0.0.1"])
            verdicts: list[str | None] = [None, "this daemon takes no KV links"]
            accepted: list[KvLink] = []
            offered: list[LinkOffer] = []

            async def serve(stream: Any) -> None:
                verdict = verdicts.pop(0) if verdicts else None

                def admits(offer: LinkOffer) -> str | None:
                    offered.append(offer)
                    return verdict

                with contextlib.suppress(LinkError):
                    accepted.append(await accept_link(stream, admits, routes))

            receiver.handle(LINK_PROTOCOL, serve)
            with trio.fail_after(30):
                route = ("hexgen/3/7/exchange/", 1, 2)  # a link of one worker's own, the offer says
                link = await open_link(sender, receiver.peer_id, routes, punch=False, route=route)
                assert not link.direct and link.relay == relay_host.peer_id and link.route == route
                await link.sealed().write(b"a KV part's frame")
                while not accepted:
                    await trio.sleep(0.01)
                assert offered[0].route == route and accepted[0].route == route
                assert await accepted[0].sealed().read_record() == b"a KV part's frame"
                with pytest.raises(LinkError, match="declined the link: this daemon takes no KV links"):
                    await open_link(sender, receiver.peer_id, routes, punch=False)
                stream = await sender.open_stream(receiver.peer_id, LINK_PROTOCOL)
                await write_frame(stream, {"token": b"x"})
                assert "bad link offer" in (await FrameReader(stream).read())["error"]
                nowhere = SpliceRoutes(lambda: ["12D3KooWnowhere"], lambda relay: [])
                with pytest.raises(LinkError, match="no address of relay"):
                    await open_link(sender, receiver.peer_id, nowhere, punch=False)
                link = await open_link(sender, receiver.peer_id, routes, punch=True)  # nobody answers the punch
                assert not link.direct
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_probe_of_a_kv_link_measures_the_spliced_path_and_is_refused_to_strangers_and_twice_at_once() -> None:
    """The sender's daemon probes its KV link to the receiver's (spliced by a relay: the path their KV would
    take): a measurement of that path. A stranger, no member of the receiver's swarm, is declined; so is a
    second probe from the sender while one is under way."""
    async with open_client() as relay_host, open_client() as sender, open_client() as receiver, open_client() as x:
        for host in (sender, receiver, x):
            await host.connect(f"{relay_host.addrs[0]}/p2p/{relay_host.peer_id}")
        for host in (sender, x):
            await host.connect(f"{receiver.addrs[0]}/p2p/{receiver.peer_id}")
        async with trio.open_nursery() as nursery:
            splicer = Splicer(lambda peer: True, "127.0.0.1", 0)
            await nursery.start(splicer.run)
            relay_host.handle(SPLICE_PROTOCOL, splicer.serve_register)
            routes = SpliceRoutes(lambda: [relay_host.peer_id], lambda relay: ["127.0.0.1"])

            def relay_of(host: Any, member: Any = lambda peer: True) -> KvRelay:
                return KvRelay(host, host.peer_id, Supervisor(host.peer_id, "model"), routes, member)

            answering = relay_of(receiver, lambda peer: peer == sender.peer_id)
            answering._nursery = nursery
            receiver.handle(LINK_PROTOCOL, answering.serve_link)
            with trio.fail_after(30):
                measured = await relay_of(sender).probe_link(receiver.peer_id)
                assert (measured.a, measured.b, measured.path) == (sender.peer_id, receiver.peer_id, "kv-link")
                assert measured.gb_s > 0
                with pytest.raises(LinkError, match="is not a member"):
                    await relay_of(x).probe_link(receiver.peer_id)
                answering._probes_from.add(sender.peer_id)
                with pytest.raises(LinkError, match="under way"):
                    await relay_of(sender).probe_link(receiver.peer_id)
            nursery.cancel_scope.cancel()
