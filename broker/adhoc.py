"""XEP-0050 ad-hoc commands on the ops bot, one per op, with XEP-0004 forms made from the declarations.

Clients that support ad-hoc commands (Gajim, Psi, Conversations, Profanity, aioxmpp) list the
bot's commands and fill in a form instead of typing. Everything comes from the op declarations,
so a new op is a new command with no code here:

- the command list (disco#items on the commands node) holds only the ops the asking person may
  run, decided per caller with the mesh's authorizer, so it differs by role; executing a command
  that is not listed for the caller is refused the same way;
- each op's form has a typed field per argument: ``boolean``, ``list-single`` for choices,
  ``text-multi`` for lists, ``text-private`` for secrets, ``text-single`` otherwise, with the
  argument's help as description, its default as value and ``required`` where it has none; plus
  an optional ``on`` field for the resources to address;
- a submission is validated by the declaration; a bad one comes back as the same form, the values
  kept, an error note naming the argument and that field's label marked;
- a quick op completes with a note and a result form (the lines the CLI prints); a long op
  (``progress=True``) stays executing: each ``next`` shows the progress so far, ``cancel`` stops
  it, and the session completes with the result.

Calls are relayed by :class:`broker.chat.ChatBot.relay`: for the operator, never as the bot. The
module implements the protocol itself on slixmpp's stanza classes rather than with slixmpp's
xep_0050 plugin, whose sessions are not bound to the JID that opened them and whose command list is
the same for everyone.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from slixmpp import Iq
from slixmpp.exceptions import XMPPError
from slixmpp.plugins.xep_0004.stanza import Form
from slixmpp.plugins.xep_0030.stanza import DiscoItems
from slixmpp.plugins.xep_0050.stanza import Command
from slixmpp.xmlstream import register_stanza_plugin
from slixmpp.xmlstream.handler import CoroutineCallback
from slixmpp.xmlstream.matcher import StanzaPath

from agents import resources as paths
from agents.authz import decide
from agents.errors import BadArguments
from agents.ops import OpSpec, Param

from .chat import ChatBot, Job, format_report, summarize

NS = Command.namespace
ON_FIELD = "on"  # not an argument name any op can have: ops take no argument called "on" (checked)
SESSION_TTL = 900.0  # seconds an idle session is kept
WAIT_FOR_PROGRESS = 5.0  # seconds a `next` waits for something new before it answers


@dataclass
class Session:
    id: str
    owner: str  # the full JID that opened it: nobody else may continue it
    spec: OpSpec
    values: dict[str, Any] = field(default_factory=dict)
    job: Job | None = None
    touched: float = field(default_factory=time.monotonic)


class AdHoc:
    """The bot's ad-hoc commands. ``AdHoc(bot)`` before ``bot.start()``."""

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        self.sessions: dict[str, Session] = {}
        xmpp = bot.xmpp
        xmpp.register_plugin("xep_0004")
        register_stanza_plugin(Iq, Command)
        register_stanza_plugin(Command, Form)
        xmpp.register_handler(CoroutineCallback("vertebra ad-hoc", StanzaPath("iq@type=set/command"),
                                                self._on_command))  # type: ignore[arg-type]  # iqs only
        disco = xmpp.plugin["xep_0030"]
        disco.add_feature(NS)
        # Keyed by our full JID: the resource is fixed ("bot"), so it is known before binding.
        disco.set_node_handler("get_items", jid=xmpp.boundjid.full, node=NS, handler=self._items)
        for spec in bot.ops.values():
            if spec.param(ON_FIELD) is not None:
                raise ValueError(f"op {spec.name} has an argument named {ON_FIELD!r}, which its form uses")

    # -- listing --------------------------------------------------------------------------------

    def may_run(self, caller: str, spec: OpSpec) -> bool:
        """Whether to offer ``spec`` to ``caller``: decided on no particular resource, so a grant
        limited to some resources (``on:``) does not show the command; the call itself is decided
        again per target, by the bot and by each agent."""
        return decide(self.bot.authorizer, caller, spec, []).allowed

    async def _items(self, jid: Any, node: Any, ifrom: Any, data: Any) -> DiscoItems:
        items = DiscoItems()
        items["node"] = NS
        who = ifrom.bare if ifrom is not None else ""
        if who:
            await self.bot.refresh_ops(who)  # the ops offered now, as the broker and the agents describe them
        for spec in self.bot.ops.values():
            if who and self.may_run(who, spec):
                items.add_item(self.bot.jid, node=spec.name, name=f"{spec.name}: {spec.summary}")
        return items

    # -- executing --------------------------------------------------------------------------------

    async def _on_command(self, iq: Iq) -> None:
        cmd = iq["command"]
        caller, action, sid = iq["from"], cmd["action"] or "execute", cmd["sessionid"]
        self._expire()
        allowed, _ = self.bot.rate.take(caller.bare)
        if not allowed:
            raise XMPPError("resource-constraint", "too many commands; wait a moment", etype="wait")
        if not sid:
            await self.bot.refresh_ops(caller.bare)
            spec = self.bot.ops.get(cmd["node"])
            if spec is None or not self.may_run(caller.bare, spec):
                # The same answer whether it does not exist or is not yours: the list is per role.
                raise XMPPError("item-not-found", f"no command {cmd['node']!r} for {caller.bare}", etype="cancel")
            if action == "cancel":
                return self._reply(iq, Session("", str(caller), spec), "canceled")
            session = Session(uuid.uuid4().hex, str(caller), spec)
            session.values = {p.name: p.default for p in spec.params if p.default not in (None, [], ())}
            self.sessions[session.id] = session
            return self._reply(iq, session, "executing", form=self.form(spec, session.values))
        found = self.sessions.get(sid)
        if found is None or found.owner != str(caller) or found.spec.name != cmd["node"]:
            raise XMPPError("bad-request", f"no session {sid!r} of yours for {cmd['node']!r}", etype="modify")
        session = found
        session.touched = time.monotonic()
        if action == "cancel":
            if session.job is not None:
                self.bot.cancel_job(session.job)
            self.sessions.pop(sid, None)
            return self._reply(iq, session, "canceled", note=("info", "cancelled"))
        if session.job is not None:
            return await self._job_stage(iq, session)
        return await self._submit(iq, session)

    async def _submit(self, iq: Iq, session: Session) -> None:
        spec, submitted = session.spec, iq["command"]["form"].get_values()
        session.values = {k: v for k, v in submitted.items() if k == ON_FIELD or spec.param(k) is not None}
        try:
            on = [paths.check(r) for r in _lines(submitted.get(ON_FIELD))]
        except paths.BadResource as exc:
            return self._invalid(iq, session, ON_FIELD, str(exc))
        try:
            args = spec.validate(_arguments(spec, submitted))
        except BadArguments as exc:
            return self._invalid(iq, session, str(exc.details.get("argument") or ""), exc.text)
        operator = iq["from"].bare
        if not spec.progress:
            report = await self.bot.relay(operator, spec, args, on)
            self.sessions.pop(session.id, None)
            return self._reply(iq, session, "completed", form=_result_form(spec, format_report(report, spec.result)),
                               note=("info" if report.ok else "error",
                                     f"{spec.name}: {summarize(report, spec.result)}"))
        job = session.job = self.bot.new_job(operator, spec, on)
        job.task = self.bot.spawn(self.bot.run_job(job, args))
        return self._reply(iq, session, "executing", form=_job_form(job), actions=("next",),
                           note=("info", f"job {job.id} started: next shows its progress, cancel stops it"))

    async def _job_stage(self, iq: Iq, session: Session) -> None:
        job = session.job
        assert job is not None
        if job.state == "running":
            job.changed.clear()
            try:
                await asyncio.wait_for(job.changed.wait(), WAIT_FOR_PROGRESS)
            except TimeoutError:
                pass
        if job.state == "running":
            return self._reply(iq, session, "executing", form=_job_form(job), actions=("next",))
        self.sessions.pop(session.id, None)
        report = job.report
        text = job.text()
        return self._reply(iq, session, "completed", form=_result_form(session.spec, text),
                           note=("info" if report is not None and report.ok else "error",
                                 f"{session.spec.name}: {summarize(report, job.result) if report else job.state}"))

    def _invalid(self, iq: Iq, session: Session, argument: str, text: str) -> None:
        """The form again, as submitted, with the error in a note and on the field it concerns."""
        return self._reply(iq, session, "executing", note=("error", text),
                           form=self.form(session.spec, session.values, error=(argument, text)))

    def _reply(self, iq: Iq, session: Session, status: str, *, form: Form | None = None,
               note: tuple[str, str] | None = None, actions: tuple[str, ...] = ("complete",)) -> None:
        reply = iq.reply()
        cmd = reply["command"]
        cmd["node"], cmd["status"] = session.spec.name, status
        if session.id:
            cmd["sessionid"] = session.id
        if status == "executing":
            cmd["actions"] = list(actions)
            cmd.xml.find(f"{{{NS}}}actions").set("execute", actions[0])
        if note is not None:
            cmd.add_note(note[1], note[0])
        if form is not None:
            cmd.append(form)
        reply.send()

    def _expire(self) -> None:
        cutoff = time.monotonic() - SESSION_TTL
        for sid in [s for s, v in self.sessions.items() if v.touched < cutoff]:
            del self.sessions[sid]

    # -- forms ---------------------------------------------------------------------------------------

    def form(self, spec: OpSpec, values: dict[str, Any], error: tuple[str, str] | None = None) -> Form:
        """The op's data form: a typed field per argument, then the resources to address."""
        form = Form()
        form["type"] = "form"
        form["title"] = spec.name
        form["instructions"] = f"{spec.summary} ({spec.effect_text})"
        for p in spec.params:
            _add_field(form, p, values.get(p.name), error[1] if error and error[0] == p.name else None)
        on_error = error[1] if error and error[0] == ON_FIELD else None
        form.add_field(var=ON_FIELD, ftype="text-multi", label="on" + (" (error)" if on_error else ""),
                       desc=on_error or "resources to act on, one per line (empty: every agent offering it)",
                       value=_lines(values.get(ON_FIELD)))
        return form


