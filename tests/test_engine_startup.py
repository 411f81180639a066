"""Start-up that scales with the model: load progress moves the daemon's start deadline, and a replica's
first collective after loading waits for its slowest rank instead of timing out; each worker pins its GPU,
and the daemon never touches CUDA."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import pytest
import torch

from hexgen.daemon.start_deadline import StartDeadline
from hexgen.daemon.worker_process import Channel, progress_reporter
from hexgen.engine.device import nccl_device_id, pin_device
from hexgen.testing.checkpoints import LLAMA_GQA
from hexgen.testing.ranks import free_port, run_ranks

# ------------------------------------------------------------------------------------- the deadline rule


def test_progress_moves_the_deadline() -> None:
    deadline = StartDeadline(started=0.0, quiet_s=120.0, cap_s=3600.0)
    assert deadline.deadline == 120.0 and not deadline.expired(119.0) and deadline.expired(120.0)
    # a 35 GB stage at 300 MB/s: about 117 s of loading, reported every second, then world formation
    total = 35_000_000_000
    for second in range(1, 118):
        assert deadline.progress(float(second), min(total, second * 300_000_000), total)
        assert not deadline.expired(second + 0.5)
    assert deadline.deadline == 117.0 + 120.0


def test_silence_repeats_and_garbage_do_not_move_it() -> None:
    deadline = StartDeadline(started=0.0, quiet_s=10.0, cap_s=100.0)
    assert deadline.progress(5.0, 100, 1000)
    assert not deadline.progress(9.0, 100, 1000)  # the same bytes again: no progress
    for done, total in [(50, 1000), (2000, 1000), ("200", 1000), (True, 1000), (None, None), (300, "x")]:
        assert not deadline.progress(9.0, done, total)
    assert deadline.deadline == 15.0 and deadline.expired(15.0)


def test_the_cap_bounds_it() -> None:
    deadline = StartDeadline(started=0.0, quiet_s=10.0, cap_s=30.0)
    for t in range(1, 40):
        deadline.progress(float(t), t, 100)
    assert deadline.deadline == 30.0


def test_bad_windows_are_refused() -> None:
    with pytest.raises(ValueError):
        StartDeadline(0.0, 0.0, 10.0)
    with pytest.raises(ValueError):
        StartDeadline(0.0, 20.0, 10.0)


def test_once_all_weights_loaded_the_deadline_is_the_load_barrier_s() -> None:
    deadline = StartDeadline(started=0.0, quiet_s=150.0, cap_s=10_000.0, loaded_s=2000.0)
    assert deadline.progress(10.0, 50, 100) and deadline.deadline == 160.0 and not deadline.loaded
    assert deadline.progress(20.0, 100, 100) and deadline.loaded and deadline.deadline == 2020.0
    assert not deadline.capped()
    # an empty model (total 0) is not "all loaded": nothing to wait on slower ranks for
    empty = StartDeadline(started=0.0, quiet_s=150.0, cap_s=10_000.0, loaded_s=2000.0)
    assert empty.progress(1.0, 0, 0) and not empty.loaded and empty.deadline == 151.0
    # still within the cap
    capped = StartDeadline(started=0.0, quiet_s=150.0, cap_s=1000.0, loaded_s=2000.0)
    assert capped.progress(900.0, 100, 100) and capped.deadline == 1000.0 and capped.capped()


def test_progress_reporter_throttles_but_sends_the_last() -> None:
    sent = []

    class Fake:
        def send(self, frame: dict) -> None:
            sent.append(frame)

    report = progress_reporter(Fake(), every_s=3600)  # type: ignore[arg-type]
    for done in range(0, 101, 10):
        report(done, 100)
    assert sent == [{"op": "progress", "done": 0, "total": 100}, {"op": "progress", "done": 100, "total": 100}]


# ----------------------------------------------------------------------------- a slow rank, for real

SLOW_S = 0.15  # per parameter: the tiny model's ~40 parameters take about 6 s on the slow rank
WORLD_TIMEOUT_S = 2.0  # every collective's timeout, far shorter than the slow rank's load


def _rank(rank: int, port: int, model_dir: str) -> float:
    from hexgen.engine import loader
    from hexgen.engine.layout import uniform_layout
    from hexgen.engine.replica import ReplicaSpec, ReplicaWorker, Request, init_world, replica_groups
    from hexgen.engine.sequence import SamplingParams

    torch.set_num_threads(1)
    if rank == 1:
        read = loader._read
        loader._read = lambda where, piece: time.sleep(SLOW_S) or read(where, piece)
    init_world(rank, 2, port, timeout_s=WORLD_TIMEOUT_S)
    spec = ReplicaSpec(model_dir, uniform_layout(LLAMA_GQA["num_hidden_layers"], 1, 2))
    started = time.monotonic()
    seen: list[tuple[int, int]] = []
    groups = replica_groups([spec], timeout=timedelta(seconds=WORLD_TIMEOUT_S))
    worker = ReplicaWorker(spec, rank, groups, progress=lambda d, t: seen.append((d, t)))
    waited = time.monotonic() - started
    assert seen and seen[-1][0] == seen[-1][1] > 0 and [d for d, _ in seen] == sorted(d for d, _ in seen)
    result = worker.step([Request(0, [3, 14, 15, 92], SamplingParams(max_tokens=2))] if worker.is_driver else None)
    assert result is not None and result.ran
    return waited


def test_first_collective_waits_for_a_slow_loading_rank(tiny_models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    outcomes = run_ranks(_rank, 2, (free_port(), str(tiny_models["llama-gqa"])), 90)
    errors = [o for o in outcomes.values() if isinstance(o, str)]
    assert not errors, "\n".join(errors)
    # the fast rank waited in the barrier for longer than any collective may take: the rule held
    assert outcomes[0] > WORLD_TIMEOUT_S * 1.5, outcomes


def test_a_daemon_worker_reports_load_progress_before_ready(tiny_models: dict, tmp_path) -> None:
    path = tmp_path / "w.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(60)
    # throttled so that more than one frame goes out (they are sent at most every PROGRESS_EVERY_S)
    code = textwrap.dedent(f"""
        import sys, time
        from hexgen.daemon import worker_process as worker
        from hexgen.engine import loader
        worker.PROGRESS_EVERY_S = 0.1
        read = loader._read
        loader._read = lambda where, piece: time.sleep(0.03) or read(where, piece)
        sys.exit(worker.main(["--ipc", {str(path)!r}]))
    """)
    process = subprocess.Popen([sys.executable, "-c", code])
    try:
        conn, _ = server.accept()
        conn.settimeout(None)
        channel = Channel(conn)
        replica = {"model_dir": str(tiny_models["llama-gqa"]), "layout": [[0, 4, 1]], "first_rank": 0}
        channel.send(
            {"op": "configure", "rank": 0, "world_size": 1, "port": free_port(), "replica": replica, "progress": True}
        )
        frames = []
        while not frames or frames[-1]["op"] == "progress":
            frames.append(channel.receive())
        assert frames[-1]["op"] == "ready", frames[-1]
        progress = [(f["done"], f["total"]) for f in frames[:-1]]
        assert len(progress) >= 2 and progress[-1][0] == progress[-1][1] > 0
        assert [d for d, _ in progress] == sorted(d for d, _ in progress)
        channel.send({"op": "shutdown"})
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------------- devices and the daemon


def test_pin_device_is_a_no_op_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    assert pin_device("cpu") == torch.device("cpu")
    assert calls == []


def test_pin_device_sets_the_worker_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    assert pin_device("cuda:3") == torch.device("cuda", 3)
    assert pin_device("cuda") == torch.device("cuda", 0)
    assert calls == [torch.device("cuda", 3), torch.device("cuda", 0)]


def test_nccl_gets_the_device_id_and_gloo_none() -> None:
    assert nccl_device_id("cuda:2", "nccl") == torch.device("cuda", 2)
    assert nccl_device_id("cuda:2", "gloo") is None
    assert nccl_device_id("cpu", "nccl") is None


def test_the_daemon_detects_hardware_without_touching_cuda() -> None:
    """The daemon's detection runs in a child process; the daemon's own modules never import torch."""
    code = textwrap.dedent("""
        import sys
        import hexgen.daemon.node, hexgen.daemon.run, hexgen.daemon.supervisor
        from types import SimpleNamespace
        from hexgen.daemon.run import hardware_for
        assert "torch" not in sys.modules, "importing the daemon imported torch"
        profile = hardware_for(SimpleNamespace(simulate_gpu=None, calibrate=False))
        assert profile.cpu_count >= 1
        assert "torch" not in sys.modules, "hardware detection imported torch in the daemon"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ------------------------------------------------------------------- the supervisor's wait for ready


