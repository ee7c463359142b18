"""Fencing on the broker: every fencing attempt and outcome is announced here, and fencing epochs live here.

Fencing agents post each attempt and outcome with ``mesh.fence.event``; the broker keeps them (on
disk), calls the listeners registered with :meth:`FencingMixin.on_fence_event` (the operators'
chat room shows them), and keeps each node's fencing epochs:

- a verified off (``fence.off`` ok) opens a new epoch for the node, numbered one more than its last;
  a node already fenced stays in its open epoch (nothing ran on it in between);
- a verified on (``fence.on`` ok) ends the open epoch;
- a reboot is a verified off then on: a new epoch that ends at once, or stays open when power did
  not come back (the outcome's ``on_error``);
- a failed attempt changes nothing: only a verified state counts.

While an epoch is open, the identities that belong to the node (the fencing agent's settings,
``identities:``, sent with each event) may run no destructive op anywhere: the broker pushes the
open epochs to every agent that offers ``fenced.install`` (agents/fencing/epochs.py) whenever one
opens or ends, and to each agent as it joins, and refuses them itself (workflow steps they request,
approvals they give).

Who may post: a live fencing agent of the directory, for a node it advertises (it can fence that
node), and nobody else, whatever the policy says: a forged "off" would lock a node's identities
out, a forged "on" would let a fenced node's zombie write again.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence

from agents.agent import Call
from agents.authz import Authorizer, Decision, decide
from agents.fenced import INSTALL_OP, Fenced, FencedIdentities, encode_entries
from agents.fencing.settings import NODE_RESOURCE, SEGMENT
from agents.ops import Arg, OpSpec, op

from .policy import push

log = logging.getLogger(__name__)

EVENT_OP = "mesh.fence.event"
RECENT_EVENTS = 1000
#: Broker ops a fenced identity may not use either: approving or taking a step is acting.
BROKER_ACTS = frozenset({"workflow.approve", "workflow.perform"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fence_events (seq INTEGER PRIMARY KEY, at REAL NOT NULL, agent TEXT NOT NULL,
                                         body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS epochs (
    cluster TEXT NOT NULL, node TEXT NOT NULL, epoch INTEGER NOT NULL,
    fenced_at REAL NOT NULL, fenced_by TEXT NOT NULL, requester TEXT NOT NULL, identities TEXT NOT NULL,
    unfenced_at REAL, unfenced_by TEXT,
    PRIMARY KEY (cluster, node, epoch));
"""


