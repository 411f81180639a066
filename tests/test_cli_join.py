"""``hexgen-node join`` flags that cannot work fail at once with one line and exit status 2."""

from __future__ import annotations

import socket

import pytest

from hexgen.testing.cli import join
from hexgen.testing.daemon_harness import Swarm


@pytest.fixture
def pinned(tmp_path):
    def write(text: str):
        path = tmp_path / "pinned.toml"
        path.write_text(text)
        return path

    return write


@pytest.fixture
def swarm(tmp_path):
    s = Swarm(tmp_path)
    yield s
    s.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("groups = 1", "at least one [[groups]]"),
        ('[[groups]]\nrole = "colocated"\nstages = [{ gpus = ["a"], layers = [0, 3] }]', "the model has 5"),
    ],
)
def test_bad_pinned_plan(stories_dir, pinned, tmp_path, text, message):
    status, err = join("--model", stories_dir, "--pin-plan", pinned(text), tmp_path=tmp_path)
    assert status == 2 and message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_missing_pinned_plan_and_unservable_model_directory(stories_dir, tmp_path):
    status, err = join("--model", stories_dir, "--pin-plan", tmp_path / "absent.toml", tmp_path=tmp_path)
    assert status == 2 and "absent.toml" in err and "Traceback" not in err
    empty = tmp_path / "model"
    empty.mkdir()
    (empty / "config.json").write_text((stories_dir / "config.json").read_text())
    status, err = join("--model", empty, tmp_path=tmp_path)
    assert status == 2 and "safetensors" in err and "Traceback" not in err


@pytest.mark.parametrize("fraction", ["1.5", "-0.1", "nan"])
def test_verify_fraction_is_a_fraction(tmp_path, fraction):
    status, err = join("--verify-fraction", fraction, tmp_path=tmp_path)
    assert status == 2 and "--verify-fraction" in err and "0 to 1" in err and "Traceback" not in err


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf"])
def test_request_timeout_is_positive_seconds(tmp_path, seconds):
    status, err = join("--request-timeout", seconds, tmp_path=tmp_path)
    assert status == 2 and "--request-timeout" in err and "positive number of seconds" in err and "Traceback" not in err


@pytest.mark.parametrize("rate", ["-1", "nan", "inf"])
def test_max_request_rate_is_a_rate(tmp_path, rate):
    status, err = join("--max-request-rate", rate, tmp_path=tmp_path)
    assert status == 2 and "--max-request-rate" in err and "requests per second" in err and "Traceback" not in err


def test_a_libp2p_port_another_daemon_holds_is_a_one_line_error(swarm):
    """py-libp2p listens with SO_REUSEPORT: without the check, the second daemon would start and take a share
    of the first one's incoming connections."""
    first = swarm.start("first")
    port = first.addr.split("/tcp/")[1].split("/")[0]
    second = swarm.start_process("second", ["--listen", f"127.0.0.1:{port}"])
    status, err = second.wait_exit(30.0)
    assert status == 2 and f"127.0.0.1:{port}" in err and "Address already in use" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert first.alive()


def test_two_daemons_with_one_key_file_stop_with_a_clear_error(swarm, tmp_path):
    """One key, one peer id: without the check the two daemons would each run a swarm of one."""
    key = tmp_path / "shared.key"
    first = swarm.start("first", key=key)
    second = swarm.start_process("second", bootstrap=[first.addr], key=key)
    for daemon in (second, first):
        status, log = daemon.wait_exit(30.0)
        assert status == 2, log
        errors = [line for line in log.splitlines() if line.startswith("hexgen-node: error:")]
        assert len(errors) == 1 and first.peer_id in errors[0] and "--key-file" in errors[0], log
        assert "Traceback" not in log


def test_one_key_met_through_a_third_daemon_stops_them_too(swarm, tmp_path):
    key = tmp_path / "shared.key"
    hub = swarm.start("hub")
    first = swarm.start("first", key=key, bootstrap=[hub.addr])
    second = swarm.start_process("second", bootstrap=[hub.addr], key=key)
    status, log = second.wait_exit(30.0)
    assert status == 2 and first.peer_id in log and "--key-file" in log and "Traceback" not in log, log
    assert hub.alive()


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf"])
def test_connect_timeout_is_positive_seconds(tmp_path, seconds):
    status, err = join("--connect-timeout", seconds, tmp_path=tmp_path)
    assert status == 2 and "--connect-timeout" in err and "positive number of seconds" in err and "Traceback" not in err
    assert err.count("\n") == 1


# ------------------------------------------------------------------------- no false duplicate-key alarms

