"""Which broker instance runs the workflows, when the broker runs as one instance per cluster node.

Every instance answers discovery and the other ops from its own directory (each hears every agent's
presence: agents address the broker's bare JID, which the server delivers to all of its resources).
Workflows are different: their steps must run once, so one instance at a time *leads* and serves
the ops declared ``leader=True`` (``agents/ops.py``). It holds a lease in the store the instances
share: on one machine a row in a small SQLite database in their shared state directory, taken and
renewed in ``BEGIN IMMEDIATE`` transactions; across machines an etcd election (the mesh file's
``state`` under ``broker``, broker/state_etcd.py). The other instances forward workflow ops to the leader (as
the caller's delegate, so the leader decides and audits for the caller as usual, under a request id of
its own: the forwarding instance's ``ended`` record names the leader and that id).

Each lead has a *term*, a number that only grows from one leader to the next (etcd: the create
revision of the leader's election key; SQLite: a counter in the lease row). The leader stamps it on
every workflow step it sends (``term``, docs/protocol.md section 6), and an agent refuses a step
whose term is older than the newest it has seen from the broker: a deposed leader that has not yet
noticed cannot act after its successor has.

An instance leads only while it has a session with the XMPP service: it gives the lease up the
moment its connection drops, so another takes over within one renewal period; an instance whose
process or machine dies (or stalls) stops renewing, and the lease expires after ``LEASE_TERM`` (at
once when the server tells the others that the holder's session ended). An instance counts itself
leader only until its last renewal, measured from when it was asked for on this machine's monotonic
clock, would have run out: a renewal that stalls cannot outlive the lease. The new leader resumes every
unfinished instance from the shared store: a step that was in flight is sent again under its
request id, and the agent answers with the first run's outcome instead of running it again
(``agents.idempotency``), so no step runs twice when a leader dies mid-step. Before a step passes
its point of no return the leader renews the lease and checks that it still leads.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from agents.db import Store, transaction
from agents.errors import OpError, Outcome, error_for

from . import shared_state

log = logging.getLogger(__name__)

LEASE_TERM = 6.0  # seconds a lease lasts unless renewed
RENEW_EVERY = LEASE_TERM / 3


# The lease file's schema versions (agents.db.migrate): the first is the schema it had before versions.
_LEASE_MIGRATIONS = ["CREATE TABLE IF NOT EXISTS lease (name TEXT PRIMARY KEY, holder TEXT NOT NULL,"
                     " expires REAL NOT NULL)",
                     # The term: one more each time the lease passes to a holder (or back after a gap).
                     "ALTER TABLE lease ADD COLUMN term INTEGER NOT NULL DEFAULT 0"]



_FORWARDED = "fw-"


def request_origin(call: Any, broker: str) -> str:
    """A digest of whom a request is for and the request id its caller gave it: the same whether the caller
    asked this instance (of the broker whose bare JID is ``broker``) or another one that forwarded it
    (under the request id ``fw-`` and this digest)."""
    if call.via and call.via.lower() == broker.lower() and call.rid.startswith(_FORWARDED):
        return call.rid[len(_FORWARDED):]
    return hashlib.sha256(f"{call.caller}\0{call.rid}".encode()).hexdigest()

class LeaseStore(Protocol):
    """The workflow lead in the store the instances share: SQLite (``Lease``) or etcd (``EtcdLease``)."""

    holder: str
    valid_until: float  # time.monotonic() after which the lead may have passed to another instance
    errors: tuple[type[BaseException], ...]  # what a store that is unreachable or broken raises

    async def take(self, gone: str = "") -> int | None: ...
    async def wait_for_change(self, timeout: float) -> None: ...
    async def current(self) -> str | None: ...
    async def release(self) -> None: ...
    async def aclose(self) -> None: ...


class Lease:
    """One named lease in a SQLite file that every instance opens (or in memory, for one instance).
    Its statements run on the file's own thread (``agents.db.Store``): a renewal that waits for a busy
    file never holds up the event loop, and the instance stops counting itself leader when its last
    renewal could have run out, whether or not the next one has come back."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(self, path: Path | None, holder: str, term: float = LEASE_TERM,
                 clock: Callable[[], float] = time.time) -> None:
        self.holder, self.term, self._clock = holder, term, clock
        self.valid_until = 0.0
        self.store = Store(path, _LEASE_MIGRATIONS, name="workflow lease")

    async def take(self, gone: str = "") -> int | None:
        """Take or renew the lease; its term while this holder has it, else None. It is taken only
        when it is free, expired, already ours, or held by ``gone`` (an instance the server said has
        left)."""
        asked = time.monotonic()
        term = await self.store.run(_take, self.holder, gone, self._clock(), self.term)
        if term is not None:
            self.valid_until = asked + self.term
        return term

    async def wait_for_change(self, timeout: float) -> None:
        await asyncio.sleep(timeout)  # a file tells no one of its changes: the next renewal reads it

    async def current(self) -> str | None:
        """The holder of an unexpired lease, if any."""
        return await self.store.run(_current, self._clock())

    async def release(self) -> None:
        self.valid_until = 0.0
        await self.store.run(_release, self.holder)

    async def aclose(self) -> None:
        await self.store.aclose()


