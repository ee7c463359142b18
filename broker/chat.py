"""The ops bot: operators run the mesh by chatting with one XMPP account, from any client.

Text commands (``help``, ``help OP``, ``agents``, ``call OP [on RESOURCE ...] key=value ...``,
``jobs``, ``job ID``, ``cancel ID``, ``approve ID [STEP]``, ``deny ID``, ``workflows``) are parsed
with the ops' descriptions (``OpSpec.parse_pairs``, ``help_text``), as the broker and the live agents
publish them (``mesh.describe``, agents/describe.py): a new op, or a new kind of agent, is callable
from chat with no chat code and nothing of its code in the bot's process. A mistyped command or op
gets a suggestion; a bad argument an error naming it.

Whose identity. The operator's bare JID, as the server stamped it on the chat message, is the
subject of every decision; the bot's own identity grants nothing:

1. every request the bot sends (discovery included) carries ``for="OPERATOR"`` (``Actor.request(...,
   behalf=)``). Agents and the broker honour it only from their configured delegates (``Agent(...,
   delegates=[BOT])``; anyone else claiming a ``for`` is denied), then decide and audit for the
   operator and hand the op ``call.caller = operator``, ``call.via = bot``: a workflow approved from
   chat records the operator as approver. An agent not configured with the bot as delegate denies
   the request: it never falls back to the bot's rights;
2. before sending, the bot decides each target for the operator itself with the mesh's authorizer, on
   the resources the agent will decide on, and audits that decision (caller = operator, rule names
   the bot) in its own hash-chained log; a target denied here is sent nothing (defense in depth: the
   agent still decides on its own).

Group-chat messages and private messages from room occupants are never commands; each sender has
a token-bucket rate limit. Long ops (declared ``progress=True``) answer with a job id, then stream
progress (coalesced, at most one message a second) and the result.

Results read as the CLI prints them (agents/render.py, from the result fields the op's description
declares): a table or a block per target, then a summary line. Nothing is cut: an answer longer than
``PAGE`` characters goes out as several messages, each headed ``[page N/M]``.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import re
import shlex
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence

from slixmpp import JID, Message

from agents import resources as paths
from agents.actor import Actor, Endpoint, Timeouts
from agents.audit import AuditLog
from agents.authz import Authorizer, decide
from agents.client import discover_all, not_discovered
from agents.describe import spec_of
from agents.errors import BadArguments, OpError, Outcome
from agents.ops import OpSpec, Result
from agents.progress_view import describe
from agents.ratelimit import RateLimit  # the token bucket per sender, shared with agents' intake
from agents.render import outcome_counts, render
from agents.report import CallReport, TargetResult
from agents.server import room_service

log = logging.getLogger(__name__)
audit_log = logging.getLogger("vertebra.audit")

MUC_USER = "{http://jabber.org/protocol/muc#user}x"
MAX_BODY = 2000  # characters of a command; anything longer is not typed by a person
PROGRESS_EVERY = 1.0  # seconds between progress messages of one job (the rest are coalesced)
KEEP_JOBS = 200
PAGE = 12000  # characters of one message (every client shows that much); a longer answer is paged
_INSTANCE = re.compile(r"[0-9a-f]{12}\Z")

Say = Callable[[str], None]


class Usage(Exception):
    """A command that cannot be run as typed; the message says what to type instead."""


@dataclass
class Job:
    """One relayed call, as operators see it in ``jobs`` and ``job ID``."""

    id: str
    owner: str  # bare JID of the operator who started it
    op: str
    on: list[str]
    started: float = field(default_factory=time.time)
    state: str = "running"  # running | done | cancelled
    progress: list[str] = field(default_factory=list)  # the latest reports, newest last
    report: CallReport | None = None
    result: Result | None = None  # what the op declares of its result, for showing it
    finished: float | None = None
    task: asyncio.Task[Any] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def touch(self) -> None:
        self.changed.set()

    def summary(self) -> str:
        where = f" on {' '.join(self.on)}" if self.on else ""
        if self.report is not None:
            return f"job {self.id}: {self.op}{where}: {self.state}, {summarize(self.report, self.result)}"
        last = f", last progress: {self.progress[-1]}" if self.progress else ""
        return f"job {self.id}: {self.op}{where}: {self.state} for {time.time() - self.started:.0f}s{last}"

    def text(self) -> str:
        """Its report as people read it, or what became of it."""
        if self.report is None:
            return f"job {self.id} was {self.state}"
        elapsed = None if self.finished is None else self.finished - self.started
        return format_report(self.report, self.result, elapsed)


def parse_call(words: Sequence[str], ops: Mapping[str, OpSpec]) -> tuple[OpSpec, list[str], dict[str, Any]]:
    """``OP [on RESOURCE ...] key=value ...`` -> (spec, resources, validated arguments)."""
    if not words:
        raise Usage("usage: call OP [on RESOURCE ...] key=value ...  (`help` lists the ops)")
    spec = find_op(words[0], ops)
    rest, on = list(words[1:]), []
    if rest and rest[0] == "on":
        rest.pop(0)
        while rest and "=" not in rest[0]:
            on.append(rest.pop(0))
        if not on:
            raise Usage("`on` needs at least one resource, such as /host/db1")
    try:
        on = [paths.check(r) for r in on]
    except paths.BadResource as exc:
        raise Usage(str(exc)) from None
    try:
        args = spec.parse_pairs(rest)
    except BadArguments as exc:
        raise Usage(f"{exc.text}{_param_hint(spec, exc)}\n{usage(spec)}") from None
    return spec, on, args


def find_op(name: str, ops: Mapping[str, OpSpec]) -> OpSpec:
    spec = ops.get(name)
    if spec is None:
        raise Usage(f"no op {name!r}{suggest(name, ops)}; `help` lists the ops")
    return spec


def suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word.lower(), list(choices), n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _param_hint(spec: OpSpec, exc: BadArguments) -> str:
    name = str(exc.details.get("argument") or "")
    if name and spec.param(name) is None:
        return suggest(name, [p.name for p in spec.params])
    return ""


def usage(spec: OpSpec) -> str:
    example = " ".join(f"{p.name}=..." for p in spec.params if p.required)
    return f"usage: call {spec.name} [on RESOURCE ...] {example}".rstrip()


def help_for(spec: OpSpec) -> str:
    text = spec.help_text()
    return text.replace(f"usage: vertebra call {spec.name} [--on RESOURCE ...]",
                        f"usage: call {spec.name} [on RESOURCE ...]")


def show(value: Any, limit: int = 300) -> str:
    """A progress report on one line as the command line writes it in a pipe (``capturing volume=db:
    3 MiB of 6 MiB (50%), 4 MiB/s, ETA 1 s``), cut to ``limit`` characters (results are never cut)."""
    text = describe(value, plain=True) if isinstance(value, dict) else value if isinstance(value, str) \
        else json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short(target: str) -> str:
    """``monitor1@vertebra.test/agent`` -> ``monitor1``: the account is what people recognise."""
    return target.split("@", 1)[0] if "@" in target else target


def summarize(report: CallReport, result: Result | None = None) -> str:
    """Outcomes counted (``2 ok, 1 timeout``); with a result declaring a summary field, the ok answers
    are counted by its value instead (``1 CRITICAL``)."""
    counts = outcome_counts(report, result)
    return ", ".join(f"{n} {o}" for o, n in counts.items()) if counts else "no targets"


def format_report(report: CallReport, result: Result | None = None, elapsed: float | None = None) -> str:
    """The answers as the op declares them (a table, or a block per target), the failures, a summary
    line: the text the CLI prints (agents/render.py)."""
    return render(report, result, elapsed)


def pages(text: str, size: int = PAGE) -> list[str]:
    """``text`` in messages of at most ``size`` characters, split between lines where it can be,
    each headed ``[page N/M]`` when there are several."""
    if len(text) <= size:
        return [text]
    size -= 20  # room for the heading
    chunks: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        while len(line) > size:  # a line longer than a page: cut it where it must be
            if current:
                chunks.append(current)
                current = ""
            chunks.append(line[:size])
            line = line[size:]
        if len(current) + len(line) > size:
            chunks.append(current)
            current = ""
        current += line
    if current:
        chunks.append(current)
    return [f"[page {n}/{len(chunks)}]\n{chunk.rstrip(chr(10))}" for n, chunk in enumerate(chunks, 1)]


class ChatBot(Actor):
    """The ops bot: one XMPP account operators chat with; relays ops for them under their identity."""

    resource = "bot"

    def __init__(self, jid: str, password: str, endpoint: Endpoint, *, broker: str, authorizer: Authorizer,
                 ops: Mapping[str, OpSpec] | None = None, broker_ops: Sequence[str] | None = None,
                 state_dir: Path | None = None, rate: RateLimit | None = None,
                 muc_domains: Sequence[str] = (), timeouts: Timeouts = Timeouts()) -> None:
        super().__init__(jid, password, endpoint, timeouts=timeouts)
        if ops is not None and broker_ops is None:  # ops given (tests, benchmarks): the broker's are its class's
            from agents.ops import ops_of

            from .service import Broker  # late: the broker's module imports this one
            broker_ops = list(ops_of(Broker))
        self.broker = broker  # full JID of the broker
        # The broker's directory when the bot runs in its process (`vertebra broker` with chat:), read
        # directly instead of asking mesh.discover: the bot decides every target for the operator anyway.
        self.directory: Any = None
        self.authorizer = authorizer
        # The ops the bot offers: as given, else as described by the broker and the live agents, asked
        # again before each command (``refresh_ops``) from ``describer``: the broker itself when the bot
        # runs in its process, else ``mesh.describe`` sent to it for the operator.
        self.ops: dict[str, OpSpec] = dict(sorted((ops or {}).items()))
        self.broker_ops = frozenset(broker_ops or ())  # served by the broker itself, not found by discovery
        self.describer: Any = None if ops is not None else RemoteDescriptions(self)
        self._described: dict[str, tuple[Any, OpSpec]] = {}  # op -> (its description, the spec made of it)
        self.audit = AuditLog(state_dir / "audit.sqlite", write_behind=0.05) if state_dir else None
        self.rate = rate or RateLimit()
        domain = JID(jid).domain
        self.muc_domains = frozenset(muc_domains or (room_service(domain), f"conference.{domain}"))
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._job_ids = iter(range(1, 1 << 62))
        # Room hooks (fencing events): each is called after a relay; a coroutine one returns runs as the bot's task.
        self.relayed: list[Callable[[str, OpSpec, CallReport], Any]] = []
        self.commands: dict[str, Callable[[JID, list[str], Say], Awaitable[None]]] = {
            "help": self.cmd_help, "agents": self.cmd_agents, "call": self.cmd_call, "jobs": self.cmd_jobs,
            "job": self.cmd_job, "cancel": self.cmd_cancel, "approve": self.cmd_approve,
            "deny": self.cmd_deny, "workflows": self.cmd_workflows}
        self.xmpp.add_event_handler("message", self._on_message)

    async def on_session(self) -> None:
        self.xmpp.send_presence()  # shown online in operators' rosters

    async def stop(self) -> None:
        await super().stop()  # cancels every task the bot started (commands, followed jobs)
        if self.audit is not None:
            await self.audit.aclose()

    # -- receiving commands --------------------------------------------------------------------

    def is_command(self, msg: Message) -> bool:
        """Only one person's direct message is a command: never group chat, nor a room occupant."""
        if msg["type"] not in ("chat", "normal"):
            return False
        sender = msg["from"]
        if sender.bare == self.jid.bare or sender.domain in self.muc_domains:
            return False
        return msg.xml.find(MUC_USER) is None

    def _on_message(self, msg: Message) -> None:
        if not self.is_command(msg):
            return
        sender, body = msg["from"], msg["body"].strip()
        if not body:
            return
        allowed, warn = self.rate.take(sender.bare)
        if not allowed:
            if warn:
                self.say(sender, f"slow down: at most {self.rate.burst} commands at once, then"
                                 f" {self.rate.rate:g} a second; the rest are dropped")
            return
        self.spawn(self.handle(sender, body))

    def say(self, to: JID | str, text: str) -> None:
        for page in pages(text):  # in order: one stream carries them all
            self.xmpp.send_message(mto=JID(to), mbody=page, mtype="chat")

    async def handle(self, sender: JID, body: str) -> None:
        """Run one command line from ``sender`` and answer it."""
        def say(text: str) -> None:
            self.say(sender, text)

        if len(body) > MAX_BODY:
            return say(f"that is {len(body)} characters; commands are at most {MAX_BODY}")
        try:
            words = shlex.split(body)
        except ValueError as exc:
            return say(f"could not read that ({exc}); quote values with spaces: text=\"a b\"")
        if not words:
            return None
        name, rest = words[0].lower(), words[1:]
        command = self.commands.get(name)
        await self.refresh_ops(sender.bare)
        try:
            if command is None:
                if name in self.ops:
                    raise Usage(f"to run {name}, type: call {' '.join(words)}")
                raise Usage(f"unknown command {words[0]!r}{suggest(name, self.commands)}; `help` lists commands")
            await command(sender, rest, say)
        except Usage as exc:
            say(str(exc))
        except Exception as exc:  # the bot answers every command, even when it is at fault
            log.exception("chat command %r from %s failed", body, sender)
            say(f"{name} failed inside the bot ({exc.__class__.__name__}); the bot's log has the details")
        return None

    async def refresh_ops(self, operator: str) -> None:
        """Bring ``ops`` up to what the broker and the live agents offer now (unless ops were given):
        descriptions are read once per op and kept while the broker returns the same one."""
        if self.describer is None:
            return
        try:
            listed = await self.describer.op_summaries(operator)
            wanted = {o["name"]: o for o in listed}
            names = list(wanted)
            found = await asyncio.gather(*(self.describer.op_description(n, operator) for n in names),
                                         return_exceptions=True)
        except (OpError, OSError, TimeoutError) as exc:
            log.warning("could not read the ops' descriptions (%s); the bot offers those it knew", exc)
            return
        ops: dict[str, OpSpec] = {}
        for name, description in zip(names, found):
            if isinstance(description, BaseException):
                log.warning("no description of %s: %s", name, description)
                continue
            known = self._described.get(name)
            if known is None or known[0] != description:
                known = self._described[name] = (description, spec_of(description))
            ops[name] = known[1]
        self.ops = dict(sorted(ops.items()))
        self.broker_ops = frozenset(n for n, o in wanted.items() if o.get("broker"))

    # -- commands ----------------------------------------------------------------------------------

    async def cmd_help(self, sender: JID, words: list[str], say: Say) -> None:
        if words:
            return say(help_for(find_op(words[0], self.ops)))
        width = max(map(len, self.ops), default=0)
        lines = ["commands:",
                 "  help [OP]                          this text, or one op's arguments",
                 "  agents                             live agents, their kinds and resources",
                 "  call OP [on RESOURCE ...] k=v ...  run an op (as you, under your own rights)",
                 "  jobs | job ID | cancel ID          your calls; stop following one",
                 "  workflows                          workflows and recent instances",
                 "  approve ID [STEP] | deny ID        decide a workflow step waiting for approval",
                 "ops:"]
        lines += [f"  {name:<{width}}  {spec.summary}" for name, spec in self.ops.items()]
        return say("\n".join(lines))

    async def cmd_agents(self, sender: JID, words: list[str], say: Say) -> None:
        report = await self.relay(sender.bare, self.ops["mesh.agents"], {}, [])
        res = report.results[0] if report.results else None
        if res is None or res.outcome is not Outcome.OK:
            return say(format_report(report, self.ops["mesh.agents"].result))
        lines = [f"{short(a['jid'])} ({a['kind']}): {' '.join(a['resources']) or 'no resources'};"
                 f" {len([o for o in a['ops'] if o in self.ops])} ops" for a in res.result]  # those offered to people
        lines.append(f"{len(res.result)} live agents")
        return say("\n".join(lines))

    async def cmd_call(self, sender: JID, words: list[str], say: Say) -> None:
        spec, on, args = parse_call(words, self.ops)
        job = self.new_job(sender.bare, spec, on)
        if not spec.progress:
            job.task = asyncio.current_task()
            await self.run_job(job, args)
            return say(job.text())
        # A long op: a job id at once, then progress as it comes, then the result.
        say(f"job {job.id} started: {spec.name}{' on ' + ' '.join(on) if on else ''}."
            f" `job {job.id}` shows it, `cancel {job.id}` stops following it")
        job.task = self.spawn(self._follow(job, args, sender))
        return None

    async def _follow(self, job: Job, args: dict[str, Any], to: JID) -> None:
        last_sent = [0.0]
        pending: list[str] = []
        flusher: list[asyncio.TimerHandle] = []
        loop = asyncio.get_running_loop()

        def flush() -> None:
            flusher.clear()
            if pending and job.state == "running":
                self.say(to, f"job {job.id}: " + "; ".join(pending[-3:]))
                last_sent[0] = loop.time()
            pending.clear()

        def on_progress(line: str) -> None:
            pending.append(line)
            if loop.time() - last_sent[0] >= PROGRESS_EVERY:
                flush()
            elif not flusher:  # coalesce: what arrives within a second goes out together
                flusher.append(loop.call_at(last_sent[0] + PROGRESS_EVERY, flush))

        await self.run_job(job, args, on_progress)
        for handle in flusher:
            handle.cancel()
        if job.report is not None:
            self.say(to, f"job {job.id} finished:\n{job.text()}")

    async def cmd_jobs(self, sender: JID, words: list[str], say: Say) -> None:
        mine = [j for j in self.jobs.values() if j.owner == sender.bare][-10:]
        return say("\n".join(j.summary() for j in mine) if mine else "you have no jobs")

    async def cmd_job(self, sender: JID, words: list[str], say: Say) -> None:
        job = self._own_job(sender, words, "job")
        text = job.summary()
        if job.progress:
            text += "\nprogress: " + "; ".join(job.progress[-5:])
        if job.report is not None:
            text += "\n" + job.text()
        return say(text)

    async def cmd_cancel(self, sender: JID, words: list[str], say: Say) -> None:
        if words and _INSTANCE.match(words[0]):
            return await self._workflow(sender, "workflow.cancel", {"instance": words[0]}, say,
                                        lambda st: f"workflow instance {st['instance']} is {st['state']}")
        job = self._own_job(sender, words, "cancel")
        if job.state != "running":
            return say(f"job {job.id} is already {job.state}")
        self.cancel_job(job)
        return say(f"job {job.id} cancelled: the bot stopped following it. An agent that had accepted it"
                   " finishes it on its own (the protocol has no cancel request yet)")

    async def cmd_workflows(self, sender: JID, words: list[str], say: Say) -> None:
        report = await self.relay(sender.bare, self.ops["workflow.list"], {"limit": 10}, [])
        res = report.results[0] if report.results else None
        if res is None or res.outcome is not Outcome.OK:
            return say(format_report(report, self.ops["workflow.list"].result))
        lines = [f"workflow {w['name']}: {w.get('description') or ''}".rstrip(": ") for w in res.result["workflows"]]
        lines += [f"broken: {b['file']}: {b['error']}" for b in res.result["broken"]]
        lines += [f"instance {i['id']}: {i['workflow']} {i['state']} (by {i['requester']})"
                  for i in res.result["instances"]]
        return say("\n".join(lines) or "no workflows are defined")

    async def cmd_approve(self, sender: JID, words: list[str], say: Say) -> None:
        if not words or not _INSTANCE.match(words[0]):
            raise Usage("usage: approve INSTANCE [STEP]  (`workflows` lists instances)")
        step = words[1] if len(words) > 1 else await self._waiting_step(sender, words[0])
        return await self._workflow(sender, "workflow.approve", {"instance": words[0], "step": step}, say,
                                    lambda st: f"approved {step}; workflow instance {st['instance']} is"
                                               f" {st['state']}{': ' + st['error'] if st['error'] else ''}")

    async def cmd_deny(self, sender: JID, words: list[str], say: Say) -> None:
        if not words or not _INSTANCE.match(words[0]):
            raise Usage("usage: deny INSTANCE  (`workflows` lists instances)")
        # A denial stops the instance: nothing waiting for approval will run.
        return await self._workflow(sender, "workflow.cancel", {"instance": words[0]}, say,
                                    lambda st: f"denied: workflow instance {st['instance']} is {st['state']}")

    async def _waiting_step(self, sender: JID, instance: str) -> str:
        report = await self.relay(sender.bare, self.ops["workflow.status"], {"instance": instance}, [])
        res = report.results[0] if report.results else None
        if res is None or res.outcome is not Outcome.OK:
            raise Usage(format_report(report, self.ops["workflow.status"].result))
        waiting = [s["name"] for s in res.result["steps"] if s["state"] == "waiting"]
        if len(waiting) != 1:
            names = ", ".join(waiting) or "none"
            raise Usage(f"instance {instance} has {len(waiting)} steps waiting ({names}): approve INSTANCE STEP")
        return waiting[0]

    async def _workflow(self, sender: JID, op_name: str, args: dict[str, Any], say: Say,
                        describe: Callable[[dict[str, Any]], str]) -> None:
        spec = self.ops[op_name]
        report = await self.relay(sender.bare, spec, spec.validate(args), [])
        res = report.results[0] if report.results else None
        if res is not None and res.outcome is Outcome.OK:
            return say(describe(res.result))
        return say(format_report(report, spec.result))

    def _own_job(self, sender: JID, words: list[str], command: str) -> Job:
        if not words:
            raise Usage(f"usage: {command} ID  (`jobs` lists yours)")
        job = self.jobs.get(words[0])
        if job is None or job.owner != sender.bare:  # someone else's job is as good as none
            raise Usage(f"you have no job {words[0]!r}; `jobs` lists yours")
        return job

    # -- jobs ----------------------------------------------------------------------------------------

    def new_job(self, owner: str, spec: OpSpec, on: list[str]) -> Job:
        job = Job(str(next(self._job_ids)), owner, spec.name, on, result=spec.result)
        self.jobs[job.id] = job
        while len(self.jobs) > KEEP_JOBS:
            self.jobs.popitem(last=False)
        return job

    async def run_job(self, job: Job, args: dict[str, Any],
                      on_progress: Callable[[str], None] | None = None) -> None:
        def progress(target: str, seq: int, payload: Any) -> None:
            line = f"{short(target)} #{seq}: {show(payload, 120)}"
            job.progress = (job.progress + [line])[-20:]
            job.touch()
            if on_progress is not None:
                on_progress(line)

        try:
            job.report = await self.relay(job.owner, self.ops[job.op], args, job.on, progress=progress)
            job.state, job.finished = "done", time.time()
        except asyncio.CancelledError:
            job.state = "cancelled"
            raise
        finally:
            job.touch()

    def cancel_job(self, job: Job) -> None:
        job.state = "cancelled"
        if job.task is not None and not job.task.done():
            job.task.cancel()
        job.touch()

    # -- relaying a call under the operator's identity ----------------------------------------------

    async def relay(self, operator: str, spec: OpSpec, args: dict[str, Any], on: Sequence[str], *,
                    progress: Callable[[str, int, Any], None] | None = None, timeout: float | None = None
                    ) -> CallReport:
        """Call ``spec`` for ``operator``: discover, decide each target for the operator (a denied
        target is sent nothing), send the rest with the on-behalf-of assertion, audit both ends."""
        loop = asyncio.get_running_loop()
        timeout = timeout if timeout is not None else spec.deadline + 5.0
        end = loop.time() + timeout
        rid = uuid.uuid4().hex
        report = CallReport(spec.name)
        addressed = bool(on)
        if not on and spec.address:  # as `vertebra call`: the op says where it goes (agents/ops.py)
            try:
                on = [paths.check(spec.address.format(**args))]
            except (KeyError, paths.BadResource):
                pass
        targets = await self._targets(operator, spec, list(on), report, min(self.timeouts.discover, timeout))
        sends = []
        for target, held in targets:
            try:
                resources = decided_resources(spec, args, list(on), held)
            except BadArguments as exc:
                report.results.append(TargetResult(target, Outcome.FAILED, error=exc.text))
                continue
            d = decide(self.authorizer, operator, spec, resources)
            self._audit_decision(rid, operator, spec, resources, args, d.allowed, d.rule or d.reason,
                                 d.version)
            if not d.allowed:
                report.results.append(TargetResult(target, Outcome.DENIED, error=d.reason))
                continue
            scoped = [w for w in on if any(paths.related(h, w) for h in held)] if held else list(on)
            sends.append((target, scoped))
        if spec.scope == "one" and not addressed:
            sends = sends[:1]  # e.g. a volume is created on one agent, not on every one that offers it
        started = time.monotonic()
        results = await asyncio.gather(*(
            self.request(t, spec.name, args, on=scoped, timeout=max(0.0, end - loop.time()), rid=rid,
                         progress=progress, behalf=operator) for t, scoped in sends))
        for res in results:
            if self.audit is not None:
                self.audit.ended(rid=rid, caller=operator, op=spec.name, outcome=res.outcome.value,
                                 duration=time.monotonic() - started)
        report.results += results
        for hook in list(self.relayed):
            try:
                result = hook(operator, spec, report)
                if asyncio.iscoroutine(result):  # called, never awaited, it would not run at all
                    self.spawn(result)
            except Exception:  # a room that cannot post must not lose the operator's answer
                log.exception("relay hook failed")
        return report

    async def _targets(self, operator: str, spec: OpSpec, on: list[str], report: CallReport, timeout: float
                       ) -> list[tuple[str, list[str]]]:
        """(target, resources it holds) for each agent to send to; what is missing goes in ``report``."""
        if spec.name in self.broker_ops:
            return [(self.broker, [])]
        if self.directory is not None:  # in the broker's process: its directory, without a round trip
            entries = [{"jid": e.jid, "resources": list(e.caps.resources)}
                       for e in self.directory.discover(spec.name, on)]
            found = TargetResult(self.broker, Outcome.OK, result=entries)
        else:
            found = await discover_all(self, self.broker, spec.name, on, timeout, behalf=operator)
        if found.outcome is not Outcome.OK:
            found.error = f"discovery through the broker failed: {found.error}"
            report.results.append(found)
            return []
        report.results += not_discovered(spec.name, on, found.result)
        return [(e["jid"], list(e["resources"])) for e in found.result]

    def _audit_decision(self, rid: str, operator: str, spec: OpSpec, resources: list[str], args: dict[str, Any],
                        allowed: bool, rule: str, version: int) -> None:
        audit_log.info("decide rid=%s caller=%s via=%s op=%s resources=%s allowed=%s reason=%s",
                       rid, operator, self.jid.bare, spec.name, resources, allowed, rule)
        if self.audit is not None:
            self.audit.decided(rid=rid, caller=operator, op=spec.name, resources=resources, args=args,
                               secret=[p.name for p in spec.params if p.secret], allowed=allowed,
                               rule=f"via chat bot {self.jid.bare}: {rule}", version=version or 0)


