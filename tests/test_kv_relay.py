"""The daemons' KV relay: which arriving KV parts a daemon delivers (daemon/kv_relay.py ``accepts``), and which
replicas still hand KV to each other over gloo when an epoch relays KV (``pair_links.gloo_groups``, deployments)."""

from __future__ import annotations

import dataclasses
import itertools
import select
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import msgpack
import pytest
import torch
import trio
import trio.lowlevel
import trio.testing

from hexgen.coordinator.plan import SOURCE, Flow, Group, Plan, Stage
from hexgen.daemon.deployment import Deployment, Replica, bridge_prefix, deployment_from_plan
from hexgen.daemon.kv_channel import KvChannel
from hexgen.daemon.kv_frames import MAX_LOST, PART_BYTES, Frame, KvLinkEnded, KvLost, KvPart, from_daemon, lost_frames
from hexgen.daemon.kv_link import KvLink, SpliceRoutes
from hexgen.daemon.kv_relay import ROUTE_LINKS, Carrier, KvRelay, accepts, sends_kv
from hexgen.daemon.kv_worker_links import LinkWriter
from hexgen.daemon.messages import PlanBody, PlanLink
from hexgen.daemon.pair_links import exchange_transport, gloo_groups, with_transports
from hexgen.daemon.sealed import new_key
from hexgen.daemon.supervisor import Supervisor
from hexgen.daemon.wire import MalformedFrame
from hexgen.daemon.worker_link import LocalWorker, SocketChannel
from hexgen.daemon.worker_process import Channel
from hexgen.engine.kv_transfer import KVMissing

PREFILL = Replica(0, 0, "prefill", ((0, 5, 2),), 0, (("A", 0), ("B", 0)))
DECODE = Replica(1, 1, "decode", ((0, 5, 1),), 2, (("C", 0),))
RELAYED = Deployment(
    3, 7, (PREFILL, DECODE), ((0, 1.0),), {0: ((1, 1.0),)}, ("a", 1), (("a", 1), ("c", 1)), False, "libp2p"
)
PART = KvPart(RELAYED.exchange_prefix, 1, 2, 9, 0, 0, 1, "float32", (1,), bytes(4))


def test_a_part_is_delivered_only_from_the_host_of_its_source_rank_to_the_host_of_its_destination() -> None:
    assert RELAYED.rank_peer(0) == "A" and RELAYED.rank_peer(1) == "B" and RELAYED.rank_peer(2) == "C"
    assert RELAYED.rank_peer(3) is None
    assert accepts(RELAYED, PART.route, "B", "C") is None
    assert "which peer A does not host" in (accepts(RELAYED, PART.route, "A", "C") or "")  # A hosts rank 0, not 1
    assert "which this daemon does not host" in (accepts(RELAYED, PART.route, "B", "A") or "")
    elsewhere = dataclasses.replace(PART, dst=5)
    assert "which this daemon does not host" in (accepts(RELAYED, elsewhere.route, "B", "C") or "")


def test_a_part_of_another_epoch_or_of_a_gloo_exchange_is_dropped() -> None:
    older = dataclasses.replace(PART, prefix="hexgen/3/6/exchange/")
    assert "this daemon's deployment does not relay" in (accepts(RELAYED, older.route, "B", "C") or "")
    direct = dataclasses.replace(RELAYED, exchange="torch")
    assert "this daemon's deployment does not relay" in (accepts(direct, PART.route, "B", "C") or "")
    assert accepts(None, PART.route, "B", "C") is not None


BRIDGED = Replica(0, 0, "colocated", ((0, 2, 1), (2, 5, 2)), 0, (("A", 0), ("B", 0), ("C", 0)), bridged=True)
SPLIT = Deployment(3, 7, (BRIDGED,), ((0, 1.0),), {}, ("a", 1), (("a", 1),), False, "libp2p")


