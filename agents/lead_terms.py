"""The newest leader's term each broker has stamped on a workflow step, kept where a restart finds it.

A broker's leading instance stamps its term (fencing token, broker/leadership.py) on every workflow
step; an agent refuses a step whose term is older than the newest it has seen from that broker, so a
deposed instance cannot act after its successor has (docs/protocol.md 6). Kept in memory only, that
newest term would be forgotten by a restart, and a deposed leader's late step reaching the restarted
agent would run. So a higher term is written to the agent's state directory (``terms.sqlite``, FULL
synchronous) before the step that carries it runs, and read back at start.

The file is written only when a broker's term grows (once per change of leader), not per step; steps
carrying the term being written wait for that write, so none runs on a term a crash could forget.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from .db import Store

_MIGRATIONS = ["CREATE TABLE IF NOT EXISTS terms (sender TEXT PRIMARY KEY, term INTEGER NOT NULL)"]


def _load(db: sqlite3.Connection) -> dict[str, int]:
    return {sender: int(term) for sender, term in db.execute("SELECT sender, term FROM terms")}


def _keep(db: sqlite3.Connection, sender: str, term: int) -> None:
    # MAX: of two writes for one sender, the higher term stays whatever order they land in.
    db.execute("INSERT INTO terms (sender, term) VALUES (?, ?)"
               " ON CONFLICT (sender) DO UPDATE SET term = MAX(term, excluded.term)", (sender, term))


class LeadTerms:
    """The newest term per sender (bare JID, lower case): in memory, and on disk when ``path`` is given."""

    def __init__(self, path: Path | None) -> None:
        self._store = Store(path, _MIGRATIONS, name="terms", synchronous="FULL") if path is not None else None
        self._newest: dict[str, int] = self._store.call(_load) if self._store is not None else {}
        self._writing: dict[str, asyncio.Future[None]] = {}  # sender -> the write of its newest term

    def __getitem__(self, sender: str) -> int:
        return self._newest[sender.lower()]

    def newest(self, sender: str) -> int:
        """The newest term seen from ``sender``; 0 when it has sent none."""
        return self._newest.get(sender.lower(), 0)

    async def admit(self, sender: str, term: int) -> bool:
        """False if ``term`` is older than the newest from ``sender``; else True once the newest term
        (``term`` or a later one) is durable. The in-memory newest is raised before the write is
        awaited, so a step with an older term arriving meanwhile is refused already."""
        sender = sender.lower()
        newest = self._newest.get(sender, 0)
        if term < newest:
            return False
        if term > newest:
            self._newest[sender] = term
            if self._store is not None:
                self._writing[sender] = asyncio.wrap_future(self._store.submit(_keep, sender, term))
        writing = self._writing.get(sender)
        if writing is not None:
            await asyncio.shield(writing)  # a write that fails raises here: the step does not run
            if self._writing.get(sender) is writing:
                del self._writing[sender]
        return True

    async def aclose(self) -> None:
        """Finish the writes handed over and close the file."""
        if self._store is not None:
            await self._store.aclose()