def decided_resources(spec: OpSpec, args: Mapping[str, Any], addressed: list[str], held: list[str]) -> list[str]:
    """The resources an agent holding ``held`` decides a request on (as ``Agent._resources_of``
    does): the declaration's templates filled in, and the most specific of each related pair of an
    addressed and a held path; the agent's own resources when nothing narrows them."""
    try:
        named = [paths.check(r) for r in spec.resources_for(args)]
    except paths.BadResource as exc:
        raise BadArguments(str(exc)) from None
    narrowed = sorted({max(h, r, key=len) for h in held for r in addressed if paths.related(h, r)})
    if addressed and held and not narrowed:
        raise BadArguments(f"the agent holds none of {' '.join(addressed)}")
    return narrowed + named or (list(held) if held else list(addressed))


class RemoteDescriptions:
    """Op descriptions from the broker's ``mesh.describe``, asked for the operator (as every request
    the bot sends); the broker reads them from the agents, cached per caps hash."""

    TIMEOUT = 5.0

    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        # Descriptions asked for, kept while the listing (names and summaries) stays the same: one
        # request per command then, not one per op.
        self._listed: tuple[tuple[str, str], ...] = ()
        self._described: dict[str, dict[str, Any]] = {}

    async def _ask(self, operator: str, op: str) -> Any:
        answer = await self.bot.request(self.bot.broker, "mesh.describe", {"op": op}, timeout=self.TIMEOUT,
                                        behalf=operator)
        if answer.outcome is not Outcome.OK:
            raise OpError(f"mesh.describe {op!r}: {answer.outcome.value}: {answer.error}")
        return answer.result

    async def op_summaries(self, operator: str) -> list[dict[str, Any]]:
        listed = await self._ask(operator, "")
        key = tuple((str(o["name"]), str(o["summary"])) for o in listed)
        if key != self._listed:
            self._listed, self._described = key, {}
        return listed

    async def op_description(self, name: str, operator: str) -> dict[str, Any]:
        if name not in self._described:
            self._described[name] = await self._ask(operator, name)
        return self._described[name]


