"""The ops room: a XEP-0045 multi-user chat where the mesh posts what operators must see together.

The bot joins a configured room (``ops@rooms.DOMAIN``; the private Prosody serves ``rooms.DOMAIN``
with rooms unlocked at creation) and keeps it closed to everyone else:

- it creates the room and is its owner; each time it joins it submits the owner configuration form
  (persistent, members-only, not listed publicly, no invitations, no subject changes), so an
  account that is not a member is refused at the door (registration-required) and neither reads
  the history nor posts;
- the members are the mesh file's admins and the people the policy names (``rbac`` policy
  ``members``); the bot gives them member affiliation and takes it away from anyone else, again
  whenever the policy changes;
- it registers its nick with the room (jabber:iq:register; on ejabberd with the MUC service), so
  nobody else may join under it, whether the bot is in the room or not;
- it joins again after any loss (kicked, banned, the room destroyed, a new or resumed session) and
  logs why at WARNING; what is posted while it is out waits and is sent once it is back, and the
  approvals still waiting are announced again (so a broker restart announces them anew).

Every post says where it comes from:

- monitor hard state changes, from the broker's alerts (``Alerts.on_alert``; hysteresis is
  the monitor's: only hard states are alerts), with the monitor agent that posted them;
- approval requests of workflow instances, with their requester and the command that approves them;
- fencing events the broker accepted, with the fencing agent and who asked it; fencing attempts and
  outcomes relayed by the bot, with the operator, and replication failures (for the ops whose
  declaration says ``announce="fencing"`` or ``"replication"``);

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
from typing import Any, Callable, Hashable, Literal
from xml.etree import ElementTree

from slixmpp import JID

from slixmpp.exceptions import IqError, IqTimeout, PresenceError

from agents.actor import Actor
from agents.authz import AdminsOnly, policy_of
from agents.errors import Outcome
from agents.ops import OpSpec
from agents.report import CallReport

from .alerts import Alert
from .chat import short, summarize

log = logging.getLogger(__name__)

APPROVAL_POLL = 2.0  # seconds between looks for workflow instances waiting for approval (and policy changes)
JOIN_TIMEOUT = 20.0  # seconds to wait for the room to answer a form or an affiliation change
# A join gets a shorter wait, then is sent again (with the backoff below): ejabberd drops, without an
# error, a join that reaches a room still shutting down, as one does when the bot joins again the moment
# it hears the room was destroyed. Joining twice is harmless; waiting JOIN_TIMEOUT for an answer that
# will never come is not.
JOIN_ANSWER = 5.0
REJOIN_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds between failed attempts to get back in
MAX_UNSENT = 50  # messages kept while the bot is out of the room (the newest; the coalescer sums up storms)

MUC_USER_NS = "http://jabber.org/protocol/muc#user"
ROOM_CONFIG = {  # the owner form's fields the bot sets, where the server's form has them
    "muc#roomconfig_persistentroom": True,  # outlives its last occupant and a server restart
    "muc#roomconfig_membersonly": True,  # only members (and the owner) may enter
    "muc#roomconfig_publicroom": False,  # not listed in the service's disco#items
    "muc#roomconfig_allowinvites": False,  # an invitation to a members-only room grants membership
    "muc#roomconfig_changesubject": False,
    "muc#roomconfig_passwordprotectedroom": False,
    "allow_subscription": False,  # ejabberd's MUC/Sub would let non-occupants receive messages
}
LEFT_BECAUSE = {  # XEP-0045 status codes on the bot's own unavailable presence
    "301": "banned from the room", "307": "kicked from the room", "321": "its affiliation was removed",
    "322": "removed because the room became members-only", "332": "the room's service is shutting down",
}


def room_members(*authorizers: Any) -> set[str]:
    """Bare JIDs that belong in the ops room: the admins and the people a policy names, found in
    ``authorizers`` (each the policy an actor decides with, ``Agent.authorizer``)."""
    found: set[str] = set()
    for authorizer in authorizers:
        if isinstance(authorizer, AdminsOnly):
            found |= set(authorizer.admins)
        policy = policy_of(authorizer)
        if policy is not None and policy.gate.policy is not None:
            found |= {jid.lower() for jid in policy.gate.policy.members}
    return found


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
    """Keeps ``actor`` in ``room`` as its owner (again after every loss) and posts to it.

    ``admins``: bare JIDs to make members besides those the authorizers name (the mesh file's
    admins, which a mesh with a policy file does not keep in its authorizer)."""

    def __init__(self, actor: Actor, room: str, *, nick: str = "vertebra", admins: Any = (),
                 interval: float = 2.0, max_lines: int = 8) -> None:
        self.actor, self.room, self.nick = actor, JID(room), nick
        actor.xmpp.register_plugin("xep_0045")
        actor.xmpp.register_plugin("xep_0004")
        self.muc = actor.xmpp.plugin["xep_0045"]
        self.admins = {str(a).lower() for a in admins}
        self._authorizers: list[Any] = [getattr(actor, "authorizer", None)]
        self.coalescer = Coalescer(self._send, interval, max_lines)
        self._announced: set[tuple[str, str]] = set()  # (instance, step) approval requests posted
        self._unsent: list[str] = []  # posts made while the bot is out of the room
        self._members: set[str] | None = None  # the member list last given to the room
        self.joined = asyncio.Event()
        self.joins = 0  # times the bot got in (tests and logs count rejoins)
        self._why: str | None = None  # why the bot must join (again); None while it is in
        self._wake = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        actor.on_event("session_start", lambda _e: self._lost("a new session started (connected, or the old"
                                                                 " one could not be resumed)"))
        # A resumed stream keeps the bot's place in the room; a kick or a destroyed room meanwhile
        # arrives as the queued presence that _on_presence reads.
        actor.on_event("session_resumed", lambda _e: self._back_in() if self._why is None and self.joins else None)
        actor.on_event("disconnected", lambda _e: self.joined.clear())
        actor.on_event(f"muc::{self.room.bare}::presence", self._on_presence)

    # -- staying in the room ---------------------------------------------------------------------

    def _back_in(self) -> None:
        """In the room: post what waited."""
        self.joined.set()
        unsent, self._unsent = self._unsent, []
        for text in unsent:
            self._send(text)

    def _lost(self, why: str) -> None:
        """The bot is (or may be) out of the room: join again, and say why."""
        self.joined.clear()
        self._why = why
        self._wake.set()
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(self._keep_joined())

    def _on_presence(self, pr: Any) -> None:
        """The room's word that the bot is out: its own unavailable presence (status 110, or its
        reserved nick, which nobody else can hold)."""
        if pr["type"] != "unavailable":
            return
        x = pr.xml.find(f"{{{MUC_USER_NS}}}x")
        codes = {s.get("code") for s in x.findall(f"{{{MUC_USER_NS}}}status")} if x is not None else set()
        if "110" not in codes and pr["from"].resource != self.nick:
            return
        if "303" in codes:  # a nick change, not a departure
            return
        destroyed = x is not None and x.find(f"{{{MUC_USER_NS}}}destroy") is not None
        reasons = [LEFT_BECAUSE[c] for c in sorted(codes) if c in LEFT_BECAUSE]
        why = "the room was destroyed" if destroyed else "; ".join(reasons) or "the room said it left"
        self._lost(why)

    async def _keep_joined(self) -> None:
        attempt = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            why = self._why
            if why is None:
                continue
            if self.joins:
                log.warning("ops room %s: joining again as %s: %s", self.room, self.nick, why)
            try:
                await self._join_and_configure()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = REJOIN_BACKOFF[min(attempt, len(REJOIN_BACKOFF) - 1)]
                attempt += 1
                log.warning("ops room %s: could not get in (%s); trying again in %.0fs", self.room,
                            _explain(exc), delay)
                await asyncio.sleep(delay)
                self._wake.set()
                continue
            if self._wake.is_set():  # lost again while joining: go round once more
                continue
            attempt, self._why = 0, None
            self.joins += 1
            log.info("ops room %s: in the room as %s, its owner", self.room, self.nick)
            self._announced.clear()  # what waits for approval is announced again after every (re)join
            self._back_in()

    async def _join_and_configure(self) -> None:
        await self.muc.join_muc_wait(self.room, self.nick, maxstanzas=0, timeout=JOIN_ANSWER)
        # The owner form every time: a room the bot created a moment ago is open until it is sent,
        # and one that outlived a restart may have been changed by another owner.
        form = await self.muc.get_room_config(self.room, timeout=JOIN_TIMEOUT)
        submit = self.actor.xmpp.plugin["xep_0004"].make_form("submit")
        submit.add_field("FORM_TYPE", ftype="hidden", value="http://jabber.org/protocol/muc#roomconfig")
        offered = form.get_fields()
        for var, value in ROOM_CONFIG.items():
            if var in offered:
                submit.add_field(var, ftype="boolean", value=value)
        await self.muc.set_room_config(self.room, submit, timeout=JOIN_TIMEOUT)
        await self._reserve_nick()
        self._members = None
        await self.sync_members()

    async def _reserve_nick(self) -> None:
        """Register the bot's nick (XEP-0045 7.10): Prosody reserves a member's registered nick
        in its room, ejabberd a registered nick on the whole service."""
        query = ("<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>"
                 "<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#register</value></field>"
                 f"<field var='muc#register_roomnick'><value>{self.nick}</value></field></x></query>")
        errors = []
        for where in (self.room.bare, self.room.domain):  # one of the two answers "not here"
            iq = self.actor.xmpp.make_iq_set(ito=where)
            iq.append(ElementTree.fromstring(query))
            try:
                await iq.send(timeout=JOIN_TIMEOUT)
            except (IqError, IqTimeout) as exc:
                errors.append(f"{where}: {_explain(exc)}")
        if len(errors) == 2:
            raise RuntimeError(f"could not reserve the nick {self.nick}: " + "; ".join(errors))

    def members(self) -> set[str]:
        """Who belongs in the room now: the admins and the people the policy names, not the bot."""
        people = self.admins | room_members(*[a for a in self._authorizers if a is not None])
        return people - {self.actor.jid.bare.lower()}

    async def sync_members(self) -> None:
        """Give member affiliation to whoever belongs and take it from anyone else (owners and
        admins of the room stay as they are)."""
        wanted = self.members()
        if wanted == self._members:
            return
        listed = await self.muc.get_affiliation_list(self.room, "member", timeout=JOIN_TIMEOUT)
        current = {str(j).lower() for j in listed}
        changes: list[tuple[str, Literal["member", "none"]]] = \
            [(j, "member") for j in sorted(wanted - current)] + [(j, "none") for j in sorted(current - wanted)]
        for jid, affiliation in changes:  # one item per IQ: Prosody reads only the first of a list
            await self.muc.set_affiliation(self.room, affiliation, jid=JID(jid), timeout=JOIN_TIMEOUT)
        if changes:
            log.info("ops room %s: members %s", self.room, ", ".join(f"{j} {a}" for j, a in changes))
        self._members = wanted

    def _send(self, text: str) -> None:
        if not self.joined.is_set():
            self._unsent = (self._unsent + [text])[-MAX_UNSENT:]
            return
        self.actor.xmpp.send_message(mto=self.room, mbody=text, mtype="groupchat")

    # -- what is posted ----------------------------------------------------------------------------

    def alert(self, a: Alert) -> None:
        self.coalescer.post(("alert", a.host, a.check), f"{alert_line(a)} (from {a.source})", a.state)

    def approval(self, instance: str, workflow: str, step: str, requester: str, why: str) -> None:
        if (instance, step) in self._announced or not self.joined.is_set():
            return  # not yet in the room: announced once the bot is in
        self._announced.add((instance, step))
        self.coalescer.post(("approval", instance, step),
                            f"approval needed: workflow {workflow} instance {instance} step {step}, requested"
                            f" by {requester} ({why}). To approve: approve {instance} {step}  to refuse:"
                            f" deny {instance}", "approvals")

    def storage_notice(self, notice: Any) -> None:
        """A storage agent's notice about a clone (its coming expiry, its destruction)."""
        self.coalescer.post(("storage", notice.clone), f"{notice.text} (from {notice.source})", "storage")

    def fence_event(self, event: dict[str, Any]) -> None:
        """A fencing event the broker accepted, with the fencing agent that posted it."""
        where = f"{event.get('cluster')}/{event.get('node')}"
        asked = f", asked by {event['requester']}" if event.get("requester") else ""
        if event.get("event") == "attempt":
            what = f"fencing: {event.get('action')} {where} attempted by {event.get('agent')}{asked}"
        else:
            result = "verified " + (event.get("state") or "") if event.get("ok") else "FAILED"
            message = f": {event['message']}" if event.get("message") else ""
            what = f"fencing: {event.get('action')} {where} {result.strip()} by {event.get('agent')}{asked}{message}"
        self.coalescer.post(("fence-event", event.get("agent"), event.get("id")), what, "fencing")

    def relayed(self, operator: str, spec: OpSpec, report: CallReport) -> None:
        """Hook for ``ChatBot.relayed``: fencing attempts and outcomes, replication failures, for the ops
        whose declaration names the topic (``announce``, carried by their description)."""
        failed = [r for r in report.results if r.outcome is not Outcome.OK]
        if spec.announce == "fencing":
            lines = "; ".join(f"{short(r.target)} {r.outcome.value}" + (f" ({r.error})" if r.error else "")
                              for r in report.results)
            self.coalescer.post(("fence", spec.name, operator, id(report)),
                                f"fencing: {spec.name} by {operator}: {summarize(report)}: {lines}", "fencing")
        elif spec.announce == "replication" and failed:
            self.coalescer.post(("replication", spec.name, id(report)),
                                f"replication failed: {spec.name} by {operator}: "
                                + "; ".join(f"{short(r.target)}: {r.error}" for r in failed), "replication")

    # -- where it comes from ---------------------------------------------------------------------------

    def follow(self, broker: Any) -> None:
        """Post the broker's alerts and fencing events as they come, and its workflow instances
        waiting for approval; keep the members in step with its policy (the broker and the bot in
        one process, as `vertebra broker` runs them)."""
        broker.alerts.on_alert(self.alert)
        broker.fencing.on_fence_event(self.fence_event)
        broker.storage_notices.on_storage_notice(self.storage_notice)
        # The broker's policy only: policy.reload replaces it there, and the bot's own copy (read at
        # start) would go on naming people the new policy dropped.
        self._authorizers = [getattr(broker, "authorizer", None)]
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_approvals(broker))

    async def _watch_approvals(self, broker: Any) -> None:
        while True:
            await self.joined.wait()
            try:
                await self.sync_members()  # a reloaded policy names other people
            except Exception as exc:
                log.warning("ops room %s: could not update its members (%s); trying again", self.room, _explain(exc))
            try:
                for inst in await broker.workflows.workflow_store.instances("waiting", 50):
                    status = await broker.workflows._status(inst["id"])
                    for s in status["steps"]:
                        if s["state"] == "waiting" and s["needs_approvals"]:
                            self.approval(status["instance"], status["workflow"], s["name"],
                                          status["requester"], s["reason"] or "waiting for approval")
            except Exception:  # a store being closed at shutdown, or a bad row: try again later
                log.debug("approval watch failed", exc_info=True)
            await asyncio.sleep(APPROVAL_POLL)

    def stop(self) -> None:
        for task in (self._watcher, self._keeper):
            if task is not None:
                task.cancel()


def _explain(exc: BaseException) -> str:
    """An XMPP error as its condition and text, anything else as itself."""
    if isinstance(exc, (IqError, PresenceError)):
        stanza = exc.iq if isinstance(exc, IqError) else exc.presence
        text = stanza["error"]["text"]
        return stanza["error"]["condition"] + (f": {text}" if text else "")
    if isinstance(exc, (IqTimeout, asyncio.TimeoutError)):
        return "no answer in time"
    return str(exc) or exc.__class__.__name__
