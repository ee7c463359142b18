"""Scheduled checks: each runs on its own jittered interval, publishes every result, and raises an
alert when its state changes for good.

A change counts the way Nagios counts soft and hard states: a result in a new state is *soft*
until ``repeats`` results in a row agree, then the state is *hard* and one alert goes out
(OK → CRITICAL, and CRITICAL → OK when it recovers). A flapping check that never repeats its new
state enough raises nothing. The first result of a check sets its state without an alert, unless
it is not OK (then the problem is announced once it is hard).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from agents.monitor.ranges import State
from agents.monitor.runner import CheckResult
from agents.monitor.settings import ScheduledCheck

__all__ = ["StateChange", "StateTracker", "Scheduler", "next_delay"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StateChange:
    """A hard state change: ``previous`` is None for a first hard problem."""

    previous: State | None
    state: State


class StateTracker:
    """Soft/hard state bookkeeping for one check."""

    def __init__(self, repeats: int) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        self.repeats = repeats
        self.hard: State | None = None  # None until a first hard state
        self.soft: State | None = None
        self.attempt = 0

    @property
    def is_hard(self) -> bool:
        return self.soft == self.hard

    def observe(self, state: State) -> StateChange | None:
        """Feed one result's state; a StateChange when it makes a hard change."""
        if state == self.soft:
            self.attempt += 1
        else:
            self.soft, self.attempt = state, 1
        if state == self.hard or self.attempt < self.repeats:
            return None
        previous, self.hard = self.hard, state
        if previous is None and state is State.OK:
            return None  # starting healthy is not news
        return StateChange(previous, state)


def next_delay(interval: float, jitter: float, rng: random.Random = random._inst) -> float:
    """The wait before the next run: ``interval`` ± ``jitter`` of it, so agents started together
    do not run their checks in lockstep."""
    return max(0.0, interval * (1.0 + rng.uniform(-jitter, jitter)))


RunFn = Callable[[ScheduledCheck], Awaitable[CheckResult]]
PublishFn = Callable[[ScheduledCheck, CheckResult, StateTracker], Awaitable[None]]
AlertFn = Callable[[ScheduledCheck, CheckResult, StateChange], Awaitable[None]]


class Scheduler:
    """Runs every scheduled check in its own task until stopped."""

    def __init__(self, entries: tuple[ScheduledCheck, ...], run: RunFn, publish: PublishFn, alert: AlertFn) -> None:
        self.entries = entries
        self._run, self._publish, self._alert = run, publish, alert
        self.trackers = {e.name: StateTracker(e.repeats) for e in entries}
        self.last: dict[str, tuple[float, CheckResult]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(e), name=f"check {e.name}") for e in self.entries]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _loop(self, entry: ScheduledCheck) -> None:
        # The first run comes after a random part of one interval: a fleet restarted at once spreads out.
        await asyncio.sleep(random.uniform(0, entry.interval * max(entry.jitter, 0.05)))
        while True:
            try:
                await self.run_once(entry)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad run must not end the schedule
                log.exception("scheduled check %s failed", entry.name)
            await asyncio.sleep(next_delay(entry.interval, entry.jitter))

    async def run_once(self, entry: ScheduledCheck) -> CheckResult:
        result = await self._run(entry)
        tracker = self.trackers[entry.name]
        change = tracker.observe(result.state)
        self.last[entry.name] = (time.time(), result)
        # Publishing and alerting are best effort: the next run tries again.
        await asyncio.gather(self._publish(entry, result, tracker),
                             self._alert(entry, result, change) if change else asyncio.sleep(0),
                             return_exceptions=True)
        return result
