"""How an actor takes in requests from many senders: a per-sender token bucket, and per-sender fair
queuing in front of a bounded number of requests being served at once.

One account sending thousands of requests must not delay everyone else's: each sender has its own
queue, served round robin (one request from each sender with one waiting, in turn), a sender holds
at most half the serving slots, and a sender over its rate or with a full queue is refused at once,
before anything about the request is decoded, logged or remembered (docs/protocol.md 3.2, 10).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, Generic, TypeVar

from .ratelimit import RateLimit

log = logging.getLogger(__name__)

Item = TypeVar("Item")


@dataclass(frozen=True)
class IntakeLimits:
    """An agent's request intake, as the mesh file's ``agents[].requests`` sets it (config.py)."""

    # Generous, because one account may speak for many (the broker running workflows, the chat bot,
    # the gateway's agent for every local program); the queue bound and the round robin do the rest.
    burst: int = 2000  # requests a sender may send at once ...
    per_second: float = 2000.0  # ... and then steadily
    queued: int = 200  # requests of one sender waiting to be served; more are refused
    running: int = 64  # requests served at once, of all senders (a sender holds at most half)


class FairIntake(Generic[Item]):
    """Serves items with ``serve``, at most ``limits.running`` at once, taking the next one round robin
    over the senders that have one waiting."""

    def __init__(self, serve: Callable[[Item], Awaitable[Any]], limits: IntakeLimits = IntakeLimits(),
                 max_senders: int = 10_000,
                 spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]] | None = None) -> None:
        self.serve, self.limits = serve, limits
        # Who runs each item's task: an actor's ``spawn``, so that stopping the actor cancels them.
        self.spawn = spawn or (lambda coro: asyncio.get_running_loop().create_task(coro))
        self.per_sender_running = max(1, limits.running // 2)
        self.rate = RateLimit(limits.burst, limits.per_second, max_senders)
        self.max_senders = max_senders
        self._waiting: OrderedDict[str, deque[Item]] = OrderedDict()  # senders in round-robin order
        self._running: Counter[str] = Counter()
        self._busy = 0
        self.tasks: set[asyncio.Task[Any]] = set()

    def offer(self, sender: str, item: Item) -> bool:
        """Take ``item`` to be served, or refuse it (False) when ``sender`` is over its rate or queue."""
        if not self.rate.take(sender)[0]:
            return False
        queue = self._waiting.get(sender)
        if queue is None:
            if self._busy < self.limits.running and self._running[sender] < self.per_sender_running:
                self._start(sender, item)
                return True
            if len(self._waiting) >= self.max_senders:
                return False
            queue = self._waiting[sender] = deque()
        if len(queue) >= self.limits.queued:
            return False
        queue.append(item)
        return True

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def _start(self, sender: str, item: Item) -> None:
        self._busy += 1
        self._running[sender] += 1
        task = self.spawn(self.serve(item))  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._done(sender, t))

    def _done(self, sender: str, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        self._busy -= 1
        self._running[sender] -= 1
        if not self._running[sender]:
            del self._running[sender]
        if not task.cancelled() and task.exception() is not None:
            log.error("serving a request from %s failed", sender, exc_info=task.exception())
        self._next()

    def _next(self) -> None:
        # The first sender in turn that may run one more goes, then to the back of the line.
        while self._busy < self.limits.running:
            sender = next((s for s in self._waiting if self._running[s] < self.per_sender_running), None)
            if sender is None:
                return
            queue = self._waiting.pop(sender)
            item = queue.popleft()
            if queue:
                self._waiting[sender] = queue
            self._start(sender, item)
