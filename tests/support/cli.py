"""Running the command line in tests: as a subprocess (``node``, ``join``) or in this process (``run_main``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def node(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m hexgen.cli.node ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "hexgen.cli.node", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
    )


def join(*args: str | Path, tmp_path: Path) -> tuple[int, str]:
    """``hexgen-node join`` on a loopback port with a simulated A100: (exit status, stderr)."""
    result = node("join", "--listen", "127.0.0.1:0", "--simulate-gpu", "A100", "--key-file", tmp_path / "k", *args)
    return result.returncode, result.stderr


def run_main(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """``main(args)`` in this process: (exit status, stdout, stderr)."""
    from hexgen.cli.node import main

    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(returncode: int, stdout: str, stderr: str, *fragments: str) -> None:
    """The command failed with status 2 and one ``hexgen-node: error:`` line holding every fragment."""
    assert returncode == 2, (stdout, stderr)
    assert "Traceback" not in stderr and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("hexgen-node: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