class _Frames:
    """A FrameReader stand-in: each frame after its delay (trio's clock)."""

    def __init__(self, frames: list[tuple[float, dict]]) -> None:
        self.frames = list(frames)

    async def read(self) -> dict:
        import trio

        delay, frame = self.frames.pop(0)
        await trio.sleep(delay)
        return frame


def _supervisor_and_worker():
    from types import SimpleNamespace

    from hexgen.daemon.supervisor import Supervisor

    return Supervisor(peer_id="p", model_dir="m"), SimpleNamespace(rank=0)


@pytest.mark.trio
async def test_a_worker_loading_for_ten_minutes_with_progress_starts(autojump_clock) -> None:
    from hexgen.daemon.supervisor import START_TIMEOUT_S

    supervisor, worker = _supervisor_and_worker()
    total = 35_000_000_000
    frames = [(60.0, {"op": "progress", "done": (i + 1) * total // 10, "total": total}) for i in range(10)]
    frames.append((START_TIMEOUT_S - 1, {"op": "ready", "rank": 0}))
    reply = await supervisor._await_ready(worker, _Frames(frames))
    assert reply["op"] == "ready"


@pytest.mark.trio
async def test_a_silent_or_repeating_worker_is_given_up(autojump_clock) -> None:
    import trio

    from hexgen.daemon.supervisor import READY_GRACE_S, START_TIMEOUT_S

    supervisor, worker = _supervisor_and_worker()
    same = {"op": "progress", "done": 5, "total": 10}
    frames = [(1.0, same)] + [(40.0, same)] * 20 + [(0.0, {"op": "ready"})]
    started = trio.current_time()
    with pytest.raises(trio.TooSlowError, match="no progress"):
        await supervisor._await_ready(worker, _Frames(frames))
    assert trio.current_time() - started == pytest.approx(1.0 + START_TIMEOUT_S + READY_GRACE_S)


def test_group_timeouts_can_be_lifted_for_the_load_barrier(tmp_path) -> None:
    """The NCCL branch of wait_for_ranks lifts the group's timeout around its barrier; the call it relies on
    (private in torch) is checked here on gloo, where it exists too."""
    code = textwrap.dedent(f"""
        from datetime import timedelta
        import torch.distributed as dist
        from hexgen.engine.device import _set_timeout, wait_for_ranks
        dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
        assert _set_timeout(timedelta(minutes=30), None)
        group = dist.new_group([0])
        assert _set_timeout(timedelta(seconds=5), group)
        wait_for_ranks(group, timedelta(minutes=30), timedelta(seconds=5))
        print("ok")
    """)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.trio
async def test_a_loaded_worker_waiting_for_a_slower_rank_is_not_given_up(autojump_clock) -> None:
    """After its last progress frame a worker waits silently at the load barrier for the slowest rank of its
    world: up to the barrier's own bound, far longer than the quiet window before loading finished."""
    import trio

    from hexgen.daemon.supervisor import LOADED_QUIET_S, READY_GRACE_S, START_TIMEOUT_S
    from hexgen.engine.bounds import LOAD_TIMEOUT_S

    assert LOADED_QUIET_S > LOAD_TIMEOUT_S
    supervisor, worker = _supervisor_and_worker()
    frames = [(1.0, {"op": "progress", "done": 10, "total": 10}), (LOAD_TIMEOUT_S, {"op": "ready", "rank": 0})]
    reply = await supervisor._await_ready(worker, _Frames(frames))
    assert reply["op"] == "ready"
    # silent past that bound too: given up, with a message saying so
    frames = [(1.0, {"op": "progress", "done": 10, "total": 10}), (LOADED_QUIET_S + 5, {"op": "ready"})]
    started = trio.current_time()
    with pytest.raises(trio.TooSlowError, match="loaded its weights but was not ready"):
        await supervisor._await_ready(worker, _Frames(frames))
    assert trio.current_time() - started == pytest.approx(1.0 + LOADED_QUIET_S)
    assert START_TIMEOUT_S + READY_GRACE_S < LOADED_QUIET_S


@pytest.mark.trio
async def test_the_start_cap_names_itself_when_it_fired(autojump_clock, monkeypatch: pytest.MonkeyPatch) -> None:
    import trio

    from hexgen.daemon import supervisor as module

    monkeypatch.setattr(module, "START_CAP_S", 3600.0)
    supervisor, worker = _supervisor_and_worker()
    # progress every minute, forever: only the cap stops it
    frames = [(60.0, {"op": "progress", "done": i + 1, "total": 10_000}) for i in range(200)]
    started = trio.current_time()
    with pytest.raises(trio.TooSlowError, match="within the 1 h cap"):
        await supervisor._await_ready(worker, _Frames(frames))
    assert trio.current_time() - started == pytest.approx(3600.0)


@pytest.mark.trio
async def test_a_kept_driver_that_cannot_be_told_the_exchange_group_fails() -> None:
    """Its workers would stay joining, and every hop on this daemon be refused, if the failed send were
    swallowed."""
    from types import SimpleNamespace

    from hexgen.daemon.supervisor import Supervisor

    failures: list[tuple[int, str]] = []

    async def on_failure(epoch, rank, error, cause, peers) -> None:
        failures.append((rank, error))

    supervisor = Supervisor(peer_id="p", model_dir="m", on_failure=on_failure)

    async def broken_send(frame: dict) -> None:
        raise OSError("the pipe is gone")

    async def secret(head: str, prefix: str) -> bytes:
        return b"s" * 32

    supervisor._world_secret = secret  # type: ignore[method-assign]
    supervisor._exchange = lambda deployment, worker, secret: {}  # type: ignore[method-assign]
    worker = SimpleNamespace(
        rank=3, send=broken_send, error=None, replica=SimpleNamespace(peers=lambda: {"p"}, first_rank=0)
    )
    deployment = SimpleNamespace(epoch=7, exchange_head="p", exchange_prefix="x", in_gloo=lambda replica: True)
    await supervisor._tell_exchange(deployment, [worker])  # type: ignore[arg-type]
    assert worker.error is not None and "exchange group" in worker.error and "pipe is gone" in worker.error
    assert failures == [(3, worker.error)]
