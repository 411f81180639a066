"""Who may rendezvous: sealed store values (an outsider at the store's port can neither read a world's
addresses nor plant its own), which prefixes name which world, and which peers a store's daemon hands a
world's secret to."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import trio
import trio.testing

from hexgen.coordinator.pinned import parse_pinned, pinned_plan
from hexgen.daemon.deployment import deployment_from_plan, replica_prefix
from hexgen.daemon.messages import PlanBody
from hexgen.daemon.serving import store_socket
from hexgen.daemon.supervisor import Supervisor
from hexgen.engine.sealed_store import RendezvousRefused, SealedStore
from hexgen.testing.plans import GPU_INDEX, GPUS, PINNED, RENDEZVOUS

PREFIX = "hexgen/1/3/abc/"
GLOO_KEY = PREFIX + "/0/{rank}"  # where gloo's first context puts each rank's address (PrefixStore adds "/")


@pytest.fixture
def store_port():
    server = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    yield server.port
    del server


def outsider(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, None, is_master=False, timeout=timedelta(seconds=10))


def form(port: int, ranks: list[int], secrets: list[bytes], size: int = 2) -> dict[int, object]:
    """Each of ``ranks`` joins a gloo world under PREFIX with its secret, in its own thread, and all-reduces
    its rank + 1; returns each rank's sum, or the exception it raised."""
    outcomes: dict[int, object] = {}

    def join(rank: int, secret: bytes) -> None:
        try:
            store = SealedStore(outsider(port), secret)
            group = dist.ProcessGroupGloo(dist.PrefixStore(PREFIX, store), rank, size, timedelta(seconds=10))
            value = torch.tensor([rank + 1.0])
            group.allreduce([value]).wait()
            outcomes[rank] = value.item()
        except Exception as exc:
            outcomes[rank] = exc

    threads = [threading.Thread(target=join, args=(r, s)) for r, s in zip(ranks, secrets, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes


def test_members_with_the_secret_form_a_world_whose_values_an_outsider_cannot_read(store_port):
    secret = os.urandom(32)
    assert form(store_port, [0, 1], [secret, secret]) == {0: 3.0, 1: 3.0}
    spy = outsider(store_port)
    keys = [key for key in spy.list_keys() if key.startswith(PREFIX)]
    assert len(keys) == 2
    for key in keys:
        sealed = spy.get(key)
        assert SealedStore(spy, secret).get(key) != sealed
        with pytest.raises(RendezvousRefused, match="not sealed with this world's secret"):
            SealedStore(spy, os.urandom(32)).get(key)


def test_a_worker_refuses_an_address_an_outsider_planted(store_port):
    """The outsider writes rank 1's key before rank 1 arrives (as it would to have rank 0 connect to it):
    rank 0 refuses the rendezvous instead of connecting."""
    secret = os.urandom(32)
    rank0 = SealedStore(outsider(store_port), secret)
    planted = outsider(store_port)
    outcomes: dict[int, object] = {}

    def join() -> None:
        try:
            dist.ProcessGroupGloo(dist.PrefixStore(PREFIX, rank0), 0, 2, timedelta(seconds=10))
            outcomes[0] = "joined"
        except Exception as exc:
            outcomes[0] = exc

    thread = threading.Thread(target=join)
    thread.start()
    planted.wait([GLOO_KEY.format(rank=0)])
    planted.set(GLOO_KEY.format(rank=1), b"the outsider's own address")
    thread.join(30)
    assert isinstance(outcomes.get(0), Exception) and "not sealed with this world's secret" in str(outcomes[0])


def test_a_value_copied_from_another_key_is_refused(store_port):
    """Sealing binds a value to its key: rank 0's own sealed address, copied under rank 1's key, is refused."""
    secret = os.urandom(32)
    sealed = SealedStore(outsider(store_port), secret)
    sealed.set(PREFIX + "0", b"address of rank 0")
    spy = outsider(store_port)
    spy.set(PREFIX + "1", spy.get(PREFIX + "0"))
    assert sealed.get(PREFIX + "0") == b"address of rank 0"
    with pytest.raises(RendezvousRefused):
        sealed.get(PREFIX + "1")


def test_a_world_needs_one_secret(store_port):
    """Two ranks with different secrets never form a world: each refuses the other's address."""
    outcomes = form(store_port, [0, 1], [os.urandom(32), os.urandom(32)])
    assert all(isinstance(o, Exception) for o in outcomes.values()), outcomes


def deployment(epoch: int = 7):
    """test_daemon_deployment's plan: prefill on pa+pb, decode on pc then pd, decode on pd."""
    plan = pinned_plan(parse_pinned(PINNED), GPU_INDEX).to_dict()
    raw = {"plan": plan, "gpus": GPUS, "term": 2, "epoch": epoch, "members": []}
    return deployment_from_plan(PlanBody.from_wire(raw), RENDEZVOUS)


def test_prefixes_name_the_exchange_group_and_replicas_formed_up_to_the_epoch():
    world = deployment()
    prefill, split, _ = world.replicas
    assert world.world(world.exchange_prefix) == ("pa", frozenset({"pa", "pb", "pc", "pd"}))
    assert world.world(replica_prefix(2, 7, prefill)) == ("pa", frozenset({"pa", "pb"}))
    assert world.world(replica_prefix(2, 3, split)) == ("pc", frozenset({"pc", "pd"}))
    for prefix in (
        replica_prefix(2, 8, prefill),  # formed after this epoch
        replica_prefix(1, 7, prefill),  # another term
        "hexgen/2/7/0123456789abcdef/",  # no such replica
        "hexgen/2/x/exchange/",
        "hexgen/2/7/" + prefill.digest,
        "",
    ):
        assert world.world(prefix) is None, prefix


@pytest.mark.trio
async def test_a_store_daemon_grants_secrets_to_a_world_s_members_only():
    head = Supervisor("pa", "model", store_address=("127.0.0.1", 5000))
    world = deployment()
    head.want(world)
    prefill_prefix = replica_prefix(2, 7, world.replicas[0])
    secret = await head.grant("pb", prefill_prefix, wait_s=1)
    assert len(secret) == 32 and secret == await head.grant("pa", prefill_prefix, wait_s=1)
    assert secret != await head.grant("pc", world.exchange_prefix, wait_s=1)
    for peer, prefix in (("pc", prefill_prefix), ("stranger", world.exchange_prefix)):
        with pytest.raises(PermissionError):
            await head.grant(peer, prefix, wait_s=0.2)
    not_head = Supervisor("pc", "model", store_address=("127.0.0.1", 5002))
    not_head.want(world)
    with pytest.raises(PermissionError):  # pc is a member, but pa's store hosts that world
        await not_head.grant("pb", prefill_prefix, wait_s=0.2)
    restarted = Supervisor("pa", "model", store_address=("127.0.0.1", 5000))  # a new store key
    restarted.want(world)
    assert await restarted.grant("pb", prefill_prefix, wait_s=1) != secret


@pytest.mark.trio
async def test_a_grant_waits_for_the_plan_that_reaches_the_asker_first():
    head = Supervisor("pa", "model", store_address=("127.0.0.1", 5000))
    head.want(deployment(epoch=6))
    later = deployment(epoch=7)
    granted: list[bytes] = []
    async with trio.open_nursery() as nursery:

        async def ask() -> None:
            granted.append(await head.grant("pc", later.exchange_prefix, wait_s=5))

        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert not granted
        head.want(later)
    assert len(granted) == 1


@pytest.mark.trio
async def test_a_daemon_s_store_serves_on_the_port_held_for_it_from_its_choice_on():
    """The store serves on the socket the daemon bound: from the moment the port is chosen no other server
    (the daemon's own HTTP gateway asking for any free port, say) can take it, and workers reach the store
    there; a store that dies is started again on it, and the store ends with the supervisor."""
    sock = store_socket("127.0.0.1")
    port = sock.getsockname()[1]
    supervisor = Supervisor("pa", "model", store_address=("127.0.0.1", port), store_socket=sock)
    with socket.socket() as rival, pytest.raises(OSError):
        rival.bind(("127.0.0.1", port))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor.run)

        def use() -> bytes:
            client = dist.TCPStore("127.0.0.1", port, None, is_master=False, timeout=timedelta(seconds=30))
            client.set("k", b"v")
            return bytes(client.get("k"))

        assert await trio.to_thread.run_sync(use) == b"v"
        first = supervisor.store
        assert first is not None
        first.kill()  # a store that dies is started again on the same socket
        assert await trio.to_thread.run_sync(use) == b"v"
        assert supervisor.store is not first
        nursery.cancel_scope.cancel()
    sock.close()
    with socket.socket() as after, pytest.raises(ConnectionRefusedError):  # the store went with the supervisor
        after.connect(("127.0.0.1", port))


STRAY_PARENT = """
import socket, subprocess, sys, time
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
store = subprocess.Popen([sys.executable, "-m", "hexgen.daemon.store", "--host", "127.0.0.1", "--port", str(port)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
assert store.stdout.readline().strip() == b"ready"
fd = store.stdin.fileno()
stray = subprocess.Popen(["sleep", "300"], pass_fds=(fd,))  # holds the store's stdin open past this process
print(store.pid, stray.pid, flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_store_ends_with_its_daemon_even_when_a_stray_process_holds_its_pipe():
    daemon = subprocess.Popen([sys.executable, "-c", STRAY_PARENT], stdout=subprocess.PIPE)
    pids: list[int] = []
    try:
        assert daemon.stdout is not None
        pids = [int(p) for p in daemon.stdout.readline().split()]
        assert len(pids) == 2, "the stand-in daemon did not start its store"
        daemon.kill()
        daemon.wait(10)
        deadline = time.monotonic() + 30
        while _alive(pids[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pids[0]), "the store outlived its daemon"
        assert _alive(pids[1])  # its stdin was still open: the store ended because its parent was gone
    finally:
        daemon.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
