"""The token bucket, the one rate limit of the mesh: ``burst`` at once, then ``rate`` a second.

Used per sender by an actor's request intake (intake.py), the chat bot's commands and the broker's
disco query budget (:class:`RateLimit`), and by the audit log for denials it records (one bucket per
sender and one for everyone). Two limits of another shape are not buckets: a workflow step's ``rate``
(N uses per period, counted in SQLite so that brokers share it: broker/constraints.py) and a
replication's bytes-per-second pacing, which delays instead of refusing (storage/transfer.py Throttle).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RateLimit", "TokenBucket"]


@dataclass(slots=True)
class TokenBucket:
    """One bucket: full (``burst`` tokens) at ``at``, refilled at ``rate`` tokens a second; each use
    takes one. ``refusing`` says the last take was refused, so a flood can be answered once."""

    burst: float
    rate: float
    at: float
    tokens: float = -1.0  # left out: full
    refusing: bool = False

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.refusing = tokens < 1.0
        self.tokens = tokens if self.refusing else tokens - 1.0
        return not self.refusing


class RateLimit:
    """A token bucket per sender: ``burst`` requests at once, then ``rate`` per second; at most
    ``max_senders`` remembered, the least recent forgotten first."""

    def __init__(self, burst: int = 5, rate: float = 1.0, max_senders: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.rate, self.max_senders, self.clock = burst, rate, max_senders, clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, sender: str) -> tuple[bool, bool]:
        """(allowed, warn): warn is true once per overflow, so a flood gets one answer, not many."""
        now = self.clock()
        bucket = self._buckets.get(sender)
        if bucket is None:
            bucket = self._buckets[sender] = TokenBucket(float(self.burst), self.rate, now)
            while len(self._buckets) > self.max_senders:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(sender)
        was_refusing = bucket.refusing
        allowed = bucket.take(now)
        return allowed, not allowed and not was_refusing