ME = "12D3KooWMe"
OWN = [f"/ip4/10.0.0.1/tcp/4001/p2p/{ME}", f"/ip4/127.0.0.1/tcp/4001/p2p/{ME}"]


def test_a_bootstrap_address_of_this_node_under_another_name_is_not_dialled():
    from hexgen.daemon.connectivity import is_own_address

    assert is_own_address(OWN[0], ME, OWN)
    # this host through a NAT or DNS name: its id on its own port
    assert is_own_address(f"/ip4/203.0.113.7/tcp/4001/p2p/{ME}", ME, OWN)
    assert is_own_address(f"/dns4/gpu-1.example/tcp/4001/p2p/{ME}", ME, OWN)
    # its id on another port cannot be this node: dialled, so a second daemon with the key is found
    assert not is_own_address(f"/ip4/127.0.0.1/tcp/4002/p2p/{ME}", ME, OWN)
    assert not is_own_address("/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWOther", ME, OWN)


def test_an_advert_of_this_id_is_never_dialled_at_this_nodes_own_addresses():
    from hexgen.daemon.connectivity import foreign_addresses

    assert foreign_addresses(list(reversed(OWN)), OWN) == []  # the same addresses in another order
    assert foreign_addresses([f"/ip4/127.0.0.1/tcp/4001/p2p/{ME}", f"/ip4/0.0.0.0/tcp/4001/p2p/{ME}"], OWN) == []
    other = [f"/ip4/10.0.0.2/tcp/4001/p2p/{ME}", f"/ip4/127.0.0.1/tcp/4005/p2p/{ME}"]
    assert foreign_addresses(other + OWN, OWN) == other


def test_adverts_of_this_id_from_before_this_process_are_dialled_only_off_its_own_port():
    from hexgen.daemon.adverts import Adverts
    from hexgen.daemon.connectivity import Connectivity
    from hexgen.daemon.envelope import seal
    from hexgen.daemon.hardware import simulated_profile
    from hexgen.daemon.host import new_identity
    from hexgen.daemon.messages import Advert
    from hexgen.testing.control import FakeClock, FakeHost, FakeNursery, swarm_state

    key = new_identity()
    state = swarm_state(FakeClock(1000.0), key_pair=key)
    connectivity = Connectivity(state, FakeHost(addrs=OWN), Adverts(state, key, dict, lambda: None), started_at=1000.0)
    nursery = connectivity._nursery = FakeNursery()  # type: ignore[assignment]

    def advert(addrs: list[str], issued: float):
        body = Advert(tuple(addrs), simulated_profile("A100x1"), "me").to_wire()
        return seal("advert", body, key, 60.0, now=issued)

    def dialled() -> list[list[str]]:
        return [list(args[0]) for _, args in nursery.started]

    elsewhere = [f"/ip4/10.0.0.9/tcp/4001/p2p/{state.peer_id}"]
    # a previous run's advert on this node's port: perhaps this host under a name it no longer lists
    connectivity.own_advert(advert(elsewhere, 999.0))
    assert dialled() == []
    connectivity.own_advert(advert(OWN, 1001.0))  # this process's own
    assert dialled() == []
    # issued since this process started: another daemon with the key, wherever it listens
    connectivity.own_advert(advert(elsewhere, 1001.0))
    assert dialled() == [elsewhere]
    # from before, on another port: cannot be this node (a daemon with the key that started first)
    other_port = [f"/ip4/10.0.0.9/tcp/4002/p2p/{state.peer_id}"]
    connectivity.own_advert(advert(other_port, 999.0))
    assert dialled() == [elsewhere, other_port]


@pytest.mark.parametrize("tokens", ["-1", "9999999"])
def test_prefill_chunk_is_a_token_count(tmp_path, tokens):
    status, err = join("--prefill-chunk", tokens, tmp_path=tmp_path)
    assert status == 2 and "--prefill-chunk" in err and "0 for whole prompts" in err and "Traceback" not in err


def test_a_splice_port_is_a_relay_s_port(tmp_path):
    status, err = join("--relay", "--splice-port", "70000", tmp_path=tmp_path)
    assert status == 2 and "--splice-port" in err and "0-65535" in err and "Traceback" not in err
    status, err = join("--splice-port", "4000", tmp_path=tmp_path)
    assert status == 2 and "--splice-port" in err and "give --relay too" in err and "Traceback" not in err


def test_a_splice_port_in_use_is_a_one_line_error(swarm):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        relay = swarm.start_process("relay", ["--relay", "--splice-port", str(port)])
        status, err = relay.wait_exit(30.0)
    assert status == 2 and f"splice port: cannot listen on 127.0.0.1:{port}" in err, err
    assert "Address already in use" in err
    assert err.count("\n") == 1 and "Traceback" not in err
