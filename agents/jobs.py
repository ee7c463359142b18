"""The long-running jobs an agent has accepted, kept on disk so that no caller is left in silence.

A job is written when its ``<accepted>`` is sent (who asked, for which op, under which request id,
where the outcome goes and until when that caller waits) and again when it ends (its outcome), and
once more when the caller's XEP-0184 receipt says the outcome arrived. After a crash or a kill the
agent finds the jobs that were still running: their coroutines are gone, so each is ended as
``interrupted`` and its outcome sent like any other, unless the job waits on work that carries on by
itself after a restart (``Job.work``: a replication update the replicator resumes), which the agent
follows again, so the job keeps running and ends with that work's real outcome. Ended jobs are kept
``RETENTION`` seconds, for ``job.status`` and for outcomes still on their way (docs/protocol.md 7.5).

The file is read and written on its own thread (``agents.db.Store``), never on the event loop.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

from . import protocol
from .db import Store
from .errors import Interrupted

RETENTION = 24 * 3600.0  # seconds an ended job is kept, as an op's durable outcome is (section 8)

_MIGRATIONS = [
    "CREATE TABLE jobs (job TEXT PRIMARY KEY, op TEXT, caller TEXT, sender TEXT, reply_to TEXT, rid TEXT,"
    " fingerprint TEXT, accepted_at REAL, deadline REAL, state TEXT, status TEXT, condition TEXT, payload TEXT,"
    " ended_at REAL, delivered INTEGER)",
    "ALTER TABLE jobs ADD COLUMN work TEXT NOT NULL DEFAULT ''",
    # Callers that repeated a job's request (another session of the same account), sent its outcome too.
    "CREATE TABLE attached (job TEXT, reply_to TEXT, rid TEXT, deadline REAL, delivered INTEGER NOT NULL DEFAULT 0,"
    " PRIMARY KEY (job, reply_to))",
]


@dataclass
class Job:
    """One accepted long op. ``caller`` is whom it runs for (the person, for a delegated request),
    ``sender`` the bare JID that sent it (the request log's key), ``reply_to`` the full JID its
    outcome goes to, ``deadline`` the caller's end (Unix time): the outcome is sent until then."""

    job: str
    op: str
    caller: str
    sender: str
    reply_to: str
    rid: str
    fingerprint: str
    accepted_at: float
    deadline: float
    state: str = "running"  # running, ended
    status: str = ""  # ok, failed, denied, timeout (the outcome's status attribute)
    condition: str = ""
    payload: str = ""  # base64 msgpack: the result, or the error sentence
    ended_at: float | None = None
    delivered: bool = False  # the caller's receipt for the outcome came back
    # The durable work the job waits on, named by the op ("replication r1a2b3c4d"): a restarted agent
    # that resumes it follows it again (Agent.follow_job) instead of reporting the job interrupted.
    work: str = ""

    @property
    def end(self) -> tuple[str, str, str]:
        """(status, condition, encoded payload), as the outcome message carries them."""
        return self.status, self.condition, self.payload

    def describe(self) -> dict[str, Any]:
        """What ``job.status`` answers about it."""
        out: dict[str, Any] = {"job": self.job, "op": self.op, "caller": self.caller, "rid": self.rid,
                               "state": self.state, "accepted_at": self.accepted_at, "ended_at": self.ended_at,
                               "delivered": self.delivered}
        if self.state == "ended":
            value = protocol.decode(self.payload)
            out.update({"status": self.status, "condition": self.condition or None,
                        "result" if self.status == "ok" else "error": value})
        return out


class JobStore:
    """The agent's jobs, in ``path`` (None: in memory only, for an agent without a state directory)."""

    def __init__(self, path: Path | None) -> None:
        # FULL: a job accepted, or ended, must still be known after a power cut, not only after a crash.
        self._store = Store(path, _MIGRATIONS, name=f"jobs {path.name if path else ':memory:'}", synchronous="FULL")
        self._store.submit(_forget_before, time.time() - RETENTION)

    async def accepted(self, job: Job) -> None:
        """On disk before its ``<accepted>`` is sent."""
        await self._store.run(_put, job)

    async def ended(self, job: Job, end: tuple[str, str, str]) -> None:
        job.state, job.ended_at = "ended", time.time()
        job.status, job.condition, job.payload = end
        await self._store.run(_put, job)

    async def delivered(self, job: Job) -> None:
        job.delivered = True
        await self._store.run(_put, job)

    async def follows(self, job: Job, work: str) -> None:
        job.work = work
        await self._store.run(_put, job)

    async def attach(self, job: str, reply_to: str, rid: str, deadline: float) -> None:
        """``reply_to`` repeated the job's request: its outcome goes there too, also after a restart."""
        await self._store.run(_attach, job, reply_to, rid, deadline)

    async def attached(self, job: str) -> list[tuple[str, str, float]]:
        """(reply_to, rid, deadline) of the callers attached to ``job`` that still wait for its outcome."""
        return await self._store.run(_attached, job, time.time())

    async def attached_undelivered(self) -> list[Job]:
        """For each ended job's attached caller still waiting for the outcome without a receipt: a copy of
        the job addressed to that caller (its reply_to, rid and deadline)."""
        return await self._store.run(_attached_undelivered, time.time())

    async def attached_delivered(self, job: str, reply_to: str) -> None:
        await self._store.run(_attached_delivered, job, reply_to)

    async def get(self, job_id: str) -> Job | None:
        return await self._store.run(_get, job_id)

    def left_running(self) -> list[Job]:
        """The jobs still marked running: the process that ran them is gone. Read once as the agent
        starts, before it can accept a job (so it waits here)."""
        return self._store.call(_running)

    def interrupt(self, job: Job, agent: str) -> None:
        """End as ``interrupted`` a job the previous run left running, whose work cannot go on."""
        text = (f"{agent} stopped while running {job.op} as job {job.job}; it may have done part of its work."
                " Look at what it changes, then run it again with a new request id if it is still wanted")
        job.state, job.ended_at = "ended", time.time()
        job.status, job.condition, job.payload = "failed", Interrupted.condition, protocol.encode(text)
        self._store.call(_put, job)

    async def undelivered(self) -> list[Job]:
        """Ended jobs whose outcome no receipt has confirmed yet, and whose caller still waits."""
        return await self._store.run(_undelivered, time.time())

    async def aclose(self) -> None:
        await self._store.aclose()


_COLUMNS = ", ".join(f.name for f in fields(Job))


def _row(row: tuple[Any, ...]) -> Job:
    job = Job(*row)
    job.delivered = bool(job.delivered)
    return job


def _put(db: sqlite3.Connection, job: Job) -> None:
    db.execute(f"INSERT OR REPLACE INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * len(fields(Job)))})",
               astuple(job))


def _get(db: sqlite3.Connection, job_id: str) -> Job | None:
    row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job = ?", (job_id,)).fetchone()
    return _row(row) if row else None


def _running(db: sqlite3.Connection) -> list[Job]:
    return [_row(r) for r in db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state = 'running'")]


def _undelivered(db: sqlite3.Connection, now: float) -> list[Job]:
    return [_row(r) for r in db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state = 'ended' AND NOT delivered"
                                        " AND deadline > ?", (now,))]


def _attach(db: sqlite3.Connection, job: str, reply_to: str, rid: str, deadline: float) -> None:
    db.execute("INSERT OR REPLACE INTO attached (job, reply_to, rid, deadline) VALUES (?, ?, ?, ?)",
               (job, reply_to, rid, deadline))


def _attached(db: sqlite3.Connection, job: str, now: float) -> list[tuple[str, str, float]]:
    return list(db.execute("SELECT reply_to, rid, deadline FROM attached WHERE job = ? AND NOT delivered"
                           " AND deadline > ?", (job, now)))


def _attached_undelivered(db: sqlite3.Connection, now: float) -> list[Job]:
    columns = ", ".join(f"a.{f.name}" if f.name in ("reply_to", "rid", "deadline") else f"j.{f.name}"
                        for f in fields(Job))
    return [_row(r) for r in db.execute(f"SELECT {columns} FROM jobs j JOIN attached a ON a.job = j.job"
                                        " WHERE j.state = 'ended' AND NOT a.delivered AND a.deadline > ?", (now,))]


def _attached_delivered(db: sqlite3.Connection, job: str, reply_to: str) -> None:
    db.execute("UPDATE attached SET delivered = 1 WHERE job = ? AND reply_to = ?", (job, reply_to))


def _forget_before(db: sqlite3.Connection, horizon: float) -> None:
    db.execute("DELETE FROM jobs WHERE state = 'ended' AND ended_at < ?", (horizon,))
    db.execute("DELETE FROM attached WHERE job NOT IN (SELECT job FROM jobs)")
