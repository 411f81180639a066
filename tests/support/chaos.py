"""A churn harness: a local swarm serves a stream of requests while daemons are SIGKILLed and restarted.

``run_churn`` starts ``daemons`` real daemons (tests/daemon_harness.py), waits until they serve, then runs
``requests`` greedy requests with ``in_flight`` of them open at any moment from one libp2p client on the entry
daemon, while a killer task SIGKILLs a non-entry daemon (in turn: the coordinator of the moment, a decode
group's host, one at random) every ``kill_every_s`` at the soonest, with at most ``max_down`` down at once.
Each kill's cycle waits until the survivors serve without the victim, restarts it with the same key file and
host name (so it rejoins as the same peer) and waits until it serves again. It records every request's tokens
against the reference, its latency and re-submissions, and every kill's failover and rejoin times. ``run_load``
is a load phase for the swarm once whole again: many clients over HTTP and libp2p, resident memory growth.

The entry is never killed and must never become the coordinator (the coordinator would then never die), so
keys are made up front: the entry gets the largest peer id (the election picks the smallest live one) and the
daemon with the smallest id starts first and holds the first lease.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from hexgen.daemon.generate_protocol import GenerateError, GenerateToken, replies
from hexgen.daemon.node_key import create_key_file, peer_id_of
from hexgen.daemon.rpc import query_status
from hexgen.daemon.swarm_view import wire_assignments
from hexgen.testing.daemon_harness import Daemon, Swarm, descendants, open_client, serving, statuses, wait_until, zombie

ENTRY = "n0"
GPUS = ("H100", "A100", "L40", "A6000")
STATUS_TIMEOUT_S = 3.0  # one status question
POLL_S = 0.2  # the killer's status polling while it waits for a state
PROCESS_EXIT_TIMEOUT_S = 15.0  # a killed daemon's workers and store notice within a second (they poll)
START_CONCURRENCY = 2
View = Mapping[str, dict[str, Any] | None]
Check = Callable[[View], bool]
# A disaggregated layout for six daemons (the entry n0 only routes): two TP1 prefill replicas hand off to a
# single-stage and a two-stage (PP=2) decode replica.
DISAGGREGATED = """
[[groups]]
role = "prefill"
stages = [{ gpus = ["n1"], layers = [0, 5] }]

[[groups]]
role = "prefill"
stages = [{ gpus = ["n2"], layers = [0, 5] }]

[[groups]]
role = "decode"
stages = [{ gpus = ["n3"], layers = [0, 5] }]