def test_what_passes_between_a_bridged_replica_s_stages_goes_by_its_layout_ranks_under_its_bridge() -> None:
    stages = dataclasses.replace(PART, prefix=bridge_prefix(2, 1, BRIDGED), src=0, dst=2)  # formed under an old term
    assert SPLIT.part_peer(stages.prefix, 2) == "C" and SPLIT.part_peer(stages.prefix, 3) is None
    assert accepts(SPLIT, stages.route, "A", "C") is None
    assert "which peer B does not host" in (accepts(SPLIT, stages.route, "B", "C") or "")
    assert "which this daemon does not host" in (accepts(SPLIT, stages.route, "A", "B") or "")
    whole = dataclasses.replace(BRIDGED, bridged=False)  # a replica with one world has no bridge
    unbridged = dataclasses.replace(SPLIT, replicas=(whole,))
    assert "does not relay" in (
        accepts(unbridged, dataclasses.replace(stages, prefix=bridge_prefix(2, 1, whole)).route, "A", "C") or ""
    )
    assert unbridged.part_peer(bridge_prefix(2, 1, whole), 0) is None


def test_who_may_send_a_daemon_kv_on_a_link() -> None:
    assert sends_kv(RELAYED, "B") is None
    assert "hosts no rank" in (sends_kv(RELAYED, "Z") or "")
    assert "relays no KV" in (sends_kv(dataclasses.replace(RELAYED, exchange="torch"), "B") or "")
    assert "relays no KV" in (sends_kv(None, "B") or "")


def _plan(*groups: tuple[str, int]) -> Plan:
    """One single-GPU group per ``(role, GPU)``, GPU k on peer ``"P{k}"``."""
    made = tuple(Group(i, role, (Stage((gpu,), (0, 4)),), 1.0, 1) for i, (role, gpu) in enumerate(groups))  # type: ignore[arg-type]
    flows = tuple(Flow(SOURCE, g.id, 1.0) for g in made if g.role == "prefill")
    return Plan(made, flows, 1.0, "test")


GPU_PEER = {k: f"P{k}" for k in range(4)}


def test_the_gloo_groups_are_linked_directly_and_leave_out_the_group_with_most_other_partners() -> None:
    # P0, P1, P2 in one data centre; P3 at home, relayed or hole-punched to all three
    direct = {("P0", "P1"): "direct", ("P0", "P2"): "direct", ("P1", "P2"): "direct"}
    home = direct | {("P0", "P3"): "relayed", ("P1", "P3"): "relayed", ("P2", "P3"): "hole-punched"}
    plan = _plan(("prefill", 3), ("prefill", 0), ("decode", 1), ("decode", 2))
    assert gloo_groups(plan, GPU_PEER, home) == (1, 2, 3)
    assert exchange_transport(plan, GPU_PEER, home) == "libp2p"
    # two hosts relayed to each other only: one of them keeps gloo with the third
    split = direct | {("P0", "P1"): "relayed"}
    assert gloo_groups(_plan(("prefill", 0), ("decode", 1), ("decode", 2)), GPU_PEER, split) == (0, 2)
    # a pair neither end reported is not trusted with gloo; one group alone needs no gloo group
    unknown = {("P0", "P1"): "direct", ("P1", "P2"): "relayed"}
    assert gloo_groups(_plan(("prefill", 0), ("decode", 1), ("decode", 2)), GPU_PEER, unknown) == (0, 1)
    assert gloo_groups(_plan(("prefill", 0), ("decode", 2)), GPU_PEER, unknown) == ()
    assert gloo_groups(None, GPU_PEER, split) == ()


def test_a_deployment_puts_in_its_gloo_exchange_only_the_plan_s_gloo_groups() -> None:
    plan = _plan(("prefill", 3), ("prefill", 0), ("decode", 1))
    gpus = {k: (f"P{k}", 0) for k in range(4)}
    body = PlanBody(1, 2, ("P0", "P1", "P3"), plan, gpus=gpus, exchange="libp2p", gloo_groups=(1, 2))
    rendezvous = {peer: (peer.lower(), 29500) for peer in ("P0", "P1", "P3")}
    relayed = deployment_from_plan(body, rendezvous)
    assert relayed.gloo == (1, 2) and [r.index for r in relayed.gloo_replicas] == [1, 2]
    assert not relayed.in_gloo(relayed.replicas[0]) and relayed.in_gloo(relayed.replicas[2])
    assert relayed.rendezvous == ("p0", 29500) and relayed.exchange_head == "P0"
    assert relayed.world(relayed.exchange_prefix) == ("P0", frozenset({"P0", "P1"}))
    everyone = deployment_from_plan(dataclasses.replace(body, exchange="torch", gloo_groups=()), rendezvous)
    assert everyone.in_gloo(everyone.replicas[0]) and everyone.rendezvous == ("p3", 29500)
    assert everyone.world(everyone.exchange_prefix) == ("P3", frozenset({"P0", "P1", "P3"}))
    alone = deployment_from_plan(dataclasses.replace(body, gloo_groups=()), rendezvous)
    assert alone.world(alone.exchange_prefix) is None


