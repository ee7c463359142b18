"""The ops room: a XEP-0045 multi-user chat where the mesh posts what operators must see together.

The bot joins a configured room (``ops@rooms.DOMAIN``; the private Prosody serves ``rooms.DOMAIN``
with rooms unlocked at creation) and posts:

- monitor hard state changes, from the broker's alerts (``AlertsMixin.on_alert``; hysteresis is
  the monitor's: only hard states are alerts);
- approval requests of workflow instances, with the command that approves them;
- fencing attempts and outcomes relayed by the bot, and any ``fence.*`` or replication failure;

Posting is rate-limited and coalesced (:class:`Coalescer`): at most one message per interval; within
an interval a newer line for the same subject (a check on a host, an instance's step) replaces the
older one, and beyond ``max_lines`` the rest is summed up in one line, so a storm of alerts stays
one readable message every few seconds. Messages in the room are never commands (the bot ignores
group chat).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from typing import Any, Callable, Hashable

from slixmpp import JID

from agents.actor import Actor
from agents.errors import Outcome
from agents.ops import OpSpec
from agents.report import CallReport

from .alerts import Alert
from .chat import short, summarize

log = logging.getLogger(__name__)

APPROVAL_POLL = 2.0  # seconds between looks for workflow instances waiting for approval


class Coalescer:
    """Lines keyed by subject, sent as one message at most every ``interval`` seconds."""

    def __init__(self, send: Callable[[str], Any], interval: float = 2.0, max_lines: int = 8) -> None:
        self.send, self.interval, self.max_lines = send, interval, max_lines
        self._lines: OrderedDict[Hashable, tuple[str, str]] = OrderedDict()  # key -> (category, line)
        self._last = float("-inf")
        self._timer: asyncio.TimerHandle | None = None

    def post(self, key: Hashable, line: str, category: str = "") -> None:
        self._lines.pop(key, None)  # the newest line about a subject wins, and moves to the end
        self._lines[key] = (category, line)
        loop = asyncio.get_running_loop()
        if self._timer is None:
            due = max(loop.time(), self._last + self.interval)
            self._timer = loop.call_at(due, self.flush)

    def flush(self) -> None:
        self._timer = None
        if not self._lines:
            return
        items = list(self._lines.values())
        self._lines.clear()
        self._last = asyncio.get_running_loop().time()
        shown = items if len(items) <= self.max_lines else items[:self.max_lines - 1]
        lines = [line for _, line in shown]
        rest = items[len(shown):]
        if rest:
            counts = Counter(category or "other" for category, _ in rest)
            lines.append(f"... and {len(rest)} more: " + ", ".join(f"{n} {c}" for c, n in counts.most_common()))
        self.send("\n".join(lines))


def alert_line(a: Alert) -> str:
    was = f" (was {a.previous})" if a.previous else ""
    return f"{a.state}: {a.check} on {a.host}{was}: {a.text}".rstrip(": ")


class OpsRoom:
    """Joins ``room`` on ``actor``'s connection (again after every new session) and posts to it."""

    def __init__(self, actor: Actor, room: str, *, nick: str = "vertebra", interval: float = 2.0,
                 max_lines: int = 8) -> None:
        self.actor, self.room, self.nick = actor, JID(room), nick
        actor.xmpp.register_plugin("xep_0045")
        self.coalescer = Coalescer(self._send, interval, max_lines)
        self._announced: set[tuple[str, str]] = set()  # (instance, step) approval requests posted
        self._watcher: asyncio.Task[None] | None = None
        actor.on("session_start", self._join)

    async def _join(self, _event: Any) -> None:
        # Not join_muc_wait: a room that is slow to answer must not hold up the bot's session.
        self.actor.xmpp.plugin["xep_0045"].join_muc(self.room, self.nick)

    def _send(self, text: str) -> None:
        self.actor.xmpp.send_message(mto=self.room, mbody=text, mtype="groupchat")

    # -- what is posted ----------------------------------------------------------------------------

    def alert(self, a: Alert) -> None:
        self.coalescer.post(("alert", a.host, a.check), alert_line(a), a.state)

    def approval(self, instance: str, workflow: str, step: str, requester: str, why: str) -> None:
        if (instance, step) in self._announced:
            return
        self._announced.add((instance, step))
        self.coalescer.post(("approval", instance, step),
                            f"approval needed: workflow {workflow} instance {instance} step {step}, requested"
                            f" by {requester} ({why}). To approve: approve {instance} {step}  to refuse:"
                            f" deny {instance}", "approvals")

    def relayed(self, operator: str, spec: OpSpec, report: CallReport) -> None:
        """Hook for ``ChatBot.relayed``: fencing attempts and outcomes, replication failures."""
        fencing = spec.name.startswith("fence.") and spec.name not in ("fence.list", "fence.info")
        failed = [r for r in report.results if r.outcome is not Outcome.OK]
        if fencing:
            lines = "; ".join(f"{short(r.target)} {r.outcome.value}" + (f" ({r.error})" if r.error else "")
                              for r in report.results)
            self.coalescer.post(("fence", spec.name, operator, id(report)),
                                f"fencing: {spec.name} by {operator}: {summarize(report)}: {lines}", "fencing")
        elif spec.name.startswith("storage.replication") and failed:
            self.coalescer.post(("replication", spec.name, id(report)),
                                f"replication failed: {spec.name} by {operator}: "
                                + "; ".join(f"{short(r.target)}: {r.error}" for r in failed), "replication")

    # -- where it comes from ---------------------------------------------------------------------------

    def follow(self, broker: Any) -> None:
        """Post the broker's alerts as they come, and its workflow instances waiting for approval
        (the broker and the bot in one process, as `vertebra broker` runs them)."""
        broker.on_alert(self.alert)
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_approvals(broker))

    async def _watch_approvals(self, broker: Any) -> None:
        while True:
            try:
                for inst in broker.workflow_store.instances("waiting", 50):
                    status = broker._status(inst["id"])
                    for s in status["steps"]:
                        if s["state"] == "waiting" and s["needs_approvals"]:
                            self.approval(status["instance"], status["workflow"], s["name"],
                                          status["requester"], s["reason"] or "waiting for approval")
            except Exception:  # a store being closed at shutdown, or a bad row: try again later
                log.debug("approval watch failed", exc_info=True)
            await asyncio.sleep(APPROVAL_POLL)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
