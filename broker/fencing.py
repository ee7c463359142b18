"""Fencing on the broker: every fencing attempt and outcome is announced here, and fencing epochs live here.

Fencing agents post each attempt and outcome with ``mesh.fence.event``; the broker keeps them (on
disk), calls the listeners registered with :meth:`Fencing.on_fence_event` (the operators'
chat room shows them), and keeps each node's fencing epochs:

- a verified off (``fence.off`` ok) opens a new epoch for the node, numbered one more than its last;
  a node already fenced stays in its open epoch (nothing ran on it in between);
- a verified on (``fence.on`` ok) ends the open epoch;
- a reboot is a verified off then on: a new epoch that ends at once, or stays open when power did
  not come back (the outcome's ``on_error``);
- a failed attempt changes nothing: only a verified state counts;
- an outcome older than the node's last change (a late resend, another agent's older report) is
  kept as an event and changes nothing (an off only when older by more than the clock-skew
  allowance, agents/protocol.py: in doubt a node stays fenced).

Each event carries the fencing agent's id for it, the same on every resend: the broker records an
event once per (agent, id), so an agent may resend until it hears ok (agents/fencing/outbox.py)
without counting twice or opening a second epoch.

While an epoch is open, the identities that belong to the node may run no op that changes state
anywhere: the broker pushes the open epochs to every agent that offers ``fenced.install``
(agents/fenced.py) whenever one opens or ends, and to each agent as it joins, and refuses them
itself (workflow steps they request, approvals they give). Which identities belong to a node is the
broker's configuration: the mesh file's settings of the fencing agent (``identities:``), as the
roster holds them, never what an event says.

Who may post: an account the broker's roster admits as kind ``fencing``, for a node the mesh file
configures it to fence, and nobody else, whatever the policy says (the op's declaration says so:
``sender="agent"``, ``sender_kinds=("fencing",)``; the broker's sender rule checks it): a forged
"off" would lock a node's identities out, a forged "on" would let a fenced node's zombie write again.

Reconciling: when a fencing agent joins the directory (which includes every agent after the broker
restarts), the broker reads its ledger (``fence.ledger``, which the agent serves to its broker
only): the last verified outcome per node. Each one the broker has not recorded is recorded as if
posted, under the same rules, so an epoch opened while the broker was down is not lost even if
the agent's outbox was. Only roster fencing agents are asked, and only their configured nodes
count; an "on" ends an epoch only as a verified on newer than the off that opened it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Protocol

from agents.agent import Call
from agents.db import Store, open_db, transaction
from agents.authz import Decision, Request
from agents.errors import OpError, Outcome
from agents.fenced import INSTALL_OP, ORDERED, Fenced, FencedIdentities, encode_entries
# The settings' own readers (as broker/service.py uses them): no device checks on the broker's machine.
from agents.fencing.settings import NODE_RESOURCE, configured_nodes, node_resource
from agents.ops import Arg, OpSpec, op
from agents.protocol import CLOCK_SKEW_ALLOWANCE
from rbac import segments

from . import shared_state
from .policy import push
from .recent import Recent

log = logging.getLogger(__name__)

EVENT_OP = "mesh.fence.event"
LEDGER_OP = "fence.ledger"  # served by fencing agents to their broker (agents/fencing/agent.py)
FENCING_KIND = "fencing"
EVENT_ID = r"[A-Za-z0-9_.:-]{1,64}"
RECENT_EVENTS = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fence_events (seq INTEGER PRIMARY KEY, at REAL NOT NULL, agent TEXT NOT NULL,
                                         body TEXT NOT NULL, event_id TEXT);
CREATE TABLE IF NOT EXISTS epochs (
    cluster TEXT NOT NULL, node TEXT NOT NULL, epoch INTEGER NOT NULL,
    fenced_at REAL NOT NULL, fenced_by TEXT NOT NULL, requester TEXT NOT NULL, identities TEXT NOT NULL,
    unfenced_at REAL, unfenced_by TEXT,
    PRIMARY KEY (cluster, node, epoch));
"""


