"""``hexgen-node join`` options from flags, ``HEXGEN_*`` variables and a TOML config file, in that order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio

from hexgen.cli.join import JoinError, layered_args
from hexgen.cli.node import build_parser
from hexgen.cli.settings import SettingsError, resolve
from hexgen.daemon.logs import KeyValueFormatter, quote
from hexgen.daemon.rpc import query_status
from hexgen.testing.cli import node
from hexgen.testing.daemon_harness import open_client


def parsed(*argv: str, env: dict[str, str] | None = None, config: dict | None = None):
    args = build_parser().parse_args(["join", *argv])
    resolve(args, env or {}, config or {}, "config file test.toml")
    return args


def test_flags_win_over_environment_which_wins_over_the_file():
    config = {"host-name": "file", "peer_timeout": 30, "http": 9000, "model": "llama-2-13b"}
    env = {"HEXGEN_HOST_NAME": "env", "HEXGEN_PEER_TIMEOUT": "20"}
    args = parsed("--host-name", "flag", env=env, config=config)
    assert args.host_name == "flag"
    assert args.peer_timeout == 20.0
    assert (args.http, args.model) == (9000, "llama-2-13b")
    assert args.listen == "0.0.0.0:4001" and args.log_level == "info" and args.bootstrap == []


def test_lists_and_switches_from_the_environment_and_the_file():
    args = parsed(env={"HEXGEN_BOOTSTRAP": "/ip4/a, /ip4/b", "HEXGEN_NO_CALIBRATE": "yes"})
    assert args.bootstrap == ["/ip4/a", "/ip4/b"] and args.no_calibrate is True
    args = parsed(config={"join": {"bootstrap": "/ip4/c", "no-calibrate": False, "log_level": "debug"}})
    assert args.bootstrap == ["/ip4/c"] and args.no_calibrate is False and args.log_level == "debug"
    assert parsed("--bootstrap", "/ip4/d", env={"HEXGEN_BOOTSTRAP": "/ip4/a"}).bootstrap == ["/ip4/d"]


@pytest.mark.parametrize(
    ("env", "config", "message"),
    [
        ({}, {"colour": "red"}, "unknown key 'colour'"),
        ({}, {"http": "8000"}, "http must be an integer"),
        ({}, {"http": True}, "http must be an integer"),
        ({}, {"no-calibrate": "yes"}, "no-calibrate must be true or false"),
        ({}, {"bootstrap": [1]}, "bootstrap must be a string or a list of strings"),
        ({}, {"log-level": "loud"}, "'loud' is not one of debug"),
        ({"HEXGEN_HTTP": "eighty"}, {}, "HEXGEN_HTTP='eighty': expected an integer"),
        ({"HEXGEN_NO_CALIBRATE": "maybe"}, {}, "HEXGEN_NO_CALIBRATE='maybe'"),
        ({"HEXGEN_LOG_LEVEL": "loud"}, {}, "HEXGEN_LOG_LEVEL: 'loud' is not one of"),
    ],
)
def test_bad_values_name_their_source(env, config, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        parsed(env=env, config=config)


def test_config_file_errors_are_join_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text("model = \n")
    args = build_parser().parse_args(["join", "--config", str(bad)])
    with pytest.raises(JoinError, match="not valid TOML"):
        layered_args(args)
    monkeypatch.setenv("HEXGEN_CONFIG", str(tmp_path / "absent.toml"))
    args = build_parser().parse_args(["join"])
    with pytest.raises(JoinError, match=r"absent\.toml does not exist"):
        layered_args(args)


def test_bad_config_file_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "join.toml"
    bad.write_text('http = "eighty"\n')
    result = node("join", "--config", bad)
    assert result.returncode == 2 and "join.toml: http must be an integer" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_key_value_lines_quote_what_needs_it():
    assert quote("plain") == "plain" and quote("two words") == '"two words"' and quote('a"b') == '"a\\"b"'
    record = __import__("logging").makeLogRecord(
        {"name": "hexgen.daemon", "levelname": "INFO", "msg": "peer %s joined", "args": ("x",), "event": "join"}
    )
    line = KeyValueFormatter().format(record)
    assert 'level=info logger=hexgen.daemon msg="peer x joined" event=join' in line and line.startswith("ts=")


def test_library_records_are_one_line_each():
    import logging
    import sys

    block = logging.makeLogRecord(
        {"name": "libp2p.host.basic_host", "levelname": "ERROR", "msg": "Failed to open stream:\n  Error: x\n"}
    )
    assert 'msg="Failed to open stream:; Error: x"' in KeyValueFormatter(full_tracebacks=False).format(block)
    mismatched = logging.makeLogRecord({"name": "libp2p.pubsub", "msg": "health %.2f", "args": ("a", 1)})
    assert "health %.2f" in KeyValueFormatter().format(mismatched)
    try:
        raise ValueError("gone\naway")
    except ValueError:
        failed = logging.makeLogRecord({"name": "libp2p.swarm", "msg": "dial failed", "exc_info": sys.exc_info()})
    folded = KeyValueFormatter(full_tracebacks=False).format(failed)
    assert folded.endswith('exc="ValueError: gone; away"') and "\n" not in folded
    assert "Traceback" in KeyValueFormatter(full_tracebacks=True).format(failed)


@pytest.mark.trio
async def test_a_daemon_started_from_a_config_file_and_the_environment(tmp_path):
    config = tmp_path / "join.toml"
    config.write_text(
        f'[join]\nlisten = "127.0.0.1:0"\nsimulate-gpu = "L40x2"\nhost-name = "from-file"\n'
        f'key-file = "{tmp_path / "node.key"}"\nlog-level = "info"\n'
    )
    env = {**os.environ, "HEXGEN_HOST_NAME": "from-env", "HEXGEN_CONFIG": str(config)}
    log = (tmp_path / "err.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hexgen.cli.node", "join"], stdout=subprocess.PIPE, stderr=log, env=env
    )
    try:
        assert proc.stdout is not None
        with trio.fail_after(60):
            line = await trio.to_thread.run_sync(proc.stdout.readline)
        ready = json.loads(line)
        async with open_client() as client:
            await client.connect_peer(ready["peer_id"], ready["addrs"])
            with trio.fail_after(10):
                status = await query_status(client, ready["peer_id"])
        assert status["host"] == "from-env"
        assert status["hardware"]["gpus"][0]["type"] == "L40" and len(status["hardware"]["gpus"]) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        proc.stdout.close()
        log.close()
    lines = (tmp_path / "err.log").read_text().splitlines()
    assert lines and all(line.startswith("ts=") and " level=" in line for line in lines), lines[:5]
    assert any("event=election" in line or "event=coordinator" in line for line in lines)
