"""Trace-driven discrete-event simulator: replays a workload through a Plan, timed by the cost model.

Requests enter prefill (or colocated) groups in proportion to the plan's flows, are prefilled in
token-budgeted FIFO batches that pipeline through the stages, ship their prompt KV to a decode group
chosen by the prefill group's out flows (over a serialized channel inside a host, through the hosts'
NIC queues between hosts), and decode there under continuous batching. Every byte that crosses hosts
(KV, activations at pipeline boundaries, TP all-reduces of a stage spanning hosts) queues on the
sending host's egress and the receiving host's ingress, shared by all groups there. Colocated groups run prefill and decode in one loop that gives prefill priority and stalls
decoding while a prefill batch runs. Decode is simulated one batch iteration at a time (not one token
per request), so a run costs O(R log R + I * S) for R requests, I decode iterations and S stages.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hexgen.coordinator.cost import CostModel
from hexgen.coordinator.network import NicQueue, Traffic, kv_bytes, pass_bytes
from hexgen.coordinator.plan import SINK, SOURCE, Group, Plan
from hexgen.coordinator.workload import Workload

# Event priorities at one instant: state changes first, then scheduling decisions, so a group that
# picks its next batch sees every request that arrived at that same instant (an offline burst).
_CHANGE, _DECIDE = 0, 1
# Event kinds.
_ARRIVE, _KV_ARRIVE, _STAGE0_FREE, _PREFILL_DONE, _COLOC_PREFILL_DONE, _COLOC_FREE, _ITER_END, _WAKE = range(8)

_ALLOWED = {
    SOURCE: ("prefill", "colocated"),
    "prefill": ("decode",),
    "decode": (SINK,),
    "colocated": (SINK,),
}


@dataclass(frozen=True)
class SimResult:
    """What a simulated run measured; times in seconds, rates per second.

    Metrics cover completed requests only; with none completed every metric is 0.0. ``group_requests``
    counts the requests each group served (a request counts once at each group it passed through);
    ``first_token_s`` and ``finish_s`` are per request in workload order (``inf`` if never reached).
    """

    requests: int
    completed: int
    duration_s: float
    throughput_rps: float
    tokens_per_s: float
    ttft_mean_s: float
    ttft_p99_s: float
    tpot_mean_s: float
    tpot_p99_s: float
    latency_mean_s: float
    latency_p99_s: float
    group_requests: dict[int, int] = field(default_factory=dict)
    decode_iterations: int = 0
    first_token_s: tuple[float, ...] = field(default=(), repr=False)
    finish_s: tuple[float, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The summary as plain JSON-able values (per-request times left out)."""
        return {
            "requests": self.requests,
            "completed": self.completed,
            "duration_s": self.duration_s,
            "throughput_rps": self.throughput_rps,
            "tokens_per_s": self.tokens_per_s,
            "ttft_mean_s": self.ttft_mean_s,
            "ttft_p99_s": self.ttft_p99_s,
            "tpot_mean_s": self.tpot_mean_s,
            "tpot_p99_s": self.tpot_p99_s,
            "latency_mean_s": self.latency_mean_s,
            "latency_p99_s": self.latency_p99_s,
            "group_requests": {str(k): v for k, v in sorted(self.group_requests.items())},
            "decode_iterations": self.decode_iterations,
        }


class SmoothRoundRobin:
    """Smooth weighted round-robin (as in nginx): a deterministic, low-variance weighted choice.

    After k picks each target has been chosen within two of ``k * weight / total`` times, and picks
    of one target are spread out rather than bunched. O(n) per pick for n targets.
    """

    def __init__(self, targets: Sequence[int], weights: Sequence[float], rng: random.Random):
        if len(targets) != len(weights) or not targets:
            raise ValueError("need as many weights as targets, and at least one")
        self.targets = tuple(targets)
        self.weights = tuple(weights)
        self.total = sum(weights)
        # The seed only sets the starting phase of the interleaving.
        self.current = [rng.random() * self.total for _ in weights]

    def pick(self) -> int:
        best = 0
        for i, w in enumerate(self.weights):
            self.current[i] += w
            if self.current[i] > self.current[best]:
                best = i
        self.current[best] -= self.total
        return self.targets[best]


