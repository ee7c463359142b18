"""Which broker instance runs the workflows, when the broker runs as one instance per cluster node.

Every instance answers discovery and the other ops from its own directory (each hears every agent's
presence: agents address the broker's bare JID, which the server delivers to all of its resources).
Workflows are different: their steps must run once, so one instance at a time *leads* and serves
the ops declared ``leader=True`` (``agents/ops.py``). It holds a
lease, a row in a small SQLite database in the state directory the instances share, taken and renewed
in ``BEGIN IMMEDIATE`` transactions; the other instances forward workflow ops to it (as the caller's
delegate, so the leader decides and audits for the caller as usual).

An instance leads only while it has a session with the XMPP service: it gives the lease up the
moment its connection drops, so another takes over within one renewal period; an instance whose
process or machine dies stops renewing, and the lease expires after ``LEASE_TERM`` (at once when
the server tells the others that the holder's session ended). The new leader resumes every
unfinished instance from the shared store: a step that was in flight is sent again under its
request id, and the agent answers with the first run's outcome instead of running it again
(``agents.idempotency``), so no step runs twice when a leader dies mid-step. Before a step passes
its point of no return the leader checks that it still holds the lease.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

from agents.db import open_db
from agents.errors import OpError, Outcome, error_for

log = logging.getLogger(__name__)

LEASE_TERM = 6.0  # seconds a lease lasts unless renewed
RENEW_EVERY = LEASE_TERM / 3


# The lease file's schema versions (agents.db.migrate): the first is the schema it had before versions.
_LEASE_MIGRATIONS = ["CREATE TABLE IF NOT EXISTS lease (name TEXT PRIMARY KEY, holder TEXT NOT NULL,"
                     " expires REAL NOT NULL)"]


class Lease:
    """One named lease in a SQLite file that every instance opens (or in memory, for one instance)."""

    def __init__(self, path: Path | None, holder: str, term: float = LEASE_TERM,
                 clock: Callable[[], float] = time.time) -> None:
        self.holder, self.term, self._clock = holder, term, clock
        self._db = open_db(path, _LEASE_MIGRATIONS)

    def take(self, gone: str = "") -> bool:
        """Take or renew the lease; True while this holder has it. It is taken only when it is free,
        expired, already ours, or held by ``gone`` (an instance the server said has left)."""
        now = self._clock()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT holder, expires FROM lease WHERE name = 'workflows'").fetchone()
            mine = row is None or row[0] in (self.holder, gone) or row[1] < now
            if mine:
                self._db.execute("INSERT OR REPLACE INTO lease VALUES ('workflows', ?, ?)",
                                 (self.holder, now + self.term))
        finally:
            self._db.execute("COMMIT")
        return mine

    def current(self) -> str | None:
        """The holder of an unexpired lease, if any."""
        row = self._db.execute("SELECT holder, expires FROM lease WHERE name = 'workflows'").fetchone()
        return row[0] if row is not None and row[1] >= self._clock() else None

    def release(self) -> None:
        self._db.execute("DELETE FROM lease WHERE name = 'workflows' AND holder = ?", (self.holder,))

    def close(self) -> None:
        self._db.close()


class Deposed(Exception):
    """This instance lost the lead (or its session) while running a workflow step."""


class Leadership:
    """A component of the broker (broker/service.py): the lease, its renewal, forwarding to the
    leader, and telling the workflow engine when this instance is elected or deposed (the
    ``elected`` and ``deposed`` callables it is given)."""

    def __init__(self, broker: Any, elected: Callable[[], None], deposed: Callable[[], None]) -> None:
        self.broker = broker
        self.on_elected, self.on_deposed = elected, deposed
        shared: Path | None = broker.shared_dir
        self.lease = Lease(shared / "leader.sqlite" if shared else None, str(broker.xmpp.boundjid))
        self.leading = False
        self.siblings: set[str] = set()  # the other live instances (full JIDs), from their presence
        self._renewer: asyncio.Task[None] | None = None
        # A broker delegates to its siblings: a forwarded op is decided for the person who asked.
        broker.delegates = broker.delegates | {broker.xmpp.boundjid.bare.lower()}
        broker.xmpp.add_event_handler("disconnected", self._on_connection_lost)

    def lead(self, gone: str = "") -> bool:
        """Take or renew the lead if this instance may; True while it leads."""
        was = self.leading
        self.leading = self.broker.online and self.lease.take(gone)
        if self.leading and not was:
            log.info("%s leads the workflows", self.lease.holder)
            self.on_elected()
        elif was and not self.leading:
            log.warning("%s no longer leads the workflows", self.lease.holder)
            self.on_deposed()
        return self.leading

    def _step_down(self) -> None:
        if self.leading:
            self.leading = False
            self.on_deposed()
        self.lease.release()

    def start_leading(self) -> None:
        """Called with each new session: take part in the election."""
        if self._renewer is None or self._renewer.done():
            self._renewer = self.broker.spawn(self._renew_forever(), name="workflow lease renewal")
        self.lead()

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            try:
                self.lead()
            except sqlite3.Error as exc:  # a busy or broken store must not end the renewals
                log.warning("lease renewal failed: %s", exc)
                self._step_down()

    def _on_connection_lost(self, _event: Any) -> None:
        # Without a session this instance can send no step and hear no outcome: let another lead now.
        self._step_down()

    def sibling_seen(self, jid: str, available: bool) -> None:
        if available:
            self.siblings.add(jid)
            return
        self.siblings.discard(jid)
        if self.lease.current() == jid:  # the server says the leader's session ended: take over now
            self.lead(gone=jid)

    def stop_leading(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        self._step_down()

    async def forward_to_leader(self, name: str, call: Any, args: dict[str, Any]) -> Any:
        """Where a leader-only op is served: None when here (this instance leads, or has just taken
        the free lead), else the leader's answer, asked for on the caller's behalf."""
        if self.lead():
            return None
        leader = self.lease.current()
        if leader is None:  # released between the two reads: the next renewal settles it
            raise OpError("no broker instance leads the workflows at this moment; try again in a few seconds")
        budget = call.deadline - asyncio.get_running_loop().time()
        res = await self.broker.request(leader, name, args, timeout=budget, behalf=call.caller)
        if res.outcome is Outcome.OK:
            return res
        if res.outcome is Outcome.UNREACHABLE and self.lead(gone=leader):
            return None  # the leader had gone, and this instance has taken over
        condition, _, text = (res.error or "").partition(": ")
        err = error_for(condition, text or condition)
        if type(err) is OpError:  # no application condition: say where it failed
            err = OpError(f"the leading broker instance {leader} answered {res.outcome.value}: {res.error}")
        raise err

