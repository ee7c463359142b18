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
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from . import protocol
from .errors import OpError, error_for

WINDOW = 600.0  # seconds a finished request's outcome is kept for repeats
ENTRIES = 20_000
DURABLE_WINDOW = 24 * 3600.0  # destructive outcomes on disk: long enough for any sane retry


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
        self._db: sqlite3.Connection | None = None
        if path is not None:
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("CREATE TABLE IF NOT EXISTS outcomes (caller TEXT, rid TEXT, fingerprint TEXT,"
                             " payload TEXT, condition TEXT, text TEXT, at REAL, PRIMARY KEY (caller, rid))")
            self._db.execute("DELETE FROM outcomes WHERE at < ?", (time.time() - DURABLE_WINDOW,))

    def get(self, key: tuple[str, str], durable: bool) -> Seen | None:
        """The request seen under ``key``; on disk too when ``durable`` (only destructive ops are kept there)."""
        seen = self._seen.get(key)
        if seen is None and durable and self._db is not None:
            row = self._db.execute("SELECT fingerprint, payload, condition, text FROM outcomes"
                                   " WHERE caller = ? AND rid = ?", key).fetchone()
            if row is not None:
                fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
                fut.set_result(Answer(payload=row[1]) if row[2] is None else
                               Answer(error=error_for(row[2], row[3])))
                seen = self._seen[key] = Seen(row[0], fut, time.monotonic())
        return seen

    def start(self, key: tuple[str, str], fp: str) -> Seen:
        seen = self._seen[key] = Seen(fp, asyncio.get_running_loop().create_future())
        return seen

    def finish(self, key: tuple[str, str], seen: Seen, answer: Answer, durable: bool) -> None:
        seen.answer.set_result(answer)
        self._seen.move_to_end(key)
        if answer.job_end is not None and not answer.job_end.done():
            # A long op is running until its job ends, however long that takes: never forgotten before.
            answer.job_end.add_done_callback(lambda _f: self._ended(key, seen))
        else:
            seen.at = time.monotonic()
        if durable and answer.admitted and self._db is not None and not answer.job:
            err = answer.error
            self._db.execute("INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (*key, seen.fingerprint, answer.payload, err.condition if err else None,
                              err.text if err else None, time.time()))
        self._forget_old()

    def _ended(self, key: tuple[str, str], seen: Seen) -> None:
        seen.at = time.monotonic()
        if key in self._seen:
            self._seen.move_to_end(key)

    def finish_job(self, key: tuple[str, str], fp: str, end: tuple[str, str, str]) -> None:
        """Record a destructive long op's final outcome, once its job has ended."""
        if self._db is not None:
            status, condition, payload = end
            self._db.execute("INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (*key, fp, payload if status == "ok" else "", None if status == "ok" else condition,
                              None if status == "ok" else str(protocol.decode(payload)), time.time()))

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
        if self._db is not None:
            self._db.close()