class FenceLedger:
    """The events and epochs, in SQLite so a restarted broker still knows which nodes are fenced."""

    def __init__(self, path: str | Path) -> None:
        # Shared by a broker's instances (one per cluster node): WAL, and each record one transaction.
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        if str(path) != ":memory:":
            self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        self._seen_version: int | None = None

    def close(self) -> None:
        self.db.close()

    def written_elsewhere(self) -> bool:
        """Whether another connection (another instance of the broker) has written since the last ask."""
        (version,) = self.db.execute("PRAGMA data_version").fetchone()
        changed, self._seen_version = version != self._seen_version, version
        return changed

    def record(self, agent: str, event: dict[str, Any]) -> tuple[int, str | None]:
        """Keep an event and apply it to the node's epochs; returns its sequence number and the change
        (``fenced``, ``unfenced``, ``rebooted`` or None)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            out = self._record(agent, event)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return out

    def _record(self, agent: str, event: dict[str, Any]) -> tuple[int, str | None]:
        cur = self.db.execute("INSERT INTO fence_events (at, agent, body) VALUES (?, ?, ?)",
                              (event["at"], agent, json.dumps(event, sort_keys=True)))
        seq = int(cur.lastrowid or 0)
        if event["event"] != "outcome" or not event["ok"]:
            return seq, None
        cluster, node, action = event["cluster"], event["node"], event["action"]
        opened = self.open_epoch(cluster, node)
        if action in ("off", "reboot") and opened is None:
            self._open(agent, event)
            if action == "reboot" and not event.get("on_error"):
                self._close(cluster, node, agent, event["at"])
                return seq, "rebooted"
            return seq, "fenced"
        if action == "on" and opened is not None:
            self._close(cluster, node, agent, event["at"])
            return seq, "unfenced"
        return seq, None

    def _open(self, agent: str, event: dict[str, Any]) -> None:
        (last,) = self.db.execute("SELECT coalesce(max(epoch), 0) FROM epochs WHERE cluster = ? AND node = ?",
                                  (event["cluster"], event["node"])).fetchone()
        self.db.execute("INSERT INTO epochs (cluster, node, epoch, fenced_at, fenced_by, requester, identities)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (event["cluster"], event["node"], last + 1, event["at"], agent, event["requester"],
                         json.dumps(sorted({j.lower() for j in event.get("identities", ())}))))

    def _close(self, cluster: str, node: str, agent: str, at: float) -> None:
        self.db.execute("UPDATE epochs SET unfenced_at = ?, unfenced_by = ? WHERE cluster = ? AND node = ?"
                        " AND unfenced_at IS NULL", (at, agent, cluster, node))

    def open_epoch(self, cluster: str, node: str) -> Fenced | None:
        found = [f for f in self.fenced() if f.cluster == cluster and f.node == node]
        return found[0] if found else None

    def fenced(self) -> list[Fenced]:
        """Every open epoch: the nodes fenced now."""
        rows = self.db.execute("SELECT cluster, node, epoch, fenced_at, fenced_by, requester, identities"
                               " FROM epochs WHERE unfenced_at IS NULL ORDER BY cluster, node").fetchall()
        return [Fenced(c, n, e, at, by, req, tuple(json.loads(ids))) for c, n, e, at, by, req, ids in rows]

    def epochs(self, cluster: str = "", node: str = "") -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT cluster, node, epoch, fenced_at, fenced_by, requester, identities,"
                               " unfenced_at, unfenced_by FROM epochs WHERE (? = '' OR cluster = ?)"
                               " AND (? = '' OR node = ?) ORDER BY cluster, node, epoch",
                               (cluster, cluster, node, node)).fetchall()
        keys = ("cluster", "node", "epoch", "fenced_at", "fenced_by", "requester", "identities", "unfenced_at",
                "unfenced_by")
        return [{**dict(zip(keys, r)), "identities": json.loads(r[6])} for r in rows]

    def events(self, since: int = 0, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT seq, agent, body FROM fence_events WHERE seq > ? ORDER BY seq DESC LIMIT ?",
                               (since, limit)).fetchall()
        return [{"seq": seq, "agent": agent, **json.loads(body)} for seq, agent, body in reversed(rows)]


class FencersMayAnnounce:
    """Admit ``mesh.fence.event`` from a live fencing agent for the nodes it advertises, from nobody
    else; ask the inner authorizer about every other op."""

    def __init__(self, inner: Authorizer, fencers: Callable[[], dict[str, set[str]]]) -> None:
        self.inner = inner
        self.fencers = fencers

    def decide(self, caller: str, spec: OpSpec, resources: Sequence[str]) -> Decision:
        if spec.name != EVENT_OP:
            return decide(self.inner, caller, spec, resources)
        held = self.fencers().get(caller.lower())
        if held is None:
            return Decision(False, f"{caller} may not announce fencing events: only live fencing agents do",
                            "fencing agents only")
        if not resources or not set(resources) <= held:
            return Decision(False, f"{caller} may not announce fencing of {' '.join(resources)}: it does not"
                                   " fence that node", "fencing agents only, for their own nodes")
        return Decision(True, "a live fencing agent announcing its own node", "fencing agents, own nodes")


class BrokerFenceGuard:
    """The broker's own check: a fenced identity may not request destructive workflow steps (the
    workflow engine decides each step for its requester through this authorizer, outside the
    runtime's own check of requests), nor approve or take a step."""

    def __init__(self, inner: Authorizer, fenced: FencedIdentities,
                 refresh: Callable[[], None] = lambda: None) -> None:
        self.inner = inner
        self.fenced = fenced
        self.refresh = refresh  # brings ``fenced`` up to date first (another instance may have fenced)

    def decide(self, caller: str, spec: OpSpec, resources: Sequence[str]) -> Decision:
        self.refresh()
        d = decide(self.inner, caller, spec, resources)
        if d.allowed:
            d = self.fenced.check(caller, spec) or d
        if d.allowed and spec.name in BROKER_ACTS:
            fenced = self.fenced.of(caller)
            if fenced is not None:
                return Decision(False, f"{caller} belongs to a fenced node: {fenced.describe()}; it may not"
                                       f" {spec.name.split('.', 1)[1]} workflow steps until the node is unfenced",
                                f"fenced node {fenced.cluster}/{fenced.node} epoch {fenced.epoch}")
        return d


