"""Audit anchors: each agent's audit head, kept by the broker so a cut or rewritten log is found.

An agent's audit log (agents/audit.py) is a keyed hash chain on the agent's own machine; whoever
holds that machine can still cut records off the end, or, holding the key too, rewrite the log and
recompute every hash. So every agent sends its head (sequence number and keyed hash of its last
record) to the brokers that have seen it, every ``Agent.audit_anchor_interval`` seconds when it
changed and on shutdown (``mesh.audit.anchor``). The broker keeps every anchor durably in SQLite in
its shared state directory (one file for all its instances) and serves them (``mesh.audit.anchors``),
and ``vertebra audit verify`` compares each log with them: a log that ends before an anchored record
was cut; one whose record differs from its anchor was rewritten.

Who may anchor: a live agent in the directory that the mesh file names, for its own log only (the
anchor is filed under the sender's bare JID as the server stamped it, never an argument), never on
someone's behalf (the op's declaration says so, ``sender="live agent"``, and the broker's sender
rule checks it). The first anchor for a sequence number stands: one that names another hash for it
is refused and logged, as it means the log was rewritten (or its state directory replaced). Who may
read anchors: whoever the mesh's policy lets run ``mesh.audit.anchors`` (by default the admins).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Annotated

from agents.agent import ANCHOR_OP, Call
from agents.db import Store, open_read_only
from agents.errors import BadArguments
from agents.ops import Arg, op

log = logging.getLogger(__name__)

ANCHORS_OP = "mesh.audit.anchors"
HASH_PATTERN = r"[0-9a-f]{64}"
# Anchors kept per agent: one each 30 s is 2,880 a day, so about a month. The oldest go first; the
# newest (which catch a cut) always stay.
MAX_ANCHORS_PER_AGENT = 100_000
PAGE = 1000  # anchors per answer: well inside a payload's 160 KiB (docs/protocol.md 3.2)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS anchors (
    agent TEXT NOT NULL,      -- bare JID, lowercased, as the server stamped the sender
    seq   INTEGER NOT NULL,
    hash  TEXT NOT NULL,
    at    REAL NOT NULL,      -- when the broker received it (its wall clock)
    PRIMARY KEY (agent, seq)
);
"""


class AnchorStore:
    """The anchors, in SQLite (WAL, shared by the broker's instances; synced commits: an anchor
    acknowledged is on disk), read and written on the store's own thread (``agents.db.Store``)."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.store = Store(path, [_SCHEMA], name="audit anchors", synchronous="FULL")

    async def add(self, agent: str, seq: int, digest: str, at: float | None = None) -> str | None:
        """File an anchor; returns why it was refused (it contradicts one already kept), else None."""
        return await self.store.run(self._add, agent.lower(), seq, digest, at)

    def _add(self, db: sqlite3.Connection, agent: str, seq: int, digest: str, at: float | None) -> str | None:
        row = db.execute("SELECT hash, at FROM anchors WHERE agent = ? AND seq = ?", (agent, seq)).fetchone()
        if row is not None:
            if row[0] == digest:
                return None  # the same head again (another broker instance, a resend)
            return (f"record {seq} of {agent}'s audit log was anchored with another hash at"
                    f" {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(row[1]))}: the log was rewritten or"
                    " its state directory replaced")
        last = db.execute("SELECT MAX(seq) FROM anchors WHERE agent = ?", (agent,)).fetchone()[0]
        if last is not None and seq < last:
            log.warning("the audit log of %s went back from record %d to %d: it was cut, or its state directory"
                        " replaced; `vertebra audit verify` reports it", agent, last, seq)
        db.execute("INSERT INTO anchors (agent, seq, hash, at) VALUES (?, ?, ?, ?)",
                   (agent, seq, digest, time.time() if at is None else at))
        db.execute("DELETE FROM anchors WHERE agent = ? AND seq <= (SELECT seq FROM anchors WHERE agent = ?"
                   " ORDER BY seq DESC LIMIT 1 OFFSET ?)", (agent, agent, MAX_ANCHORS_PER_AGENT))
        return None

    async def of(self, agent: str, after: int = 0, limit: int = PAGE) -> list[tuple[int, str, float]]:
        """An agent's anchors after sequence ``after``, oldest first, at most ``limit``."""
        rows = await self.store.run(lambda db: db.execute(
            "SELECT seq, hash, at FROM anchors WHERE agent = ? AND seq > ? ORDER BY seq LIMIT ?",
            (agent.lower(), after, limit)).fetchall())
        return [tuple(r) for r in rows]

    async def aclose(self) -> None:
        await self.store.aclose()


def read_anchors(path: str | Path, agent: str) -> list[tuple[int, str, float]]:
    """Every anchor of ``agent`` in a broker's anchor database, read-only (`vertebra audit verify
    --anchors PATH`, for a broker that is not running)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no anchor database at {path}")
    db = open_read_only(path)
    try:
        return [tuple(r) for r in db.execute(
            "SELECT seq, hash, at FROM anchors WHERE agent = ? ORDER BY seq", (agent.lower(),))]
    finally:
        db.close()


class Anchors:
    """A component of the broker (broker/service.py): the anchor ops and their store."""

    def __init__(self, shared_dir: Path | None) -> None:
        self.store = AnchorStore(shared_dir / "audit-anchors.sqlite" if shared_dir else None)

    async def aclose(self) -> None:
        await self.store.aclose()

    @op(ANCHOR_OP, effect="change", deadline=5, sender="live agent")
    async def audit_anchor(self, call: Call,
                           seq: Annotated[int, Arg("the sequence number of the last record of the sender's"
                                                   " audit log", min=1)],
                           hash: Annotated[str, Arg("that record's keyed hash (64 hex digits)",
                                                    pattern=HASH_PATTERN)]) -> dict:
        """(For agents.) Anchor the head of the sender's own audit log at the broker."""
        refusal = await self.store.add(call.caller, seq, hash)
        if refusal is not None:
            log.warning("refused an audit anchor from %s: %s", call.caller, refusal)
            raise BadArguments(f"{refusal}; run `vertebra audit verify` on that agent's machine", argument="hash")
        return {"anchored": seq}

    @op(ANCHORS_OP, effect="read", deadline=10)
    async def audit_anchors(self, call: Call,
                            agent: Annotated[str, Arg("the agent's bare JID")],
                            after: Annotated[int, Arg("only anchors after this sequence number", min=0)] = 0
                            ) -> dict:
        """The anchors an agent's audit log has at this broker, oldest first, a page at a time."""
        page = await self.store.of(agent, after, PAGE + 1)
        return {"agent": agent.lower(), "anchors": [list(a) for a in page[:PAGE]], "more": len(page) > PAGE}