[[groups]]
role = "decode"
stages = [{ gpus = ["n4"], layers = [0, 3] }, { gpus = ["n5"], layers = [3, 5] }]
"""


@dataclass(frozen=True)
class ChurnConfig:
    daemons: int = 6
    requests: int = 200
    in_flight: int = 8
    max_tokens: int = 32
    kill_every_s: float = 4.0  # from one kill to the next, at the soonest
    pause_s: float = 1.0  # after a killed daemon serves again, before the next kill
    max_down: int = 1  # daemons between their kill and serving again at once (more: kills overlap)
    down_s: float = 0.0  # after the survivors serve without the victim, before it is restarted
    max_kills: int | None = None  # None: keep killing while requests run
    min_kills: int = 0  # keep the requests flowing (re-running the list) until this many kills happened
    pinned: str | None = None  # a pinned layout (TOML) every daemon is started with
    gpus: tuple[str, ...] = GPUS
    seed: int = 0
    serving_timeout_s: float = 180.0  # the first time, each wait of a kill cycle, and the last
    request_timeout_s: float = 300.0
    entry_http: bool = False  # the entry also serves the OpenAI API (--http), for a load phase after the churn


@dataclass
class RequestRecord:
    index: int
    prompt: list[int]
    expected: list[int]
    tokens: list[int] = field(default_factory=list)
    started: float = 0.0  # seconds from the start of the request phase
    latency_s: float | None = None  # to the final frame; None when the request did not complete
    error: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None
    attempts: int = 0  # hops the entry tried: more than 1 means it re-submitted after a failure

    @property
    def lost(self) -> bool:
        return self.latency_s is None or self.error is not None

    def diff(self) -> dict[str, int]:
        """Tokens repeated (extra), missing and wrong against the reference, by an alignment of the two."""
        counts = {"duplicated": 0, "missing": 0, "wrong": 0}
        matcher = difflib.SequenceMatcher(a=self.expected, b=self.tokens, autojunk=False)
        for op, a0, a1, b0, b1 in matcher.get_opcodes():
            if op == "insert":
                counts["duplicated"] += b1 - b0
            elif op == "delete":
                counts["missing"] += a1 - a0
            elif op == "replace":
                counts["wrong"] += max(a1 - a0, b1 - b0)
        return counts


@dataclass
class Kill:
    victim: str  # the daemon's name
    peer_id: str
    why: str  # "coordinator", "decode" or "random"
    was_coordinator: bool
    roles: list[str]  # the victim's roles in the plan it was killed under
    at_s: float  # seconds from the start of the request phase
    in_flight: int  # client requests open at the kill
    plan_without_s: float | None = None  # the entry adopted a plan without the victim
    failover_s: float | None = None  # every live daemon serves a plan without the victim
    restart_s: float | None = None  # the restarted daemon printed its ready line
    rejoin_s: float | None = None  # the entry adopted a plan with the victim again
    serving_s: float | None = None  # every daemon, the victim too, serves that plan
    processes_left: int = 0  # the victim's workers or store still running after it died
    error: str | None = None


@dataclass
class ChurnResult:
    config: ChurnConfig
    records: list[RequestRecord]
    kills: list[Kill]
    wall_s: float
    start_s: float  # from the first daemon's start until the swarm served
    max_in_flight: int
    plan_roles: list[str]  # the groups' roles of the plan the swarm first served
    whole_s: float | None  # after the last request, until every daemon served one plan together
    processes_left: int  # processes of the swarm still running after the cleanup
    errors: list[str]

    @property
    def lost(self) -> int:
        return sum(r.lost for r in self.records)

    def token_errors(self) -> dict[str, int]:
        totals = {"duplicated": 0, "missing": 0, "wrong": 0}
        for record in self.records:
            if not record.lost:
                for key, value in record.diff().items():
                    totals[key] += value
        return totals

    @property
    def latencies(self) -> list[float]:
        return sorted(r.latency_s for r in self.records if r.latency_s is not None)

    @property
    def resubmitted(self) -> int:
        return sum(r.attempts > 1 for r in self.records)

    def summary(self) -> dict[str, Any]:
        errors = self.token_errors()
        return {
            "requests": len(self.records),
            "lost": self.lost,
            "duplicated_tokens": errors["duplicated"],
            "missing_tokens": errors["missing"],
            "wrong_tokens": errors["wrong"],
            "equal_reference": sum(not r.lost and r.tokens == r.expected for r in self.records),
            "resubmitted": self.resubmitted,
            "p50_latency_s": _round(percentile(self.latencies, 50)),
            "p99_latency_s": _round(percentile(self.latencies, 99)),
            "failovers": [_round(k.failover_s) for k in self.kills],
            "kills": len(self.kills),
            "coordinator_kills": sum(k.was_coordinator for k in self.kills),
            "rejoined": sum(k.serving_s is not None for k in self.kills),
            "max_in_flight": self.max_in_flight,
            "wall_s": _round(self.wall_s),
            "start_s": _round(self.start_s),
            "plan_roles": self.plan_roles,
            "whole_again_s": _round(self.whole_s),
            "processes_left": self.processes_left,
            "errors": self.errors,
        }


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile of ``values`` by linear interpolation (None for no values)."""
    ordered = sorted(values)
    if not ordered:
        return None
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# ------------------------------------------------------------------------------------------------- the swarm