@dataclass(eq=False)
class _GroupState:
    """Mutable per-group simulation state. ``queue`` holds requests waiting for this group's next step."""

    group: Group
    queue: deque[int] = field(default_factory=deque)
    busy: bool = False
    wake_pending: bool = False
    route: SmoothRoundRobin | None = None
    # prefill pipelines: when each stage is next free
    stage_free: list[float] = field(default_factory=list)
    # continuous batching: resident count, sum of their contexts, (finishing iteration, request) heap
    resident: int = 0
    context_sum: int = 0
    finishing: list[tuple[int, int]] = field(default_factory=list)
    iteration: int = 0
    # colocated: slots held by prefill batches still in the pipeline
    pending: int = 0


def _check_plan(plan: Plan) -> dict[int, Group]:
    """Validate the plan's flow graph; returns groups by id. Raises ValueError naming the problem. O(G + F)."""
    groups: dict[int, Group] = {}
    for g in plan.groups:
        if g.id in groups:
            raise ValueError(f"plan lists group {g.id} twice")
        groups[g.id] = g
    inflow, outflow = _flow_totals(plan, groups)
    for gid in inflow:
        g = groups[gid]
        if not g.stages:
            raise ValueError(f"group {gid} receives requests but has no stages")
        if g.role == "prefill" and outflow.get(gid, 0.0) <= 0:
            raise ValueError(f"prefill group {gid} receives requests but has no flow to a decode group")
        if g.role != "prefill" and g.batch < 1:
            raise ValueError(f"{g.role} group {gid} receives requests but its batch is {g.batch}")
    return groups


def _flow_totals(plan: Plan, groups: dict[int, Group]) -> tuple[dict[int, float], dict[int, float]]:
    """Each group's total positive inflow and outflow; raises ValueError on a flow the roles forbid."""
    inflow: dict[int, float] = {}
    outflow: dict[int, float] = {}
    for f in plan.flows:
        src, dst = _end_role(f.src, groups), _end_role(f.dst, groups)
        if dst not in _ALLOWED.get(src, ()):
            raise ValueError(f"flow {f.src}->{f.dst}: a {src} end cannot send to a {dst} end")
        if not math.isfinite(f.rate) or f.rate < 0:
            raise ValueError(f"flow {f.src}->{f.dst}: rate must be finite and non-negative, got {f.rate}")
        if f.rate > 0:
            if isinstance(f.dst, int):
                inflow[f.dst] = inflow.get(f.dst, 0.0) + f.rate
            if isinstance(f.src, int):
                outflow[f.src] = outflow.get(f.src, 0.0) + f.rate
    return inflow, outflow


def _end_role(end: int | str, groups: dict[int, Group]) -> str:
    """SOURCE, SINK, or the role of the group ``end`` names; ValueError when there is no such group."""
    if end in (SOURCE, SINK):
        return str(end)
    if isinstance(end, int) and end in groups:
        return groups[end].role
    known = ", ".join(str(i) for i in sorted(groups)) or "none"
    raise ValueError(f"a flow names group {end!r}, which the plan does not have (groups: {known})")


def _router(plan: Plan, src: int | str, rng: random.Random) -> SmoothRoundRobin | None:
    flows = plan.out_flows(src)
    if not flows:
        return None
    return SmoothRoundRobin([int(f.dst) for f in flows], [f.rate for f in flows], rng)


