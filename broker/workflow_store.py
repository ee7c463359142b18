"""Durable workflow state: instances, their steps and their history, in SQLite in the broker's state dir.

What must survive a broker restart is exactly what decides whether a step may run again: a step's
state moves pending -> (waiting | held) -> running -> ok | failed, and the move to ``running`` is
written, together with the ``performed`` event the constraints read, before the request leaves
the broker. A restarted broker therefore finds a step either not started (it runs normally), or
``running`` (it was in flight: it is sent again with the same request id, and the agent answers
with the first outcome instead of running it again), or finished (it is never sent again).

The history (``requested``, ``approved``, ``performed`` events) is what
:mod:`broker.constraints` checks separation of duty, the two-person rule and binding of duty over.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

from agents.db import open_db

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


class WorkflowStore:
    def __init__(self, path: Path | None) -> None:
        # A step marked running must be on disk before its request leaves: FULL, not NORMAL.
        self.db = open_db(path, _MIGRATIONS, synchronous="FULL", row_factory=sqlite3.Row)

    def close(self) -> None:
        self.db.close()

    def _tx(self) -> "_Tx":
        return _Tx(self.db)

    # -- instances -----------------------------------------------------------------------------

    def create(self, iid: str, workflow: str, requester: str, params: dict[str, Any], plan: list,
               steps: Iterable[str]) -> None:
        """A new instance, every step pending and requested by the requester, in one transaction."""
        now = time.time()
        with self._tx():
            self.db.execute("INSERT INTO instances VALUES (?, ?, ?, ?, ?, 'running', '', ?, ?)",
                            (iid, workflow, requester, json.dumps(params), json.dumps(plan), now, now))
            for step in steps:
                self.db.execute("INSERT INTO steps (instance, step, state) VALUES (?, ?, 'pending')", (iid, step))
                self.db.execute("INSERT INTO events (instance, kind, step, actor, at) VALUES (?, ?, ?, ?, ?)",
                                (iid, REQUESTED, step, requester, now))

    def instance(self, iid: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM instances WHERE id = ?", (iid,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        out["params"], out["plan"] = json.loads(out["params"]), json.loads(out["plan"])
        return out

    def instances(self, state: str = "", limit: int = 50) -> list[dict[str, Any]]:
        sql = "SELECT id, workflow, requester, state, error, created, updated FROM instances"
        rows = self.db.execute(sql + (" WHERE state = ?" if state else "") + " ORDER BY created DESC LIMIT ?",
                               ((state,) if state else ()) + (limit,))
        return [dict(r) for r in rows]

    def unfinished(self) -> list[str]:
        return [r[0] for r in self.db.execute(
            f"SELECT id FROM instances WHERE state NOT IN ({','.join('?' * len(FINISHED))}) ORDER BY created",
            FINISHED)]

    def set_instance(self, iid: str, state: str, error: str = "") -> None:
        self.db.execute("UPDATE instances SET state = ?, error = ?, updated = ? WHERE id = ?",
                        (state, error, time.time(), iid))

    # -- steps and history ---------------------------------------------------------------------

    def step(self, iid: str, step: str) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM steps WHERE instance = ? AND step = ?", (iid, step)).fetchone()
        out = dict(row)
        out["result"] = json.loads(out["result"])
        return out

    def steps(self, iid: str) -> dict[str, dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM steps WHERE instance = ?", (iid,))
        return {r["step"]: dict(r, result=json.loads(r["result"])) for r in rows}

    def set_step(self, iid: str, step: str, **fields: Any) -> None:
        if "result" in fields:
            fields["result"] = json.dumps(fields["result"], default=str)
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE steps SET {cols} WHERE instance = ? AND step = ?", (*fields.values(), iid, step))

    def start_step(self, iid: str, step: str, performer: str, target: str) -> None:
        """The point of no return: the performed event and the running state, written together."""
        now = time.time()
        with self._tx():
            self.db.execute("INSERT INTO events (instance, kind, step, actor, at) VALUES (?, ?, ?, ?, ?)",
                            (iid, PERFORMED, step, performer, now))
            self.db.execute("UPDATE steps SET state = 'running', performer = ?, target = ?, started = ?,"
                            " reason = '' WHERE instance = ? AND step = ?", (performer, target, now, iid, step))

    def add_event(self, iid: str, kind: str, step: str, actor: str) -> None:
        self.db.execute("INSERT INTO events (instance, kind, step, actor, at) VALUES (?, ?, ?, ?, ?)",
                        (iid, kind, step, actor, time.time()))

    def history(self, iid: str) -> list[Event]:
        return [Event(r["kind"], r["step"], r["actor"], r["at"]) for r in self.db.execute(
            "SELECT kind, step, actor, at FROM events WHERE instance = ? ORDER BY seq", (iid,))]


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
