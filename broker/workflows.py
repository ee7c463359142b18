"""The workflow engine: the broker runs declarative workflows, durably, under role constraints.

A component of the broker (``WorkflowEngine``, in ``Broker.components``), it serves these ops, so
`vertebra call workflow.run --to broker workflow=NAME param=node=3` and the operator chat work
without more code:

- ``workflow.list``     the definitions (``*.yaml`` in the broker's ``settings["workflows"]``
                        directory, read afresh each time) and recent instances;
- ``workflow.run``      start an instance as the caller; waits up to ``wait`` seconds for it to
                        finish or stop at an approval, and returns its status;
- ``workflow.approve``  approve a step as the caller (separation of duty, no approving twice);
- ``workflow.perform``  take a ``hold:`` step as the caller, who becomes its performer (binding of duty);
- ``workflow.status``   one instance: each step's state, approvers, outcome and what it waits for;
                        with ``wait`` and ``since`` (its ``changes`` digest) at the instance's next
                        change, which the store announces (:mod:`broker.workflow_changes`);
- ``workflow.cancel``   stop an instance before its next step.

Definitions are parsed in :mod:`broker.workflow_spec`; state lives in :mod:`broker.workflow_store`;
the constraints are :mod:`broker.constraints`, checked when a step is approved and again when it
is about to run (approvals re-checked then: an approver revoked in between no longer counts).

Durability: a step becomes ``running`` on disk before its request leaves, and its request id is
derived from (instance, step). After a restart the broker resumes every unfinished instance; a
finished step is never sent again, and a step that was in flight is sent again with the same
request id, so the agent answers with the first outcome instead of running it twice, also when the
agent restarted between running the step and answering it (agents keep the outcome of every op that
changes state on disk for a day, and answer ``interrupted`` for one cut off before it was recorded;
see ``agents.idempotency``).

Who may do what:

- the runtime's gate decides each workflow op as usual (``workflow.run`` on ``/workflow/NAME``, the
  others on no resource, so a role needs a grant without ``on:`` to use them);
- every step is decided for the requester (or the ``hold`` step's performer) with the broker's
  rules (``Broker.rules``: the fenced-identity guard, then the policy), on the step's op and
  resources, when the run starts (a run any of whose steps the requester may not run is refused,
  and nothing runs) and again just before the step runs;
- approving is the right to ``workflow.approve`` on ``/workflow/NAME/STEP``: a grant without ``on:``
  lets a role approve everything, and a deny with ``on:`` takes particular steps away.

On whose behalf steps run: the broker sends each step from its own JID, so today an agent's gate
decides on the broker's identity (the broker needs grants for the ops workflows use) and the
agent's audit names the broker. The requester is named in the broker's audit log, which records a
``decided`` and an ``ended`` record for each step under the same request id the agent logs, so the
two join on ``rid``. The minimal runtime change that lets agents see the requester too: an optional
``for`` attribute on the ``<op/>`` element (``Actor.request(..., behalf=JID)``), which an agent
honours only when the stanza comes from its own configured broker (``Agent.broker``); the agent then
authorizes both the broker and the requester (both must be allowed), passes ``call.behalf``, and
writes ``caller=broker, for=requester`` in its audit records. Nobody else can claim a ``for``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any, Callable

from agents.agent import Call
from agents.authz import Decision, Request
from agents.errors import BadArguments, Denied, Outcome
from agents.ops import Arg, Field, OpSpec, Result, op
from agents.pairs import parse_pairs
from rbac import segments

from . import shared_state
from .constraints import APPROVED, StepRule, check_approval, check_perform
from .workflow_spec import NAME_PATTERN, Plan, Step, Workflow, WorkflowError, load_dir
from .leadership import Deposed, request_origin
from .workflow_changes import AnnouncingStore, Changes, digest
from .workflow_store import FINISHED, WorkflowState

log = logging.getLogger(__name__)

DISCOVER_WAIT = 30.0  # seconds a step waits for an agent offering its op to be in the directory
RETRY_PAUSE = 1.0  # seconds between attempts of a step whose outcome was timeout or unreachable
_NAME = r"[a-z][a-z0-9_-]{0,62}"
_INSTANCE = r"[0-9a-f]{12}"
_INSTANCE_ARG = Arg("the instance id: 12 hex digits, as workflow run printed it", pattern=_INSTANCE)
# What people are shown of an instance (a block, its steps a table) and of the listing (tables).
_STATUS = Result(
    Field("instance"), Field("workflow"), Field("requester"), Field("params"), Field("state"), Field("error"),
    Field("created", display="time"), Field("updated", display="time"),
    Field("steps", display="table", columns=(
        Field("stage"), Field("name", "step"), Field("op"), Field("state"), Field("approved_by", "approved by"),
        Field("target"), Field("outcome"), Field("reason"))))
_LISTING = Result(
    Field("workflows", display="table", columns=(Field("name", "workflow"), Field("params"),
                                                 Field("description"))),
    Field("broken", display="table", columns=(Field("file"), Field("error"))),
    Field("instances", display="table", columns=(
        Field("id", "instance"), Field("workflow"), Field("state"), Field("requester"),
        Field("created", display="time"), Field("updated", display="time"), Field("error"))))
_STEP = rf"{NAME_PATTERN}(:{segments.PATTERN})?"  # a step, or one of a for_each step's, "name:item"
_WAIT = Arg("seconds to wait for the instance to finish or stop at an approval (0: return at once)",
            min=0, max=50)


async def _remote(*_a: Any, **_k: Any) -> None:
    """Stands in for the implementation of an op another agent serves."""


def step_spec(step: Step, installed: OpSpec | None = None) -> OpSpec:
    """The OpSpec the authorizer decides a step's op on (the broker does not serve it itself). Its
    effect is the installed declaration's, raised to destructive when the step says so; an op the
    installation does not declare counts as a change (so a fenced identity may not run it)."""
    effect = "destructive" if step.destructive else installed.effect if installed else "change"
    return OpSpec(name=step.op, summary=step.op, description="", params=(), effect=effect,
                  deadline=step.timeout, progress=False, resources=(), func=_remote)


def step_rid(instance: str, step: str) -> str:
    """The request id of a step: the same on every attempt and after every restart (readable when
    it fits the protocol's 128 characters, else hashed, never cut: two cut names could collide)."""
    rid = f"wf-{instance}-{step}"
    return rid if len(rid) <= 128 else f"wf-{instance}-{hashlib.sha256(step.encode()).hexdigest()}"


class WorkflowEngine:
    """A component of the broker (broker/service.py): workflow ops, the runner, and resuming after a
    restart. It sends steps, decides and audits through ``broker``, and runs while this instance
    leads (``leadership``, which calls ``on_elected`` and ``on_deposed``)."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.leadership: Any = None  # set by the broker once its leadership is made (it needs our hooks)
        # SQLite files in the shared state directory, or etcd (the mesh file's broker state).
        # Every write to an instance is announced, so workflow.status can answer at its next change.
        self.changes = Changes()
        self.workflow_store: WorkflowState = AnnouncingStore(shared_state.workflow_store(broker), self.changes)
        self.rate_limits = shared_state.rate_limits(broker)
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()  # instances that changed while their runner was busy
        self._installed: dict[str, OpSpec] | None = None
        self._resuming: asyncio.Task[None] | None = None
        # Held from reading an instance's state to writing what that reading decided (an approval, a
        # performer, a cancellation, the runner's new instance state): the store is awaited in
        # between, and two such decisions on the same instance must not both see the old state.
        self._deciding = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------------------------

    def on_elected(self) -> None:
        """Leading now (see broker.leadership): resume every unfinished instance."""
        self._resuming = self.broker.spawn(self._resume(), name="resuming workflow instances")

    async def _resume(self) -> None:
        for iid in await self.workflow_store.unfinished():
            log.info("resuming workflow instance %s", iid)
            self._kick(iid)

    def on_deposed(self) -> None:
        # Cancelled, never failed: a step in flight stays `running` on disk, for the next leader to
        # resend with its rid.
        for task in [self._resuming, *self._runners.values()]:
            if task is not None:
                task.cancel()

    async def halt(self) -> None:
        """Stop leading and let every runner end (before the broker stops)."""
        runners = [t for t in [self._resuming, *self._runners.values()] if t is not None and not t.done()]
        await self.leadership.stop_leading()
        await asyncio.gather(*runners, return_exceptions=True)

    async def aclose(self) -> None:
        await self.workflow_store.aclose()
        await self.rate_limits.aclose()

    # -- definitions ----------------------------------------------------------------------------

    def workflow_definitions(self) -> tuple[dict[str, Workflow], dict[str, str]]:
        """The definitions in the configured directory (good ones by name, bad files with errors)."""
        where = self.broker.settings.get("workflows")
        if not where or not Path(where).is_dir():
            return {}, {}
        return load_dir(where)

    def _installed_spec(self, op_name: str) -> OpSpec | None:
        """What the installation declares; read late, since the catalogue imports the broker."""
        if self._installed is None:
            from agents.kinds import catalogue
            self._installed = catalogue()
        return self._installed.get(op_name)

    def _is_destructive(self, op_name: str) -> bool:
        spec = self._installed_spec(op_name)
        return bool(spec and spec.destructive)

    # -- ops --------------------------------------------------------------------------------------

    @op("workflow.list", effect="read", deadline=10, leader=True, result=_LISTING)
    async def workflow_list(self, call: Call,
                            state: Annotated[str, Arg("only instances in this state (running, waiting, done,"
                                                      " failed, cancelled)", pattern=r"[a-z]*")] = "",
                            limit: Annotated[int, Arg("at most this many instances, newest first",
                                                      min=1, max=500)] = 20) -> dict:
        """The workflows this broker can run, and its recent workflow instances."""
        good, bad = self.workflow_definitions()
        return {"workflows": [wf.describe() for wf in good.values()],
                "broken": [{"file": f, "error": e} for f, e in bad.items()],
                "instances": await self.workflow_store.instances(state, limit)}

    @op("workflow.run", effect="change", deadline=60, resources=("/workflow/{workflow}",), leader=True,
        result=_STATUS)
    async def workflow_run(self, call: Call,
                           workflow: Annotated[str, Arg("the workflow to run", pattern=_NAME)],
                           param: Annotated[list[str], Arg("a parameter as name=value; repeat the name for"
                                                           " each item of a list parameter")] = (),  # type: ignore[assignment]
                           wait: Annotated[float, _WAIT] = 10.0) -> dict:
        """Start a workflow as the caller, and report its status."""
        good, bad = self.workflow_definitions()
        wf = good.get(workflow)
        if wf is None:
            broken = next((e for e in bad.values() if f"{workflow}.yaml" in e), "")
            raise BadArguments(broken or f"no workflow {workflow!r}; this broker has"
                               f" {', '.join(sorted(good)) or 'none (set the broker settings key workflows)'}",
                               argument="workflow")
        try:
            plan = wf.plan(_pairs(wf, param), self._is_destructive)
        except WorkflowError as exc:
            raise BadArguments(str(exc), argument="param") from None
        for step in plan.steps():  # refused up front, so a run never stops half way for want of a grant
            d = self._decide_step(call.caller, step)
            if not d.allowed:
                raise Denied(f"workflow {workflow}: step {step.name}: {d.reason}")
        # Made from whom it runs for and the request id that asked for it: a retry under that request id
        # finds this instance, whichever broker instance it reaches and whichever leads by then.
        iid, params = request_origin(call, str(self.broker.jid.bare))[:12], wf.bind(_pairs(wf, param))
        earlier = await self.workflow_store.instance(iid)
        if earlier is None:
            await self.workflow_store.create(iid, workflow, call.caller, params, plan.to_json(),
                                             [s.name for s in plan.steps()])
            log.info("workflow %s instance %s requested by %s", workflow, iid, call.caller)
        elif (earlier["workflow"], earlier["params"]) != (workflow, json.loads(json.dumps(params))):  # as stored
            raise BadArguments(f"this request id already started workflow {earlier['workflow']} (instance {iid})"
                               " with other parameters; send this one with a new request id")
        await self._settle(iid, wait)
        return await self._status(iid)

    @op("workflow.approve", effect="change", deadline=60, leader=True, result=_STATUS)
    async def workflow_approve(self, call: Call,
                               instance: Annotated[str, _INSTANCE_ARG],
                               step: Annotated[str, Arg("the step to approve", pattern=_STEP)],
                               wait: Annotated[float, _WAIT] = 10.0) -> dict:
        """Approve a step of a workflow instance as the caller."""
        async with self._deciding:
            inst, s = await self._find_step(instance, step)
            verdict = check_approval(await self.workflow_store.history(instance), _rule(s), call.caller)
            allowed = verdict.ok and self._may_approve(inst["workflow"], s)(call.caller)
            reason = verdict.reason if not verdict.ok else (
                "approval accepted" if allowed else
                f"{call.caller} may not approve step {s.base} of workflow {inst['workflow']}")
            self._audit(call.rid, call.caller, "workflow.approve", [f"/workflow/{inst['workflow']}/{s.base}"],
                        {"instance": instance, "step": step}, allowed, f"workflow constraint: {reason}")
            if not allowed:
                raise Denied(reason)
            await self.workflow_store.add_event(instance, APPROVED, s.name, call.caller)
        log.info("workflow instance %s step %s approved by %s", instance, s.name, call.caller)
        await self._settle(instance, wait)
        return await self._status(instance)

    @op("workflow.perform", effect="change", deadline=60, leader=True, result=_STATUS)
    async def workflow_perform(self, call: Call,
                               instance: Annotated[str, _INSTANCE_ARG],
                               step: Annotated[str, Arg("the held step to perform", pattern=_STEP)],
                               wait: Annotated[float, _WAIT] = 10.0) -> dict:
        """Take a held step of a workflow instance: it runs on the caller's behalf."""
        store = self.workflow_store
        async with self._deciding:
            inst, s = await self._find_step(instance, step)
            if not s.hold:
                raise BadArguments(f"step {s.name} is not held: it runs on its own as {inst['requester']}",
                                   argument="step")
            row = await store.step(instance, s.name)
            if row["performer"]:
                raise Denied(f"step {s.name} is already taken by {row['performer']}")
            verdict = check_perform(await store.history(instance), StepRule(s.name, bound_to=s.bound_to),
                                    call.caller, lambda _jid: True)
            d = self._decide_step(call.caller, s)
            allowed = verdict.ok and d.allowed
            reason = verdict.reason if not verdict.ok else d.reason
            self._audit(call.rid, call.caller, s.op, s.on, s.args, allowed,
                        f"workflow {inst['workflow']} step {s.name} taken: {reason}")
            if not allowed:
                raise Denied(reason)
            await store.set_step(instance, s.name, performer=call.caller)
        await self._settle(instance, wait)
        return await self._status(instance)

    @op("workflow.status", effect="read", deadline=10, leader=True, result=_STATUS)
    async def workflow_status(self, call: Call,
                              instance: Annotated[str, _INSTANCE_ARG],
                              wait: Annotated[float, Arg("seconds to wait for it to finish or stop at an"
                                                         " approval first (with since: for its next change)",
                                                         min=0, max=8)] = 0.0,
                              since: Annotated[str, Arg("the changes digest of the status the caller has: with"
                                                        " wait, answer once the instance differs from it",
                                                        pattern="([0-9a-f]{16})?")] = "") -> dict:
        """One workflow instance: its steps, approvals, outcomes and what it waits for."""
        await self._find(instance)
        if wait and since:
            # Watched before it is read, so a change between the reading and the wait is not missed.
            end = asyncio.get_running_loop().time() + wait
            with self.changes.watching(instance) as changed:
                while True:
                    changed.clear()  # before reading: a change while it is read wakes the wait below
                    status = await self._status(instance)
                    left = end - asyncio.get_running_loop().time()
                    if status["changes"] != since or status["state"] in FINISHED or left <= 0:
                        return status
                    try:
                        await asyncio.wait_for(changed.wait(), left)
                    except TimeoutError:
                        pass
        if wait:
            task = self._runners.get(instance)
            if task is not None and not task.done():
                await asyncio.wait({task}, timeout=wait)
        return await self._status(instance)

    @op("workflow.cancel", effect="change", deadline=10, leader=True, result=_STATUS)
    async def workflow_cancel(self, call: Call,
                              instance: Annotated[str, _INSTANCE_ARG]) -> dict:
        """Stop a workflow instance before its next step (a step already sent still ends)."""
        async with self._deciding:
            inst = await self._find(instance)
            if inst["state"] in FINISHED:
                raise BadArguments(f"instance {instance} is already {inst['state']}", argument="instance")
            await self.workflow_store.set_instance(instance, "cancelled", f"cancelled by {call.caller}")
        return await self._status(instance)

    # -- running ---------------------------------------------------------------------------------

    def _kick(self, iid: str) -> asyncio.Task[None]:
        task = self._runners.get(iid)
        if task is not None and not task.done():
            self._dirty.add(iid)  # the busy runner looks again before it rests
            return task
        task = self.broker.spawn(self._run(iid), name=f"workflow instance {iid}")
        self._runners[iid] = task
        task.add_done_callback(functools.partial(self._runner_done, iid))
        return task

    def _runner_done(self, iid: str, task: asyncio.Task[None]) -> None:
        if self._runners.get(iid) is task:  # not a newer runner of the same instance
            del self._runners[iid]

    async def _settle(self, iid: str, wait: float) -> None:
        """Kick the instance and wait, at most ``wait`` seconds, until it finishes or waits."""
        task = self._kick(iid)
        if wait > 0:
            await asyncio.wait({task}, timeout=wait)

    async def _run(self, iid: str) -> None:
        store = self.workflow_store
        try:
            while True:
                self._dirty.discard(iid)
                state, error = await self._advance(iid)
                async with self._deciding:
                    if (await self._find(iid))["state"] == "cancelled":
                        return
                    await store.set_instance(iid, state, error)
                if state != "waiting" or iid not in self._dirty:
                    return
        except asyncio.CancelledError:
            raise
        except Deposed:
            log.info("workflow instance %s left to the next leading broker instance", iid)
        except Exception as exc:  # a fault of the engine ends the instance rather than looping on it
            log.exception("workflow instance %s failed in the engine", iid)
            await store.set_instance(iid, "failed", f"engine error: {exc.__class__.__name__}: {exc}")

    async def _advance(self, iid: str) -> tuple[str, str]:
        """Run stages in order until one fails or waits; return the instance's new state and error."""
        inst = await self.workflow_store.instance(iid)
        if inst is None or inst["state"] in FINISHED:
            return (inst or {}).get("state", "failed"), (inst or {}).get("error", "")
        for stage in Plan.from_json(inst["plan"]).stages:
            ends = await asyncio.gather(*(self._run_step(inst, s) for s in stage))
            failed = [reason for state, reason in ends if state == "failed"]
            if failed:
                return "failed", failed[0]
            waiting = [reason for state, reason in ends if state == "waiting"]
            if waiting:
                return "waiting", "; ".join(waiting)
            if (await self._find(iid))["state"] == "cancelled":
                return "cancelled", ""
        return "done", ""

    async def _run_step(self, inst: dict[str, Any], step: Step) -> tuple[str, str]:
        """Bring one step to ok, failed or waiting; returns (state, reason)."""
        store, iid = self.workflow_store, inst["id"]
        row = await store.step(iid, step.name)
        if row["state"] in ("ok", "failed"):
            return row["state"], row["reason"]
        if row["state"] != "running":
            if (await self._find(iid))["state"] == "cancelled":
                return "waiting", "cancelled"
            admitted = await self._admit_step(inst, step, row)
            if isinstance(admitted, tuple):
                return admitted
            row = admitted
        return await self._send_step(inst, step, row)

    async def _admit_step(self, inst: dict[str, Any], step: Step, row: dict[str, Any]
                          ) -> tuple[str, str] | dict[str, Any]:
        """Constraints, authorization and rate limit for a step about to run; when it may run, its row
        (it is then `running` on disk, with its target), else the step's new state and why."""
        store, iid = self.workflow_store, inst["id"]
        if step.hold and not row["performer"]:
            reason = f"step {step.name} is held until someone performs it (workflow.perform)"
            await store.set_step(iid, step.name, state="held", reason=reason)
            return "waiting", reason
        performer = row["performer"] or inst["requester"]
        history = await store.history(iid)
        verdict = check_perform(history, StepRule(step.name, bound_to=step.bound_to), performer, lambda _j: True)
        if verdict.ok:
            verdict = check_perform(history, _rule(step), performer, self._may_approve(inst["workflow"], step))
            if not verdict.ok:  # only approvals are missing: wait for more
                await store.set_step(iid, step.name, state="waiting", reason=verdict.reason)
                return "waiting", verdict.reason
        rid = step_rid(iid, step.name)
        d = self._decide_step(performer, step) if verdict.ok else Decision(False, verdict.reason)
        if not d.allowed:
            return await self._fail_step(inst, step, performer, d.reason, "denied")
        target = await self._target(step)
        if target is None:
            on = f" on {' '.join(step.on)}" if step.on else ""
            return await self._fail_step(inst, step, performer, f"no live agent offers {step.op}{on}",
                                   Outcome.NOT_DISCOVERED.value)
        if step.rate and not row["rate_taken"]:
            taken = await self.rate_limits.take(step.rate["key"], step.rate["limit"], step.rate["per"],
                                          f"{performer} {iid}/{step.name}")
            if not taken.ok:
                return await self._fail_step(inst, step, performer, taken.reason, "denied")
            await store.set_step(iid, step.name, rate_taken=1)
        if not await self.leadership.lead():
            raise Deposed  # the point of no return is the leader's alone
        running = await store.start_step(iid, step.name, performer, target)
        self._audit(rid, performer, step.op, step.on, step.args, True,
                    f"workflow {inst['workflow']} instance {iid} step {step.name}, sent by the broker on"
                    f" behalf of {performer}: {d.rule or d.reason}", version=d.version)
        return running

    async def _target(self, step: Step) -> str | None:
        """A live agent offering the step's op on its resources; waits a while for one, since a
        broker that just restarted learns its directory back from the agents' presence."""
        loop = asyncio.get_running_loop()
        end = loop.time() + min(DISCOVER_WAIT, step.timeout)
        while True:
            entries = self.broker.directory.discover(step.op, step.on)
            if entries or loop.time() > end:
                return entries[0].jid if entries else None
            await asyncio.sleep(0.2)

    async def _send_step(self, inst: dict[str, Any], step: Step, row: dict[str, Any]) -> tuple[str, str]:
        """Send (or resend, with the same rid) a running step and record its one outcome."""
        store, iid, rid = self.workflow_store, inst["id"], step_rid(inst["id"], step.name)
        started = time.monotonic()
        for attempt in range(step.retries + 1):
            await store.set_step(iid, step.name, attempts=row["attempts"] + attempt + 1)
            if not self.leadership.leading:
                raise Deposed  # every step goes out stamped with the term of a lead still held
            res = await self.broker.request(row["target"], step.op, step.args, on=step.on,
                                     timeout=step.timeout, rid=rid, behalf=row["performer"] or inst["requester"],
                                     term=self.leadership.term,
                                     progress=functools.partial(self.changes.step_progress, iid, rid))
            if not (self.leadership.leading and self.broker.online):
                raise Deposed  # an outcome seen while losing the lead or the session is not recorded
            if res.outcome not in (Outcome.TIMEOUT, Outcome.UNREACHABLE) or attempt == step.retries:
                break
            # The same rid again: an agent that already ran it answers with the first outcome.
            await asyncio.sleep(RETRY_PAUSE)
        ok = res.outcome is Outcome.OK
        reason = "" if ok else f"step {step.name}: {res.outcome.value}: {res.error}"
        await store.set_step(iid, step.name, state="ok" if ok else "failed", outcome=res.outcome.value,
                       result=res.result, reason=reason, ended=time.time())
        if self.broker.audit is not None:
            self.broker.audit.ended(rid=rid, caller=row["performer"], op=step.op,
                             outcome=res.outcome.value, duration=time.monotonic() - started)
        log.info("workflow instance %s step %s: %s", iid, step.name, res.outcome.value)
        return ("ok", "") if ok else ("failed", reason)

    async def _fail_step(self, inst: dict[str, Any], step: Step, performer: str, reason: str, outcome: str
                   ) -> tuple[str, str]:
        """A step refused before it was sent: nothing ran. Refusals by a rule are audited."""
        text = f"step {step.name}: {reason}"
        await self.workflow_store.set_step(inst["id"], step.name, state="failed", outcome=outcome, reason=text,
                                     ended=time.time())
        if outcome == "denied":
            self._audit(step_rid(inst["id"], step.name), performer, step.op, step.on, step.args, False,
                        f"workflow {inst['workflow']} instance {inst['id']}: {reason}")
        return "failed", text

    # -- decisions ---------------------------------------------------------------------------------

    def _decide_step(self, who: str, step: Step) -> Decision:
        return self.broker.authorize(Request(who, step.on), step_spec(step, self._installed_spec(step.op)))

    def _may_approve(self, workflow: str, step: Step) -> Callable[[str], bool]:
        """Whether someone may approve this step now: asked afresh each time, so a revocation counts."""
        spec = self.broker.ops["workflow.approve"]
        resource = [f"/workflow/{workflow}/{step.base}"]
        return lambda jid: self.broker.authorize(Request(jid, resource), spec).allowed

    def _audit(self, rid: str, caller: str, op_name: str, resources: list[str], args: dict[str, Any],
               allowed: bool, rule: str, version: int = 0) -> None:
        if self.broker.audit is not None:
            self.broker.audit.decided(rid=rid, caller=caller, op=op_name, resources=resources,
                               args=args, secret=(), allowed=allowed, rule=rule, version=version)

    # -- reading ---------------------------------------------------------------------------------------

    async def _find(self, iid: str) -> dict[str, Any]:
        inst = await self.workflow_store.instance(iid)
        if inst is None:
            raise BadArguments(f"no workflow instance {iid} (workflow.list shows the recent ones)",
                               argument="instance")
        return inst

    async def _find_step(self, iid: str, step: str) -> tuple[dict[str, Any], Step]:
        inst = await self._find(iid)
        found = Plan.from_json(inst["plan"]).step(step)
        if found is None:
            names = ", ".join(s.name for s in Plan.from_json(inst["plan"]).steps())
            raise BadArguments(f"instance {iid} has no step {step!r}; its steps are {names}", argument="step")
        if inst["state"] in FINISHED:
            raise BadArguments(f"instance {iid} is already {inst['state']}", argument="instance")
        return inst, found

    async def _status(self, iid: str) -> dict[str, Any]:
        store = self.workflow_store
        inst = await self._find(iid)
        rows, history = await store.steps(iid), await store.history(iid)
        steps = []
        for n, stage in enumerate(Plan.from_json(inst["plan"]).stages, 1):
            for s in stage:
                r = rows[s.name]
                steps.append({"name": s.name, "stage": n, "op": s.op, "on": s.on, "state": r["state"],
                              "destructive": s.destructive, "needs_approvals": s.needed,
                              "approved_by": [e.actor for e in history if e.kind == APPROVED and e.step == s.name],
                              "hold": s.hold, "performer": r["performer"], "target": r["target"],
                              "outcome": r["outcome"], "result": r["result"], "reason": r["reason"],
                              "attempts": r["attempts"], "rid": step_rid(iid, s.name),
                              "progress": self.changes.last_progress(step_rid(iid, s.name))})
        status = {"instance": iid, "workflow": inst["workflow"], "requester": inst["requester"],
                  "params": inst["params"], "state": inst["state"], "error": inst["error"],
                  "created": inst["created"], "updated": inst["updated"], "steps": steps}
        return dict(status, changes=digest(status))  # what a follower passes back as since


def _rule(step: Step) -> StepRule:
    return StepRule(step.name, destructive=step.destructive, approvals=step.approvals, bound_to=step.bound_to)


def _pairs(wf: Workflow, words: list[str]) -> dict[str, Any]:
    """``name=value`` words as parameters; a repeated name (or any name of a list parameter) is a list."""
    return parse_pairs(words, f"workflow {wf.name}", many={p.name for p in wf.params if p.many}, noun="parameter",
                       argument="param")

