"""Reports members gossip about the serving plane: workers that failed, and peers caught by spot-checks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from hexgen.daemon.coordination import Coordination
from hexgen.daemon.envelope import Envelope, seal
from hexgen.daemon.failure import FailureReport, WorldFailure, blocked_pair
from hexgen.daemon.messages import SuspectReport
from hexgen.daemon.spot_check import Verdict
from hexgen.daemon.swarm_state import SwarmState

REPORT_TTL_S = 60.0

Publish = Callable[[list[Envelope]], Awaitable[None]]


class Reports:
    """Takes failure and suspect reports (this node's own and the members') and sends this node's."""

    def __init__(self, state: SwarmState, key_pair: Any, coordination: Coordination, publish: Publish) -> None:
        self.state = state
        self.key_pair = key_pair
        self.coordination = coordination
        self.publish = publish

    def apply_suspect(self, env: Envelope, now: float = 0.0) -> None:
        self.take_suspect(env.signer, SuspectReport.from_wire(env.body))

    def take_suspect(self, reporter: str, report: SuspectReport) -> None:
        """Flag the accused (status shows them); the coordinator plans without their GPUs from now on."""
        state = self.state
        for peer in report.peers:
            if peer in state.flagged:
                continue
            state.flagged[peer] = {"by": reporter, "reason": report.reason, "t": round(state.clock(), 3)}
            state.event("suspect", f"peer {peer} flagged by {reporter}'s spot-check: {report.reason}", peer=peer)
        state.poke()

    async def report_verdict(self, verdict: Verdict) -> None:
        if verdict.outcome != "accused":
            return
        report = SuspectReport.from_wire({"peers": sorted(verdict.accused), "reason": verdict.detail})
        self.take_suspect(self.state.peer_id, report)
        await self.publish([seal("suspect", report.to_wire(), self.key_pair, REPORT_TTL_S)])

    def apply_failure(self, env: Envelope, now: float = 0.0) -> None:
        self.take_failure(env.signer, FailureReport.from_wire(env.body))

    def take_failure(self, reporter: str, report: FailureReport) -> None:
        """A member's worker failed: a world that could not connect blocks the pair of peers it names (on
        every node, whatever the epoch: a late report still says the link is bad), and the coordinator
        rebuilds the world in a new epoch, within its re-plan budget."""
        state = self.state
        text = f"peer {reporter} reports a failed worker in epoch {report.epoch}: {report.error}"
        state.event("failure", text, peer=reporter, epoch=report.epoch)
        addresses = state.peer_addresses()
        pair = blocked_pair(reporter, report, addresses)
        if pair is not None and report.cause is not None:
            reason = self.blocked_reason(pair, reporter, report.cause)
            if state.blocked.block(pair, reason, addresses, state.clock()):
                state.event("blocked", reason, peer=pair[0], other=pair[1])
                state.poke()
        self.coordination.count_failure(report)

    def blocked_reason(self, pair: tuple[str, str], reporter: str, cause: WorldFailure) -> str:
        name = self.state.peer_name
        other = pair[1] if pair[0] == reporter else pair[0]
        where = f" at {cause.remote}" if cause.remote else ""
        return (
            f"peers {name(pair[0])} and {name(pair[1])} cannot form a world: "
            f"the {cause.world} of {name(reporter)} could not connect to {name(other)}{where}"
        )

    async def report_failure(
        self, epoch: int, rank: int, error: str, cause: WorldFailure | None = None, peers: list[str] | None = None
    ) -> None:
        """A worker of this node failed in ``epoch``: tell every member (and this node)."""
        plan = self.state.plan
        if plan is None or plan.epoch != epoch:
            return
        report = FailureReport(plan.term, epoch, rank, error[:500], tuple(peers or ()), cause)
        self.take_failure(self.state.peer_id, report)
        await self.publish([seal("failure", report.to_wire(), self.key_pair, REPORT_TTL_S)])
