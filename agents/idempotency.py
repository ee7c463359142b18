"""Request ids an agent has seen, so that a repeated request returns the first outcome and never
runs twice.

A request id is scoped to its caller's bare JID and bound to what it asked for (op, addressed
resources and arguments): the same id for a different request is refused. Outcomes are kept in
memory for ``WINDOW`` seconds (at most ``ENTRIES``); the outcomes of destructive ops that were admitted
(authorized and started) are also written to SQLite in the agent's state directory, so a retry after
the agent restarted does not power a node off twice. A request never admitted (denied, undecodable,
unknown op, bad arguments; one refused by the intake is not even seen here) ran nothing, so its retry
after a restart has nothing to repeat: it leaves no row on disk, and a flood of them cannot fill the
disk. A request still running is never forgotten: a repeat waits for its outcome.

The file is read and written on its own thread (``agents.db.Store``), never on the event loop: a
destructive request is looked up on disk with :meth:`RequestLog.recall`, and its outcome is on disk
when the awaitable :meth:`RequestLog.finish` returns, before the agent answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from . import protocol
from .db import Store
from .errors import OpError, error_for

log = logging.getLogger(__name__)

WINDOW = 600.0  # seconds a finished request's outcome is kept for repeats
ENTRIES = 20_000
DURABLE_WINDOW = 24 * 3600.0  # destructive outcomes on disk: long enough for any sane retry

# The request log's schema versions (agents.db.migrate): the first is the schema it had before versions.
_MIGRATIONS = [("CREATE TABLE IF NOT EXISTS outcomes (caller TEXT, rid TEXT, fingerprint TEXT, payload TEXT,"
                " condition TEXT, text TEXT, at REAL, PRIMARY KEY (caller, rid))")]


@dataclass
class Answer:
    """A request's outcome as sent back: a quick op's encoded result or error, or a long op's job."""

    payload: str = ""
    error: OpError | None = None
    job: str = ""
    job_end: asyncio.Future[tuple[str, str, str]] | None = None  # (status, condition, encoded payload)
    admitted: bool = False  # authorized and started: only then may its outcome be kept on disk


@dataclass
class Seen:
    fingerprint: str
    answer: asyncio.Future[Answer]
    at: float = field(default=float("inf"))  # when it ended; running requests are never forgotten


def fingerprint(op: str, on: str, behalf: str, payload: str) -> str:
    """What a request asks for: its op, addressed resources, whom it is for, and its arguments."""
    return hashlib.sha256("\0".join((op, on, behalf, payload)).encode()).hexdigest()


class RequestLog:
    def __init__(self, path: Path | None = None) -> None:
        self._seen: OrderedDict[tuple[str, str], Seen] = OrderedDict()
        self._store: Store | None = None
        if path is not None:
            # FULL: a destructive op's outcome, once answered, must outlive a power cut too, or its
            # retry after one would run the op again.
            self._store = Store(path, _MIGRATIONS, name=f"requests {Path(path).name}", synchronous="FULL")
            self._store.submit(_forget_before, time.time() - DURABLE_WINDOW)

    def get(self, key: tuple[str, str]) -> Seen | None:
        """The request seen under ``key`` in this run (in memory)."""
        return self._seen.get(key)

    async def recall(self, key: tuple[str, str]) -> Seen | None:
        """The request seen under ``key``, in memory or on disk (where destructive ops are kept)."""
        seen = self._seen.get(key)
        if seen is not None or self._store is None:
            return seen
        row = await self._store.run(_outcome_of, key)
        seen = self._seen.get(key)  # the same request may have started while the disk was read
        if seen is None and row is not None:
            fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
            fut.set_result(Answer(payload=row[1]) if row[2] is None else Answer(error=error_for(row[2], row[3] or "")))
            seen = self._seen[key] = Seen(row[0], fut, time.monotonic())
        return seen

    def start(self, key: tuple[str, str], fp: str) -> Seen:
        seen = self._seen[key] = Seen(fp, asyncio.get_running_loop().create_future())
        return seen

    async def finish(self, key: tuple[str, str], seen: Seen, answer: Answer, durable: bool) -> None:
        """Give the request its answer (repeats waiting on it get it too); with ``durable``, an admitted
        quick op's outcome is on disk when this returns."""
        seen.answer.set_result(answer)
        self._seen.move_to_end(key)
        if answer.job_end is not None and not answer.job_end.done():
            # A long op is running until its job ends, however long that takes: never forgotten before.
            answer.job_end.add_done_callback(lambda _f: self._ended(key, seen))
        else:
            seen.at = time.monotonic()
        self._forget_old()
        if durable and answer.admitted and self._store is not None and not answer.job:
            err = answer.error
            await self._keep((*key, seen.fingerprint, answer.payload, err.condition if err else None,
                              err.text if err else None, time.time()))

    def _ended(self, key: tuple[str, str], seen: Seen) -> None:
        seen.at = time.monotonic()
        if key in self._seen:
            self._seen.move_to_end(key)

    async def finish_job(self, key: tuple[str, str], fp: str, end: tuple[str, str, str]) -> None:
        """Record a destructive long op's final outcome, once its job has ended."""
        if self._store is not None:
            status, condition, payload = end
            await self._keep((*key, fp, payload if status == "ok" else "", None if status == "ok" else condition,
                              None if status == "ok" else str(protocol.decode(payload)), time.time()))

    async def _keep(self, row: tuple[object, ...]) -> None:
        assert self._store is not None
        try:
            await self._store.run(_keep_outcome, row)
        except sqlite3.Error:  # the answer still goes out; only a retry after a restart could run it again
            log.exception("could not keep the outcome of request %s from %s on disk", row[1], row[0])

    def abandon(self, key: tuple[str, str], seen: Seen, error: OpError) -> None:
        """The run died without an outcome: fail any repeat waiting on it, and forget the id."""
        if not seen.answer.done():
            seen.answer.set_result(Answer(error=error))
        self._seen.pop(key, None)

    def _forget_old(self) -> None:
        # Entries are in the order they finished (finish moves them to the end); a running one met at
        # the front is passed over, never dropped.
        horizon = time.monotonic() - WINDOW
        for _ in range(len(self._seen)):
            key, oldest = next(iter(self._seen.items()))
            if oldest.at == float("inf"):
                self._seen.move_to_end(key)
            elif oldest.at > horizon and len(self._seen) <= ENTRIES:
                return
            else:
                del self._seen[key]

    def close(self) -> None:
        """Finish the writes handed over and close the file (waits here: for shutdown)."""
        if self._store is not None:
            self._store.close()

    async def aclose(self) -> None:
        """:meth:`close` without holding up the event loop."""
        if self._store is not None:
            await self._store.aclose()


def _forget_before(db: sqlite3.Connection, horizon: float) -> None:
    db.execute("DELETE FROM outcomes WHERE at < ?", (horizon,))


def _outcome_of(db: sqlite3.Connection, key: tuple[str, str]) -> tuple[str, str, str | None, str | None] | None:
    return db.execute("SELECT fingerprint, payload, condition, text FROM outcomes WHERE caller = ? AND rid = ?",
                      key).fetchone()


def _keep_outcome(db: sqlite3.Connection, row: tuple[object, ...]) -> None:
    db.execute("INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?, ?, ?, ?, ?)", row)