def make_keys(root: Path, count: int) -> list[str]:
    """Key files ``n0.key`` .. for ``count`` daemons: ``n0`` (the entry) gets the largest peer id and ``n1`` the
    smallest. Returns the peer ids by daemon index."""
    root.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(count):
        path = root / f"key-{i}.tmp"
        made.append((peer_id_of(create_key_file(path)), path))
    made.sort()
    order = [made[-1], *made[:-1]]  # largest first (n0), then ascending (n1 the smallest)
    for i, (_, path) in enumerate(order):
        path.rename(root / f"n{i}.key")
    return [peer_id for peer_id, _ in order]


class ChurnSwarm:
    """The swarm under churn: starts, kills and restarts daemons by name, keeps each daemon's earlier logs."""

    def __init__(self, root: Path, model_dir: Path, config: ChurnConfig) -> None:
        self.root = root
        self.config = config
        self.swarm = Swarm(root, model=str(model_dir))
        self.extra: list[str] = []
        if config.pinned is not None:
            pinned = root / "pinned.toml"
            root.mkdir(parents=True, exist_ok=True)
            pinned.write_text(config.pinned)
            self.extra = ["--pin-plan", str(pinned)]
        self.current: dict[str, Daemon] = {}
        self.children: set[int] = set()  # every worker or store pid seen below a daemon
        self.restarts: dict[str, int] = {}

    def gpu(self, name: str) -> str:
        gpus = self.config.gpus
        return gpus[int(name[1:]) % len(gpus)]

    @property
    def entry(self) -> Daemon:
        return self.current[ENTRY]

    def live(self) -> list[Daemon]:
        return [d for d in self.current.values() if d.alive()]

    def _start(self, name: str, bootstrap: list[str]) -> Daemon:
        extra = self.extra + (["--http", "0"] if name == ENTRY and self.config.entry_http else [])
        daemon = self.swarm.start(name, bootstrap=bootstrap, gpu=self.gpu(name), extra=extra)
        self.current[name] = daemon
        return daemon

    async def start_all(self) -> None:
        """``n1`` first (the smallest id: it takes the first lease), the entry next, the rest on the entry,
        two at a time (a start is mostly imports: CPU)."""
        make_keys(self.root, self.config.daemons)
        seed = await trio.to_thread.run_sync(self._start, "n1", [])
        await trio.to_thread.run_sync(self._start, ENTRY, [seed.addr])
        limiter = trio.CapacityLimiter(START_CONCURRENCY)
        async with trio.open_nursery() as nursery:
            for i in range(2, self.config.daemons):
                nursery.start_soon(
                    partial(trio.to_thread.run_sync, self._start, f"n{i}", [self.entry.addr], limiter=limiter)
                )

    def note_children(self) -> None:
        for daemon in self.live():
            self.children |= descendants(daemon.proc.pid)

    async def kill(self, daemon: Daemon) -> set[int]:
        """SIGKILL ``daemon``; returns its workers and store, which must end by themselves."""
        below = descendants(daemon.proc.pid)
        self.children |= below
        daemon.proc.kill()
        await trio.to_thread.run_sync(daemon.proc.wait, 10)
        if daemon.proc.stdout:
            daemon.proc.stdout.close()
        return below

    async def restart(self, name: str) -> Daemon:
        """The same key file and host name, bootstrapped on the entry; the old log is kept beside."""
        count = self.restarts[name] = self.restarts.get(name, 0) + 1
        log = self.root / f"{name}.log"
        if log.exists():
            log.rename(self.root / f"{name}.log.{count}")
        return await trio.to_thread.run_sync(self._start, name, [self.entry.addr])

    async def close(self) -> int:
        """Kill every daemon; returns how many of their processes were still running afterwards (those are
        then killed too)."""
        with contextlib.suppress(Exception):
            self.note_children()
        self.swarm.close()
        return await reap(self.children, PROCESS_EXIT_TIMEOUT_S)