class BrokerDescriptions:
    """Op descriptions straight from the broker the bot runs beside (its ``mesh.describe``, no round trip)."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker

    async def op_summaries(self, operator: str) -> list[dict[str, Any]]:
        return await self.broker.descriptions.op_summaries()

    async def op_description(self, name: str, operator: str) -> dict[str, Any]:
        return await self.broker.descriptions.op_description(name)


async def start_beside_broker(mesh: Any, broker: Any, instance: int) -> ChatBot | None:
    """The operators' chat bot, in the broker's process so that its ops room can follow the broker's
    alerts and approvals as they happen: one account, so beside the broker's first instance only
    (registered for the broker kind in the ``vertebra.companions`` entry points)."""
    if not mesh.chat or instance != 1:
        return None
    from agents.cli import _state_dir

    from .adhoc import AdHoc
    from .room import OpsRoom

    chat = mesh.chat
    bot = ChatBot(mesh.jid(chat.account), mesh.password(chat.account), mesh.endpoint(), broker=mesh.broker_jid,
                  authorizer=mesh.authorizer(), state_dir=_state_dir(mesh, chat.account),
                  rate=RateLimit(chat.burst, chat.per_second))
    bot.directory = broker.directory
    bot.describer = BrokerDescriptions(broker)
    AdHoc(bot)
    if chat.room:
        room = OpsRoom(bot, chat.room, admins=mesh.admins)  # members: the admins and whom the policy names
        bot.relayed.append(room.relayed)
        room.follow(broker)
    await bot.start(timeout=30.0)
    return bot
