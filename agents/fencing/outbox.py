"""The fencing agent's durable record of what it must tell the broker, and of what it has done.

Two tables in one SQLite file in the agent's state dir (``fencing.sqlite``, private like its audit
log):

- ``outbox``: every fencing event (attempt or outcome) not yet acknowledged by the broker. An event
  is written here, and committed, before the agent acts on it (the attempt before the device runs,
  the outcome before the op answers), so neither a broker that is down nor an agent that crashes
  loses it. The agent resends the oldest first, under the event's own id, until the broker answers
  ok (its acknowledgement; the broker records an event once per agent and id), then deletes it.
- ``ledger``: the last verified outcome (ok off, on or reboot) per node, kept after delivery. The
  broker reads it when the agent joins (``fence.ledger``, broker/fencing.py) and records what it
  lacks, so an epoch opened while the broker was down is recovered even if the outbox was lost.

The file is read and written on its own thread (``agents.db.Store``): every method is awaited, and
the event loop goes on while a commit is synced.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from ..db import Store, transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (n INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, body TEXT NOT NULL,
                                   created REAL NOT NULL, tries INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS ledger (cluster TEXT NOT NULL, node TEXT NOT NULL, id TEXT NOT NULL,
                                   body TEXT NOT NULL, PRIMARY KEY (cluster, node));
"""
# The outbox's schema versions (agents.db.migrate): the first is the schema it had before versions.
_MIGRATIONS = [_SCHEMA]
#: The power actions whose verified outcome the ledger keeps (a status changes nothing).
LEDGER_ACTIONS = frozenset({"off", "on", "reboot"})


class FenceOutbox:
    """Events waiting for the broker's acknowledgement, and the ledger of verified outcomes."""

    def __init__(self, path: Path | None) -> None:
        # Each write is its own committed transaction (autocommit), synced: an event the agent acted
        # on must outlive a crash right after.
        self.store = Store(path, _MIGRATIONS, name="fencing outbox", synchronous="FULL")

    def close(self) -> None:
        self.store.close()

    async def aclose(self) -> None:
        await self.store.aclose()

    async def keep(self, event: dict[str, Any]) -> None:
        """Write an event to send (``event["id"]`` names it) and, for a verified outcome, to the ledger;
        one transaction, on disk when this returns."""
        await self.store.run(_keep, event)

    async def pending(self, limit: int = 100) -> list[dict[str, Any]]:
        """Events not acknowledged yet, oldest first."""
        rows = await self.store.run(lambda db: db.execute("SELECT body FROM outbox ORDER BY n LIMIT ?",
                                                          (limit,)).fetchall())
        return [json.loads(body) for (body,) in rows]

    async def tried(self, event_id: str) -> int:
        """Count a failed send; returns how many there have been."""
        return await self.store.run(_tried, event_id)

    async def delivered(self, event_id: str) -> None:
        """The broker acknowledged it: it is not sent again."""
        await self.store.run(lambda db: db.execute("DELETE FROM outbox WHERE id = ?", (event_id,)))

    async def ledger(self, delivered_only: bool = False) -> list[dict[str, Any]]:
        """The last verified outcome per node, by cluster and node; with ``delivered_only``, only those
        the outbox no longer holds (one it holds reaches the broker through it, after the events
        before it)."""
        where = " WHERE id NOT IN (SELECT id FROM outbox)" if delivered_only else ""
        rows = await self.store.run(lambda db: db.execute(f"SELECT body FROM ledger{where} ORDER BY cluster, node"
                                                          ).fetchall())
        return [json.loads(body) for (body,) in rows]


def _keep(db: sqlite3.Connection, event: dict[str, Any]) -> None:
    body = json.dumps(event, sort_keys=True)
    with transaction(db):
        db.execute("INSERT OR IGNORE INTO outbox (id, body, created) VALUES (?, ?, ?)",
                   (event["id"], body, time.time()))
        if event["event"] == "outcome" and event.get("ok") and event["action"] in LEDGER_ACTIONS:
            db.execute("INSERT OR REPLACE INTO ledger (cluster, node, id, body) VALUES (?, ?, ?, ?)",
                       (event["cluster"], event["node"], event["id"], body))


def _tried(db: sqlite3.Connection, event_id: str) -> int:
    db.execute("UPDATE outbox SET tries = tries + 1 WHERE id = ?", (event_id,))
    row = db.execute("SELECT tries FROM outbox WHERE id = ?", (event_id,)).fetchone()
    return int(row[0]) if row else 0
