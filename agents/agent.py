"""An agent: an actor that serves the ops its class declares.

An op's whole path through an agent, in order:

1. advertise — on every session, each op becomes a disco#info feature, the agent's kind and
   resources go into an XEP-0128 form, and a directed presence with the XEP-0115 caps hash goes to
   the broker until a broker answers with its own (``on_session``);
2. receive — an IQ-set ``<op>`` arrives; limits are checked before decoding (``protocol.decode``);
3. deduplicate — a request id seen before returns the first outcome and never runs twice;
4. validate — the op's declaration checks and converts the arguments (``OpSpec.validate``);
5. authorize — the agent's rules (``Agent.rules``) are walked in order for the caller's bare JID as
   the server stamped it, the delegate that sent it and the resources it acts on (``authz``);
6. execute — within the op's deadline; a long op answers at once with a job id and reports
   sequence-numbered progress, then exactly one outcome, sent until the caller acknowledges it: the
   job's life is the agent's ``jobs`` component's (``agents/jobs.py``), which keeps it on disk, so one
   cut off by a crash is followed to its end (its work resumed, ``follow_job``) or reported interrupted;
7. audit — the decision and the outcome are written to the hash-chained log (``agents/audit.py``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Awaitable, Callable, Sequence

from slixmpp import Iq, Presence

from . import __version__, caps, describe, fenced, policy_sync, protocol, resources as paths
from .actor import Actor, Backoff, Endpoint
from .audit import AuditLog
from .authz import AdminsOnly, Authorizer, Decision, Request, Rule, authorize, broker_only
from .errors import (BadArguments, BadPayload, Denied, Expired, InternalError, OpError, OpTimeout, Outcome,
                     ResourceConstraint, StaleTerm, TooLarge, UnknownOp)
from .idempotency import Answer, RequestLog, fingerprint
from .intake import FairIntake, IntakeLimits
from .jobs import RETENTION, Job, Jobs
from .lead_terms import LeadTerms
from .ops import Arg, OpSpec, op, ops_of

log = logging.getLogger(__name__)
audit_log = logging.getLogger("vertebra.audit")

AGENT_FORM = "urn:vertebra:1#agent"
ANCHOR_OP = "mesh.audit.anchor"  # an agent's audit head, sent to its brokers (broker/anchors.py)
JOB_STATUS_OP = "job.status"


@dataclass
class Call:
    """What an op's implementation knows about the request it serves."""

    agent: "Agent"
    caller: str  # bare JID of whom the request is for: the sender as the server stamped it, or whom a delegate acts for
    rid: str
    resources: list[str]
    deadline: float  # loop time by which the op must end
    via: str = ""  # the delegate (broker, chat bot) that sent it on the caller's behalf, if any
    # Where the op was passed on to be served, for this end's audit record: (that agent's JID, the request id
    # it was sent under), as a broker instance forwards a workflow op to the leading one.
    passed_to: tuple[str, str] | None = None
    # Set by the job life cycle (agents/jobs.py) for a long op; empty for a quick one.
    job: str = ""  # the job's id, named in its progress and outcome messages
    reply_to: str = ""  # the full JID progress goes to
    waits_on: Awaitable[Any] | None = None  # a job followed after a restart: the work it still waits on
    _seq: int = field(default=0)

    async def progress(self, payload: Any) -> None:
        """Report progress to the caller (long ops only; ignored for quick ones)."""
        if not self.job:
            return
        self._seq += 1
        self.agent.jobs.send_progress(self, self._seq, payload)

    async def follows(self, work: str) -> None:
        """Name, on the job's record, the durable work this long op waits on and that carries on by
        itself after a restart (``Agent.follow_job`` finds it again by this name); ignored for quick ops."""
        await self.agent.jobs.follows(self.job, work)


MAX_ADDRESSED = 64  # resources one request may address
_TOO_MANY = ResourceConstraint("too many requests from you; retry later")