def _add_field(form: Form, p: Param, value: Any, error: str | None) -> None:
    if p.choices:
        ftype = "list-multi" if p.many else "list-single"
    elif p.kind == "boolean" and not p.many:
        ftype = "boolean"
    elif p.many:
        ftype = "text-multi"
    else:
        ftype = "text-private" if p.secret else "text-single"
    label = p.name + (" (error)" if error else "")
    desc = f"error: {error}" if error else f"{p.help} ({p.type_name})".strip()
    kw: dict[str, Any] = {}
    if p.choices:
        kw["options"] = [{"label": str(c), "value": str(c)} for c in p.choices]
    if value is not None and not p.secret:
        if p.many:
            kw["value"] = [str(v) for v in (value if isinstance(value, (list, tuple)) else _lines(value))]
        elif ftype == "boolean":
            kw["value"] = bool(value) if isinstance(value, bool) else str(value).lower() in ("1", "true")
        else:
            kw["value"] = str(value)
    form.add_field(var=p.name, ftype=ftype, label=label, desc=desc, required=p.required, **kw)


def _lines(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).splitlines()
    return [str(v).strip() for v in items if str(v).strip()]


def _arguments(spec: OpSpec, submitted: dict[str, Any]) -> dict[str, Any]:
    """Form values as arguments: empty fields are left out (defaults apply), lists split by line."""
    args: dict[str, Any] = {}
    for p in spec.params:
        value = submitted.get(p.name)
        if p.many:
            items = _lines(value)
            if items:
                args[p.name] = items
        elif isinstance(value, (list, tuple)):
            if value:
                args[p.name] = value[0]
        elif isinstance(value, bool):
            args[p.name] = value
        elif value is not None and str(value) != "":
            args[p.name] = str(value)
    return args


def _result_form(spec: OpSpec, text: str) -> Form:
    form = Form()
    form["type"] = "result"
    form["title"] = f"{spec.name}: result"
    form.add_field(var="results", ftype="text-multi", label="results", value=text.splitlines())
    return form


def _job_form(job: Job) -> Form:
    form = Form()
    form["type"] = "form"  # a form, so the client shows `next` and `cancel`
    form["title"] = f"job {job.id}: {job.op}"
    form.add_field(var="job", ftype="fixed", value=job.summary())
    form.add_field(var="progress", ftype="text-multi", label="progress", value=job.progress[-10:] or ["waiting"])
    return form
