"""How long a request waits for the swarm before its entry fails it over, or gives it up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Patience:
    """How long a request waits for the swarm: ``timeout_s`` with neither a token nor word that a replica
    holding it still steps (``alive``, once a second from a busy driver; none while a step blocks) ends it
    with an error; an attempt silent for half of that is given up and re-submitted, so a hop stuck on work
    that will never come (a KV transfer whose sender failed) is failed over in time, while a request that
    merely waits in a busy replica's queue keeps its place."""

    timeout_s: float
    since: float

    @property
    def deadline(self) -> float:
        return self.since + self.timeout_s

    @property
    def hop_silence_s(self) -> float:
        return self.timeout_s / 2

    def progress(self, now: float) -> None:
        self.since = now

    def message(self, last_failure: str | None, plan_error: str | None) -> str:
        """What the client hears when the request ran out of patience: why, as far as this entry knows."""
        text = f"no replica took the request within {self.timeout_s:g} s"
        if last_failure:
            text += f" (last attempt: {last_failure})"
        if plan_error:
            text += f"; the coordinator says: {plan_error}"
        return text