def info_op(kind: str) -> Callable[..., Any]:
    """The ``KIND.info`` op every agent kind serves: who it is and what it holds."""

    @op(f"{kind}.info", effect="read", deadline=5)
    async def info(self: "Agent", call: Call) -> dict:
        """Name, kind, version, resources and ops of this agent."""
        return self.describe()

    return info


class Agent(Actor):
    """Serves the ops declared on its class. Subclasses set ``kind`` and declare ops with ``@op``."""

    kind = "agent"
    resource = "agent"

    def __init__(self, jid: str, password: str, endpoint: Endpoint, *, resources: Sequence[str] = (),
                 broker: str | None = None, authorizer: Authorizer | None = None,
                 settings: dict[str, Any] | None = None, name: str | None = None,
                 state_dir: Path | None = None, delegates: Sequence[str] = (), resource: str | None = None,
                 requests: IntakeLimits | None = None) -> None:
        super().__init__(jid, password, endpoint, resource=resource)
        # Advertising needs forms (XEP-0004, XEP-0128); clients do without them and so without their
        # handlers on every stanza. Caps (XEP-0115) are agents/caps.py's, not slixmpp's plugin: the agent
        # puts its hash on the few presences it sends itself and reads nobody's.
        for plugin in ("xep_0004", "xep_0128"):
            self.xmpp.register_plugin(plugin)
        # No stream resumption for agents: a session that could be resumed hibernates on the server after
        # a crash (20 s here), and only then does the server send the agent's unavailable presence, to
        # the broker and to every caller waiting on one of its jobs. Without it they learn at once; a
        # network blip costs a new session, which re-announces the agent (docs/protocol.md 2.2).
        self.xmpp.plugin["xep_0198"].allow_resume = False
        self._caps_ver: str | None = None
        self.state_dir = state_dir  # where this agent keeps durable state, if it has any
        self.fenced = fenced.FencedIdentities()  # identities of nodes fenced now, as the broker pushes them
        self.audit = AuditLog(state_dir / "audit.sqlite", write_behind=0.05) if state_dir else None
        self.name = name or jid.split("@", 1)[0]
        self.resources = [paths.check(r) for r in resources]
        self.broker = broker
        # Who may send requests on someone else's behalf (``for``): the broker, running workflow steps,
        # and any configured delegate such as the operators' chat bot. Nobody else can claim a ``for``.
        self.delegates = frozenset(d.lower() for d in (*delegates, *([broker] if broker else [])))
        # The newest leader's term (fencing token) each sender has stamped on a workflow step: a step
        # with an older one comes from a broker instance that has been deposed (broker/leadership.py).
        # Kept in the state directory: a restart must not forget it (agents/lead_terms.py).
        self._terms = LeadTerms(state_dir / "terms.sqlite" if state_dir else None)
        self.authorizer = authorizer or AdminsOnly(())  # the policy: the last of the rules below
        # What authorization walks for every request, in order (agents/authz.py); a kind with a rule
        # of its own puts it before the policy's.
        self.rules: list[Rule] = [self.sent_by_broker, self.not_while_fenced, self.asks_about_a_job, self.by_policy]
        self.settings = settings or {}
        self.ops: dict[str, OpSpec] = ops_of(type(self))
        self._parts: dict[str, Any] = {}  # op name -> the component that serves it (``serve_part``)
        # Private like the audit log (it names every caller and op): 0600 in a 0700 directory (agents.db).
        self._requests = RequestLog(state_dir / "requests.sqlite" if state_dir else None)
        # The long ops it accepts, from their <accepted> until their outcome reached the caller (agents/jobs.py).
        self.jobs = Jobs(self, state_dir / "jobs.sqlite" if state_dir else None, self._requests)
        # Requests are served fairly per sender and refused over a sender's rate or queue (intake.py).
        self.intake: FairIntake[Iq] = FairIntake(self._serve, requests or IntakeLimits(), spawn=self.spawn)
        self._brokers: set[str] = set()  # full JIDs of brokers that have seen us this session
        self._broker_sessions: dict[str, str] = {}  # broker full JID -> its session we last answered
        self._announcer: asyncio.Task[None] | None = None
        self._audit_flusher: asyncio.Task[None] | None = None
        self._anchored: dict[str, int] = {}  # broker full JID -> audit sequence it holds as our anchor
        self.xmpp.add_event_handler("presence_available", self._on_broker_presence)
        self.xmpp.add_event_handler("presence_unavailable", self._on_broker_presence)
        self._advertise_features()

    async def stop(self) -> None:
        if self._audit_flusher is not None:
            self._audit_flusher.cancel()
        if self.audit is not None and self.online:
            self.audit.flush()
            try:  # the last records this agent wrote: a cut after shutdown is detected too
                await self._anchor_audit(timeout=3.0)
            except Exception:
                log.warning("could not anchor the audit log's head on shutdown", exc_info=True)
        await super().stop()
        await self._requests.aclose()
        await self.jobs.aclose()
        await self._terms.aclose()
        if self.audit is not None:
            await self.audit.aclose()

    # -- the ops every agent serves ------------------------------------------------------------

    fenced_install = fenced.install_op()

    @op(policy_sync.INSTALL_OP, effect="change", deadline=10, sender="broker")
    async def policy_install(self, call: Call, text: Annotated[str, Arg("the policy, as YAML")],
                             issued_at: Annotated[float, Arg("when the broker vouched for it (epoch s)")]) -> dict:
        """Install the authorization policy this agent's broker pushes (accepted from the broker only)."""
        return policy_sync.install(self.authorizer, text, issued_at)

    @op(JOB_STATUS_OP, effect="read", deadline=600)
    async def job_status(self, call: Call, job: Annotated[str, Arg("the job id the agent's <accepted> named")],
                         wait: Annotated[float, Arg("seconds to wait for a running job to end", min=0, max=600)] = 0
                         ) -> dict:
        """A long op's job: running, or how it ended (answered to its caller, or to whom the policy allows)."""
        found = await self.jobs.get(job)
        if found is None or (found.caller != call.caller and not self.by_policy(
                Request(call.caller, call.resources, call.via), self.ops[JOB_STATUS_OP]).allowed):
            raise OpError(f"{self.name} has no job {job} of yours: jobs are kept {RETENTION / 3600:g} hours after"
                          " they end, and shown to their caller or to whom the policy lets run job.status")
        if job in self.jobs.running and wait > 0:
            left = call.deadline - asyncio.get_running_loop().time() - 0.5  # time for the answer to travel
            await self.jobs.wait(job, max(0.0, min(wait, left)))
            found = await self.jobs.get(job) or found
        return found.describe()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "jid": str(self.jid), "kind": self.kind, "version": __version__,
                "resources": list(self.resources), "ops": sorted(self.ops)}

    # -- advertise -----------------------------------------------------------------------------

    def _advertise_features(self) -> None:
        disco = self.xmpp.plugin["xep_0030"]
        disco.add_identity(category="automation", itype="rpc", name=f"vertebra {self.kind} agent")
        features = [spec.feature for spec in self.ops.values()]
        if fenced.INSTALL_OP in self.ops:
            features.append(fenced.ORDERED)
        self.vertebra.serve(self._on_op, features)  # features at session bind
        form = self.xmpp.plugin["xep_0004"].make_form(ftype="result")
        form.add_field(var="FORM_TYPE", ftype="hidden", value=AGENT_FORM)
        form.add_field(var="kind", ftype="text-single", value=self.kind)
        if self.resources:  # never empty: older brokers hash an empty field otherwise than XEP-0115 says
            form.add_field(var="resources", ftype="text-multi", value=list(self.resources))
        self.xmpp.plugin["xep_0128"].add_extended_info(data=form)
        describe.publish(self.xmpp, self.ops)  # each op's arguments and facts on a disco node of its own

    async def on_session(self) -> None:
        # The caps hash covers features and the form, so agents alike share one disco query.
        self._caps_ver = await caps.advertise(self.xmpp)
        self.presence()  # available, so a broker's hello to our bare JID reaches us
        if self.audit is not None and self._audit_flusher is None:
            self._audit_flusher = self.spawn(self._flush_audit(self.audit), name=f"audit flusher {self.name}")
        self._brokers.clear()
        self._broker_sessions.clear()
        self._start_announcing()
        self.jobs.on_session()

    def presence(self, to: str | None = None) -> None:
        """Send available presence (to ``to``, else broadcast) carrying this agent's caps hash."""
        self._available(to).send()

    def _available(self, to: str | None = None) -> Presence:
        """This actor's available presence to ``to`` (else a broadcast): its caps hash, and what
        _stamp_presence adds."""
        pres = self.xmpp.make_presence(pto=to)
        if self._caps_ver:
            caps.stamp(pres, self._caps_ver)
        self._stamp_presence(pres)
        return pres

    def _stamp_presence(self, pres: Presence) -> None:
        """Anything else every presence of this actor carries (the broker's: its session, 4.5)."""

    # -- discover: the broker and this agent find each other -----------------------------------

    def _start_announcing(self) -> None:
        if self.broker and (self._announcer is None or self._announcer.done()):
            self._announcer = self.spawn(self._announce_until_seen(), name=f"announcer {self.name}")

    async def _announce_until_seen(self) -> None:
        """Directed presence (with caps) to the broker, repeated with backoff until a broker answers
        with its own: a broker that was not online yet would otherwise never hear of us. The server
        tells the broker, in turn, the moment we go."""
        backoff = Backoff(base=0.5, cap=10.0)
        while not self._brokers and self.online_or_starting:
            self.presence(self.broker)
            await asyncio.sleep(backoff.next())

    @property
    def online_or_starting(self) -> bool:
        return not self._stopping and self.xmpp.transport is not None

    @property
    def broker_jid(self) -> str | None:
        """The full JID of a broker that has seen this agent, else the conventional one."""
        if not self.broker:
            return None
        return next(iter(sorted(self._brokers)), f"{self.broker}/broker")

    def is_broker(self, jid: str) -> bool:
        """Whether ``jid`` is this agent's broker (one that has seen it, or any session of its account)."""
        return jid in self._brokers or (bool(self.broker) and jid.split("/", 1)[0] == self.broker)

    def _on_broker_presence(self, pres: Presence) -> None:
        if not self.broker or pres["from"].bare != self.broker:
            return
        broker = str(pres["from"])
        if pres["type"] == "unavailable":
            self._brokers.discard(broker)
            self._broker_sessions.pop(broker, None)
            self._start_announcing()  # to be known again as soon as a broker returns
            return
        marker = pres.xml.find(protocol.BROKER_SESSION)
        session = marker.get("id", "") if marker is not None else ""
        # A broker we had not heard from (it acknowledged us, or it started and says hello), or one we
        # had, from a session we have not answered: a broker that lost its session comes back under
        # the same full JID with an empty directory, and the server need not have told us it went
        # (docs/protocol.md 4.4). Every hello is answered, the same session's second one included: it
        # goes only to agents that broker has not listed (our answer to its first was lost, or came
        # while it could not file it). A hello to our bare JID is one too (older brokers did not say
        # so; Prosody delivers it to the bare JID, ejabberd to the full one). One presence back lists
        # us there with our current caps.
        hello = marker is not None and marker.get("hello") == "1"
        if hello or broker not in self._brokers or not pres["to"].resource \
                or self._broker_sessions.get(broker, session) != session:
            self._brokers.add(broker)
            self._broker_sessions[broker] = session
            self.presence(broker)

    # -- receive, deduplicate, validate --------------------------------------------------------

    def _on_op(self, iq: Iq) -> None:
        # Refused unread: no decode, no audit record, no request-log entry; the answer is all it costs.
        if not self.intake.offer(iq["from"].bare, iq):
            self.xmpp.send(protocol.error_reply(iq, _TOO_MANY))

    async def _serve(self, iq: Iq) -> None:
        req = protocol.op_of(iq)  # its attributes read directly (protocol.request explains why)
        caller, rid = iq["from"].bare, req.get("rid", "")
        if not rid or len(rid) > 128:
            error = BadPayload("request has no valid rid (1-128 characters)")
            self._audit_refusal(iq, caller, rid or "", error)
            self.xmpp.send(protocol.error_reply(iq, error))
            return
        try:  # before the request log: a repeat from the current leader counts, one from a deposed one is refused
            await self._check_term(caller, req.get("term", ""))
        except OpError as refusal:
            self._audit_refusal(iq, caller, rid, refusal)
            self.xmpp.send(protocol.error_reply(iq, refusal))
            return
        key, fp = (caller, rid), fingerprint(req.get("name", ""), req.get("on", ""), req.get("for", ""), req.text or "")
        spec = self.ops.get(req.get("name", ""))
        seen = self._requests.get(key)
        if seen is None and spec is not None and spec.changes_state:  # kept on disk across restarts too
            seen = await self._requests.recall(key)
        repeat = seen is not None
        if seen is None:
            seen = self._requests.start(key, fp)
            try:
                answer = await self._admit_and_run(iq, caller, rid, key, fp)
                if isinstance(answer.error, Expired):  # never started: a retry under this rid, in time, may run
                    self._requests.abandon(key, seen, answer.error, ran=False)
                else:
                    await self._requests.finish(key, seen, answer, durable=bool(spec and spec.changes_state))
            finally:
                if not seen.answer.done():
                    self._requests.abandon(key, seen, InternalError(f"request {rid} was interrupted"))
        elif seen.fingerprint != fp:
            error = BadPayload(f"request id {rid} was already used for a different request; use a new id for a new"
                               " request")
            self._audit_refusal(iq, caller, rid, error)
            self.xmpp.send(protocol.error_reply(iq, error))
            return
        answer = await asyncio.shield(seen.answer)
        if answer.job and repeat:  # attached to the running job, on its record before this <accepted>
            await self.jobs.repeated(answer, str(iq["from"]), rid,
                                     protocol.caller_deadline(req, self.ops[req.get("name", "")].deadline))
        self.xmpp.send(self._reply(iq, answer))

    def _reply(self, iq: Iq, answer: Answer) -> Iq:
        if answer.error is not None:
            return protocol.error_reply(iq, answer.error)
        # Not iq.reply(clear=True): that deep-copies the whole request, payload and all, only to clear it.
        if answer.job:
            return protocol.result(iq, "accepted", {"job": answer.job})
        return protocol.result(iq, "outcome", {"status": "ok"}, answer.payload)

    async def _admit_and_run(self, iq: Iq, caller: str, rid: str, key: tuple[str, str], fp: str) -> Answer:
        name = protocol.op_of(iq).get("name", "")
        decided: list[str] = []  # _admit notes here once the decision is recorded
        try:
            spec, call, args = self._admit(iq, caller, rid, decided)
            if spec.destructive and self.audit is not None:
                await self.audit.written()  # its decision is on disk before the op starts (audit.py)
            if spec.changes_state:  # a repeat after a crash mid-run (or mid-job): interrupted, not run again
                await self._requests.started(key, fp, spec.name, self.name)
        except OpError as exc:  # refused before running: the decision record says it all, or a refusal's
            log.info("refused rid=%s caller=%s op=%s: %s", rid, caller, name, exc.text)
            if not decided:
                self._audit_refusal(iq, caller, rid, exc)
            return Answer(error=exc)
        except Exception as exc:  # a fault while admitting still answers, and runs nothing
            log.exception("admitting %s from %s failed", name, caller)
            error = InternalError(f"{name} could not be admitted: {exc.__class__.__name__}")
            if not decided:
                self._audit_refusal(iq, caller, rid, error)
            return Answer(error=error)
        if spec.progress:  # a long op: accepted as a job, which reports its outcome later (agents/jobs.py)
            return await self.jobs.accept(spec, call, args, str(iq["from"]), key, fp,
                                          protocol.caller_deadline(protocol.op_of(iq), spec.deadline))
        try:  # admitted: its outcome, whatever it is, may be kept durably (idempotency.py)
            return Answer(payload=await self.execute(spec, call, args), admitted=True)
        except OpError as exc:
            return Answer(error=exc, admitted=not isinstance(exc, Expired))

    def _admit(self, iq: Iq, caller: str, rid: str, decided: list[str] | None = None
               ) -> tuple[OpSpec, Call, dict[str, Any]]:
        """Decode, validate and authorize a request; raises the OpError that refuses it. Once the
        decision is in the audit log, the op's name is added to ``decided`` (a refusal before that is
        audited by the caller)."""
        req = protocol.op_of(iq)
        if len(req):
            raise BadPayload("the <op/> element must hold only its base64 payload, no child elements")
        deadline = protocol.parse_deadline(req.get("deadline", ""))  # wall clock, seconds; None from older senders
        spec = self.ops.get(req.get("name", ""))
        if spec is None:
            raise UnknownOp(f"{req.get('name', '')!r} is not an op of {self.kind} agent {self.name};"
                            f" it offers {', '.join(sorted(self.ops))}")
        args = spec.validate(protocol.decode(req.text) or {})
        resources = self._resources_of(spec, args, req.get("on", "").split())
        via, caller = self._subject(caller, req.get("for", ""))
        decision = self.authorize(Request(caller, resources, via), spec)
        audit_log.info("decide rid=%s caller=%s op=%s resources=%s allowed=%s reason=%s",
                       rid, caller, spec.name, resources, decision.allowed, decision.reason)
        if self.audit is not None:
            rule = decision.rule or decision.reason
            # A destructive op's decision is committed before the op starts: a crash it causes (or one
            # during it) must not lose who powered off a node. Other decisions are written in batches.
            self.audit.decided(rid=rid, caller=caller, op=spec.name, resources=resources, args=args,
                               secret=[p.name for p in spec.params if p.secret], allowed=decision.allowed,
                               rule=f"{rule} (sent by {via} on the caller's behalf)" if via else rule,
                               version=decision.version or 0, durable=decision.allowed and spec.destructive)
        if decided is not None:
            decided.append(spec.name)
        if not decision.allowed:
            raise Denied(decision.reason)
        timeout = min(spec.deadline, protocol.budget(req.get("timeout", ""), spec.deadline))
        if deadline is not None:  # the caller's own end, whatever held the request up on the way
            left = deadline + protocol.CLOCK_SKEW_ALLOWANCE - time.time()
            if left <= 0:
                self._audit_end(rid, caller, spec.name, Expired.condition, time.monotonic())
                raise Expired(
                    f"{spec.name} was not started: the request reached {self.name} {time.time() - deadline:.1f}s"
                    f" after its deadline (allowing {protocol.CLOCK_SKEW_ALLOWANCE:g}s of clock skew), when the"
                    " caller had stopped waiting; nothing was done. Send it again if it is still wanted")
            timeout = min(timeout, left)
        return spec, Call(self, caller, rid, resources, asyncio.get_running_loop().time() + timeout, via), args

    async def _check_term(self, sender: str, term: str) -> None:
        """Refuse a step stamped with an older leader's term than the newest this sender has sent; a
        newer term is on disk before the step runs."""
        if not term:
            return
        if not re.fullmatch(r"[1-9][0-9]{0,18}", term):
            raise BadPayload(f"'term' must be the leading broker instance's term, a positive decimal integer,"
                             f" got {term[:40]!r}")
        try:
            admitted = await self._terms.admit(sender, int(term))
        except (sqlite3.Error, OSError) as error:  # not on disk: a restart could forget it, so nothing runs
            log.error("could not keep %s's term %s in the state directory: %s", sender, term, error)
            raise InternalError("this agent could not record the leader's term in its state directory;"
                                " see its log") from error
        if not admitted:
            raise StaleTerm(f"this step comes from a broker instance whose lead has ended (term {term}; the"
                            f" current leader's is {self._terms.newest(sender)} or later): only the leading"
                            " instance's steps run")

    def _subject(self, sender: str, behalf: str) -> tuple[str, str]:
        """(delegate, subject): whom a request is decided and audited for. A ``for`` is honoured from
        this agent's delegates only, and names a bare JID."""
        if not behalf:
            return "", sender
        if sender.lower() not in self.delegates:
            raise Denied(f"{sender} may not act on behalf of {behalf}: only this agent's broker and configured"
                         " delegates may")
        if not re.fullmatch(r"[^@/\s]+@[^@/\s]+", behalf):
            raise BadPayload(f"'for' must name a bare JID (user@domain), got {behalf!r}")
        return sender, behalf.lower()

    def _resources_of(self, spec: OpSpec, args: dict[str, Any], addressed: list[str]) -> list[str]:
        """The canonical resources a request acts on, which authorization decides over: the
        declaration's templates filled with the arguments, and of what the caller addressed, the
        most specific of each pair of an addressed path and a related path this agent holds (the
        agent's own resources when nothing narrows them)."""
        if len(addressed) > MAX_ADDRESSED:
            raise TooLarge(f"a request may address at most {MAX_ADDRESSED} resources, got {len(addressed)}")
        try:
            addressed = [paths.check(r) for r in addressed]
            named = [paths.check(r) for r in spec.resources_for(args)]
        except paths.BadResource as exc:
            raise BadArguments(str(exc)) from None
        narrowed = sorted({max(h, r, key=len) for h in self.resources for r in addressed if paths.related(h, r)})
        if addressed and not narrowed:
            raise BadArguments(f"{self.name} holds none of {' '.join(addressed)}; it holds"
                               f" {' '.join(self.resources) or 'no resources'}")
        return narrowed + named or list(self.resources)

    # -- authorize: the rules walked for every request (``self.rules``) ------------------------

    def sent_by_broker(self, request: Request, spec: OpSpec) -> Decision | None:
        """An op only the broker sends (``sender="broker"``) is its broker's alone."""
        return broker_only(request, spec, self.broker)

    def not_while_fenced(self, request: Request, spec: OpSpec) -> Decision | None:
        """A fenced node's identities run no op that changes state (see fenced.py)."""
        return self.fenced.check(request.caller, spec)

    def asks_about_a_job(self, request: Request, spec: OpSpec) -> Decision | None:
        """Anyone may ask about a job: ``job.status`` itself tells only the job's caller, or whom the
        policy allows to run it."""
        if spec.name == JOB_STATUS_OP:
            return Decision(True, "anyone may ask about a job; it is shown to its caller or to whom the policy"
                                  " allows")
        return None

    def by_policy(self, request: Request, spec: OpSpec) -> Decision:
        """The mesh's policy (or its admins, without one) decides."""
        return self.authorizer.decide(request.caller, spec, request.resources)

    def authorize(self, request: Request, spec: OpSpec) -> Decision:
        """Walk this agent's rules for ``request`` (any failure denies)."""
        return authorize(self.rules, request, spec)

    # -- execute -------------------------------------------------------------------------------

    async def execute(self, spec: OpSpec, call: Call, args: dict[str, Any]) -> str:
        """Run the op within the call's deadline and return its encoded result; every ending is
        audited, and every failure (a result too large to send included) is an OpError."""
        started = time.monotonic()
        timeout = call.deadline - asyncio.get_running_loop().time()
        try:
            # Out of time before it began: never start it (a coroutine runs up to its first await).
            if timeout <= 0:
                raise Expired(f"{spec.name} was not started: its deadline passed before it could begin; nothing"
                              " was done")
            async with asyncio.timeout(timeout):  # unlike wait_for, no second task per request
                result = await self.perform(spec, call, args)
            payload = protocol.encode(result, what=f"the result of {spec.name}")
        except TimeoutError:
            error: OpError = OpTimeout(f"{spec.name} did not finish within {timeout:.3g}s and was stopped")
        except OpError as exc:
            error = exc
        except Exception as exc:
            log.exception("op %s failed", spec.name)
            error = InternalError(f"{spec.name} failed unexpectedly: {exc.__class__.__name__}: {exc}")
        else:
            self._audit_end(call.rid, call.caller, spec.name, "ok", started, call.passed_to)
            return payload
        self._audit_end(call.rid, call.caller, spec.name, error.condition, started, call.passed_to)
        raise error

    def serve_part(self, part: Any) -> Any:
        """Serve the ops ``part`` declares (an instance of one of the classes in the kind's
        ``components``, which ``ops_of`` already counts among this agent's ops) with ``part`` as their
        self; returns ``part``."""
        for name in ops_of(type(part)):
            self._parts[name] = part
        return part

    async def perform(self, spec: OpSpec, call: Call, args: dict[str, Any]) -> Any:
        """Run an admitted op's implementation, on the component that serves it or on the agent (or, for
        a job followed after a restart, await the work it waits on)."""
        if call.waits_on is not None:
            return await call.waits_on
        return await spec.func(self._parts.get(spec.name, self), call, **args)

    def follow_job(self, job: Job, call: Call) -> Awaitable[Any] | None:
        """After a restart, for a job the previous run left running that named its work (``Call.follows``):
        the awaitable that ends with the op's result as that work, resumed by the kind, goes on (``call``
        reports its progress), or None when it cannot go on: the job is then reported interrupted.
        Kinds whose work resumes after a restart override this."""
        return None

    # -- audit ---------------------------------------------------------------------------------

    def _audit_refusal(self, iq: Iq, sender: str, rid: str, error: OpError) -> None:
        """Audit a request refused before any decision (rate-limited per sender like denials): a forged
        ``for``, a payload that does not decode, an unknown op, bad arguments."""
        req = iq["vertebra_op"]
        audit_log.info("refused rid=%s sender=%s op=%.200s for=%.200s condition=%s", rid, sender, req["name"],
                       req["for"], error.condition)
        if self.audit is not None:
            self.audit.refused(rid=rid, caller=sender, op=req["name"] or "", condition=error.condition,
                               reason=error.text, behalf=req["for"] or "")

    def _audit_end(self, rid: str, caller: str, op_name: str, outcome: str, started: float,
                   passed_to: tuple[str, str] | None = None) -> None:
        duration = time.monotonic() - started
        audit_log.info("end rid=%s caller=%s op=%s outcome=%s duration=%.3fs%s", rid, caller, op_name, outcome,
                       duration, f" passed to {passed_to[0]} as rid={passed_to[1]}" if passed_to else "")
        if self.audit is not None:
            self.audit.ended(rid=rid, caller=caller, op=op_name, outcome=outcome, duration=duration,
                             passed_to=passed_to)

    # Seconds between the audit log's flushes, each followed by sending its head to the brokers when it
    # changed (what records since the last anchor a truncation can take unnoticed; README, audit).
    audit_anchor_interval = 30.0

    async def _flush_audit(self, audit: AuditLog) -> None:
        # Denials held back by the per-sender rate limit are written as one summary now and then, and
        # the head is anchored at the brokers (broker/anchors.py) so the log cannot be cut unnoticed.
        while True:
            await asyncio.sleep(self.audit_anchor_interval)
            try:
                audit.flush()
                await self._anchor_audit()
            except Exception:  # a disk or broker fault this time: the next round tries again
                log.exception("flushing or anchoring the audit log failed")

    async def _anchor_audit(self, timeout: float = 5.0) -> None:
        """Send the audit log's head (sequence, keyed hash) to each broker that has seen this agent
        and does not have it yet; one that fails is tried again next time."""
        if self.audit is None or not self.broker:
            return
        seq, digest = await self.audit.current_head()
        brokers = [b for b in sorted(self._brokers) if self._anchored.get(b) != seq]
        if not seq or not brokers:
            return
        results = await asyncio.gather(*(self.request(b, ANCHOR_OP, {"seq": seq, "hash": digest}, timeout=timeout)
                                         for b in brokers), return_exceptions=True)
        for broker, res in zip(brokers, results):
            if not isinstance(res, BaseException) and res.outcome is Outcome.OK:
                self._anchored[broker] = seq
            else:
                log.warning("could not anchor the audit log's head (record %d) at %s: %s; trying again in %gs",
                            seq, broker, res if isinstance(res, BaseException) else f"{res.outcome.value}: {res.error}",
                            self.audit_anchor_interval)
