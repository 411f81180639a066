"""The engine worker process as the daemon drives it: configure over a unix socket, join the world,
generate, stream tokens, shut down. Two real worker processes form a TP=2 replica over gloo."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hexgen.daemon.worker_frames import (
    AliveFrame,
    ConfigureFrame,
    FailedFrame,
    GenerateFrame,
    ReadyFrame,
    ShutdownFrame,
    StepFrame,
    frame_from_worker,
)
from hexgen.daemon.worker_process import Background, Channel, Liveness, abort_on_failure, spec_from
from hexgen.daemon.worker_setup import ReplicaSetup
from hexgen.engine.llm import LLM
from hexgen.engine.sequence import SamplingParams
from hexgen.testing.checkpoints import TINY_CONFIGS, random_prompts
from hexgen.testing.daemon_harness import zombie
from hexgen.testing.ranks import free_port


def _listen(path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(60)
    return server


def _spawn(path):
    return subprocess.Popen([sys.executable, "-m", "hexgen.daemon.worker_process", "--ipc", str(path)])


@pytest.fixture
def workers():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def test_tp2_replica_served_through_worker_processes(tiny_models, tmp_path, workers):
    model_dir = tiny_models["llama-gqa"]
    replica = ReplicaSetup(str(model_dir), ((0, 4, 2),))
    port = free_port()
    channels = []
    for rank in range(2):
        server = _listen(tmp_path / f"w{rank}.sock")
        workers.append(_spawn(tmp_path / f"w{rank}.sock"))
        conn, _ = server.accept()
        conn.settimeout(None)
        channel = Channel(conn)
        channel.send(ConfigureFrame(rank, 2, replica, port=port).to_wire())
        channels.append(channel)
    replies = [frame_from_worker(c.receive()) for c in channels]
    assert all(isinstance(r, ReadyFrame) for r in replies), replies
    driver = channels[next(i for i, r in enumerate(replies) if r.driver)]  # type: ignore[union-attr]

    prompts = random_prompts(4, TINY_CONFIGS["llama-gqa"]["vocab_size"], seed=11)
    for i, prompt in enumerate(prompts):
        driver.send(GenerateFrame(i, tuple(prompt), SamplingParams(max_tokens=12)).to_wire())
    streamed: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    done: dict[int, str] = {}
    while len(done) < len(prompts):
        for raw in driver.poll(30):
            frame = frame_from_worker(raw)
            if not isinstance(frame, StepFrame):
                continue  # alive: the driver still steps
            assert len({t.id for t in frame.tokens}) == len(frame.tokens)  # a step makes one token a sequence
            for token in frame.tokens:
                streamed[token.id].append(token.token)
                if token.finished:
                    done[token.id] = token.finished
    expected = [o.token_ids for o in LLM(model_dir).generate(prompts, SamplingParams(max_tokens=12))]
    assert [streamed[i] for i in range(len(prompts))] == expected
    assert set(done.values()) == {"length"}
    driver.send(ShutdownFrame().to_wire())
    assert [p.wait(timeout=60) for p in workers] == [0, 0]


@pytest.mark.parametrize(
    ("first", "error"),
    [({"op": "generate"}, "a bad first frame: field 'id'"), ({"op": "shutdown"}, "the first frame must be configure")],
)
def test_worker_refuses_a_bad_first_frame(tmp_path, workers, first, error):
    server = _listen(tmp_path / "w.sock")
    workers.append(_spawn(tmp_path / "w.sock"))
    conn, _ = server.accept()
    conn.settimeout(None)
    channel = Channel(conn)
    channel.send(first)
    reply = frame_from_worker(channel.receive())
    assert isinstance(reply, FailedFrame) and reply.error.startswith(error), reply
    assert workers[0].wait(timeout=60) == 0


PARENT = """
import socket, subprocess, sys, time
from hexgen.daemon.wire import encode_frame
from hexgen.daemon.worker_frames import ConfigureFrame
from hexgen.daemon.worker_setup import ReplicaSetup
path, port = sys.argv[1], int(sys.argv[2])
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(1)
worker = subprocess.Popen([sys.executable, "-m", "hexgen.daemon.worker_process", "--ipc", path])
conn, _ = server.accept()
frame = ConfigureFrame(1, 2, ReplicaSetup("unused", ((0, 2, 2),)), store=("127.0.0.1", port), prefix="x/")
conn.sendall(encode_frame(frame.to_wire()))
print(worker.pid, flush=True)
time.sleep(600)
"""


def test_a_worker_forming_its_world_dies_with_its_daemon(tmp_path):
    """Rank 1 waits for a store that never answers (it would for minutes); killing the process that started
    it must end it too, or a SIGKILLed daemon would leave workers behind."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "w.sock"), str(free_port())], stdout=subprocess.PIPE, text=True
    )
    try:
        worker_pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while len(list(Path(f"/proc/{worker_pid}/task").glob("*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the worker runs its watcher thread beside the blocked main thread
        assert Path(f"/proc/{worker_pid}").exists()
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{worker_pid}").exists() and not zombie(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{worker_pid}").exists() or zombie(worker_pid), "the worker outlived its daemon"
    finally:
        parent.kill()
        parent.stdout.close()


class FakeChannel:
    """Records frames; ``sent`` is set on each one."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.sent = threading.Event()

    def send(self, obj: dict) -> None:
        self.frames.append(obj)
        self.sent.set()


def test_liveness_speaks_while_busy_except_while_a_kv_is_awaited():
    channel, receiving = FakeChannel(), [False]
    liveness = Liveness(channel, lambda: receiving[0])
    liveness.tick()
    assert channel.frames == []  # idle: nothing to vouch for
    liveness.busy = True
    liveness.tick()
    assert channel.frames == [AliveFrame().to_wire()]  # a long step in progress is not a stuck hop
    receiving[0] = True
    liveness.tick()
    assert channel.frames == [AliveFrame().to_wire()]  # a KV that never comes must let the entry fail over


def test_liveness_thread_sends_during_a_step():
    channel = FakeChannel()
    liveness = Liveness(channel, lambda: False, every_s=0.01).start()
    liveness.busy = True
    try:
        assert channel.sent.wait(10)
    finally:
        liveness.stop()
    liveness.thread.join(10)
    assert not liveness.thread.is_alive()
    assert AliveFrame().to_wire() in channel.frames


def test_a_failed_exchange_aborts_the_load():
    """The loader's callback raises the exchange thread's error once known, instead of loading on."""
    from hexgen.engine.formation import WorldFormationError

    error = WorldFormationError("exchange group", "connect", "error [10.0.0.9]:1: refused")

    def fail() -> None:
        raise error

    heard: list[tuple[int, int]] = []
    failed = Background(fail)
    failed.thread.join(10)
    with pytest.raises(WorldFormationError) as caught:
        abort_on_failure(failed, lambda d, t: heard.append((d, t)))(1, 10)
    assert caught.value is error and heard == []
    formed = Background(lambda: "joined")
    formed.thread.join(10)
    abort_on_failure(formed, lambda d, t: heard.append((d, t)))(2, 10)
    abort_on_failure(None, lambda d, t: heard.append((d, t)))(3, 10)
    assert heard == [(2, 10), (3, 10)]


def test_a_broken_world_ends_the_worker_with_one_line(monkeypatch, capsys):
    from hexgen.daemon import worker_process as worker_module
    from hexgen.engine.formation import WorldFormationError

    def broken(channel: Channel, kv_fd: int | None = None) -> None:
        raise WorldFormationError("exchange group", "connect", "error [10.0.0.9]:1: refused")

    monkeypatch.setattr(worker_module, "serve", broken)
    ours, theirs = socket.socketpair()
    with ours:
        assert worker_module.main(["--ipc-fd", str(theirs.detach())]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hexgen-worker: error: the exchange group could not connect (cannot reach 10.0.0.9)")
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(("told", "loads"), [("none", None), ("int8", "int8"), ("int4", "int4")])
def test_a_worker_loads_the_quantization_its_daemon_names(told: str, loads: str | None) -> None:
    assert spec_from(ReplicaSetup("/models/m", ((0, 4, 1),), quantize=told)).quantize == loads