# -- the lease's statements, each run on its store's thread ------------------------------------------

def _take(db: sqlite3.Connection, holder: str, gone: str, now: float, length: float) -> int | None:
    with transaction(db):
        row = db.execute("SELECT holder, expires, term FROM lease WHERE name = 'workflows'").fetchone()
        term = None
        if row is None or row[0] in (holder, gone) or row[1] < now:
            # The same term only while this holder's lease runs on without a gap.
            kept = row is not None and row[0] == holder and row[1] >= now
            term = row[2] if kept else (row[2] if row else 0) + 1
            db.execute("INSERT OR REPLACE INTO lease (name, holder, expires, term) VALUES ('workflows', ?, ?, ?)",
                       (holder, now + length, term))
    return term


def _current(db: sqlite3.Connection, now: float) -> str | None:
    row = db.execute("SELECT holder, expires FROM lease WHERE name = 'workflows'").fetchone()
    return row[0] if row is not None and row[1] >= now else None


def _release(db: sqlite3.Connection, holder: str) -> None:
    # Expired rather than deleted: the row keeps the term, so the next holder's is higher.
    db.execute("UPDATE lease SET expires = 0 WHERE name = 'workflows' AND holder = ?", (holder,))


class Deposed(Exception):
    """This instance lost the lead (or its session) while running a workflow step."""


