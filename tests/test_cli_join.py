"""``hexgen-node join`` flags that cannot work fail at once with one line and exit status 2."""

from __future__ import annotations

import pytest
from daemon_harness import Swarm
from test_cli_plan import node


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


def join(*args, tmp_path) -> tuple[int, str]:
    result = node("join", "--listen", "127.0.0.1:0", "--simulate-gpu", "A100", "--key-file", tmp_path / "k", *args)
    return result.returncode, result.stderr


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