def _nearest_rank(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank of a non-empty list. O(n log n)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def decode_iteration_time(cost: CostModel, group: Group, resident: int, context: float) -> float:
    """Seconds for one decode iteration of ``resident`` sequences (one token each) at mean ``context``.

    The resident batch is split into S micro-batches of resident/S that circulate the S stages, so a
    round takes S times the slowest stage (just the stage time when S == 1). O(S).
    """
    s = len(group.stages)
    return s * max(cost.decode_stage_times(group.stages, group.batch, resident / s, context))


class _Simulation:
    """One run's event loop. Not reusable: construct, call ``run`` once."""

    def __init__(self, plan: Plan, cost: CostModel, workload: Workload, seed: int):
        self.cost = cost
        self.groups = _check_plan(plan)
        rng = random.Random(seed)
        self.entry = _router(plan, SOURCE, rng)
        self.states: dict[int, _GroupState] = {}
        for gid in sorted(self.groups):
            g = self.groups[gid]
            st = _GroupState(g, stage_free=[0.0] * len(g.stages))
            if g.role == "prefill":
                st.route = _router(plan, gid, rng)
            self.states[gid] = st
        reqs = workload.requests
        self.arrival = [r.arrival_s for r in reqs]
        self.prompt = [r.prompt_tokens for r in reqs]
        self.output = [max(1, r.output_tokens) for r in reqs]
        self.first_token = [math.inf] * len(reqs)
        self.finish = [math.inf] * len(reqs)
        self.served = dict.fromkeys(sorted(self.groups), 0)
        self.channel_free: dict[tuple[int, int], float] = {}
        self.nics = NicQueue(cost.cluster)
        self._per_token: dict[tuple[int, int], Traffic] = {}
        self.iterations = 0
        self.budget = cost.params.prefill_batch_tokens
        self.events: list[tuple[float, int, int, int, int, Any]] = []
        self.seq = 0

    def per_token(self, src: int, dst: int) -> Traffic:
        """Cross-host bytes per token: of a pass through group ``src`` (dst == src), else of the KV from
        prefill group ``src`` to decode group ``dst``; memoized."""
        key = (src, dst)
        found = self._per_token.get(key)
        if found is None:
            stages = self.groups[src].stages
            if src == dst:
                found = pass_bytes(self.cost, stages, 1.0)
            else:
                found = kv_bytes(self.cost, stages, self.groups[dst].stages, 1.0)
            self._per_token[key] = found
        return found

    def send(self, src: int, dst: int, tokens: float, t: float, latency_s: float = 0.0) -> float:
        """Queue ``tokens`` tokens' cross-host bytes (see ``per_token``) on the NICs; when they have arrived.

        A group's own traffic (activations, whose latency the stage times hold) goes ahead of KV caches (see
        ``NicQueue``); a KV hand-off lands ``latency_s`` after its last byte leaves, or a pair's measured
        one-way latency where the cluster has one."""
        traffic = self.per_token(src, dst)
        if not traffic:
            return t
        scaled = {pair: tokens * b for pair, b in traffic.items()}
        return self.nics.reserve(scaled, t, latency_s, urgent=src == dst, measured=src != dst)

    def push(self, t: float, prio: int, kind: int, gid: int, payload: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, prio, self.seq, kind, gid, payload))

    def wake(self, st: _GroupState, t: float) -> None:
        if not st.busy and not st.wake_pending:
            st.wake_pending = True
            self.push(t, _DECIDE, _WAKE, st.group.id)

    def run(self) -> None:
        if self.entry is not None:
            order = sorted(range(len(self.arrival)), key=lambda i: (self.arrival[i], i))
            for i in order:
                self.push(self.arrival[i], _CHANGE, _ARRIVE, -1, i)
        handlers: dict[int, Callable[[float, int, Any], None]] = {
            _ARRIVE: self.on_arrive,
            _KV_ARRIVE: self.on_kv_arrive,
            _STAGE0_FREE: self.on_stage0_free,
            _PREFILL_DONE: self.on_prefill_done,
            _COLOC_PREFILL_DONE: self.on_coloc_prefill_done,
            _COLOC_FREE: self.on_coloc_free,
            _ITER_END: self.on_iter_end,
            _WAKE: self.on_wake,
        }
        events = self.events
        while events:
            t, _, _, kind, gid, payload = heapq.heappop(events)
            handlers[kind](t, gid, payload)

    # arrivals
    def on_arrive(self, t: float, _gid: int, req: int) -> None:
        assert self.entry is not None
        gid = self.entry.pick()
        self.served[gid] += 1
        st = self.states[gid]
        st.queue.append(req)
        self.wake(st, t)

    def on_kv_arrive(self, t: float, gid: int, req: int) -> None:
        st = self.states[gid]
        st.queue.append(req)
        self.wake(st, t)

    def on_wake(self, t: float, gid: int, _payload: None) -> None:
        st = self.states[gid]
        st.wake_pending = False
        if st.busy:
            return
        role = st.group.role
        if role == "prefill":
            self.start_prefill(st, t)
        elif role == "decode":
            free = min(st.group.batch - st.resident, len(st.queue))
            self.admit(st, [st.queue.popleft() for _ in range(free)])
            self.start_iteration(st, t)
        elif st.queue and st.resident + st.pending < st.group.batch:
            self.start_coloc_prefill(st, t)
        else:
            self.start_iteration(st, t)

    # prefill
    def take_batch(self, queue: deque[int], limit: int) -> list[int]:
        """FIFO requests up to the prompt-token budget and ``limit`` requests; at least one."""
        batch = [queue.popleft()]
        tokens = self.prompt[batch[0]]
        while queue and len(batch) < limit and tokens + self.prompt[queue[0]] <= self.budget:
            tokens += self.prompt[queue[0]]
            batch.append(queue.popleft())
        return batch

    def prefill_times(self, group: Group, batch: list[int]) -> list[float]:
        prompts = [self.prompt[r] for r in batch]
        return self.cost.prefill_stage_times(group.stages, sum(prompts), sum(p * p for p in prompts), len(batch))

    def start_prefill(self, st: _GroupState, t: float) -> None:
        if not st.queue:
            return
        batch = self.take_batch(st.queue, len(st.queue))
        times = self.prefill_times(st.group, batch)
        # Batches never overtake each other, so the whole pipeline schedule is known now: each stage
        # starts when the batch reaches it and the stage has finished the previous batch.
        end = t
        for k, dt in enumerate(times):
            end = max(end, st.stage_free[k]) + dt
            st.stage_free[k] = end
        end = max(end, self.send(st.group.id, st.group.id, sum(self.prompt[r] for r in batch), t))
        st.busy = True
        self.push(st.stage_free[0], _CHANGE, _STAGE0_FREE, st.group.id)
        self.push(end, _CHANGE, _PREFILL_DONE, st.group.id, batch)

    def on_stage0_free(self, t: float, gid: int, _payload: None) -> None:
        st = self.states[gid]
        st.busy = False
        self.wake(st, t)

    def on_prefill_done(self, t: float, gid: int, batch: list[int]) -> None:
        st = self.states[gid]
        assert st.route is not None
        for r in batch:
            self.first_token[r] = t
            if self.output[r] == 1:
                self.finish[r] = t
                continue
            dst = st.route.pick()
            self.served[dst] += 1
            channel = (gid, dst)
            start = max(t, self.channel_free.get(channel, 0.0))
            stages = (st.group.stages, self.groups[dst].stages)
            done = start + self.cost.kv_transfer_time(self.prompt[r], *stages, same_host_only=True)
            self.channel_free[channel] = done
            latency = self.cost.params.inter_host_latency_s
            done = max(done, self.send(gid, dst, self.prompt[r], t, latency))
            self.push(done, _CHANGE, _KV_ARRIVE, dst, r)

    # continuous batching (decode and colocated)
    def admit(self, st: _GroupState, requests: Iterable[int]) -> None:
        """Make ``requests`` resident; the caller keeps the resident count within the batch cap."""
        for r in requests:
            st.resident += 1
            # a resident sequence has produced one token (prefill's) and attends over prompt + tokens so far
            st.context_sum += self.prompt[r] + 1
            heapq.heappush(st.finishing, (st.iteration + self.output[r] - 1, r))

    def start_iteration(self, st: _GroupState, t: float) -> None:
        if st.resident == 0:
            return
        dt = decode_iteration_time(self.cost, st.group, st.resident, st.context_sum / st.resident)
        st.busy = True
        end = max(t + dt, self.send(st.group.id, st.group.id, st.resident, t))
        self.push(end, _CHANGE, _ITER_END, st.group.id)

    def on_iter_end(self, t: float, gid: int, _payload: None) -> None:
        st = self.states[gid]
        self.iterations += 1
        st.iteration += 1
        st.context_sum += st.resident
        while st.finishing and st.finishing[0][0] <= st.iteration:
            _, r = heapq.heappop(st.finishing)
            self.finish[r] = t
            st.resident -= 1
            st.context_sum -= self.prompt[r] + self.output[r]
        st.busy = False
        self.wake(st, t)

    def start_coloc_prefill(self, st: _GroupState, t: float) -> None:
        batch = self.take_batch(st.queue, st.group.batch - st.resident - st.pending)
        times = self.prefill_times(st.group, batch)
        # time-sharing: decode stalls while the prefill batch occupies the pipeline, which costs the group
        # its slowest stage's time (batches interleave across stages); the batch's own first token comes
        # after it has passed every stage
        st.busy = True
        st.pending += len(batch)
        sent = self.send(st.group.id, st.group.id, sum(self.prompt[r] for r in batch), t)
        self.push(max(t + max(times), sent), _CHANGE, _COLOC_FREE, st.group.id)
        self.push(max(t + sum(times), sent), _CHANGE, _COLOC_PREFILL_DONE, st.group.id, batch)

    def on_coloc_free(self, t: float, gid: int, _payload: None) -> None:
        st = self.states[gid]
        st.busy = False
        self.wake(st, t)

    def on_coloc_prefill_done(self, t: float, gid: int, batch: list[int]) -> None:
        st = self.states[gid]
        st.pending -= len(batch)
        decoding = []
        for r in batch:
            self.first_token[r] = t
            if self.output[r] == 1:
                self.finish[r] = t
            else:
                decoding.append(r)
        self.admit(st, decoding)
        self.wake(st, t)

    def result(self) -> SimResult:
        done = [i for i, f in enumerate(self.finish) if math.isfinite(f)]
        n = len(self.arrival)
        nothing = SimResult(
            n,
            0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            group_requests=dict(self.served),
            decode_iterations=self.iterations,
            first_token_s=tuple(self.first_token),
            finish_s=tuple(self.finish),
        )
        if not done:
            return nothing
        duration = max(self.finish[i] for i in done) - min(self.arrival)
        ttft = [self.first_token[i] - self.arrival[i] for i in done]
        latency = [self.finish[i] - self.arrival[i] for i in done]
        tpot = [(self.finish[i] - self.first_token[i]) / (self.output[i] - 1) for i in done if self.output[i] > 1]
        tokens = sum(self.output[i] for i in done)
        rate = 1.0 / duration if duration > 0 else 0.0
        return dataclasses.replace(
            nothing,
            completed=len(done),
            duration_s=duration,
            throughput_rps=len(done) * rate,
            tokens_per_s=tokens * rate,
            ttft_mean_s=sum(ttft) / len(ttft),
            ttft_p99_s=_nearest_rank(ttft, 0.99),
            tpot_mean_s=sum(tpot) / len(tpot) if tpot else 0.0,
            tpot_p99_s=_nearest_rank(tpot, 0.99) if tpot else 0.0,
            latency_mean_s=sum(latency) / len(latency),
            latency_p99_s=_nearest_rank(latency, 0.99),
        )


def simulate(plan: Plan, cost: CostModel, workload: Workload, *, seed: int = 0) -> SimResult:
    """Replay ``workload`` through ``plan`` with stage times from ``cost``; returns the measured metrics.

    Arrivals are the workload's ``arrival_s`` (all zero for an offline batch). Dispatch follows the
    plan's positive flows by smooth weighted round-robin; ``seed`` sets only the round-robin phases, so
    a run is deterministic for a seed. A plan whose source has no positive flow completes nothing.
    Raises ValueError when a flow names a missing group or joins roles that cannot be joined.
    Complexity O(R log R + I * S) for R requests, I decode iterations and S stages per group.
    """
    sim = _Simulation(plan, cost, workload, seed)
    sim.run()
    return sim.result()
