"""When a starting worker is given up on: ``quiet_s`` without a sign of progress, not a fixed time.

Loading scales with the model (a 35 GB stage at 300 MB/s takes two minutes, a slow disk far longer), so a
fixed start timeout either kills honest workers or waits too long for hung ones. The worker reports bytes
loaded; each report that shows more bytes than the last moves the deadline to ``quiet_s`` from now, up to
an overall cap.

A worker that reported all its weights loaded goes quiet while it waits at the load barrier for slower
ranks (up to the barrier's own bound), profiles and joins the exchange group, so from then on the deadline
is ``loaded_s`` from that report (still within the cap).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StartDeadline:
    started: float
    quiet_s: float
    cap_s: float
    loaded_s: float = 0.0  # the quiet window once all weights are loaded; 0: the same as ``quiet_s``
    deadline: float = 0.0
    done: int = -1
    loaded: bool = False

    def __post_init__(self) -> None:
        if self.quiet_s <= 0 or self.cap_s < self.quiet_s:
            raise ValueError(f"need 0 < quiet_s <= cap_s, got {self.quiet_s} and {self.cap_s}")
        self.deadline = self.started + self.quiet_s

    def progress(self, now: float, done: object, total: object) -> bool:
        """Take a progress report; True when it moved the deadline (more bytes than before). Malformed or
        repeated reports move nothing, so a worker cannot stay alive by repeating itself."""
        if isinstance(done, bool) or not isinstance(done, int) or not isinstance(total, int) or done <= self.done:
            return False
        if not 0 <= done <= total:
            return False
        self.done = done
        self.loaded = 0 < total <= done
        quiet = max(self.quiet_s, self.loaded_s) if self.loaded else self.quiet_s
        self.deadline = min(max(self.deadline, now + quiet), self.started + self.cap_s)
        return True

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def capped(self) -> bool:
        """True when the deadline is the overall cap, not a quiet window."""
        return self.deadline >= self.started + self.cap_s