class FencingMixin:
    """Mixed into the broker before ``Agent``: the fencing event ops, the epochs and their pushes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        state: Path | None = self.shared_dir  # type: ignore[attr-defined]
        self.fence_ledger = FenceLedger(state / "fencing.sqlite" if state else ":memory:")
        self._fence_listeners: list[Callable[[dict[str, Any]], Any]] = []
        self._fenced_from_ledger()
        inner = FencersMayAnnounce(self.authorizer, self._fencing_agents)  # type: ignore[has-type]
        self.authorizer = BrokerFenceGuard(inner, self.fenced, self._fenced_from_ledger)  # type: ignore[attr-defined]

    def _fenced_from_ledger(self) -> None:
        """The runtime's view of fenced identities, from the ledger the broker's instances share, when
        it has changed (one cheap PRAGMA per decision otherwise)."""
        if self.fence_ledger.written_elsewhere():
            self.fenced.install(self.fence_ledger.fenced())  # type: ignore[attr-defined]

    async def stop(self) -> None:
        await super().stop()  # type: ignore[misc]
        self.fence_ledger.close()

    def on_fence_event(self, listener: Callable[[dict[str, Any]], Any]) -> None:
        """Call ``listener`` with each fencing event as the broker keeps it (the chat room shows them)."""
        self._fence_listeners.append(listener)

    def _fencing_agents(self) -> dict[str, set[str]]:
        """Live fencing agents by bare JID, with the node paths each advertises."""
        out: dict[str, set[str]] = {}
        for e in self.directory.entries():  # type: ignore[attr-defined]
            if e.caps.kind == "fencing":
                out.setdefault(e.jid.split("/", 1)[0].lower(), set()).update(e.caps.resources)
        return out

    # -- ops ------------------------------------------------------------------------------------

    @op(EVENT_OP, effect="change", deadline=10, resources=(NODE_RESOURCE,))
    async def fence_event(self, call: Call,
                          event: Annotated[Literal["attempt", "outcome"], Arg("what happened")],
                          action: Annotated[Literal["off", "on", "reboot", "status"], Arg("the power action")],
                          cluster: Annotated[str, Arg("the node's cluster", pattern=SEGMENT)],
                          node: Annotated[str, Arg("the node", pattern=SEGMENT)],
                          requester: Annotated[str, Arg("who asked the fencing agent")] = "",
                          request: Annotated[str, Arg("the request id the fencing agent served")] = "",
                          ok: Annotated[bool, Arg("outcome: whether the action was verified")] = False,
                          state: Annotated[str, Arg("outcome: the verified power state")] = "",
                          message: Annotated[str, Arg("outcome: what the agent reported")] = "",
                          on_error: Annotated[str, Arg("reboot: why power did not come back")] = "",
                          identities: Annotated[list[str], Arg("the bare JIDs that belong to the node")] = (),
                          at: Annotated[float, Arg("when it happened (epoch s)")] = 0.0) -> dict:
        """Announce a fencing attempt or outcome (fencing agents only, for their own nodes)."""
        body = {"event": event, "action": action, "cluster": cluster, "node": node, "requester": requester,
                "request": request, "ok": ok, "state": state, "message": message, "on_error": on_error,
                "identities": list(identities), "at": at or time.time(), "received": time.time()}
        seq, change = self.fence_ledger.record(call.caller, body)
        body.update(seq=seq, agent=call.caller, change=change)
        log.info("fencing %s from %s: %s %s/%s ok=%s%s", event, call.caller, action, cluster, node, ok,
                 f" -> {change}" if change else "")
        if change is not None:
            self.fenced.install(self.fence_ledger.fenced())
            self._spawn(self.push_fenced())  # type: ignore[attr-defined]
        for listener in list(self._fence_listeners):
            try:
                listener(dict(body))
            except Exception:  # one broken listener must not lose the event for the others
                log.exception("fencing event listener failed")
        opened = self.fence_ledger.open_epoch(cluster, node)
        return {"seq": seq, "change": change, "fenced": opened is not None,
                "epoch": opened.epoch if opened else None}

    @op("mesh.fence.events", effect="read", deadline=5)
    async def fence_events(self, call: Call,
                           since: Annotated[int, Arg("only events after this sequence number", min=0)] = 0,
                           limit: Annotated[int, Arg("at most this many, newest last", min=1,
                                                     max=RECENT_EVENTS)] = 50) -> list:
        """The fencing attempts and outcomes the broker keeps, oldest first."""
        return self.fence_ledger.events(since, limit)

    @op("mesh.fence.epochs", effect="read", deadline=5)
    async def fence_epochs(self, call: Call,
                           cluster: Annotated[str, Arg("only this cluster (default: all)")] = "",
                           node: Annotated[str, Arg("only this node (default: all)")] = "") -> dict:
        """Which nodes are fenced now, and every node's fencing epochs."""
        return {"fenced": [f.to_dict() for f in self.fence_ledger.fenced()
                           if cluster in ("", f.cluster) and node in ("", f.node)],
                "epochs": self.fence_ledger.epochs(cluster, node)}

    # -- pushes ---------------------------------------------------------------------------------

    def _takers(self) -> list[str]:
        return [e.jid for e in self.directory.entries() if INSTALL_OP in e.caps.ops]  # type: ignore[attr-defined]

    async def push_fenced(self, targets: list[str] | None = None) -> dict[str, str]:
        """Push the open epochs; returns each target's error ("" when it took them)."""
        targets = self._takers() if targets is None else targets
        return await push(self, targets, INSTALL_OP, {"fenced": encode_entries(self.fence_ledger.fenced())},
                          "the fenced nodes")

    def policy_on_join(self, jid: str) -> None:
        """A newly listed agent gets the fenced nodes at once (and the policy, by the next mixin)."""
        parent = getattr(super(), "policy_on_join", None)
        if parent is not None:
            parent(jid)
        if jid in self._takers():
            self._spawn(self.push_fenced([jid]))  # type: ignore[attr-defined]