class FenceLedgerState(Protocol):
    """What the broker needs of a store of fencing events and epochs, shared by its instances. The
    reads and the recording are awaited; ``written_elsewhere`` and ``fenced_now`` answer at once,
    for the fenced-identity rule, which decides synchronously (``FencedNow``)."""

    async def record(self, agent: str, event: dict[str, Any]) -> tuple[int, str | None, bool]: ...
    async def open_epoch(self, cluster: str, node: str) -> Fenced | None: ...
    async def fenced(self) -> list[Fenced]: ...
    async def fenced_state(self) -> tuple[str, int, list[Fenced]]: ...
    async def epochs(self, cluster: str = "", node: str = "") -> list[dict[str, Any]]: ...
    async def events(self, since: int = 0, limit: int = 50) -> list[dict[str, Any]]: ...
    def written_elsewhere(self) -> bool: ...
    def fenced_now(self) -> list[Fenced]: ...
    async def aclose(self) -> None: ...

    errors: tuple[type[BaseException], ...]     # what the awaited calls raise while the store cannot answer


class FenceLedger:
    """:class:`FenceLedgerState` in SQLite, so a restarted broker still knows which nodes are fenced.

    Recording and the awaited reads run on the file's own thread (``agents.db.Store``). The one
    exception is what the synchronous fenced-identity rule asks for every decision: whether another
    instance has written (``PRAGMA data_version`` on a read connection of its own, answered from
    the WAL's shared memory), and only then a re-read of the open epochs (a WAL read never waits
    for a writer). The open epochs recorded here are kept in memory as each recording leaves them."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)    # a shared file out of reach

    def __init__(self, path: str | Path) -> None:
        # Shared by a broker's instances (one per cluster node): WAL, and each record one transaction.
        self.store = Store(path, [_SCHEMA], name="fence ledger")
        self.store.call(_add_event_ids)
        self.id: str = self.store.call(_ledger_id)
        self._fenced: list[Fenced] = self.store.call(_fenced)
        # Another instance can only write to a file: in memory, nothing is written elsewhere.
        in_memory = path is None or str(path) == ":memory:"
        self._probe = None if in_memory else open_db(path, [_SCHEMA])
        self._seen_version: int | None = None
        self._local_change = True  # the first decision installs what the ledger held at start

    async def aclose(self) -> None:
        await self.store.aclose()
        if self._probe is not None:
            self._probe.close()

    def close(self) -> None:
        self.store.close()
        if self._probe is not None:
            self._probe.close()

    def written_elsewhere(self) -> bool:
        """Whether the open epochs may have changed since the last ask: another connection (another
        instance of the broker) has written, or a recording here has."""
        changed, self._local_change = self._local_change, False
        if self._probe is not None:
            (version,) = self._probe.execute("PRAGMA data_version").fetchone()
            if version != self._seen_version:
                self._seen_version = version
                self._fenced = _fenced(self._probe)
                changed = True
        return changed

    def fenced_now(self) -> list[Fenced]:
        """The open epochs as last read (see :meth:`written_elsewhere`), without waiting."""
        return list(self._fenced)

    async def record(self, agent: str, event: dict[str, Any]) -> tuple[int, str | None, bool]:
        """Keep an event (once per agent and ``event["id"]``) and apply it to the node's epochs;
        returns its sequence number, the change (``fenced``, ``unfenced``, ``rebooted`` or None)
        and whether it was new (False: a resend of one recorded before, which changes nothing)."""
        seq, change, new, fenced = await self.store.run(_record, agent, event)
        if change is not None:
            # Another instance may have written since: the next decision reads the file again.
            self._fenced, self._local_change, self._seen_version = fenced, True, None
        return seq, change, new

    async def open_epoch(self, cluster: str, node: str) -> Fenced | None:
        found = [f for f in await self.fenced() if f.cluster == cluster and f.node == node]
        return found[0] if found else None

    async def fenced(self) -> list[Fenced]:
        """Every open epoch: the nodes fenced now."""
        return await self.store.run(_fenced)

    async def fenced_state(self) -> tuple[str, int, list[Fenced]]:
        """The open epochs, with the ledger's id and the number of its newest event when they were read
        (one snapshot): which state of the ledger a push of them is (agents/fenced.py)."""
        seq, fenced = await self.store.run(_fenced_state)
        return self.id, seq, fenced

    async def epochs(self, cluster: str = "", node: str = "") -> list[dict[str, Any]]:
        return await self.store.run(_epochs, cluster, node)

    async def events(self, since: int = 0, limit: int = 50) -> list[dict[str, Any]]:
        return await self.store.run(_events, since, limit)


# -- the ledger's statements, each run on its store's thread ----------------------------------------

def _add_event_ids(db: sqlite3.Connection) -> None:
    columns = {row[1] for row in db.execute("PRAGMA table_info(fence_events)")}
    if "event_id" not in columns:  # a ledger written before events had ids
        db.execute("ALTER TABLE fence_events ADD COLUMN event_id TEXT")
    # One record per event however often its agent resends it.
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS fence_event_once ON fence_events (agent, event_id)")


def _record(db: sqlite3.Connection, agent: str, event: dict[str, Any]
            ) -> tuple[int, str | None, bool, list[Fenced]]:
    """One event in one transaction; also returns the open epochs it leaves."""
    with transaction(db):
        seq, change, new = _apply(db, agent, event)
        fenced = _fenced(db)
    return seq, change, new, fenced


def _apply(db: sqlite3.Connection, agent: str, event: dict[str, Any]) -> tuple[int, str | None, bool]:
    agent = agent.lower()
    event_id = event.get("id") or None
    if event_id is not None:
        row = db.execute("SELECT seq FROM fence_events WHERE agent = ? AND event_id = ?", (agent, event_id)).fetchone()
        if row is not None:
            return row[0], None, False
    cur = db.execute("INSERT INTO fence_events (at, agent, body, event_id) VALUES (?, ?, ?, ?)",
                     (event["at"], agent, json.dumps(event, sort_keys=True), event_id))
    seq = int(cur.lastrowid or 0)
    if event["event"] != "outcome" or not event["ok"]:
        return seq, None, True
    cluster, node = event["cluster"], event["node"]
    opened = any(f.cluster == cluster and f.node == node for f in _fenced(db))
    change = epoch_change(event, _last_change(db, cluster, node), opened)
    if change in ("fenced", "rebooted"):
        _open(db, agent, event)
    if change in ("rebooted", "unfenced"):
        _close(db, cluster, node, agent, event["at"])
    return seq, change, True


def epoch_change(event: dict[str, Any], last_change: float, opened: bool) -> str | None:
    """What a recorded event does to its node's epochs, given when they last changed and whether one
    is open (every store of the ledger decides with this): ``fenced`` (a new epoch opens), ``rebooted``
    (one opens and ends at once), ``unfenced`` (the open one ends) or None."""
    if event["event"] != "outcome" or not event["ok"]:
        return None
    action = event["action"]
    # Older than what the node's epochs already say (a late resend, another agent's older report):
    # the newer verified state stands. Times are the agents' clocks; an off within the clock-skew
    # allowance of the last change still counts, since erring that way keeps a node fenced.
    slack = CLOCK_SKEW_ALLOWANCE if action in ("off", "reboot") else 0.0
    if event["at"] < last_change - slack:
        return None
    if action in ("off", "reboot") and not opened:
        return "rebooted" if action == "reboot" and not event.get("on_error") else "fenced"
    if action == "on" and opened and event.get("state") == "on":
        return "unfenced"
    return None


def _last_change(db: sqlite3.Connection, cluster: str, node: str) -> float:
    """When the node's epochs last changed (its latest fence or unfence), 0 if never."""
    (last,) = db.execute("SELECT max(max(fenced_at, coalesce(unfenced_at, 0))) FROM epochs"
                         " WHERE cluster = ? AND node = ?", (cluster, node)).fetchone()
    return float(last or 0.0)


