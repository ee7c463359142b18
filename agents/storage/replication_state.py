"""Durable replication state in the agent's state directory (one SQLite file): the actions this agent
replicates as a source, and the packages (with the transfers spooling into them) it holds as a target.
Everything a restarted agent needs to carry on lives here: an action's schedule, throttle, pause flag, the
last snapshot both sides hold, and the update in flight (its snapshot, base and transfer id), so that a
resumed update regenerates the very same stream.

Every statement runs on the file's own thread (``agents.db.Store``), never on the event loop: a change is
awaited until it is committed (``synchronous=FULL``), and only then acted on. What the file holds is also
kept in memory, as committed, so that reading it costs no statement and can be done where nothing may be
awaited (the job a restart left running is followed or not at once; a connection's first bytes decide
whether a receive follows them). One agent owns the file; the memory copy is replaced, never changed in
place, by the store's thread after each commit, so a reader in any thread sees one committed state.
"""

from __future__ import annotations

import copy
import json
import sqlite3
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from agents.db import Store, transaction
from agents.storage.driver import StorageError


# Each migration is idempotent: files written before schema versions (user_version 0) already hold
# the tables of the first, and files at version 1 written before transfers were recorded lack the second.
_MIGRATIONS = [
    """
    CREATE TABLE IF NOT EXISTS actions(
        id TEXT PRIMARY KEY, volume TEXT NOT NULL, target TEXT NOT NULL, package TEXT NOT NULL,
        interval REAL NOT NULL, continuous INTEGER NOT NULL, tls INTEGER NOT NULL, rate REAL,
        paused INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL DEFAULT 0, last_snap TEXT, last_end REAL,
        pending TEXT, state TEXT NOT NULL DEFAULT 'idle', error TEXT, last TEXT, created REAL NOT NULL);
    CREATE TABLE IF NOT EXISTS packages(
        name TEXT PRIMARY KEY, action TEXT NOT NULL, source TEXT NOT NULL, source_volume TEXT NOT NULL,
        created REAL NOT NULL);
    """,
    """
    CREATE TABLE IF NOT EXISTS transfers(
        id TEXT PRIMARY KEY, package TEXT NOT NULL, snapshot TEXT NOT NULL, opened REAL NOT NULL);
    """,
]


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


@dataclass(frozen=True)
class Package:
    name: str
    action: str
    source: str                     # bare JID of the source agent; only it may send into the package
    source_volume: str
    created: float


_ACTION_COLUMNS = [f.name for f in fields(Action)]


