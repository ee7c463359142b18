"""Durable workflow state: instances, their steps and their history, in SQLite in the broker's state dir.

What must survive a broker restart is exactly what decides whether a step may run again: a step's
state moves pending -> (waiting | held) -> running -> ok | failed, and the move to ``running`` is
written, together with the ``performed`` event the constraints read, before the request leaves
the broker. A restarted broker therefore finds a step either not started (it runs normally), or
``running`` (it was in flight: it is sent again with the same request id, and the agent answers
with the first outcome instead of running it again), or finished (it is never sent again).

The history (``requested``, ``approved``, ``performed`` events) is what
:mod:`broker.constraints` checks separation of duty, the two-person rule and binding of duty over.

The engine sees the state through :class:`WorkflowState`, whose methods are all awaited: the SQLite
store runs its statements on a thread of its own, and a store on another backend answers the same
methods.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from agents.db import Store, transaction

from .constraints import PERFORMED, REQUESTED, Event

FINISHED = ("done", "failed", "cancelled")  # instance states that never change again

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY, workflow TEXT NOT NULL, requester TEXT NOT NULL, params TEXT NOT NULL,
    plan TEXT NOT NULL, state TEXT NOT NULL, error TEXT NOT NULL DEFAULT '', created REAL NOT NULL,
    updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS instances_state ON instances (state, created);
CREATE TABLE IF NOT EXISTS steps (
    instance TEXT NOT NULL, step TEXT NOT NULL, state TEXT NOT NULL, performer TEXT NOT NULL DEFAULT '',
    target TEXT NOT NULL DEFAULT '', rate_taken INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    outcome TEXT NOT NULL DEFAULT '', result TEXT NOT NULL DEFAULT 'null', reason TEXT NOT NULL DEFAULT '',
    started REAL, ended REAL, PRIMARY KEY (instance, step));
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, instance TEXT NOT NULL, kind TEXT NOT NULL, step TEXT NOT NULL,
    actor TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_instance ON events (instance, seq);
"""


# The store's schema versions (agents.db.migrate): the first is the schema it had before versions.
_MIGRATIONS = [_SCHEMA]


class WorkflowState(Protocol):
    """What the workflow engine needs of a store of workflow state, every method awaited (a store
    never makes the event loop wait for its disk or its network). :class:`WorkflowStore` keeps it in
    SQLite; another backend (a distributed key-value store) implements the same methods.

    Rows are plain dicts: an instance has ``id, workflow, requester, params, plan, state, error,
    created, updated``; a step has ``instance, step, state, performer, target, rate_taken, attempts,
    outcome, result, reason, started, ended``."""

    async def create(self, iid: str, workflow: str, requester: str, params: dict[str, Any], plan: list,
                     steps: Iterable[str]) -> None: ...
    async def instance(self, iid: str) -> dict[str, Any] | None: ...
    async def instances(self, state: str = "", limit: int = 50) -> list[dict[str, Any]]: ...
    async def unfinished(self) -> list[str]: ...
    async def set_instance(self, iid: str, state: str, error: str = "") -> None: ...
    async def step(self, iid: str, step: str) -> dict[str, Any]: ...
    async def steps(self, iid: str) -> dict[str, dict[str, Any]]: ...
    async def set_step(self, iid: str, step: str, **fields: Any) -> None: ...
    async def start_step(self, iid: str, step: str, performer: str, target: str) -> dict[str, Any]: ...
    async def add_event(self, iid: str, kind: str, step: str, actor: str) -> None: ...
    async def history(self, iid: str) -> list[Event]: ...
    async def aclose(self) -> None: ...


# The columns set_step may change (the others are the step's identity).
STEP_FIELDS = frozenset({"state", "performer", "target", "rate_taken", "attempts", "outcome", "result", "reason",
                         "started", "ended"})


class WorkflowStore:
    """:class:`WorkflowState` in one SQLite file, every statement on the file's own thread
    (``agents.db.Store``)."""

    def __init__(self, path: Path | None) -> None:
        # A step marked running must be on disk before its request leaves: FULL, not NORMAL.
        self.store = Store(path, _MIGRATIONS, name="workflows", synchronous="FULL", row_factory=sqlite3.Row)

    async def aclose(self) -> None:
        await self.store.aclose()

    def close(self) -> None:
        self.store.close()

    # -- instances -----------------------------------------------------------------------------

    async def create(self, iid: str, workflow: str, requester: str, params: dict[str, Any], plan: list,
                     steps: Iterable[str]) -> None:
        """A new instance, every step pending and requested by the requester, in one transaction."""
        await self.store.run(_create, iid, workflow, requester, json.dumps(params), json.dumps(plan), list(steps))

    async def instance(self, iid: str) -> dict[str, Any] | None:
        return await self.store.run(_instance, iid)

    async def instances(self, state: str = "", limit: int = 50) -> list[dict[str, Any]]:
        return await self.store.run(_instances, state, limit)

    async def unfinished(self) -> list[str]:
        return await self.store.run(_unfinished)

    async def set_instance(self, iid: str, state: str, error: str = "") -> None:
        await self.store.run(_set_instance, iid, state, error)

    # -- steps and history ---------------------------------------------------------------------

    async def step(self, iid: str, step: str) -> dict[str, Any]:
        return await self.store.run(_step, iid, step)

    async def steps(self, iid: str) -> dict[str, dict[str, Any]]:
        return await self.store.run(_steps, iid)

    async def set_step(self, iid: str, step: str, **fields: Any) -> None:
        unknown = set(fields) - STEP_FIELDS
        if unknown:  # column names go into the statement: only the known ones
            raise ValueError(f"a step has no field {', '.join(sorted(unknown))}")
        if "result" in fields:
            fields["result"] = json.dumps(fields["result"], default=str)
        await self.store.run(_set_step, iid, step, fields)

    async def start_step(self, iid: str, step: str, performer: str, target: str) -> dict[str, Any]:
        """The point of no return: the performed event and the running state, written together; the
        step's row as written."""
        return await self.store.run(_start_step, iid, step, performer, target)

    async def add_event(self, iid: str, kind: str, step: str, actor: str) -> None:
        await self.store.run(_add_event, iid, kind, step, actor)

    async def history(self, iid: str) -> list[Event]:
        return await self.store.run(_history, iid)