def running(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists() and not zombie(pid)}


async def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """Wait up to ``timeout`` for ``pids`` to end; returns the ones still running."""
    with trio.move_on_after(timeout):
        while running(pids):
            await trio.sleep(0.1)
    return running(pids)


async def reap(pids: set[int], timeout: float) -> int:
    """Wait up to ``timeout`` for ``pids`` to end; kill and count the ones that did not."""
    left = await wait_gone(pids, timeout)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return len(left)


# ------------------------------------------------------------------------------------------------- the run


@dataclass
class _Run:
    swarm: ChurnSwarm
    client: Any
    config: ChurnConfig
    records: list[RequestRecord]
    began: float
    kills: list[Kill] = field(default_factory=list)
    down: set[str] = field(default_factory=set)  # daemons between their kill and serving again
    last_kill: float = -math.inf
    last_back: float = -math.inf
    open_requests: int = 0
    max_in_flight: int = 0
    listed_done: bool = False  # every request of the configured list was sent
    killer_idle: trio.Event = field(default_factory=trio.Event)
    failed: bool = False  # a kill cycle did not recover: no further kills
    errors: list[str] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.began

    def settled(self) -> list[Daemon]:
        return [d for d in self.swarm.live() if d.name not in self.down]


async def _status(run: _Run, daemon: Daemon) -> dict[str, Any] | None:
    with contextlib.suppress(Exception):
        with trio.fail_after(STATUS_TIMEOUT_S):
            if daemon.peer_id not in run.client.connected_peers():
                await run.client.connect(daemon.addr)
            return await query_status(run.client, daemon.peer_id)
    return None


async def _poll(run: _Run, daemons: Callable[[], list[Daemon]], check: Check, timeout: float) -> float | None:
    """Seconds until ``check`` holds for the statuses of ``daemons()`` (by peer id), None on timeout."""
    start = time.monotonic()
    with trio.move_on_after(timeout):
        while True:
            view = await statuses(run.client, daemons())
            with contextlib.suppress(KeyError, TypeError, AttributeError):
                if view and check(view):
                    return time.monotonic() - start
            await trio.sleep(POLL_S)
    return None


def _plan_members(status: dict[str, Any] | None) -> set[str]:
    return set(((status or {}).get("plan") or {}).get("members") or [])


def _serves(status: dict[str, Any] | None, key: tuple[int, int]) -> bool:
    """The daemon adopted the plan ``key`` (term, epoch) and its workers for it are all ready."""
    if status is None or not status.get("plan") or status.get("serving") is None:
        return False
    plan, serving_now = status["plan"], status["serving"]
    return (
        (plan["term"], plan["epoch"]) == key
        and serving_now["epoch"] == plan["epoch"]
        and all(w["state"] == "ready" for w in serving_now["workers"].values())
    )


def serving_without(peer_id: str) -> Check:
    """Every daemon asked serves one plan, and ``peer_id`` is not in it."""

    def check(view: View) -> bool:
        states = list(view.values())
        if any(s is None or not s.get("plan") for s in states):
            return False
        keys = {(s["plan"]["term"], s["plan"]["epoch"]) for s in states if s is not None}
        if len(keys) != 1:
            return False
        key = keys.pop()
        return all(_serves(s, key) and peer_id not in _plan_members(s) for s in states)

    return check


def serving_with(peer_id: str, entry_id: str) -> Check:
    """The entry and ``peer_id`` serve one plan that has ``peer_id`` in it."""

    def check(view: View) -> bool:
        entry, peer = view.get(entry_id), view.get(peer_id)
        if entry is None or peer is None or not entry.get("plan"):
            return False
        key = (entry["plan"]["term"], entry["plan"]["epoch"])
        return peer_id in _plan_members(entry) and _serves(entry, key) and _serves(peer, key)

    return check


