"""Durable replication state in the agent's state directory (one SQLite file): the actions this agent
replicates as a source, and the packages (with the transfers spooling into them) it holds as a target.
Everything a restarted agent needs to carry on lives here: an action's schedule, throttle, pause flag, the
last snapshot both sides hold, and the update in flight (its snapshot, base and transfer id), so that a
resumed update regenerates the very same stream.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from agents.db import open_db
from agents.storage.driver import StorageError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS actions(
    id TEXT PRIMARY KEY, volume TEXT NOT NULL, target TEXT NOT NULL, package TEXT NOT NULL,
    interval REAL NOT NULL, continuous INTEGER NOT NULL, tls INTEGER NOT NULL, rate REAL,
    paused INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL DEFAULT 0, last_snap TEXT, last_end REAL,
    pending TEXT, state TEXT NOT NULL DEFAULT 'idle', error TEXT, last TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS packages(
    name TEXT PRIMARY KEY, action TEXT NOT NULL, source TEXT NOT NULL, source_volume TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS transfers(
    id TEXT PRIMARY KEY, package TEXT NOT NULL, snapshot TEXT NOT NULL, opened REAL NOT NULL);
"""


@dataclass
class Action:
    id: str
    volume: str
    target: str                     # full JID of the target storage agent
    package: str
    interval: float                 # seconds between scheduled updates; 0 = on demand only
    continuous: bool                # start the next update as soon as one ends
    tls: bool
    rate: float | None              # bytes per second; None = unthrottled
    created: float
    paused: bool = False
    seq: int = 0                    # number of the last snapshot taken for this action
    last_snap: str | None = None    # the last snapshot both sides hold
    last_end: float | None = None
    pending: dict[str, Any] | None = None    # the update in flight: seq, snap, transfer, base
    state: str = "idle"             # idle | running | paused | error
    error: str | None = None
    last: dict[str, Any] | None = None       # figures of the last completed update

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Package:
    name: str
    action: str
    source: str                     # bare JID of the source agent; only it may send into the package
    source_volume: str
    created: float


class ReplicationState:
    """Actions and packages in one SQLite file; every change is committed before it is acted on."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Implicit transactions, committed by the methods below; the directory also receives packages,
        # so its mode is left as it is.
        self.db = open_db(path, [_SCHEMA], synchronous="FULL", private=False, isolation_level="DEFERRED")

    def close(self) -> None:
        self.db.close()

    # actions ----------------------------------------------------------------------------------------
    def add_action(self, a: Action) -> None:
        if self.db.execute("SELECT 1 FROM actions WHERE package = ? AND target = ?",
                           (a.package, a.target)).fetchone():
            raise StorageError(f"an action already replicates into package {a.package!r} on {a.target}; "
                               f"choose another package name", code="exists")
        self._write(a, insert=True)

    def save(self, a: Action) -> None:
        self._write(a, insert=False)

    def _write(self, a: Action, insert: bool) -> None:
        row = asdict(a)
        for key in ("pending", "last"):
            row[key] = json.dumps(row[key]) if row[key] is not None else None
        cols = [f.name for f in fields(Action)]
        if insert:
            self.db.execute(f"INSERT INTO actions({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                            [row[c] for c in cols])
        else:
            self.db.execute(f"UPDATE actions SET {','.join(c + ' = ?' for c in cols[1:])} WHERE id = ?",
                            [row[c] for c in cols[1:]] + [a.id])
        self.db.commit()

    def action(self, action_id: str) -> Action:
        found = [a for a in self.actions() if a.id == action_id]
        if not found:
            raise StorageError(f"no replication action {action_id!r}; storage.replication.list shows them",
                               code="not_found")
        return found[0]

    def actions(self) -> list[Action]:
        cols = [f.name for f in fields(Action)]
        out = []
        for r in self.db.execute(f"SELECT {','.join(cols)} FROM actions ORDER BY created"):
            row = dict(zip(cols, r))
            for key in ("pending", "last"):
                row[key] = json.loads(row[key]) if row[key] else None
            for key in ("continuous", "tls", "paused"):
                row[key] = bool(row[key])
            out.append(Action(**row))
        return out

    def drop_action(self, action_id: str) -> None:
        self.db.execute("DELETE FROM actions WHERE id = ?", (action_id,))
        self.db.commit()

    # packages ---------------------------------------------------------------------------------------
    def package(self, name: str) -> Package | None:
        r = self.db.execute("SELECT name, action, source, source_volume, created FROM packages WHERE name = ?",
                            (name,)).fetchone()
        return Package(*r) if r else None

    def packages(self) -> list[Package]:
        return [Package(*r) for r in self.db.execute(
            "SELECT name, action, source, source_volume, created FROM packages ORDER BY name")]

    def add_package(self, p: Package) -> None:
        self.db.execute("INSERT INTO packages VALUES (?, ?, ?, ?, ?)",
                        (p.name, p.action, p.source, p.source_volume, p.created))
        self.db.commit()

    def drop_package(self, name: str) -> None:
        self.db.execute("DELETE FROM packages WHERE name = ?", (name,))
        self.db.commit()

    # transfers (the target's spools: which package and snapshot each one is for) ---------------------
    def add_transfer(self, transfer: str, package: str, snapshot: str, opened: float) -> None:
        self.db.execute("INSERT OR IGNORE INTO transfers VALUES (?, ?, ?, ?)", (transfer, package, snapshot, opened))
        self.db.commit()

    def transfers(self) -> dict[str, tuple[str, str]]:
        """(package, snapshot) by transfer id."""
        return {r[0]: (r[1], r[2]) for r in self.db.execute("SELECT id, package, snapshot FROM transfers")}

    def drop_transfer(self, transfer: str) -> None:
        self.db.execute("DELETE FROM transfers WHERE id = ?", (transfer,))
        self.db.commit()
