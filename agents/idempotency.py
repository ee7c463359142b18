"""Request ids an agent has seen, so that a repeated request returns the first outcome and never
runs twice.

A request id is scoped to its caller's bare JID and bound to what it asked for (op, addressed
resources and arguments): the same id for a different request is refused. Outcomes are kept in
memory for ``WINDOW`` seconds (at most ``ENTRIES``); the outcomes of admitted (authorized and started)
requests for ops that change state (effect ``change`` or ``destructive``) are also written to SQLite in
the agent's state directory and kept there for ``DURABLE_WINDOW``, so a retry after the agent restarted
neither powers a node off twice nor fails with ``exists`` on the volume its first run made. Reads are
kept in memory only: running one again changes nothing. A request never admitted (denied, undecodable,
unknown op, bad arguments; one refused by the intake is not even seen here) ran nothing, so its retry
after a restart has nothing to repeat: it leaves no row on disk, and a flood of them cannot fill the
disk. A request still running is never forgotten: a repeat waits for its outcome.

A quick op's outcome, once given, is kept as a plain tuple of strings (and its error, if it failed)
rather than the objects it was served with. The cyclic garbage collector does not track such tuples, so
a window full of outcomes costs it nothing; kept as objects, the 20,000 of a busy agent were most of
what every full collection walked, a pause of some 50 ms on the event loop each time (bench/README.md).

Before an op that changes state runs (a long op: before its job is accepted), :meth:`RequestLog.started`
puts a row on disk that already says ``interrupted``; its outcome replaces it. So an agent killed between
running the op and recording how it ended answers a repeat after its restart with ``interrupted`` (it may
or may not have taken effect; look, and use a new id to run it again) rather than running it a second
time. A request that turns out never to have started (it expired first, or its job could not be
recorded) has that row removed again.

The file is read and written on its own thread (``agents.db.Store``), never on the event loop: such a
request is looked up on disk with :meth:`RequestLog.recall`, and its outcome is on disk when the
awaitable :meth:`RequestLog.finish` returns, before the agent answers (a repeat waiting in memory gets it
only then too). Rows handed over while the thread is busy writing go to disk together, in one
transaction and one sync, so many requests at once do not wait for a sync each.
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
from .db import Store, transaction
from .errors import Interrupted, OpError, error_for

log = logging.getLogger(__name__)

WINDOW = 600.0  # seconds a finished request's outcome is kept for repeats
ENTRIES = 20_000
DURABLE_WINDOW = 24 * 3600.0  # outcomes of ops that change state, on disk: long enough for any sane retry
PRUNE_EVERY = 600.0  # seconds between deletions of rows older than DURABLE_WINDOW while the agent runs

# The request log's schema versions (agents.db.migrate): the first is the schema it had before versions;
# the second lets the rows past the window be found without reading them all, now that every change keeps one.
_MIGRATIONS = [("CREATE TABLE IF NOT EXISTS outcomes (caller TEXT, rid TEXT, fingerprint TEXT, payload TEXT,"
                " condition TEXT, text TEXT, at REAL, PRIMARY KEY (caller, rid))"),
               "CREATE INDEX IF NOT EXISTS outcomes_at ON outcomes (at)"]


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
    started: bool = False  # its "interrupted" row is on disk (RequestLog.started)


def fingerprint(op: str, on: str, behalf: str, payload: str) -> str:
    """What a request asks for: its op, addressed resources, whom it is for, and its arguments."""
    return hashlib.sha256("\0".join((op, on, behalf, payload)).encode()).hexdigest()


class RequestLog:
    def __init__(self, path: Path | None = None) -> None:
        # A running request (or job) as its Seen; a finished quick op as (fingerprint, payload, error, ended at).
        self._seen: OrderedDict[tuple[str, str], Seen | tuple[str, str, OpError | None, float]] = OrderedDict()
        self._store: Store | None = None
        self._pruned = time.monotonic()
        # Rows waiting for the next transaction, each with the future its writer awaits (group commit).
        self._waiting: list[tuple[tuple[object, ...], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        if path is not None:
            # FULL: an outcome, once answered, must outlive a power cut too, or a retry after one would
            # run the op again.
            self._store = Store(path, _MIGRATIONS, name=f"requests {Path(path).name}", synchronous="FULL")
            self._store.submit(_forget_before, time.time() - DURABLE_WINDOW)

    def get(self, key: tuple[str, str]) -> Seen | None:
        """The request seen under ``key`` in this run (in memory)."""
        seen = self._seen.get(key)
        if isinstance(seen, tuple):  # a finished quick op's outcome, kept compact (the module docstring says why)
            fp, payload, error, at = seen
            fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
            fut.set_result(Answer(payload=payload, error=error))
            return Seen(fp, fut, at)
        return seen

    async def recall(self, key: tuple[str, str]) -> Seen | None:
        """The request seen under ``key``, in memory or on disk (where ops that change state are kept)."""
        seen = self.get(key)
        if seen is not None or self._store is None:
            return seen
        row = await self._store.run(_outcome_of, key, time.time() - DURABLE_WINDOW)
        if key not in self._seen and row is not None:  # the same request may have started while the disk was read
            fp, payload, condition, text = row
            self._seen[key] = (fp, payload, None if condition is None else _recorded_error(condition, text),
                               time.monotonic())
        return self.get(key)

    async def started(self, key: tuple[str, str], fp: str, op: str, agent: str) -> None:
        """Put on disk, before an admitted op that changes state runs, that it was started: until its
        outcome replaces the row, a repeat after a restart is told it was interrupted, not run again."""
        seen = self._seen.get(key)
        if isinstance(seen, Seen):
            seen.started = True
        if self._store is not None:
            text = (f"{op} was started under request id {key[1]}, but {agent} stopped before it recorded how it"
                    " ended, so it may or may not have taken effect; it is not run again under this id. Look at"
                    " what it changes, then send it with a new request id if it is still wanted")
            await self._keep((*key, fp, "", Interrupted.condition, text, time.time()))

    def start(self, key: tuple[str, str], fp: str) -> Seen:
        seen = self._seen[key] = Seen(fp, asyncio.get_running_loop().create_future())
        return seen

    async def finish(self, key: tuple[str, str], seen: Seen, answer: Answer, durable: bool) -> None:
        """Give the request its answer (repeats waiting on it get it too); with ``durable``, an admitted
        quick op's outcome is on disk first, before anyone is answered. One that was not admitted after
        all (its long op's job could not be recorded) ran nothing, and leaves no row either."""
        if durable and answer.admitted and self._store is not None and not answer.job:
            err = answer.error
            await self._keep((*key, seen.fingerprint, answer.payload, err.condition if err else None,
                              err.text if err else None, time.time()))
        elif not answer.admitted and seen.started and self._store is not None:
            self._store.submit(_forget, key)
        seen.answer.set_result(answer)
        self._seen.move_to_end(key)
        if answer.job_end is not None and not answer.job_end.done():
            # A long op is running until its job ends, however long that takes: never forgotten before.
            answer.job_end.add_done_callback(lambda _f: self._ended(key, seen))
        elif answer.job:
            seen.at = time.monotonic()
        elif self._seen.get(key) is seen:
            _drop_frames(answer.error)
            self._seen[key] = (seen.fingerprint, answer.payload, answer.error, time.monotonic())
        self._forget_old()

    def follow(self, key: tuple[str, str], fp: str, answer: Answer) -> None:
        """After a restart: the request under ``key`` is a job the agent follows again (its work resumed),
        so a repeat attaches to the job instead of being told the ``interrupted`` its row says until the
        job's outcome replaces it (:meth:`finish_job`)."""
        seen = self.start(key, fp)
        seen.started = True
        seen.answer.set_result(answer)
        assert answer.job_end is not None, "a job's answer carries its end"
        answer.job_end.add_done_callback(lambda _f: self._ended(key, seen))

    def _ended(self, key: tuple[str, str], seen: Seen) -> None:
        seen.at = time.monotonic()
        if key in self._seen:
            self._seen.move_to_end(key)

    async def finish_job(self, key: tuple[str, str], fp: str, end: tuple[str, str, str]) -> None:
        """Record the final outcome of a long op that changes state, once its job has ended."""
        if self._store is not None:
            status, condition, payload = end
            await self._keep((*key, fp, payload if status == "ok" else "", None if status == "ok" else condition,
                              None if status == "ok" else str(protocol.decode(payload)), time.time()))

    async def _keep(self, row: tuple[object, ...]) -> None:
        """Put ``row`` on disk; returns once it is synced (with the rows handed over meanwhile)."""
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((row, written))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_waiting())
        await asyncio.shield(written)  # a cancelled request does not take the others' write with it

    async def _write_waiting(self) -> None:
        assert self._store is not None
        while self._waiting:
            batch, self._waiting = self._waiting, []
            if time.monotonic() - self._pruned > PRUNE_EVERY:  # the window holds while the agent runs, too
                self._pruned = time.monotonic()
                self._store.submit(_forget_before, time.time() - DURABLE_WINDOW)
            try:
                await self._store.run(_keep_outcomes, [row for row, _ in batch])
            except sqlite3.Error:  # the answers still go out; only a retry after a restart could run them again
                log.exception("could not keep the outcomes of %d requests on disk (the first: %s from %s)",
                              len(batch), batch[0][0][1], batch[0][0][0])
            for _, written in batch:
                if not written.done():
                    written.set_result(None)

    def abandon(self, key: tuple[str, str], seen: Seen, error: OpError, *, ran: bool = True) -> None:
        """The run died without an outcome: fail any repeat waiting on it, and forget the id. A request
        that certainly never ran (``ran`` false: it expired before it began) leaves nothing on disk
        either, so a retry under its id, in time, may run it; one that may have run keeps the row that
        says it was interrupted."""
        if not seen.answer.done():
            seen.answer.set_result(Answer(error=error))
        self._seen.pop(key, None)
        if not ran and seen.started and self._store is not None:
            self._store.submit(_forget, key)  # before any later read of it: the store runs work in order

    def _forget_old(self) -> None:
        # Entries are in the order they finished (finish moves them to the end); a running one met at
        # the front is passed over, never dropped.
        horizon = time.monotonic() - WINDOW
        for _ in range(len(self._seen)):
            key, oldest = next(iter(self._seen.items()))
            at = oldest[-1] if isinstance(oldest, tuple) else oldest.at
            if at == float("inf"):
                self._seen.move_to_end(key)
            elif at > horizon and len(self._seen) <= ENTRIES:
                return
            else:
                del self._seen[key]

    def close(self) -> None:
        """Finish the writes handed over and close the file (waits here: for shutdown)."""
        if self._store is not None:
            self._store.close()

    async def aclose(self) -> None:
        """:meth:`close` without holding up the event loop."""
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)  # what was handed over is written
        if self._store is not None:
            await self._store.aclose()