async def _request(run: _Run, record: RequestRecord) -> None:
    entry = run.swarm.entry
    request = {"tokens": record.prompt, "max_tokens": run.config.max_tokens}
    run.open_requests += 1
    run.max_in_flight = max(run.max_in_flight, run.open_requests)
    record.started = run.now()
    try:
        with trio.fail_after(run.config.request_timeout_s):
            async for frame in replies(run.client, entry.peer_id, request):
                if isinstance(frame, GenerateError):
                    record.error = frame.error
                elif isinstance(frame, GenerateToken):
                    record.tokens.append(frame.token)
                else:
                    record.latency_s = run.now() - record.started
                    record.finish_reason = frame.finish_reason
                    record.completion_tokens = frame.completion_tokens
                    record.attempts = sum(h.get("role") != "decode" for h in frame.served_by)
        if record.latency_s is None and record.error is None:
            record.error = "the stream ended without a final frame"
    except trio.TooSlowError:
        record.error = f"no final frame within {run.config.request_timeout_s} s"
    except Exception as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        run.open_requests -= 1


async def _requests(run: _Run) -> None:
    """Every record through ``in_flight`` client tasks; then, while the killer still owes ``min_kills`` or a
    kill's cycle is open, more requests over the same prompts (recorded too: the result counts every request
    sent), so that no kill and no rejoin happens on an idle swarm."""
    send, receive = trio.open_memory_channel[RequestRecord](len(run.records))
    for record in run.records:
        send.send_nowait(record)
    send.close()
    prompts = [(r.prompt, r.expected) for r in run.records]

    def owed() -> bool:
        return bool(run.config.min_kills) and (len(run.kills) < run.config.min_kills or bool(run.down))

    async def client_task() -> None:
        async for record in receive:
            await _request(run, record)
        run.listed_done = True
        while owed() and not run.killer_idle.is_set():
            prompt, expected = prompts[len(run.records) % len(prompts)]
            record = RequestRecord(len(run.records), prompt, expected)
            run.records.append(record)
            await _request(run, record)

    async with trio.open_nursery() as nursery:
        for _ in range(run.config.in_flight):
            nursery.start_soon(client_task)


def _more_kills(run: _Run) -> bool:
    config = run.config
    if run.failed or (config.max_kills is not None and len(run.kills) >= config.max_kills):
        return False
    return not run.listed_done or len(run.kills) < config.min_kills


def _due(run: _Run) -> bool:
    """A kill is due: ``kill_every_s`` after the last kill, ``pause_s`` after the last daemon came back, and
    fewer than ``max_down`` daemons down."""
    now, config = time.monotonic(), run.config
    return (
        len(run.down) < config.max_down
        and now - run.last_kill >= config.kill_every_s
        and now - run.last_back >= config.pause_s
        and len([d for d in run.settled() if d.name != ENTRY]) > 0
    )


async def _killer(run: _Run) -> None:
    """Kill a non-entry daemon whenever one is due (see ``_due``) while requests run; each kill's cycle
    (failover, restart, rejoin) runs as a task of its own, so cycles may overlap."""
    config = run.config
    rng = random.Random(config.seed)
    # a decode group first, while the pinned layout is in force (with a pinned host down the planner's
    # colocated plan serves), then the coordinator of the moment, then any
    policies = ["decode", "coordinator", "random"] if config.pinned else ["coordinator", "random"]
    try:
        async with trio.open_nursery() as nursery:
            while _more_kills(run):
                if not _due(run):
                    await trio.sleep(0.1)  # pacing: the killer's clock, not a state to wait for
                    continue
                status = await _status(run, run.swarm.entry)
                if status is None:
                    run.errors.append("the entry did not answer its status")
                    run.failed = True
                    break
                victim, why = _pick(run, status, policies[len(run.kills) % len(policies)], rng)
                roles = wire_assignments((status.get("plan") or {}).get("body")).get(victim.peer_id, [])
                kill = Kill(
                    victim=victim.name,
                    peer_id=victim.peer_id,
                    why=why,
                    was_coordinator=status.get("coordinator") == victim.peer_id,
                    roles=sorted({r["role"] for r in roles}),
                    at_s=run.now(),
                    in_flight=run.open_requests,
                )
                run.kills.append(kill)
                run.down.add(victim.name)
                run.last_kill = time.monotonic()
                await nursery.start(_cycle, run, victim, kill)
    finally:
        run.killer_idle.set()


