"""Fencing epochs as every agent sees them: which identities belong to a node that is fenced now.

After a verified off the broker opens a fencing epoch for the node (see ``broker.fencing``); a
verified on ends it. While it is open, the node may still be running a zombie process that holds
its old credentials (a hung kernel that wakes, a network partition that heals): whatever it asks
must not change shared state. So every agent refuses every op that changes state (declared with
effect ``change`` or ``destructive``, ``agents/ops.py``) requested by the node's identities (the bare
JIDs the fencing agent's settings list under ``identities:``), with an error saying which node was
fenced, when and by whom. Reads (effect ``read``) stay allowed: they change nothing.

How agents learn it: the broker pushes the whole list of open epochs with the ``fenced.install``
op, to every agent that offers it, whenever an epoch opens or ends and to each agent as it joins.
Like ``policy.install``, the op is accepted from the agent's own broker only, whatever a policy
says: nobody else can fence or unfence identities. A push replaces the whole list, so a missed
push is repaired by the next one. Pushes can pass each other (two read the ledger, the later read is
sent first; or two broker instances push at once), so each says which state of the ledger it is:
``ledger`` (the ledger's id) and ``version`` (the number of its newest event when it was read). An
agent ignores a list older than the one it has from the same ledger, so a node fenced a moment ago is
never unfenced by a list read before. It advertises that it does so with the disco feature
``ORDERED``; the broker sends the two arguments only to agents that advertise it (an agent of an
earlier version refuses arguments it does not know, and a refused push would leave it unfenced).

The runtime (``agents/agent.py``) declares ``fenced.install`` on every agent (``sender="broker"``)
and :meth:`FencedIdentities.check` is one of the rules authorization walks (``agents/authz.py``),
so the refusal is part of the decision the audit log records. The broker walks the same rules when
it decides a workflow step for its requester, or who may approve one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Iterable, Mapping

from .authz import Decision
from .errors import BadArguments
from .ops import Arg, OpSpec, op

INSTALL_OP = "fenced.install"
ORDERED = "urn:vertebra:fenced:ordered"   # fenced.install takes ledger and version, and ignores older lists


@dataclass(frozen=True)
class Fenced:
    """One open fencing epoch, as the broker pushes it."""

    cluster: str
    node: str
    epoch: int  # counts this node's verified offs, so a later epoch is always a larger number
    fenced_at: float  # epoch seconds of the verified off
    fenced_by: str  # the fencing agent that did it
    requester: str  # who asked for it
    identities: tuple[str, ...]  # bare JIDs that belong to the node

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.fenced_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (f"node {self.node} of cluster {self.cluster} was fenced at {when} (epoch {self.epoch},"
                f" by {self.fenced_by} for {self.requester})")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Fenced":
        try:
            return cls(cluster=str(raw["cluster"]), node=str(raw["node"]), epoch=int(raw["epoch"]),
                       fenced_at=float(raw["fenced_at"]), fenced_by=str(raw.get("fenced_by", "")),
                       requester=str(raw.get("requester", "")),
                       identities=tuple(str(j).lower() for j in raw.get("identities", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadArguments(f"a fenced entry needs cluster, node, epoch and fenced_at: {exc}",
                               argument="fenced") from None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "identities": list(self.identities)}


class FencedIdentities:
    """The open epochs an agent knows of, indexed by identity; decides what a fenced identity may do."""

    def __init__(self) -> None:
        self._by_identity: dict[str, Fenced] = {}
        self.entries: tuple[Fenced, ...] = ()
        self.installed_at: float | None = None  # when the broker last told us (None: never)
        self.ledger, self.version = "", 0       # which state of which ledger the list is (none said: "", 0)

    def install(self, entries: Iterable[Fenced], ledger: str = "", version: int = 0) -> bool:
        """Replace what we know with the broker's whole list, unless it is from an older state of the
        same ledger than the list we have (then False, and nothing changes). A list that says no state
        (an older broker's) is always taken."""
        if ledger and ledger == self.ledger and version < self.version:
            return False
        if ledger:
            self.ledger, self.version = ledger, version
        self.entries = tuple(entries)
        by_identity: dict[str, Fenced] = {}
        for f in self.entries:
            for jid in f.identities:
                # An identity of two fenced nodes: the older fence is the one it has lived under longest.
                if jid not in by_identity or f.fenced_at < by_identity[jid].fenced_at:
                    by_identity[jid] = f
        self._by_identity = by_identity
        self.installed_at = time.time()
        return True

    def of(self, caller: str) -> Fenced | None:
        return self._by_identity.get(caller.lower())

    def check(self, caller: str, spec: OpSpec) -> Decision | None:
        """A denial when ``caller`` belongs to a fenced node and ``spec`` changes state (any effect
        but read), else None."""
        if not spec.changes_state or not self._by_identity:
            return None
        fenced = self.of(caller)
        if fenced is None:
            return None
        return Decision(False, f"{caller} belongs to a fenced node: {fenced.describe()}; its ops that change"
                               f" state ({spec.name}) are refused until the node is unfenced (a verified"
                               " fence.on); reads are still served",
                        f"fenced node {fenced.cluster}/{fenced.node} epoch {fenced.epoch}")


def encode_entries(entries: Iterable[Fenced]) -> str:
    """The ``fenced`` argument of ``fenced.install`` (op arguments are scalars or lists of them)."""
    return json.dumps([f.to_dict() for f in entries], sort_keys=True)


def parse_entries(text: str) -> list[Fenced]:
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise BadArguments(f"fenced: not JSON: {exc}", argument="fenced") from None
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise BadArguments("fenced: expected a JSON list of objects", argument="fenced")
    return [Fenced.from_dict(r) for r in raw]


def install_op() -> Any:
    """The ``fenced.install`` op, for an agent class body (``fenced_install = install_op()``); the
    agent keeps what it learns in ``self.fenced`` (a FencedIdentities)."""

    @op(INSTALL_OP, effect="change", deadline=10, sender="broker")
    async def fenced_install(self: Any, call: Any,
                             fenced: Annotated[str, Arg("every open fencing epoch, as a JSON list of"
                                                        " {cluster, node, epoch, fenced_at, fenced_by,"
                                                        " requester, identities}")] = "[]",
                             ledger: Annotated[str, Arg("the id of the broker's fencing ledger the list was read"
                                                        " from", pattern=r"[A-Za-z0-9-]{0,64}")] = "",
                             version: Annotated[int, Arg("the number of the ledger's newest event when the list"
                                                         " was read: an older list than the one installed from"
                                                         " the same ledger is ignored", min=0)] = 0) -> dict:
        """Take the broker's list of fenced nodes (accepted from this agent's broker only)."""
        entries = parse_entries(fenced)
        taken = self.fenced.install(entries, ledger, version)
        return {"fenced": len(entries), "identities": sum(len(f.identities) for f in entries), "taken": taken,
                "version": self.fenced.version}

    return fenced_install