def _open(db: sqlite3.Connection, agent: str, event: dict[str, Any]) -> None:
    (last,) = db.execute("SELECT coalesce(max(epoch), 0) FROM epochs WHERE cluster = ? AND node = ?",
                         (event["cluster"], event["node"])).fetchone()
    db.execute("INSERT INTO epochs (cluster, node, epoch, fenced_at, fenced_by, requester, identities)"
               " VALUES (?, ?, ?, ?, ?, ?, ?)",
               (event["cluster"], event["node"], last + 1, event["at"], agent, event["requester"],
                json.dumps(sorted({j.lower() for j in event.get("identities", ())}))))


def _close(db: sqlite3.Connection, cluster: str, node: str, agent: str, at: float) -> None:
    db.execute("UPDATE epochs SET unfenced_at = ?, unfenced_by = ? WHERE cluster = ? AND node = ?"
               " AND unfenced_at IS NULL", (at, agent, cluster, node))


def _ledger_id(db: sqlite3.Connection) -> str:
    """The ledger's id, made when it is first opened: a ledger made anew (its file lost) numbers its events
    from 1 again, and agents must not take its lists for older ones."""
    with transaction(db):
        db.execute("CREATE TABLE IF NOT EXISTS ledger (one INTEGER PRIMARY KEY CHECK (one = 1), id TEXT NOT NULL)")
        db.execute("INSERT OR IGNORE INTO ledger VALUES (1, ?)", (uuid.uuid4().hex,))
        (ledger,) = db.execute("SELECT id FROM ledger").fetchone()
    return str(ledger)


