"""``hexgen-node demo`` run as the README says: its output, and no process left behind, also after Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hexgen.testing.daemon_harness import descendants, zombie

HEXGEN_NODE = Path(sys.executable).parent / "hexgen-node"


def start_demo(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], list[str], set[int]]:
    """The demo as a subprocess (data under ``tmp_path``); a thread collects its stdout lines and every process
    that ever ran below it."""
    if not HEXGEN_NODE.exists():
        pytest.skip(f"the console script is not installed beside {sys.executable}")
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [str(HEXGEN_NODE), "demo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    lines: list[str] = []
    seen: set[int] = set()

    def watch() -> None:
        while proc.poll() is None:
            seen.update(descendants(proc.pid))
            time.sleep(0.05)

    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    threading.Thread(target=watch, daemon=True).start()
    return proc, lines, seen


def assert_nothing_left(seen: set[int]) -> None:
    deadline = time.monotonic() + 20
    while (left := {p for p in seen if Path(f"/proc/{p}").exists() and not zombie(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes outlived the demo: {sorted(left)}"


def test_demo_plans_streams_and_stops(tmp_path):
    proc, lines, seen = start_demo(tmp_path)
    try:
        proc.wait(timeout=280)
    finally:
        proc.kill()
    out = "".join(lines)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    assert "random weights, so its text is nonsense" in out
    assert out.count("  node") >= 4 and "plan: epoch" in out and "  group 0" in out and "flows" in out
    assert "TTFT" in out and "48 tokens" in out and out.rstrip().endswith("done: every process stopped")
    assert len(seen) >= 8, "four daemons, each with a worker and a store, ran below the demo"
    assert_nothing_left(seen)
    model = tmp_path / "data" / "hexgen" / "demo" / "tiny-llama"
    assert sorted(p.name for p in model.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_ctrl_c_mid_run_stops_every_process(tmp_path):
    proc, lines, seen = start_demo(tmp_path, "--max-tokens", "400")
    try:
        deadline = time.monotonic() + 200
        while not any(line.startswith("  node3") for line in lines) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert_nothing_left(seen)


def test_bad_demo_flags_are_one_line_errors(tmp_path):
    for args, message in ((["--gpus", "B200"], "--gpus"), (["--model", str(tmp_path)], "no config.json")):
        result = subprocess.run(
            [sys.executable, "-m", "hexgen.cli.node", "demo", *args], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