class ReplicationState:
    """Actions, packages and transfers in one SQLite file on a thread of its own; every change is committed
    before it is acted on, and read back from memory."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The directory also receives packages, so its mode is left as it is.
        self.store = Store(path, _MIGRATIONS, name=f"replication {path.name}", synchronous="FULL", private=False)
        try:
            self._actions, self._packages, self._transfers = self.store.call(_load)
        except BaseException:
            self.store.close()
            raise

    def close(self) -> None:
        self.store.close()

    async def aclose(self) -> None:
        await self.store.aclose()

    # actions ----------------------------------------------------------------------------------------
    def action(self, action_id: str) -> Action:
        found = self._actions.get(action_id)
        if found is None:
            raise StorageError(f"no replication action {action_id!r}; storage.replication.list shows them",
                               code="not_found")
        return copy.deepcopy(found)

    def actions(self) -> list[Action]:
        return [copy.deepcopy(a) for a in sorted(self._actions.values(), key=lambda a: a.created)]

    async def add_action(self, a: Action) -> None:
        await self.store.run(self._add_action, copy.deepcopy(a))

    async def change_action(self, action_id: str, **changes: Any) -> Action:
        """Change some fields of an action and commit. The change is made on the store's thread to the
        action as last committed, so changes made at once by different ops (a throttle while an update
        runs) each keep the other's."""
        return copy.deepcopy(await self.store.run(self._change_action, action_id, changes))

    async def drop_action(self, action_id: str) -> None:
        await self.store.run(self._drop_action, action_id)

    def _add_action(self, db: sqlite3.Connection, a: Action) -> None:
        if any(o.package == a.package and o.target == a.target for o in self._actions.values()):
            raise StorageError(f"an action already replicates into package {a.package!r} on {a.target}; "
                               f"choose another package name", code="exists")
        db.execute(f"INSERT INTO actions({','.join(_ACTION_COLUMNS)}) VALUES ({','.join('?' * len(_ACTION_COLUMNS))})",
                   _action_row(a))
        self._actions = {**self._actions, a.id: a}

    def _change_action(self, db: sqlite3.Connection, action_id: str, changes: dict[str, Any]) -> Action:
        a = self.action(action_id)
        for key, value in changes.items():
            setattr(a, key, value)
        row = _action_row(a)
        db.execute(f"UPDATE actions SET {','.join(c + ' = ?' for c in _ACTION_COLUMNS[1:])} WHERE id = ?",
                   row[1:] + [a.id])
        self._actions = {**self._actions, a.id: a}
        return a

    def _drop_action(self, db: sqlite3.Connection, action_id: str) -> None:
        db.execute("DELETE FROM actions WHERE id = ?", (action_id,))
        self._actions = {k: v for k, v in self._actions.items() if k != action_id}

    # packages ---------------------------------------------------------------------------------------
    def package(self, name: str) -> Package | None:
        return self._packages.get(name)

    def packages(self) -> list[Package]:
        return sorted(self._packages.values(), key=lambda p: p.name)

    async def add_package(self, p: Package) -> None:
        await self.store.run(self._add_package, p)

    async def drop_package(self, name: str) -> None:
        await self.store.run(self._drop_package, name)

    def _add_package(self, db: sqlite3.Connection, p: Package) -> None:
        db.execute("INSERT INTO packages VALUES (?, ?, ?, ?, ?)", (p.name, p.action, p.source, p.source_volume,
                                                                    p.created))
        self._packages = {**self._packages, p.name: p}

    def _drop_package(self, db: sqlite3.Connection, name: str) -> None:
        db.execute("DELETE FROM packages WHERE name = ?", (name,))
        self._packages = {k: v for k, v in self._packages.items() if k != name}

    # transfers (the target's spools: which package and snapshot each one is for) ---------------------
    def transfers(self) -> dict[str, tuple[str, str]]:
        """(package, snapshot) by transfer id."""
        return dict(self._transfers)

    async def add_transfer(self, transfer: str, package: str, snapshot: str, opened: float) -> None:
        await self.store.run(self._add_transfer, transfer, package, snapshot, opened)

    async def drop_transfer(self, transfer: str) -> None:
        await self.store.run(self._drop_transfer, transfer)

    def _add_transfer(self, db: sqlite3.Connection, transfer: str, package: str, snapshot: str,
                      opened: float) -> None:
        db.execute("INSERT OR IGNORE INTO transfers VALUES (?, ?, ?, ?)", (transfer, package, snapshot, opened))
        if transfer not in self._transfers:
            self._transfers = {**self._transfers, transfer: (package, snapshot)}

    def _drop_transfer(self, db: sqlite3.Connection, transfer: str) -> None:
        db.execute("DELETE FROM transfers WHERE id = ?", (transfer,))
        self._transfers = {k: v for k, v in self._transfers.items() if k != transfer}


def _action_row(a: Action) -> list[Any]:
    row = asdict(a)
    for key in ("pending", "last"):
        row[key] = json.dumps(row[key]) if row[key] is not None else None
    return [row[c] for c in _ACTION_COLUMNS]


def _load(db: sqlite3.Connection) -> tuple[dict[str, Action], dict[str, Package], dict[str, tuple[str, str]]]:
    """Everything the file holds, read in one transaction (a consistent view)."""
    with transaction(db):
        actions = {}
        for r in db.execute(f"SELECT {','.join(_ACTION_COLUMNS)} FROM actions ORDER BY created"):
            row = dict(zip(_ACTION_COLUMNS, r))
            for key in ("pending", "last"):
                row[key] = json.loads(row[key]) if row[key] else None
            for key in ("continuous", "tls", "paused"):
                row[key] = bool(row[key])
            actions[row["id"]] = Action(**row)
        packages = {r[0]: Package(*r) for r in db.execute(
            "SELECT name, action, source, source_volume, created FROM packages ORDER BY name")}
        transfers = {r[0]: (r[1], r[2]) for r in db.execute("SELECT id, package, snapshot FROM transfers")}
    return actions, packages, transfers