# -- the statements, each run on the store's thread ------------------------------------------------

def _create(db: sqlite3.Connection, iid: str, workflow: str, requester: str, params: str, plan: str,
            steps: list[str]) -> None:
    now = time.time()
    with transaction(db):
        db.execute("INSERT INTO instances VALUES (?, ?, ?, ?, ?, 'running', '', ?, ?)",
                   (iid, workflow, requester, params, plan, now, now))
        for step in steps:
            db.execute("INSERT INTO steps (instance, step, state) VALUES (?, ?, 'pending')", (iid, step))
            db.execute("INSERT INTO events (instance, kind, step, actor, at) VALUES (?, ?, ?, ?, ?)",
                       (iid, REQUESTED, step, requester, now))


def _instance(db: sqlite3.Connection, iid: str) -> dict[str, Any] | None:
    row = db.execute("SELECT * FROM instances WHERE id = ?", (iid,)).fetchone()
    if row is None:
        return None
    out = dict(row)
    out["params"], out["plan"] = json.loads(out["params"]), json.loads(out["plan"])
    return out


def _instances(db: sqlite3.Connection, state: str, limit: int) -> list[dict[str, Any]]:
    sql = "SELECT id, workflow, requester, state, error, created, updated FROM instances"
    rows = db.execute(sql + (" WHERE state = ?" if state else "") + " ORDER BY created DESC LIMIT ?",
                      ((state,) if state else ()) + (limit,))
    return [dict(r) for r in rows]


def _unfinished(db: sqlite3.Connection) -> list[str]:
    return [r[0] for r in db.execute(
        f"SELECT id FROM instances WHERE state NOT IN ({','.join('?' * len(FINISHED))}) ORDER BY created",
        FINISHED)]


def _set_instance(db: sqlite3.Connection, iid: str, state: str, error: str) -> None:
    db.execute("UPDATE instances SET state = ?, error = ?, updated = ? WHERE id = ?", (state, error, time.time(), iid))


def _step(db: sqlite3.Connection, iid: str, step: str) -> dict[str, Any]:
    row = db.execute("SELECT * FROM steps WHERE instance = ? AND step = ?", (iid, step)).fetchone()
    out = dict(row)
    out["result"] = json.loads(out["result"])
    return out


def _steps(db: sqlite3.Connection, iid: str) -> dict[str, dict[str, Any]]:
    rows = db.execute("SELECT * FROM steps WHERE instance = ?", (iid,))
    return {r["step"]: dict(r, result=json.loads(r["result"])) for r in rows}


def _set_step(db: sqlite3.Connection, iid: str, step: str, fields: dict[str, Any]) -> None:
    cols = ", ".join(f"{k} = ?" for k in fields)
    db.execute(f"UPDATE steps SET {cols} WHERE instance = ? AND step = ?", (*fields.values(), iid, step))


def _start_step(db: sqlite3.Connection, iid: str, step: str, performer: str, target: str) -> dict[str, Any]:
    now = time.time()
    with transaction(db):
        db.execute("INSERT INTO events (instance, kind, step, actor, at) VALUES (?, ?, ?, ?, ?)",
                   (iid, PERFORMED, step, performer, now))
        db.execute("UPDATE steps SET state = 'running', performer = ?, target = ?, started = ?,"
                   " reason = '' WHERE instance = ? AND step = ?", (performer, target, now, iid, step))
        return _step(db, iid, step)


def _add_event(db: sqlite3.Connection, iid: str, kind: str, step: str, actor: str) -> None:
    db.execute("INSERT INTO events (instance, kind, step, actor, at) VALUES (?, ?, ?, ?, ?)",
               (iid, kind, step, actor, time.time()))


def _history(db: sqlite3.Connection, iid: str) -> list[Event]:
    return [Event(r["kind"], r["step"], r["actor"], r["at"]) for r in db.execute(
        "SELECT kind, step, actor, at FROM events WHERE instance = ? ORDER BY seq", (iid,))]