def _pick(run: _Run, status: dict[str, Any], policy: str, rng: random.Random) -> tuple[Daemon, str]:
    by_peer = {d.peer_id: d for d in run.settled() if d.name != ENTRY}
    roles = wire_assignments((status.get("plan") or {}).get("body"))
    coordinator = status.get("coordinator")
    if policy == "coordinator" and coordinator in by_peer:
        return by_peer[coordinator], "coordinator"
    if policy == "decode":
        decoders = sorted(p for p, rs in roles.items() if p in by_peer and any(r["role"] == "decode" for r in rs))
        if decoders:
            return by_peer[rng.choice(decoders)], "decode"
    return by_peer[rng.choice(sorted(by_peer))], "random"


async def _cycle(
    run: _Run, victim: Daemon, kill: Kill, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """SIGKILL ``victim``, time the failover, restart it as the same peer, time its rejoin."""
    swarm, timeout = run.swarm, run.config.serving_timeout_s
    below = await swarm.kill(victim)
    killed = time.monotonic()
    task_status.started()
    try:
        entry = swarm.entry
        kill.plan_without_s = await _poll(
            run, lambda: [entry], lambda v: victim.peer_id not in _plan_members(v[entry.peer_id]), timeout
        )
        failover = await _poll(run, run.settled, serving_without(victim.peer_id), timeout)
        kill.failover_s = None if failover is None else time.monotonic() - killed
        if kill.failover_s is None:
            kill.error = f"the swarm did not serve without {victim.name} within {timeout} s"
            return
        if run.config.down_s:
            await trio.sleep(run.config.down_s)
        try:
            restarted = await swarm.restart(victim.name)
        except Exception as exc:
            kill.error = f"restart failed: {exc}"
            return
        kill.restart_s = time.monotonic() - killed
        if restarted.peer_id != victim.peer_id:
            kill.error = f"{victim.name} came back as another peer ({restarted.peer_id})"
            return
        run.client.forget_addresses(victim.peer_id)
        rejoin = await _poll(run, lambda: [entry], lambda v: victim.peer_id in _plan_members(v[entry.peer_id]), timeout)
        kill.rejoin_s = None if rejoin is None else time.monotonic() - killed
        back = await _poll(run, lambda: [entry, restarted], serving_with(victim.peer_id, entry.peer_id), timeout)
        kill.serving_s = None if back is None else time.monotonic() - killed
        if kill.serving_s is None:
            kill.error = f"{victim.name} did not serve again within {timeout} s"
            return
        swarm.note_children()
        kill.processes_left = len(await wait_gone(below, PROCESS_EXIT_TIMEOUT_S))
    finally:
        if kill.error is not None:
            run.errors.append(f"kill {run.kills.index(kill) + 1} ({victim.name}): {kill.error}")
            run.failed = True
        run.down.discard(victim.name)
        run.last_back = time.monotonic()


async def run_churn(
    root: Path,
    model_dir: Path,
    prompts: list[list[int]],
    expected: list[list[int]],
    config: ChurnConfig,
    after: Callable[[ChurnSwarm, Any], Awaitable[None]] | None = None,
) -> ChurnResult:
    """Run the churn scenario of ``config`` (request ``i`` is ``prompts[i % len(prompts)]``, whose greedy
    output must be ``expected[i % len(prompts)]``); then, when the swarm serves whole again, ``after(swarm,
    client)`` (a load phase, say). Every daemon and its processes are gone on return."""
    swarm = ChurnSwarm(root, model_dir, config)
    records = [RequestRecord(i, prompts[i % len(prompts)], expected[i % len(prompts)]) for i in range(config.requests)]
    errors: list[str] = []
    started = time.monotonic()
    start_s = math.nan
    kills: list[Kill] = []
    max_in_flight = 0
    plan_roles: list[str] = []
    wall_s = 0.0
    whole_s: float | None = None
    try:
        await swarm.start_all()
        async with open_client() as client:
            ids = {d.peer_id for d in swarm.live()}
            view, _ = await wait_until(client, swarm.live(), serving(ids), config.serving_timeout_s, "serving")
            start_s = time.monotonic() - started
            body = (view[swarm.entry.peer_id] or {})["plan"]["body"]
            plan_roles = [g["role"] for g in body["plan"]["groups"]]
            swarm.note_children()
            run = _Run(swarm, client, config, records, began=time.monotonic())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_requests, run)
                nursery.start_soon(_killer, run)
            wall_s = run.now()
            kills, max_in_flight = run.kills, run.max_in_flight
            errors += run.errors
            everyone = {d.peer_id for d in swarm.live()}
            whole_s = await _poll(run, swarm.live, serving(everyone), config.serving_timeout_s)
            if whole_s is None or len(everyone) != config.daemons:
                errors.append(f"{len(everyone)} of {config.daemons} daemons did not serve together at the end")
            elif after is not None:
                await after(swarm, client)
    finally:
        with trio.CancelScope(shield=True):
            processes_left = await swarm.close()
    return ChurnResult(
        config=config,
        records=records,
        kills=kills,
        wall_s=wall_s,
        start_s=start_s,
        max_in_flight=max_in_flight,
        plan_roles=plan_roles,
        whole_s=whole_s,
        processes_left=processes_left,
        errors=errors,
    )


