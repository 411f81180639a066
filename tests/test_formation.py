"""Forming gloo groups in two steps (engine.formation): ranks still starting are waited for, ranks that
cannot connect fail within the connect timeout and name the address."""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from hexgen.engine.formation import CONNECT_GRACE_S, Timeouts, WorldFormationError, form_gloo
from hexgen.engine.sealed_store import SealedStore, UnreachableStore

SECRET = os.urandom(32)
PREFIX = "hexgen/1/1/exchange/"


@pytest.fixture
def store_port():
    server = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    yield server.port
    del server


def run_ranks(
    port: int,
    delays: list[float | None],
    timeouts: Timeouts,
    unreachable: int | None = None,
    store_class=UnreachableStore,
) -> dict[int, object]:
    """Each rank forms the group in a thread after its delay (None: it never comes); returns each rank's
    (seconds, group or error)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    outcomes: dict[int, object] = {}

    def join(rank: int) -> None:
        time.sleep(delays[rank])
        client = dist.TCPStore("127.0.0.1", port, None, is_master=False, timeout=timedelta(seconds=30))
        store = (UnreachableStore if rank == unreachable else SealedStore)(client, SECRET)
        started = time.monotonic()
        try:
            outcome: object = form_gloo(store, PREFIX, rank, len(delays), timeouts, "exchange group")
        except Exception as exc:
            outcome = exc
        outcomes[rank] = (time.monotonic() - started, outcome)

    threads = [threading.Thread(target=join, args=(r,), daemon=True) for r, d in enumerate(delays) if d is not None]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_a_rank_that_starts_late_is_waited_for(store_port):
    outcomes = run_ranks(store_port, [0.0, 2.5], Timeouts(arrival_s=30, connect_s=1.0, operation_s=30))
    # rank 1 comes 2.5 s after rank 0, past the 1 s connect timeout: both forming the group is the property
    for _, group in outcomes.values():
        assert isinstance(group, dist.ProcessGroupGloo), group
    print(f"rank 0 waited {outcomes[0][0]:.1f} s for rank 1")


def test_ranks_that_never_arrive_are_named(store_port):
    outcomes = run_ranks(store_port, [0.0, None], Timeouts(arrival_s=1.0, connect_s=1.0))
    seconds, error = outcomes[0]
    print(f"rank 0 gave up after {seconds:.1f} s")
    assert seconds < 30, "it failed on its own arrival bound, not the store's 30 s timeout"
    assert (
        isinstance(error, WorldFormationError) and error.stage == "arrive" and "ranks [1] never arrived" in str(error)
    )


def test_a_rank_that_cannot_be_reached_fails_fast_with_its_address(store_port):
    outcomes = run_ranks(store_port, [0.0, 0.0], Timeouts(arrival_s=30, connect_s=3.0), unreachable=1)
    failed = {rank: out for rank, out in outcomes.items() if isinstance(out[1], Exception)}
    assert failed, "the unreachable rank's peer cannot connect"
    for seconds, error in failed.values():
        assert isinstance(error, WorldFormationError) and error.stage == "connect", error
        assert seconds < 30, "it failed connecting, before the 30 s arrival timeout could have fired"
    assert any(error.remote == "127.0.0.1" for _, error in failed.values())
    print(f"the connecting side failed after {min(seconds for seconds, _ in failed.values()):.1f} s")


def test_a_rank_that_never_answers_fails_within_the_connect_timeout(store_port):
    """A socket that takes connections and never answers at the port UnreachableStore publishes (1, so the
    peer is the side that connects): as through a firewall that drops packets. gloo alone would retry it for
    several times its timeout; the connect step is bounded."""
    try:
        silent = socket.create_server(("127.0.0.1", 1), backlog=8)
    except OSError as exc:
        pytest.skip(f"cannot listen on port 1 here: {exc}")
    with silent:
        outcomes = run_ranks(store_port, [0.0, 0.0], Timeouts(arrival_s=30, connect_s=2.0), unreachable=1)
    for seconds, error in outcomes.values():
        assert isinstance(error, WorldFormationError) and error.stage == "connect", error
        print(f"failed after {seconds:.1f} s (connect bound {2.0 + CONNECT_GRACE_S:.0f} s)")
        assert seconds < 30, "it failed connecting, before the 30 s arrival timeout could have fired"


def test_a_store_nobody_answers_at_is_a_formation_error_naming_its_address():
    from hexgen.engine.formation import WorldFormationError, reach_store

    with socket.socket() as probe:  # a port just freed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(WorldFormationError) as caught:
        reach_store("127.0.0.1", port, 2.0, "replica world")
    assert caught.value.remote == "127.0.0.1" and caught.value.world == "replica world"
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        reach_store("127.0.0.1", listening.getsockname()[1], 2.0, "replica world")
