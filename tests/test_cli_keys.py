"""``hexgen-node keygen``, ``swarm-key`` and ``admit``: real subprocesses for the main paths, ``main()`` for the rest."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair

from hexgen.cli.node import CLIError, main, parse_duration
from hexgen.daemon.certificates import (
    create_swarm_key,
    load_certificate,
    load_swarm_key,
    parse_certificate_text,
    swarm_id,
    swarm_public_key,
    verify_certificate,
)
from hexgen.daemon.node_key import create_key_file, load_key, peer_id_of
from hexgen.testing.cli import assert_one_line_error, run_main

PEER = peer_id_of(create_new_key_pair(b"p" * 32))


def start_node(*args: str | Path, data_home: Path) -> subprocess.Popen[str]:
    """Start ``python -m hexgen.cli.node ARGS`` with ``$XDG_DATA_HOME`` pointing at ``data_home``."""
    env = {**os.environ, "XDG_DATA_HOME": str(data_home)}
    return subprocess.Popen(
        [sys.executable, "-m", "hexgen.cli.node", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@dataclass(frozen=True)
class Run:
    """A finished subprocess: its exit status, output, and the data folder it ran with."""

    returncode: int
    stdout: str
    stderr: str
    data_home: Path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The subprocess scenarios, started at once: each process spends most of a second importing libp2p.

    Everything else runs ``main()`` in this process, which takes the same path minus the interpreter.
    """
    homes = {name: tmp_path_factory.mktemp(name) for name in ("keygen", "admit", "bad")}
    create_swarm_key(homes["admit"] / "hexgen" / "swarm.key")
    create_swarm_key(homes["bad"] / "swarm.key")
    commands = {
        "keygen": ("keygen",),
        "admit": ("admit", PEER, "--valid-for", "2h"),
        "bad": ("admit", "QmNotAPeer", "--swarm-key", homes["bad"] / "swarm.key"),
        "help": ("--help",),
    }
    homes["help"] = homes["bad"]
    processes = {name: start_node(*args, data_home=homes[name]) for name, args in commands.items()}
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=60)
        results[name] = Run(process.returncode, stdout, stderr, homes[name])
    return results


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- subprocesses ---------------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_under_the_data_dir_and_prints_the_peer_id(runs: dict[str, Run]) -> None:
    run = runs["keygen"]
    assert run.returncode == 0, run.stderr
    key_file = run.data_home / "hexgen" / "node.key"
    assert run.stdout == peer_id_of(load_key(key_file)) + "\n"
    assert mode(key_file) == 0o600 and mode(key_file.parent) == 0o700
    assert str(key_file) in run.stderr and "Traceback" not in run.stderr


def test_admit_prints_a_certificate_that_verifies(runs: dict[str, Run]) -> None:
    run = runs["admit"]
    assert run.returncode == 0, run.stderr
    public_key = swarm_public_key(load_swarm_key(run.data_home / "hexgen" / "swarm.key"))
    cert = verify_certificate(parse_certificate_text(run.stdout), public_key, PEER, now=time.time())
    assert cert.expires == pytest.approx(cert.issued + 7200)
    assert f"admitted {PEER} to swarm {cert.swarm_id}" in run.stderr


def test_bad_peer_id_is_one_line_in_a_real_process(runs: dict[str, Run]) -> None:
    run = runs["bad"]
    assert_one_line_error(run.returncode, run.stdout, run.stderr, "'QmNotAPeer' is not an Ed25519 peer id")


def test_help_lists_the_key_commands(runs: dict[str, Run]) -> None:
    run = runs["help"]
    assert run.returncode == 0
    for command in ("keygen", "swarm-key", "admit"):
        assert command in run.stdout


# --- main() in this process -------------------------------------------------------------------------------


def test_keygen_refuses_to_overwrite_and_names_the_current_peer_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "node.key"
    existing = peer_id_of(create_key_file(key_file))
    status, out, err = run_main(capsys, "keygen", "--key-file", key_file)
    assert_one_line_error(status, out, err, f"key file {key_file} already exists", existing, "--force")
    assert peer_id_of(load_key(key_file)) == existing