# ------------------------------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    """Many clients at once on the entry, over HTTP (the OpenAI API) and libp2p, for a while."""

    clients: int
    http_clients: int
    duration_s: float
    latencies: list[float] = field(default_factory=list)  # completed requests
    errors: list[str] = field(default_factory=list)  # failed requests (status, exception, error frame)
    mismatches: int = 0  # completed, but not the greedy reference
    rss_mb: dict[str, float] = field(default_factory=dict)  # after the warm-up and at the end

    @property
    def rss_growth_pct(self) -> float | None:
        """Growth of the daemons' (trio processes') resident memory from the warm-up to the end."""
        start, end = self.rss_mb.get("daemons_start"), self.rss_mb.get("daemons_end")
        return None if not start or end is None else 100.0 * (end - start) / start

    @property
    def rss_growth_all_pct(self) -> float | None:
        """The same for the daemons with their workers and stores."""
        start, end = self.rss_mb.get("all_start"), self.rss_mb.get("all_end")
        return None if not start or end is None else 100.0 * (end - start) / start

    def summary(self) -> dict[str, Any]:
        return {
            "load_clients": self.clients,
            "load_http_clients": self.http_clients,
            "load_duration_s": self.duration_s,
            "load_requests": len(self.latencies),
            "load_errors": len(self.errors) + self.mismatches,
            "load_mismatches": self.mismatches,
            "load_error_samples": sorted(set(self.errors))[:5],
            "load_p50_latency_s": _round(percentile(self.latencies, 50)),
            "load_p99_latency_s": _round(percentile(self.latencies, 99)),
            "load_requests_per_s": _round(len(self.latencies) / self.duration_s),
            "rss_growth_pct": _round(self.rss_growth_pct, 2),
            "rss_growth_all_pct": _round(self.rss_growth_all_pct, 2),
            "rss_mb": {k: round(v, 1) for k, v in self.rss_mb.items()},
        }


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def swarm_rss(swarm: ChurnSwarm) -> tuple[float, float]:
    """Resident MiB of the live daemons, and of the daemons with every process below them."""
    daemons = [d.proc.pid for d in swarm.live()]
    below = set().union(*(descendants(pid) for pid in daemons)) if daemons else set()
    own = sum(rss_mb(pid) for pid in daemons)
    return own, own + sum(rss_mb(pid) for pid in below)