def _fenced_state(db: sqlite3.Connection) -> tuple[int, list[Fenced]]:
    db.execute("BEGIN")  # deferred: one read snapshot for both
    try:
        (seq,) = db.execute("SELECT coalesce(max(seq), 0) FROM fence_events").fetchone()
        return int(seq), _fenced(db)
    finally:
        db.execute("COMMIT")


def _fenced(db: sqlite3.Connection) -> list[Fenced]:
    rows = db.execute("SELECT cluster, node, epoch, fenced_at, fenced_by, requester, identities"
                      " FROM epochs WHERE unfenced_at IS NULL ORDER BY cluster, node").fetchall()
    return [Fenced(c, n, e, at, by, req, tuple(json.loads(ids))) for c, n, e, at, by, req, ids in rows]


def _epochs(db: sqlite3.Connection, cluster: str, node: str) -> list[dict[str, Any]]:
    rows = db.execute("SELECT cluster, node, epoch, fenced_at, fenced_by, requester, identities,"
                      " unfenced_at, unfenced_by FROM epochs WHERE (? = '' OR cluster = ?)"
                      " AND (? = '' OR node = ?) ORDER BY cluster, node, epoch",
                      (cluster, cluster, node, node)).fetchall()
    keys = ("cluster", "node", "epoch", "fenced_at", "fenced_by", "requester", "identities", "unfenced_at",
            "unfenced_by")
    return [{**dict(zip(keys, r)), "identities": json.loads(r[6])} for r in rows]


def _events(db: sqlite3.Connection, since: int, limit: int) -> list[dict[str, Any]]:
    rows = db.execute("SELECT seq, agent, body FROM fence_events WHERE seq > ? ORDER BY seq DESC LIMIT ?",
                      (since, limit)).fetchall()
    return [{"seq": seq, "agent": agent, **json.loads(body)} for seq, agent, body in reversed(rows)]


class FencedNow:
    """The broker's fenced-identity rule: as every agent's (``Agent.not_while_fenced``), with the
    ledger the broker's instances share read first when another instance has written to it (one
    cheap PRAGMA per decision otherwise). The workflow engine decides each step, approval and
    performer with the broker's rules too, so a fenced identity may not request a step that changes
    state, nor approve or take one (both change state); reads stay allowed."""

    def __init__(self, ledger: FenceLedgerState, fenced: FencedIdentities) -> None:
        self.ledger, self.fenced = ledger, fenced

    def refresh(self) -> None:
        if self.ledger.written_elsewhere():
            self.fenced.install(self.ledger.fenced_now())

    def __call__(self, request: Request, spec: OpSpec) -> Decision | None:
        self.refresh()
        return self.fenced.check(request.caller, spec)