class Leadership:
    """A component of the broker (broker/service.py): the lease, its renewal, forwarding to the
    leader, and telling the workflow engine when this instance is elected or deposed (the
    ``elected`` and ``deposed`` callables it is given)."""

    def __init__(self, broker: Any, elected: Callable[[], None], deposed: Callable[[], None]) -> None:
        self.broker = broker
        self.on_elected, self.on_deposed = elected, deposed
        self.lease = shared_state.lease(broker, str(broker.xmpp.boundjid), LEASE_TERM)
        self.term: int | None = None  # this instance's term while it leads (stamped on every step)
        self.siblings: set[str] = set()  # the other live instances (full JIDs), from their presence
        self._renewer: asyncio.Task[None] | None = None
        self._renewing = asyncio.Lock()  # one conversation with the store at a time
        # A broker delegates to its siblings: a forwarded op is decided for the person who asked.
        broker.delegates = broker.delegates | {broker.xmpp.boundjid.bare.lower()}
        broker.xmpp.add_event_handler("disconnected", self._on_connection_lost)

    @property
    def leading(self) -> bool:
        """Whether this instance leads now: it took the lease, has its session, and its last renewal
        cannot have run out yet (however long the next one takes)."""
        return (self.term is not None and self.broker.online
                and time.monotonic() < self.lease.valid_until)

    async def lead(self, gone: str = "") -> bool:
        """Take or renew the lead if this instance may; True while it leads."""
        async with self._renewing:
            was = self.term
            # A lead whose renewal ran out has ended, even if the same term is renewed now: its steps
            # stopped (Deposed) when it ran out, and are resumed as by a new leader.
            lapsed = was is not None and time.monotonic() >= self.lease.valid_until
            term = None
            if self.broker.online:
                try:
                    term = await self.lease.take(gone)
                except self.lease.errors as exc:  # an unreachable or busy store must not end the renewals
                    log.warning("workflow lease renewal failed: %s", exc)
                    # The lead stands until the last renewal that went through could have run out.
                    term = was if not lapsed and time.monotonic() < self.lease.valid_until else None
            self.term = term if self.broker.online else None
            changed = was != self.term or lapsed
            if was is not None and changed:
                log.warning("%s no longer leads the workflows (term %s)", self.lease.holder, was)
                self.on_deposed()
            if self.term is not None and changed:
                log.info("%s leads the workflows (term %s)", self.lease.holder, self.term)
                self.on_elected()
            return self.leading

    def _step_down(self) -> None:
        if self.term is not None:
            self.term = None
            self.on_deposed()
        self.broker.spawn(self._release(), name="giving up the workflow lease")

    async def _release(self) -> None:
        async with self._renewing:
            if self.term is None:  # not retaken meanwhile
                try:
                    await self.lease.release()
                except self.lease.errors as exc:
                    log.warning("could not give up the workflow lease at once (it expires on its own): %s", exc)

    def start_leading(self) -> None:
        """Called with each new session: take part in the election."""
        if self._renewer is None or self._renewer.done():
            self._renewer = self.broker.spawn(self._renew_forever(), name="workflow lease renewal")

    async def _renew_forever(self) -> None:
        while True:
            await self.lead()
            await self.lease.wait_for_change(RENEW_EVERY)  # or sooner, where the store says it changed

    def _on_connection_lost(self, _event: Any) -> None:
        # Without a session this instance can send no step and hear no outcome: let another lead now.
        self._step_down()

    def sibling_seen(self, jid: str, available: bool) -> None:
        if available:
            self.siblings.add(jid)
            return
        self.siblings.discard(jid)
        self.broker.spawn(self._take_over_from(jid), name="taking over the workflow lead")

    async def _take_over_from(self, jid: str) -> None:
        try:
            if await self.lease.current() == jid:  # the server says the leader's session ended: take over now
                await self.lead(gone=jid)
        except self.lease.errors as exc:
            log.warning("could not check the workflow lease: %s", exc)

    async def stop_leading(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)  # ended: start_leading may start anew
        async with self._renewing:
            if self.term is not None:
                self.term = None
                self.on_deposed()
            try:
                await self.lease.release()
            except self.lease.errors as exc:
                log.warning("could not give up the workflow lease at once (it expires on its own): %s", exc)

    async def aclose(self) -> None:
        """Close the store's connection (when the broker stops)."""
        try:
            await self.lease.aclose()
        except self.lease.errors as exc:
            log.warning("closing the workflow lease store: %s", exc)

    async def forward_to_leader(self, name: str, call: Any, args: dict[str, Any]) -> Any:
        """Where a leader-only op is served: None when here (this instance leads, or has just taken
        the free lead), else the leader's answer, asked for on the caller's behalf."""
        if self.leading or await self.lead():
            return None
        try:
            leader = await self.lease.current()
        except self.lease.errors as exc:
            raise OpError(f"the broker's shared state cannot be read ({exc}); try again in a few seconds") from None
        if leader is None:  # released between the two reads: the next renewal settles it
            raise OpError("no broker instance leads the workflows at this moment; try again in a few seconds")
        budget = call.deadline - asyncio.get_running_loop().time()
        # A retry through any instance is the same request to the leader, which answers it from its
        # request log instead of running it again.
        rid = _FORWARDED + request_origin(call, str(self.broker.jid.bare))
        call.passed_to = (leader, rid)  # this instance's audit record then names the leader's
        res = await self.broker.request(leader, name, args, timeout=budget, behalf=call.caller, rid=rid)
        if res.outcome is Outcome.OK:
            return res
        if res.outcome is Outcome.UNREACHABLE and await self.lead(gone=leader):
            call.passed_to = None
            return None  # the leader had gone, and this instance has taken over
        condition, _, text = (res.error or "").partition(": ")
        err = error_for(condition, text or condition)
        if type(err) is OpError:  # no application condition: say where it failed
            err = OpError(f"the leading broker instance {leader} answered {res.outcome.value}: {res.error}")
        raise err