def test_swarm_key_writes_a_private_key_and_prints_the_swarm_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    status, out, err = run_main(capsys, "swarm-key")
    assert status == 0
    swarm_key_file = tmp_path / "hexgen" / "swarm.key"
    assert mode(swarm_key_file) == 0o600 and mode(swarm_key_file.parent) == 0o700
    assert out.strip() == swarm_id(swarm_public_key(load_swarm_key(swarm_key_file)))
    assert "keep it secret" in err


def test_keygen_force_replaces_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "k" / "node.key"
    status, first, _ = run_main(capsys, "keygen", "--key-file", key_file)
    assert status == 0
    status, second, _ = run_main(capsys, "keygen", "--key-file", key_file, "--force")
    assert status == 0 and first != second
    assert second.strip() == peer_id_of(load_key(key_file))
    assert mode(key_file) == 0o600


def test_admit_writes_a_certificate_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    swarm_key_file = tmp_path / "swarm.key"
    public_key = swarm_public_key(create_swarm_key(swarm_key_file))
    cert_file = tmp_path / "certs" / "peer.cert"
    status, out, err = run_main(
        capsys, "admit", PEER, "--swarm-key", swarm_key_file, "-o", cert_file, "--valid-for", "never"
    )
    assert status == 0 and out == ""
    assert str(cert_file) in err and "with no expiry" in err
    cert = verify_certificate(load_certificate(cert_file), public_key, PEER, now=time.time() + 1e8)
    assert cert.expires is None

    status, out, err = run_main(capsys, "admit", PEER, "--swarm-key", swarm_key_file, "-o", cert_file)
    assert_one_line_error(status, out, err, f"certificate file {cert_file} already exists", "--force")
    status, _, _ = run_main(capsys, "admit", PEER, "--swarm-key", swarm_key_file, "-o", cert_file, "--force")
    assert status == 0 and load_certificate(cert_file).expires is not None  # the default lifetime


def test_swarm_key_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "swarm.key"
    status, first, _ = run_main(capsys, "swarm-key", path)
    assert status == 0
    status, out, err = run_main(capsys, "swarm-key", path)
    assert_one_line_error(status, out, err, "already exists", "--force")
    status, second, _ = run_main(capsys, "swarm-key", path, "--force")
    assert status == 0 and second != first


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("admit", PEER, "--swarm-key", "{tmp}/missing.key"), ("missing.key does not exist",)),
        (("admit", PEER, "--swarm-key", "{tmp}"), ("is a directory",)),
        (("admit", PEER, "--swarm-key", "{tmp}/loose.key"), ("accessible to other users", "chmod 600")),
        (("admit", PEER, "--swarm-key", "{tmp}/junk.key"), ("junk.key is unusable",)),
        (("admit", PEER, "--swarm-key", "{tmp}/swarm.key", "--valid-for", "5x"), ("bad duration '5x'",)),
        (("admit", PEER, "--swarm-key", "{tmp}/swarm.key", "--valid-for=-3d"), ("bad duration",)),
        (("admit", PEER, "--swarm-key", "{tmp}/swarm.key", "-o", "{tmp}/blocker/x.cert"), ("cannot create",)),
        (("keygen", "--key-file", "{tmp}/blocker/node.key"), ("cannot create",)),
        (("keygen", "--key-file", "{tmp}/junk.key"), ("already exists",)),
        (("swarm-key", "{tmp}/blocker/swarm.key"), ("cannot create",)),
    ],
)
def test_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    create_swarm_key(tmp_path / "swarm.key")
    create_swarm_key(tmp_path / "loose.key")
    (tmp_path / "loose.key").chmod(0o644)
    (tmp_path / "junk.key").write_text("junk")
    (tmp_path / "junk.key").chmod(0o600)
    (tmp_path / "blocker").write_text("a file where a folder should be")
    status, out, err = run_main(capsys, *(arg.format(tmp=tmp_path) for arg in args))
    assert_one_line_error(status, out, err, *fragments)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["admit"])
    assert info.value.code == 2 and "PEER_ID" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("90m", 5400), ("12h", 43200), ("30d", 2592000), ("2w", 1209600), ("1.5h", 5400), ("never", None)],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "0", "-1h", "nan", "inf", "1y", "5 days"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(CLIError, match="bad duration"):
        parse_duration(text)
