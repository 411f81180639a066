"""Multi-process test helpers: a free local port, and N ranks run as spawned processes whose outcomes come back."""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

# Shared objects a rank needs (an Event, say) must come from this context: the ranks are spawned from it.
context = multiprocessing.get_context("spawn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(target: Callable[..., Any], rank: int, args: tuple, results: multiprocessing.Queue) -> None:
    try:
        outcome = target(rank, *args)
    except BaseException:
        outcome = traceback.format_exc()
    results.put((rank, outcome))
    # Skipping interpreter teardown (seconds with torch loaded) once the result is flushed keeps the tests fast.
    results.close()
    results.join_thread()
    os._exit(0)


def run_ranks(target: Callable[..., Any], world: int, args: tuple, timeout_s: float) -> dict[int, Any]:
    """Runs ``target(rank, *args)`` in ``world`` spawned processes and returns each rank's outcome: what the
    target returned, or the traceback of what it raised. Fails the test naming the ranks that did not answer
    within ``timeout_s``; the processes are always joined, and killed if still alive."""
    results = context.Queue()
    processes = [context.Process(target=_rank, args=(target, r, args, results), daemon=True) for r in range(world)]
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout_s
        outcomes: dict[int, Any] = {}
        while len(outcomes) < world:
            try:
                rank, outcome = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                missing = sorted(set(range(world)) - set(outcomes))
                exits = [p.exitcode for p in processes]
                pytest.fail(f"ranks {missing} did not finish within {timeout_s:g} s (exit codes {exits})")
            outcomes[rank] = outcome
        return outcomes
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
