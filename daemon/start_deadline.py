"""When a starting worker is given up on: ``quiet_s`` without a sign of progress, not a fixed time.

Loading scales with the model (a 35 GB stage at 300 MB/s takes two minutes, a slow disk far longer), so a
fixed start timeout either kills honest workers or waits too long for hung ones. The worker reports bytes
loaded; each report that shows more bytes than the last moves the deadline to ``quiet_s`` from now, up to
an overall cap.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StartDeadline:
    started: float
    quiet_s: float
    cap_s: float
    deadline: float = 0.0
    done: int = -1

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
        self.deadline = min(max(self.deadline, now + self.quiet_s), self.started + self.cap_s)
        return True

    def expired(self, now: float) -> bool:
        return now >= self.deadline