class Fencing:
    """A component of the broker (broker/service.py): the fencing event ops, the ledger of events
    and epochs, the broker's fenced-identity rule (``fenced_now``) and the pushes of open epochs,
    sent through ``broker``."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        # SQLite in the shared state directory, or etcd (the mesh file's broker state).
        self.ledger: FenceLedgerState = shared_state.fence_ledger(broker)
        # Only told to listeners: the ledger keeps the events.
        self._events: Recent[dict[str, Any]] = Recent("fencing event")
        self.fenced_now = FencedNow(self.ledger, broker.fenced)
        self.fenced_now.refresh()

    async def aclose(self) -> None:
        await self.ledger.aclose()

    def on_fence_event(self, listener: Callable[[dict[str, Any]], Any]) -> None:
        """Call ``listener`` with each fencing event as the broker keeps it (the chat room shows them)."""
        self._events.listen(listener)

    def _fencing_agent(self, caller: str) -> dict[str, tuple[str, ...]] | None:
        """The nodes (resource paths, with their identities) the mesh file configures the account
        ``caller`` to fence, or None if the roster does not admit it as a fencing agent."""
        admission = self.broker.roster.get(caller.split("/", 1)[0].lower())
        if admission is None or admission.kind != FENCING_KIND:
            return None
        return configured_nodes(admission.settings)

    # -- ops ------------------------------------------------------------------------------------

    @op(EVENT_OP, effect="change", deadline=10, resources=(NODE_RESOURCE,), sender="agent",
        sender_kinds=(FENCING_KIND,), own_resources="fence that node")
    async def fence_event(self, call: Call,
                          id: Annotated[str, Arg("the agent's id for this event, the same on every resend",
                                                 pattern=EVENT_ID)],
                          event: Annotated[Literal["attempt", "outcome"], Arg("what happened")],
                          action: Annotated[Literal["off", "on", "reboot", "status"], Arg("the power action")],
                          cluster: Annotated[str, Arg("the node's cluster", pattern=segments.PATTERN)],
                          node: Annotated[str, Arg("the node", pattern=segments.PATTERN)],
                          requester: Annotated[str, Arg("who asked the fencing agent")] = "",
                          request: Annotated[str, Arg("the request id the fencing agent served")] = "",
                          ok: Annotated[bool, Arg("outcome: whether the action was verified")] = False,
                          state: Annotated[str, Arg("outcome: the verified power state")] = "",
                          message: Annotated[str, Arg("outcome: what the agent reported")] = "",
                          on_error: Annotated[str, Arg("reboot: why power did not come back")] = "",
                          at: Annotated[float, Arg("when it happened (epoch s)")] = 0.0) -> dict:
        """Announce a fencing attempt or outcome (configured fencing agents only, for their own nodes).

        Recorded once per agent and id: the ok answer is the agent's acknowledgement, and a resend
        changes nothing."""
        args = {"id": id, "event": event, "action": action, "cluster": cluster, "node": node,
                "requester": requester, "request": request, "ok": ok, "state": state, "message": message,
                "on_error": on_error, "at": at}
        return await self._take_event(call.caller, args)

    async def _take_event(self, agent: str, args: dict[str, Any], reconciled: bool = False) -> dict[str, Any]:
        """Record one fencing event of a configured fencing agent (posted, or read from its ledger),
        apply it to the epochs, push and tell the listeners when it is new."""
        nodes = self._fencing_agent(agent) or {}
        # Whose node it is: the broker's configuration of this agent, never the event's word.
        identities = nodes.get(node_resource(args["cluster"], args["node"]), ())
        body = {**args, "identities": list(identities), "at": args["at"] or time.time(), "received": time.time()}
        if reconciled:
            body["reconciled"] = True
        seq, change, new = await self.ledger.record(agent, body)
        opened = await self.ledger.open_epoch(args["cluster"], args["node"])
        answer = {"seq": seq, "change": change, "fenced": opened is not None,
                  "epoch": opened.epoch if opened else None, "duplicate": not new}
        if not new:
            log.debug("fencing event %s from %s again: recorded before as %d", args["id"], agent, seq)
            return answer
        body.update(seq=seq, agent=agent.lower(), change=change)
        log.info("fencing %s from %s%s: %s %s/%s ok=%s%s", args["event"], agent, " (from its ledger)" if reconciled
                 else "", args["action"], args["cluster"], args["node"], args["ok"], f" -> {change}" if change else "")
        if change is not None:
            self.broker.fenced.install(self.ledger.fenced_now())
            self.broker.spawn(self._push_fenced_when_answered())
        self._events.add(dict(body))
        return answer

    async def reconcile_fencing(self, jid: str) -> int:
        """Read a fencing agent's ledger (its last verified outcome per node) and record each outcome
        not recorded yet; returns how many were new. Only an agent the roster admits as a fencing
        agent is asked, only its configured nodes count, and each entry passes the event op's own
        checks: its word is taken no further than if it had posted the event."""
        bare = jid.split("/", 1)[0].lower()
        nodes = self._fencing_agent(bare)
        if not nodes:
            return 0
        res = await self.broker.request(jid, LEDGER_OP, {}, timeout=10.0)
        if res.outcome is not Outcome.OK or not isinstance(res.result, dict):
            log.warning("could not read the fencing ledger of %s (%s: %s); its events arrive as it resends them",
                        jid, res.outcome.value, res.error)
            return 0
        spec = self.broker.ops[EVENT_OP]
        new = 0
        for raw in res.result.get("entries", [])[:len(nodes) * 4]:
            try:
                args = spec.validate(raw)
            except OpError as exc:
                log.warning("ignored an entry of %s's fencing ledger: %s", jid, exc.text)
                continue
            if node_resource(args["cluster"], args["node"]) not in nodes:
                log.warning("ignored %s's ledger entry for %s/%s: the mesh file does not configure it to fence"
                            " that node", jid, args["cluster"], args["node"])
                continue
            if args["event"] != "outcome" or not args["ok"]:
                continue  # only a verified state counts
            if not (await self._take_event(bare, args, reconciled=True))["duplicate"]:
                new += 1
        if new:
            log.warning("recorded %d fencing outcome(s) of %s from its ledger that the broker had not received",
                        new, jid)
        return new

    @op("mesh.fence.events", effect="read", deadline=5)
    async def fence_events(self, call: Call,
                           since: Annotated[int, Arg("only events after this sequence number", min=0)] = 0,
                           limit: Annotated[int, Arg("at most this many, newest last", min=1,
                                                     max=RECENT_EVENTS)] = 50) -> list:
        """The fencing attempts and outcomes the broker keeps, oldest first."""
        return await self.ledger.events(since, limit)

    @op("mesh.fence.epochs", effect="read", deadline=5)
    async def fence_epochs(self, call: Call,
                           cluster: Annotated[str, Arg("only this cluster (default: all)")] = "",
                           node: Annotated[str, Arg("only this node (default: all)")] = "") -> dict:
        """Which nodes are fenced now, and every node's fencing epochs."""
        return {"fenced": [f.to_dict() for f in await self.ledger.fenced()
                           if cluster in ("", f.cluster) and node in ("", f.node)],
                "epochs": await self.ledger.epochs(cluster, node)}

    # -- pushes ---------------------------------------------------------------------------------

    def _takers(self) -> list[str]:
        return [e.jid for e in self.broker.directory.entries() if INSTALL_OP in e.caps.ops]

    async def push_fenced(self, targets: list[str] | None = None, session: str | None = None) -> dict[str, str]:
        """Push the open epochs; returns each target's error ("" when it took them). Agents that advertise
        ``ORDERED`` are told which state of the ledger the list is, so a list read earlier and arriving later
        is ignored; the others get the list alone (an argument they do not know would fail the push).
        ``session`` is the broker session the push is for, by default the one the ledger is read in (see
        ``push``: a read that outlives its session is not sent in the next)."""
        session = self.broker.session if session is None else session
        targets = self._takers() if targets is None else targets
        ledger, version, entries = await self.ledger.fenced_state()
        plain = {"fenced": encode_entries(entries)}
        ordered = [t for t in targets if self.broker.directory.has_feature(t, ORDERED)]
        others = sorted(set(targets) - set(ordered))
        done = await asyncio.gather(
            push(self.broker, ordered, INSTALL_OP, {**plain, "ledger": ledger, "version": version}, "the fenced nodes",
                 session),
            push(self.broker, others, INSTALL_OP, plain, "the fenced nodes", session))
        return {**done[0], **done[1]}

    def on_join(self, jid: str) -> None:
        """A newly listed agent gets the fenced nodes at once; a fencing agent's ledger is reconciled
        (after a broker restart, every agent joins again)."""
        if self._fencing_agent(jid):
            self.broker.spawn(self._reconcile_quietly(jid))
        if self.broker.directory.offers(jid, INSTALL_OP):
            self.broker.spawn(self._push_fenced_when_answered([jid], self.broker.session))

    async def _push_fenced_when_answered(self, targets: list[str] | None = None, session: str | None = None) -> None:
        """push_fenced on the broker's own account, the ledger asked again while it cannot answer: an agent
        that joins while etcd is out of reach still learns the fenced nodes once it is back."""
        await shared_state.until_answered(self.broker, lambda: self.push_fenced(targets, session),
                                          self.ledger.errors, "pushing the fenced nodes")

    async def _reconcile_quietly(self, jid: str) -> None:
        try:
            await self.reconcile_fencing(jid)
        except Exception:  # the agent's resends still deliver what it holds
            log.exception("reconciling the fencing ledger of %s failed", jid)
