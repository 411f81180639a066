"""``hexgen-node demo`` run as the README says: the Hub's chat model served from a stand-in Hub, the built-in
tiny Llama where the Hub cannot be had (and why), and no process left behind, also after Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from hexgen.cli.demo import CHAT, DEMO_MODEL, choose_model, describe_model, tiny_model
from hexgen.testing.daemon_harness import descendants, zombie
from hexgen.testing.hub_server import FakeHub, FakeRepo, files_of

HEXGEN_NODE = Path(sys.executable).parent / "hexgen-node"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TINY_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A stand-in Hub serving, as DEMO_MODEL, a tiny random Llama with a chat template."""
    files = files_of(tiny_model(tmp_path_factory.mktemp("checkpoint")))
    config = json.loads(files["tokenizer_config.json"]) | {"chat_template": CHAT_TEMPLATE}
    repo = FakeRepo()
    repo.add("main", files | {"tokenizer_config.json": json.dumps(config).encode()})
    with FakeHub({DEMO_MODEL: repo}) as server:
        yield server


def _hub_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return env | {"HF_HUB_CACHE": str(tmp_path / "hub-cache")} | settings


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_demo(
    tmp_path: Path, *args: str, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[str], list[str], set[int]]:
    """The demo as a subprocess (data under ``tmp_path``, the Hub settings of ``env``); a thread collects its
    stdout lines and every process that ever ran below it."""
    if not HEXGEN_NODE.exists():
        pytest.skip(f"the console script is not installed beside {sys.executable}")
    env = {**(env or os.environ), "XDG_DATA_HOME": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}
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


def test_demo_fetches_the_hub_model_and_holds_a_chat(tmp_path, hub):
    # two answers of 24 tokens: the 48 tokens the built-in model's one generation takes
    proc, lines, seen = start_demo(tmp_path, "--max-tokens", "24", env=_hub_env(tmp_path, HF_ENDPOINT=hub.url))
    try:
        proc.wait(timeout=280)
    finally:
        proc.kill()
    out = "".join(lines)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    assert f"model: {DEMO_MODEL} (" in out and "nonsense" not in out
    assert out.count("  node") >= 4 and "plan: epoch" in out and "weights none" in out and "  group 0" in out
    assert all(f"you: {turn}" in out for turn in CHAT) and out.count("assistant (24 tokens at most") == 2
    assert (
        out.count("TTFT") == 2
        and out.count(", 24 tokens,") == 2
        and out.rstrip().endswith("done: every process stopped")
    )
    assert len(seen) >= 8, "four daemons, each with a worker and a store, ran below the demo"
    assert_nothing_left(seen)
    assert not (tmp_path / "data" / "hexgen" / "demo").exists(), "the tiny Llama is built only to stand in"


def test_offline_serves_the_tiny_llama_says_why_and_ctrl_c_stops_every_process(tmp_path):
    proc, lines, seen = start_demo(tmp_path, "--max-tokens", "400", env=_hub_env(tmp_path, HF_HUB_OFFLINE="1"))
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
    out = "".join(lines)
    assert "random weights, so its text is nonsense" in out
    assert f"not serving {DEMO_MODEL}: HF_HUB_OFFLINE is set and the Hub cache" in out
    model = tmp_path / "data" / "hexgen" / "demo" / "tiny-llama"
    assert sorted(p.name for p in model.iterdir()) == TINY_FILES


def test_the_demo_model_comes_from_the_hub_or_its_cache_else_the_tiny_llama_says_why(tmp_path, hub):
    data = tmp_path / "data"
    down = f"http://127.0.0.1:{_closed_port()}"
    unreachable = choose_model(None, data, _hub_env(tmp_path, HF_ENDPOINT=down))
    assert unreachable.built_in and unreachable.path == data / "tiny-llama"
    assert unreachable.why == f"cannot reach {down} (Connection refused) and the Hub cache does not hold {DEMO_MODEL}"
    assert describe_model(unreachable).splitlines()[1] == f"not serving {DEMO_MODEL}: {unreachable.why}"
    offline = choose_model(None, data, _hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert offline.built_in and "HF_HUB_OFFLINE is set" in str(offline.why)
    fetched = choose_model(None, data, _hub_env(tmp_path, HF_ENDPOINT=hub.url))
    assert not fetched.built_in and fetched.why is None
    assert sorted(p.name for p in fetched.path.iterdir()) == TINY_FILES
    asked = len(hub.seen)
    for env in (_hub_env(tmp_path, HF_ENDPOINT=down), _hub_env(tmp_path, HF_HUB_OFFLINE="1")):
        assert choose_model(None, data, env) == fetched  # from the cache, without asking the Hub
    assert len(hub.seen) == asked
    named = choose_model(str(data / "tiny-llama"), data, _hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert named.path == data / "tiny-llama" and not named.built_in and named.why is None


def test_bad_demo_flags_are_one_line_errors(tmp_path):
    cases = (
        (["--gpus", "B200"], "--gpus"),
        (["--model", str(tmp_path)], "no config.json"),
        (["--quantize", "int3"], "--quantize: unknown quantization 'int3': choose one of none, int8, int4"),
    )
    for args, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "hexgen.cli.node", "demo", *args], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