def _forget_before(db: sqlite3.Connection, horizon: float) -> None:
    db.execute("DELETE FROM outcomes WHERE at < ?", (horizon,))


def _forget(db: sqlite3.Connection, key: tuple[str, str]) -> None:
    db.execute("DELETE FROM outcomes WHERE caller = ? AND rid = ?", key)


def _outcome_of(db: sqlite3.Connection, key: tuple[str, str], horizon: float
                ) -> tuple[str, str, str | None, str | None] | None:
    return db.execute("SELECT fingerprint, payload, condition, text FROM outcomes WHERE caller = ? AND rid = ?"
                      " AND at >= ?", (*key, horizon)).fetchone()


def _recorded_error(condition: str, text: str | None) -> OpError:
    """The error a request ended in, rebuilt from its record: with the condition it was answered with,
    also one this module does not know (a storage agent's ``exists``), which would otherwise come back as
    a plain ``failed``."""
    error = error_for(condition, text or "")
    if error.condition != condition:
        error.condition = condition
    return error


def _keep_outcomes(db: sqlite3.Connection, rows: list[tuple[object, ...]]) -> None:
    with transaction(db):
        db.executemany("INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?, ?, ?, ?, ?)", rows)


def _drop_frames(error: BaseException | None) -> None:
    """Clear the tracebacks of ``error`` and of the exceptions it was raised from or while handling: their
    frames (and every local of each, a read buffer say) are of no use to a repeat, and a kept outcome
    would keep them alive. The chain itself, and each message, stay."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]   # an ExceptionGroup's too