def test_the_plan_records_which_hand_offs_go_over_libp2p() -> None:
    links = (
        PlanLink(("P0", "P1"), "stage", "direct", (0, 0)),
        PlanLink(("P0", "P2"), "handoff", "direct", (0, 1)),
        PlanLink(("P0", "P3"), "handoff", "relayed", (0, 2)),
    )
    assert [x.transport for x in with_transports(links, "libp2p", (0, 1))] == ["torch", "torch", "libp2p"]
    assert [x.transport for x in with_transports(links, "libp2p", ())] == ["torch", "libp2p", "libp2p"]
    assert [x.transport for x in with_transports(links, "torch", ())] == ["torch", "torch", "torch"]
    assert [PlanLink.from_wire(x.to_wire()) for x in with_transports(links, "libp2p", ())] == list(
        with_transports(links, "libp2p", ())
    )


def test_a_bridged_group_s_stage_boundaries_and_hand_offs_go_over_libp2p_and_it_joins_no_gloo_group() -> None:
    links = (
        PlanLink(("P0", "P1"), "stage", "relayed", (0, 0)),
        PlanLink(("P1", "P2"), "stage", "direct", (0, 0)),  # each stage of a bridged group is a world of its own
        PlanLink(("P2", "P3"), "stage", "direct", (1, 1)),
        PlanLink(("P1", "P3"), "handoff", "direct", (0, 1)),
    )
    bridged = [x.transport for x in with_transports(links, "libp2p", (), (0,))]
    assert bridged == ["libp2p", "libp2p", "torch", "libp2p"]
    assert [x.transport for x in with_transports(links, "torch", ())] == ["libp2p", "torch", "torch", "torch"]
    # P0 and P1 relayed, every other pair direct: the bridged group 0 would put that pair in the gloo group
    kinds = {(a, b): "direct" for a, b in itertools.combinations(sorted(GPU_PEER.values()), 2)}
    kinds["P0", "P1"] = "relayed"
    two = (Stage((0,), (0, 2)), Stage((1,), (2, 4)))
    groups = (Group(0, "prefill", two, 1.0, 1), *_plan(("decode", 2), ("decode", 3)).groups)
    plan = Plan(tuple(dataclasses.replace(g, id=i) for i, g in enumerate(groups)), (), 1.0, "test")
    assert exchange_transport(plan, GPU_PEER, kinds) == "libp2p"
    assert gloo_groups(plan, GPU_PEER, kinds) == (1, 2)


# -- lost messages -----------------------------------------------------------------------------------------


def test_a_lost_notice_is_parsed_strictly_and_chunked() -> None:
    keys = [(RELAYED.exchange_prefix, 1, 2, 9, i) for i in range(MAX_LOST + 3)] + [("hexgen/3/8/exchange/", 0, 2, 1, 0)]
    notices = lost_frames(keys)
    assert [len(n.messages) for n in notices] == [MAX_LOST, 3, 1]
    assert [k for n in notices for k in n.keys] == keys
    assert all(from_daemon(n.frame()) == n for n in notices)
    assert from_daemon(PART.frame_head() + bytes(PART.data)) == PART
    head = msgpack.packb({"lost": "p/", "messages": [[1, 2, 3]]})
    with pytest.raises(MalformedFrame, match=r"\[src, dst, tag, index\]"):
        from_daemon(len(head).to_bytes(4, "big") + head)
    with pytest.raises(MalformedFrame, match="names no lost"):  # a part never passes for a notice, nor back
        KvPart.from_frame(notices[0].frame())


