"""Workflow constraints casbin cannot express, checked over one workflow instance's history.

casbin answers "may this role run this op"; these answer questions about who did what earlier in
the same instance (the Bertino-Ferrari-Atluri model): separation of duty (the requester of a step
may not approve it), the two-person rule for destructive steps (two distinct approvers, neither the
requester), binding of duty (the same person performs two named steps), and rate limits (at most N
of an op per period, counted atomically in SQLite, or on etcd with compare-and-swap
(broker/state_etcd.py), so two brokers or two racing requests cannot both take the last slot).
Approvals are re-checked when the step runs: an approver who has since lost the right to approve no
longer counts.

Pure logic over :class:`Event` lists plus the SQLite counter; nothing here talks to the mesh.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from agents.db import Store, transaction

REQUESTED, APPROVED, PERFORMED = "requested", "approved", "performed"


@dataclass(frozen=True)
class Event:
    """One thing that happened to a step of a workflow instance."""

    kind: str  # requested | approved | performed
    step: str
    actor: str  # bare JID
    at: float = 0.0


@dataclass(frozen=True)
class StepRule:
    """What a step demands before it may run."""

    step: str
    destructive: bool = False  # two-person rule: two distinct approvers, neither the requester
    approvals: int = 0  # approvals needed besides that (the larger of the two applies)
    bound_to: str | None = None  # binding of duty: performed by whoever performed this other step

    @property
    def needed(self) -> int:
        return max(self.approvals, 2 if self.destructive else 0)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str  # the constraint that decided, for the caller's error and the audit trail


def _of(history: Sequence[Event], kind: str, step: str) -> list[Event]:
    return [e for e in history if e.kind == kind and e.step == step]


def requester(history: Sequence[Event], step: str) -> str | None:
    found = _of(history, REQUESTED, step)
    return found[0].actor if found else None


def check_approval(history: Sequence[Event], rule: StepRule, approver: str) -> Verdict:
    """May ``approver`` approve ``rule.step`` now? (Their right to approve at all is casbin's question.)"""
    who = requester(history, rule.step)
    if who is None:
        return Verdict(False, f"step {rule.step} has not been requested")
    if approver == who:
        return Verdict(False, f"separation of duty: {approver} requested {rule.step} and may not approve it")
    if any(e.actor == approver for e in _of(history, APPROVED, rule.step)):
        return Verdict(False, f"{approver} already approved {rule.step}; a second approval must come from"
                              " someone else")
    if _of(history, PERFORMED, rule.step):
        return Verdict(False, f"step {rule.step} has already run")
    return Verdict(True, "approval accepted")


def valid_approvers(history: Sequence[Event], rule: StepRule, still_may_approve: Callable[[str], bool]
                    ) -> list[str]:
    """Distinct approvers of the step who are not its requester and who may still approve now."""
    who = requester(history, rule.step)
    out: list[str] = []
    for e in _of(history, APPROVED, rule.step):
        if e.actor != who and e.actor not in out and still_may_approve(e.actor):
            out.append(e.actor)
    return out


def check_perform(history: Sequence[Event], rule: StepRule, performer: str,
                  still_may_approve: Callable[[str], bool]) -> Verdict:
    """May ``performer`` run ``rule.step`` now? Re-checks every approval against ``still_may_approve``."""
    if requester(history, rule.step) is None:
        return Verdict(False, f"step {rule.step} has not been requested")
    if _of(history, PERFORMED, rule.step):
        return Verdict(False, f"step {rule.step} has already run; it never runs twice")
    if rule.bound_to is not None:
        earlier = _of(history, PERFORMED, rule.bound_to)
        if earlier and earlier[0].actor != performer:
            return Verdict(False, f"binding of duty: {rule.step} must be performed by {earlier[0].actor}, who"
                                  f" performed {rule.bound_to}")
    if rule.needed:
        approvers = valid_approvers(history, rule, still_may_approve)
        if len(approvers) < rule.needed:
            kind = "two-person rule" if rule.destructive and rule.needed == 2 else "approvals"
            counted = ", ".join(approvers) or "none"
            return Verdict(False, f"{kind}: {rule.step} needs {rule.needed} distinct approvers other than the"
                                  f" requester who may still approve; it has {len(approvers)} ({counted})")
    return Verdict(True, "constraints hold")


# The rate store's schema versions (agents.db.migrate): the first is the schema it had before versions.
_RATE_MIGRATIONS = ["""
CREATE TABLE IF NOT EXISTS uses (key TEXT NOT NULL, at REAL NOT NULL, who TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS uses_key ON uses (key, at);
"""]


class RateLimits:
    """At most N uses of a key (an op, or an op on a cluster) per period, counted atomically.

    Each use is a row; ``take`` counts the rows inside the window and inserts one in the same
    IMMEDIATE transaction, so concurrent takers (threads, processes, brokers sharing the file) are
    serialized by SQLite and the (N+1)th is refused however the requests race. The statements run
    on the file's own thread (``agents.db.Store``): ``take`` is awaited, as another backend's would be.
    """

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.store = Store(path, _RATE_MIGRATIONS, name="rate limits")

    async def take(self, key: str, limit: int, period: float, who: str) -> Verdict:
        """Count one use of ``key`` if fewer than ``limit`` were counted in the last ``period`` seconds."""
        return await self.store.run(_take, key, limit, period, who, self.clock())

    async def aclose(self) -> None:
        await self.store.aclose()

    def close(self) -> None:
        self.store.close()


def rate_verdict(key: str, used: int, limit: int, period: float) -> Verdict:
    """Whether one more use of ``key`` fits, ``used`` uses having been counted in the last ``period``
    seconds (every store of the rate limits decides with this)."""
    if used >= limit:
        return Verdict(False, f"rate limit: {key} already used {used} times in the last {period:g}s"
                              f" (at most {limit})")
    return Verdict(True, f"rate limit: use {used + 1} of {limit} in {period:g}s")


def _take(db: sqlite3.Connection, key: str, limit: int, period: float, who: str, now: float) -> Verdict:
    with transaction(db):
        (used,) = db.execute("SELECT count(*) FROM uses WHERE key = ? AND at > ?", (key, now - period)).fetchone()
        verdict = rate_verdict(key, used, limit, period)
        if verdict.ok:
            db.execute("INSERT INTO uses (key, at, who) VALUES (?, ?, ?)", (key, now, who))
            db.execute("DELETE FROM uses WHERE at < ?", (now - 7 * 86400,))  # keep a week for review
    return verdict
