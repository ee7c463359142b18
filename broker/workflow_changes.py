"""Changes of workflow instances as they happen, so a follower is told instead of asking again and again.

The engine's store (``WorkflowState``) is wrapped by :class:`AnnouncingStore`: every write to an instance
(its creation, its state, a step's state, an approval or a performer) wakes whoever waits on that
instance in :class:`Changes`. ``workflow.status`` with ``wait`` and ``since`` (the ``changes`` digest of
the status the caller already has) answers as soon as the instance differs from it, so
`vertebra workflow status ID --follow` shows each step as it happens with one request per change.

A running step's progress reports (bytes of a snapshot or a clone) are kept too, the last one of each of
the newest ``PROGRESS_KEPT`` steps, in memory: the status shows it with its step, and each is a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections import OrderedDict
from typing import Any, Iterable, Iterator

from .constraints import Event
from .workflow_store import WorkflowState


PROGRESS_KEPT = 1000  # steps whose last progress report is kept for the status, newest first


class Changes:
    """Who waits for which instance (only waiters are kept), and the last progress report of the newest
    steps (at most ``PROGRESS_KEPT``): nothing grows with the instances."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._progress: OrderedDict[str, Any] = OrderedDict()  # by step rid, the newest last

    def step_progress(self, iid: str, rid: str, _target: str, _seq: int, payload: Any) -> None:
        """A progress report of the step ``rid`` of instance ``iid`` (an ``Actor.request`` progress callback)."""
        self._progress[rid] = payload
        self._progress.move_to_end(rid)
        while len(self._progress) > PROGRESS_KEPT:
            self._progress.popitem(last=False)
        self.changed(iid)

    def last_progress(self, rid: str) -> Any:
        """The step's last progress report, if it sent one lately (None otherwise)."""
        return self._progress.get(rid)

    def changed(self, iid: str) -> None:
        for waiter in self._waiters.get(iid, ()):
            waiter.set()

    @contextlib.contextmanager
    def watching(self, iid: str) -> Iterator[asyncio.Event]:
        """An event set at each change of ``iid`` from now on (registered before the caller reads the
        instance, so a change between that reading and the wait is not missed)."""
        waiter = asyncio.Event()
        self._waiters.setdefault(iid, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._waiters[iid]
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[iid]


def digest(status: dict[str, Any]) -> str:
    """A short digest of an instance's status (without its own digest): equal when nothing changed."""
    plain = {k: v for k, v in status.items() if k != "changes"}
    return hashlib.blake2b(json.dumps(plain, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


class AnnouncingStore:
    """A :class:`WorkflowState` that tells :class:`Changes` of every write to an instance."""

    def __init__(self, store: WorkflowState, changes: Changes) -> None:
        self.store, self.changes = store, changes

    async def create(self, iid: str, workflow: str, requester: str, params: dict[str, Any], plan: list,
                     steps: Iterable[str]) -> None:
        await self.store.create(iid, workflow, requester, params, plan, steps)
        self.changes.changed(iid)

    async def instance(self, iid: str) -> dict[str, Any] | None:
        return await self.store.instance(iid)

    async def instances(self, state: str = "", limit: int = 50) -> list[dict[str, Any]]:
        return await self.store.instances(state, limit)

    async def unfinished(self) -> list[str]:
        return await self.store.unfinished()

    async def set_instance(self, iid: str, state: str, error: str = "") -> None:
        await self.store.set_instance(iid, state, error)
        self.changes.changed(iid)

    async def step(self, iid: str, step: str) -> dict[str, Any]:
        return await self.store.step(iid, step)

    async def steps(self, iid: str) -> dict[str, dict[str, Any]]:
        return await self.store.steps(iid)

    async def set_step(self, iid: str, step: str, **fields: Any) -> None:
        await self.store.set_step(iid, step, **fields)
        self.changes.changed(iid)

    async def start_step(self, iid: str, step: str, performer: str, target: str) -> dict[str, Any]:
        row = await self.store.start_step(iid, step, performer, target)
        self.changes.changed(iid)
        return row

    async def add_event(self, iid: str, kind: str, step: str, actor: str) -> None:
        await self.store.add_event(iid, kind, step, actor)
        self.changes.changed(iid)

    async def history(self, iid: str) -> list[Event]:
        return await self.store.history(iid)

    async def aclose(self) -> None:
        await self.store.aclose()