def daemon_c() -> tuple[KvRelay, KvChannel, socket.socket, socket.socket]:
    """Daemon C of RELAYED's relay, its decode worker (rank 2) on a KV socket pair: the relay, the worker's
    channel, and the pair's daemon and worker ends."""
    supervisor = Supervisor("C", "model")
    supervisor.deployment = RELAYED
    worker = LocalWorker(DECODE, 0, RELAYED.epoch)
    daemon_end, worker_end = socket.socketpair()
    worker.kv = SocketChannel(trio.SocketStream(trio.socket.from_stdlib_socket(daemon_end)))
    supervisor.workers[worker.slot] = worker
    relay = KvRelay(None, "C", supervisor)  # type: ignore[arg-type]  # serving parts needs no host
    return relay, KvChannel(worker_end), daemon_end, worker_end


@pytest.mark.trio
async def test_a_carrier_that_ends_mid_message_fails_that_message_at_its_receiver_at_once() -> None:
    """Daemon C hosts rank 2; sender B's carrier brings the first of a message's two parts, and a one-part
    message whole, then ends: the rank's receive of the first fails at once naming the broken connection (not
    after its timeout), the whole one is taken, and one never started still waits."""
    relay, channel, daemon_end, worker_end = daemon_c()
    shape = (PART_BYTES // 2,)
    first = KvPart(RELAYED.exchange_prefix, 1, 2, 9, 0, 0, 2, "float32", shape, bytes(PART_BYTES))
    whole = dataclasses.replace(PART, tag=10)
    frames = [first.frame_head() + bytes(first.data), whole.frame_head() + bytes(whole.data)]

    async def next_frame() -> bytes | None:
        return frames.pop(0) if frames else None

    assert await relay._serve_parts(next_frame, "B", "link")
    group = channel.bind(RELAYED.exchange_prefix, 2)
    started = time.monotonic()
    with pytest.raises(KVMissing, match="connection that carried it between the daemons broke"):
        await trio.to_thread.run_sync(group.recv([torch.zeros(shape)], 1, 9).wait, timedelta(seconds=30))
    assert time.monotonic() - started < 30
    received = torch.ones(1)
    assert await trio.to_thread.run_sync(group.recv([received], 1, 10).wait, timedelta(seconds=30))
    assert received.item() == 0.0
    assert not group.arrived(1, 11, 1)
    worker_end.close()
    daemon_end.close()


def test_a_step_loop_waiting_on_its_daemon_wakes_when_a_relayed_message_is_whole_or_the_channel_ends() -> None:
    """A driver waiting for relayed KV selects on its KV channel besides its daemon's frames: a message
    becoming whole ends the wait (no frame from the daemon, no polling interval), and so does the channel's
    end; a drained channel is not ready."""
    control_daemon, control_worker = socket.socketpair()
    kv_daemon, kv_worker = socket.socketpair()
    channel, kv = Channel(control_worker), KvChannel(kv_worker)

    def wait_until(event: Callable[[], None]) -> list[list[object]]:
        outcome: list[list[object]] = []
        waiting = threading.Thread(target=lambda: outcome.append(channel.poll(None, kv)), daemon=True)
        waiting.start()
        event()
        waiting.join(30)
        return outcome

    try:
        assert wait_until(lambda: kv_daemon.sendall(PART.frame_head() + bytes(PART.data))) == [[]]
        assert select.select([kv], [], [], 0)[0] == []
        assert wait_until(kv_daemon.close) == [[]], "the channel's end did not end the wait"
    finally:
        control_daemon.close()  # a wait still blocked sees its daemon gone and ends
        kv_daemon.close()


def test_a_receive_copies_into_its_buffer_unless_the_buffer_adopts_the_message_s_memory() -> None:
    """A stage link's receive fills the tensor it was given, which others may view; a KV chunk's own fresh
    buffer instead takes the message's memory as it is, saving a copy and the pages of a second buffer."""
    daemon_end, worker_end = socket.socketpair()
    group = KvChannel(worker_end).bind(RELAYED.exchange_prefix, 2)
    values = torch.arange(6, dtype=torch.float32)
    for tag in (1, 2):
        part = dataclasses.replace(PART, tag=tag, shape=(2, 3), data=values.numpy().tobytes())
        daemon_end.sendall(part.frame_head() + bytes(part.data))
    try:
        filled = torch.zeros(2, 3)
        where = filled.data_ptr()
        assert group.recv([filled], 1, 1).wait(timedelta(seconds=30))
        assert filled.data_ptr() == where and torch.equal(filled.view(-1), values)
        adopting = torch.zeros(2, 3)
        where = adopting.data_ptr()
        assert group.recv([adopting], 1, 2, adopt=True).wait(timedelta(seconds=30))
        assert adopting.data_ptr() != where and torch.equal(adopting.view(-1), values)
        assert adopting.shape == (2, 3) and adopting.is_contiguous()
    finally:
        daemon_end.close()


@pytest.mark.trio
async def test_parts_a_broken_carrier_left_unsent_are_named_lost_to_their_daemon_on_the_next_carrier() -> None:
    """Daemon B queues a two-part message and a one-part one for C; its carrier takes the first part and
    breaks on the second. The next carrier to C brings C a notice naming both messages first."""
    supervisor = Supervisor("B", "model")
    supervisor.deployment = RELAYED
    shape = (PART_BYTES // 2,)
    first = [KvPart(RELAYED.exchange_prefix, 1, 2, 9, 0, n, 2, "float32", shape, bytes(PART_BYTES)) for n in (0, 1)]
    alone = dataclasses.replace(PART, tag=10)
    routed, noticed, written, later, opened = trio.Event(), trio.Event(), [], [], []

    async def breaks(frame: Frame) -> None:
        if written:
            await routed.wait()
            raise OSError("the link was reset")
        written.append(frame)

    async def keeps(frame: Frame) -> None:
        later.append(frame)
        noticed.set()

    class Breaking(KvRelay):
        async def _carrier(self, peer: str) -> Carrier:
            opened.append(peer)
            return Carrier("direct", "R", breaks if len(opened) == 1 else keeps, trio.lowlevel.checkpoint)

    relay = Breaking(None, "B", supervisor)  # type: ignore[arg-type]  # writing parts needs no host
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run)
        await trio.testing.wait_all_tasks_blocked()
        for part in (*first, alone):
            await relay._route(part, part.frame_head() + bytes(part.data), LocalWorker(PREFILL, 1, RELAYED.epoch))
        routed.set()
        with trio.fail_after(30):
            await noticed.wait()
        nursery.cancel_scope.cancel()
    assert len(written) == 1 and opened == ["C", "C"]
    notice = from_daemon(later[0])
    assert isinstance(notice, KvLost) and notice.keys == sorted([first[0].key, alone.key])


@pytest.mark.trio
async def test_a_lost_notice_from_a_daemon_fails_a_message_never_begun_but_only_for_ranks_that_daemon_hosts() -> None:
    """C hosts rank 2. B (host of rank 1) says message 0 from rank 1 under tag 9 is lost: the rank's receive
    of it fails at once, though no part of it ever came. The same notice for rank 0, which A hosts, is
    ignored: that receive still waits."""
    relay, channel, daemon_end, worker_end = daemon_c()
    notices = [
        KvLost(RELAYED.exchange_prefix, ((1, 2, 9, 0),)).frame(),
        KvLost(RELAYED.exchange_prefix, ((0, 2, 9, 0),)).frame(),
    ]

    async def next_frame() -> bytes | None:
        return notices.pop(0) if notices else None

    assert await relay._serve_parts(next_frame, "B", "link")
    group = channel.bind(RELAYED.exchange_prefix, 2)
    with pytest.raises(KVMissing, match="connection that carried it between the daemons broke"):
        await trio.to_thread.run_sync(group.recv([torch.zeros(1)], 1, 9).wait, timedelta(seconds=30))
    sentinel = dataclasses.replace(PART, tag=12)  # filed after anything the daemon wrote before it
    daemon_end.sendall(sentinel.frame_head() + bytes(sentinel.data))
    assert await trio.to_thread.run_sync(group.recv([torch.zeros(1)], 1, 12).wait, timedelta(seconds=30))
    assert not group.arrived(0, 9, 1)
    worker_end.close()
    daemon_end.close()


@pytest.mark.trio
async def test_a_link_of_a_route_s_own_is_admitted_as_its_parts_would_be_and_handed_to_its_worker() -> None:
    """C admits B's offer of a link for rank 1 -> rank 2 (B hosts 1, C hosts 2) at most ROUTE_LINKS times,
    and none for a rank B does not host or a rank no worker here has. An admitted link's socket goes to rank
    2's worker, which opens and files what arrives on it with no daemon in the way."""
    relay, channel, daemon_end, worker_end = daemon_c()
    route = PART.route
    assert [relay._refuse_route(route, "B") for _ in range(ROUTE_LINKS)] == [None] * ROUTE_LINKS
    assert "links for" in (relay._refuse_route(route, "B") or "")
    assert "which peer B does not host" in (relay._refuse_route((route[0], 0, 2), "B") or "")
    assert "which this daemon does not host" in (relay._refuse_route((route[0], 1, 1), "B") or "")

    key = new_key()
    with socket.create_server(("127.0.0.1", 0)) as server:
        out = socket.create_connection(server.getsockname())
        into, _ = server.accept()
    link = KvLink(trio.SocketStream(trio.socket.from_stdlib_socket(into)), key, "R", True, route)
    await relay._hand_in(link, "B")
    assert into.fileno() == -1  # the daemon's copy is closed: the worker holds the link alone
    values = torch.arange(3, dtype=torch.float32)
    part = dataclasses.replace(PART, shape=(3,), data=values.numpy().tobytes())
    LinkWriter(out, key, route).write(part.frame_head(), memoryview(part.data))
    received = torch.zeros(3)
    group = channel.bind(RELAYED.exchange_prefix, 2)
    assert await trio.to_thread.run_sync(group.recv([received], 1, 9).wait, timedelta(seconds=30))
    assert torch.equal(received, values)
    for end in (out, worker_end, daemon_end):
        end.close()


@pytest.mark.trio
async def test_a_worker_s_link_that_ended_is_forgotten_and_another_is_asked_for_only_after_a_while() -> None:
    """C's worker (rank 2) says its own link for a route ended: C's status no longer counts it, and a part of
    that route does not ask for another link until LINK_RETRY_S passed. A malformed end is dropped and the
    socket read on."""
    relay, _, daemon_end, worker_end = daemon_c()
    route = (PART.prefix, 2, 1)
    relay._granted = {route: ("B", "direct")}
    relay._nursery = "not to be used"  # type: ignore[assignment]  # no link may be asked for here
    relay.routes = SpliceRoutes(lambda: ["R"], lambda relay: ["127.0.0.1"])
    bad = msgpack.packb({"ended": list(route), "extra": 1})
    worker_end.sendall(len(bad).to_bytes(4, "big") + bad + KvLinkEnded(route).frame())
    worker_end.shutdown(socket.SHUT_RDWR)  # the worker's channel reads it in a thread: close alone ends nothing
    (worker,) = relay.supervisor.workers.values()
    with trio.fail_after(10):
        await relay.pump(worker)
    assert relay.worker_links("B") == {}
    assert relay._route_retry[route] > trio.current_time()
    relay._link_route(worker, route, "B")  # within LINK_RETRY_S: nothing is started (no nursery to start it)
    for end in (daemon_end, worker_end):
        end.close()


def test_the_links_a_peer_s_status_counts_are_those_of_routes_the_deployment_still_carries() -> None:
    """B's workers were given links of their own to C's for two routes of this epoch and one of an older
    one: C's status counts this epoch's, by kind; a peer given none shows none."""
    supervisor = Supervisor("B", "model")
    supervisor.deployment = RELAYED
    relay = KvRelay(None, "B", supervisor)  # type: ignore[arg-type]  # counting links needs no host
    relay._granted = {
        PART.route: ("C", "direct"),
        (PART.prefix, 0, 2): ("C", "splice"),
        ("hexgen/3/6/exchange/", 1, 2): ("C", "direct"),
    }
    assert relay.worker_links("C") == {"direct": 1, "splice": 1}
    assert relay.worker_links("A") == {}