async def _text_answer(client: Any, entry: Daemon, text: str, max_tokens: int) -> str:
    """The entry's greedy completion of ``text`` over libp2p: what the HTTP clients must get."""
    pieces: list[str] = []
    with trio.fail_after(120):
        async for frame in replies(client, entry.peer_id, {"prompt": text, "max_tokens": max_tokens}):
            if isinstance(frame, GenerateError):
                raise RuntimeError(f"the entry refused {text!r}: {frame.error}")
            pieces.append(frame.text)
    return "".join(pieces)


async def _http_completion(http: Any, body: dict[str, Any]) -> str:
    """One /v1/completions request; streamed (server-sent events) when ``body`` says so. Raises on an error."""
    if not body.get("stream"):
        reply = await http.post("/v1/completions", json=body)
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:200]}")
        return str(reply.json()["choices"][0]["text"])
    pieces = []
    async with http.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            pieces.extend(str(choice.get("text", "")) for choice in event.get("choices", []))
    return "".join(pieces)


async def run_load(
    swarm: ChurnSwarm,
    client: Any,
    prompts: list[list[int]],
    expected: list[list[int]],
    texts: list[str],
    *,
    clients: int,
    duration_s: float,
    max_tokens: int,
    http_share: float = 0.5,
    warmup_s: float = 2.0,
) -> LoadResult:
    """``clients`` concurrent clients of the entry for ``duration_s``: a ``http_share`` of them over the
    OpenAI API (the entry must run with ``--http``; text ``texts``, every other request streamed), the rest
    over libp2p (token ``prompts``); every answer is checked against the greedy reference. Resident memory
    is read after ``warmup_s`` and at the end."""
    import httpx  # only the load phase needs it

    entry = swarm.entry
    http_clients = round(clients * http_share) if entry.http else 0
    result = LoadResult(clients, http_clients, duration_s)
    answers = [await _text_answer(client, entry, text, max_tokens) for text in texts]
    deadline = trio.current_time() + duration_s
    limits = httpx.Limits(max_connections=http_clients + 4, max_keepalive_connections=http_clients + 4)

    async def one(kind: str, index: int, http: Any) -> None:
        start = time.monotonic()
        try:
            with trio.fail_after(STATUS_TIMEOUT_S + 120):
                if kind == "http":
                    text = texts[index % len(texts)]
                    body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": index % 2 == 1}
                    good = await _http_completion(http, body) == answers[index % len(texts)]
                else:
                    request = {"tokens": prompts[index % len(prompts)], "max_tokens": max_tokens}
                    tokens = []
                    async for frame in replies(client, entry.peer_id, request):
                        if isinstance(frame, GenerateError):
                            raise RuntimeError(frame.error)
                        if isinstance(frame, GenerateToken):
                            tokens.append(frame.token)
                    good = tokens == expected[index % len(prompts)]
        except Exception as exc:
            result.errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")
            return
        result.latencies.append(time.monotonic() - start)
        result.mismatches += not good

    async def client_task(kind: str, number: int, http: Any) -> None:
        index = number
        while trio.current_time() < deadline:
            await one(kind, index, http)
            index += clients

    async def sample_rss() -> None:
        await trio.sleep(warmup_s)
        result.rss_mb["daemons_start"], result.rss_mb["all_start"] = swarm_rss(swarm)
        await trio.sleep_until(deadline)
        result.rss_mb["daemons_end"], result.rss_mb["all_end"] = swarm_rss(swarm)

    base = entry.http or "http://unused"
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120.0) as http, trio.open_nursery() as nursery:
        nursery.start_soon(sample_rss)
        for number in range(clients):
            nursery.start_soon(client_task, "http" if number < http_clients else "libp2p", number, http)
    return result
