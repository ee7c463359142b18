"""The fencing agent: powers failed cluster nodes off (and back on) through real fence devices.

Ops take the node and the cluster it belongs to; their resource is ``/cluster/{cluster}/node/{node}``
so the authorization hook decides on the very node. Devices, levels and each node's cluster come
from the mesh file's agent ``settings`` (see settings.py); the agent advertises one resource per node
it can fence, so discovery on a node's path finds the agents that can fence it.

Every power op is carried out by the PowerController: off counts only when status confirms OFF,
reboot is a verified off then on, a timeout is a failure, and concurrent requests for one node and
action share one device action. A repeated request id gets the first outcome from the runtime.

Each attempt and outcome is announced: logged on ``vertebra.fencing.events``, kept in ``events``,
and posted to the broker as ``mesh.fence.event`` (broker/fencing.py), which records a fencing
epoch for a node after a verified off and ends it after a verified on. Every event is first written
to the agent's durable outbox (outbox.py; the attempt before the device runs, the outcome before
the op answers), then sent, oldest first and under its own id, until the broker answers ok, with
backoff and at once whenever a broker (re)appears: a broker that was down, or an agent that
crashed, loses no fence. The op waits briefly for its outcome's acknowledgement (a broker that does
not answer delays nobody's fence), so by the time a caller hears "off" the broker usually knows too.
The agent also keeps the last verified outcome per node (its ledger), which the broker reads with
``fence.ledger`` (from the broker only) when the agent joins.

Authorization: the agent walks the rules every agent walks (agents/authz.py) with one of its own
before the policy's: a person's manual fence needs approval where the settings say so (guard.py);
identities of fenced nodes may not run ops that change state (agents/fenced.py, as on every agent).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
import uuid
from typing import Annotated, Any

from rbac import segments

from ..actor import Backoff
from ..agent import Agent, Call, info_op
from ..config import ConfigError
from ..errors import BadArguments, OpError, OpTimeout, Outcome
from ..ops import Arg, Field, Result, op
from .devices import FencingConfigError
from .driver import KILL_GRACE
from .guard import ApprovalGuard
from .outbox import FenceOutbox
from .power import PowerController, PowerOutcome, StillInFlight
from .settings import NODE_RESOURCE, FencingSettings

events_log = logging.getLogger("vertebra.fencing.events")

#: Below Pacemaker's 60 s per device action; a caller's shorter budget wins (the runtime takes the
#: smaller of the two).
OP_DEADLINE = 55.0
#: Kept back from the op's time so the controller ends with its own failure (naming the device that
#: hung) before the runtime's timeout would: a killed agent gets KILL_GRACE after SIGTERM.
ANSWER_MARGIN = KILL_GRACE + 1.0
#: A caller that joined an action in flight stops waiting this long before its deadline, to answer
#: with its own sentence (the action still running) rather than the runtime's timeout.
JOIN_MARGIN = 0.2
EVENTS_KEPT = 1000
EVENT_OP = "mesh.fence.event"
# What people are shown of a power action or a status: the node's power state, then each device tried.
_POWER = Result(Field("cluster"), Field("node"), Field("action"), Field("state", "power"), Field("ok"),
                Field("devices", display="list"), Field("message"), Field("on_error", "on error"),
                Field("attempts", display="table", columns=(
                    Field("device"), Field("action"), Field("ok"), Field("exit_code", "exit"),
                    Field("timed_out", "timed out"), Field("duration", display="duration"), Field("detail"))))
LEDGER_OP = "fence.ledger"
#: How long an op waits for the broker to take its outcome before answering anyway.
ANNOUNCE_WAIT = 3.0
#: Seconds one post of an event waits for the broker's answer.
POST_TIMEOUT = 5.0

Node = Annotated[str, Arg("the node to act on, as the fencing settings name it", pattern=segments.PATTERN)]
Cluster = Annotated[str, Arg("the cluster the node belongs to", pattern=segments.PATTERN)]


class FencingAgent(Agent):
    kind = "fencing"

    info = info_op("fencing")

    def __init__(self, *args: Any, settings: dict[str, Any] | None = None,
                 resources: Any = (), name: str | None = None, **kwargs: Any) -> None:
        try:
            fencing = FencingSettings.from_settings(settings or {})
        except FencingConfigError as error:
            who = f"fencing agent {name}" if name else "fencing agent"
            raise ConfigError(f"{who}: settings: {error}") from None
        # Each node it can fence is one of its resources, so discovery on a node's path finds it.
        advertised = list(resources) + [r for r in fencing.resources() if r not in resources]
        super().__init__(*args, settings=settings, resources=advertised, name=name, **kwargs)
        self.fencing = fencing
        self.power = PowerController(fencing.registry) if fencing.registry else None
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)
        # Its own rule comes before the others: a person's manual fence needs approval (guard.py).
        self.rules = [self.sent_by_broker, ApprovalGuard(fencing, lambda: self.broker), self.not_while_fenced,
                      self.by_policy]
        self.outbox = FenceOutbox(self.state_dir / "fencing.sqlite" if self.state_dir else None)
        self._acked: dict[str, asyncio.Future[None]] = {}  # event id -> done when the broker took it
        self._wake: asyncio.Event | None = None  # set when there is something to send or a broker to try
        self._sender: asyncio.Task[None] | None = None

    async def on_session(self) -> None:
        await super().on_session()
        if self._sender is None or self._sender.done():
            self._wake = asyncio.Event()
            self._sender = self.spawn(self._send_outbox(), name=f"fencing outbox sender {self.name}")
        assert self._wake is not None  # made with the sender
        self._wake.set()  # a new session: what is still in the outbox goes now

    def _on_broker_presence(self, pres: Any) -> None:
        super()._on_broker_presence(pres)
        if self._wake is not None and pres["type"] != "unavailable" and self.broker \
                and pres["from"].bare == self.broker:
            self._wake.set()  # a broker (re)appeared: resend at once rather than at the next backoff

    async def stop(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        await super().stop()
        await self.outbox.aclose()

    # -- ops ------------------------------------------------------------------------------------

    @op("fence.off", effect="destructive", deadline=OP_DEADLINE, resources=(NODE_RESOURCE,),
        approval="fence-node", result=_POWER, announce="fencing")
    async def off(self, call: Call, cluster: Cluster, node: Node) -> dict:
        """Power a node off; ok only when the device's status confirms OFF.

        Levels are tried in order; concurrent requests for the node share one device action."""
        return await self._power(call, "off", cluster, node)

    @op("fence.on", effect="destructive", deadline=OP_DEADLINE, resources=(NODE_RESOURCE,),
        approval="fence-node-on", result=_POWER, announce="fencing")
    async def on(self, call: Call, cluster: Cluster, node: Node) -> dict:
        """Power a node on (unfence); ok only when the device's status confirms ON."""
        return await self._power(call, "on", cluster, node)

    @op("fence.reboot", effect="destructive", deadline=OP_DEADLINE, resources=(NODE_RESOURCE,),
        approval="fence-node-reboot", result=_POWER, announce="fencing")
    async def reboot(self, call: Call, cluster: Cluster, node: Node) -> dict:
        """Power a node off (verified), then on; ok once off is verified.

        If power does not come back, the result is still ok (the node is fenced) and says so in
        on_error."""
        return await self._power(call, "reboot", cluster, node)

    @op("fence.status", effect="read", deadline=OP_DEADLINE, resources=(NODE_RESOURCE,), result=_POWER,
        announce="fencing")
    async def status(self, call: Call, cluster: Cluster, node: Node) -> dict:
        """A node's power state (on or off) as its fence device reports it; failed when unknown."""
        return await self._power(call, "status", cluster, node)

    @op("fence.list", effect="read", deadline=5, result=Result(Field("clusters")))
    async def list_nodes(self, call: Call,
                   cluster: Annotated[str, Arg("only nodes of this cluster (default: all)")] = "") -> dict:
        """The nodes this agent can fence, by cluster."""
        clusters = self.fencing.by_cluster()
        if cluster:
            clusters = {cluster: clusters[cluster]} if cluster in clusters else {}
        return {"clusters": clusters}

    @op(LEDGER_OP, effect="read", deadline=5, sender="broker")
    async def ledger(self, call: Call) -> dict:
        """The last verified outcome per node, as posted (this agent's broker only: it reconciles its
        fencing epochs from it when the agent joins). An outcome the outbox still holds is left out: the
        outbox delivers it after the events before it (its attempt), which reconciling it first would
        put after it in the broker's record."""
        return {"entries": [_event_args(e) for e in await self.outbox.ledger(delivered_only=True)]}

    # -- doing it -------------------------------------------------------------------------------

    async def _power(self, call: Call, action: str, cluster: str, node: str) -> dict:
        if self.power is None:
            raise OpError(f"fencing agent {self.name} has no fence devices configured (settings.fencing"
                          " in the mesh file); it cannot fence anything")
        known = self.fencing.clusters.get(node)
        if known != cluster:
            served = ", ".join(f"{c}/{n}" for n, c in sorted(self.fencing.clusters.items()))
            raise BadArguments(f"fencing agent {self.name} fences no node {node!r} in cluster {cluster!r}"
                               f" (it fences: {served}); check the cluster and node names",
                               argument="node")
        loop = asyncio.get_running_loop()
        budget = call.deadline - loop.time() - ANSWER_MARGIN
        # Joining an action in flight needs no device time of its own: that action keeps its budget.
        if budget <= 0 and not self.power.in_flight(node, action):
            raise OpError(f"{action} {node}: the request left too little time to run a fence device"
                          f" (it needs more than {ANSWER_MARGIN:g}s); nothing was done")
        await self._announce("attempt", call, action, cluster, node)
        try:
            outcome: PowerOutcome = await getattr(self.power, action)(
                node, budget=budget, wait=call.deadline - loop.time() - JOIN_MARGIN)
        except StillInFlight as still:  # this caller's time is up; the fence goes on to its verified end
            raise OpTimeout(str(still)) from None
        acked = await self._announce("outcome", call, action, cluster, node, outcome)
        wait = min(ANNOUNCE_WAIT, call.deadline - asyncio.get_running_loop().time() - 0.5)
        if acked is not None and wait > 0:
            # Never cancels it: the outbox keeps it, and sends it until the broker takes it.
            await asyncio.wait({acked}, timeout=wait)
        if not outcome.ok:
            raise OpError(outcome.message)
        return _result(cluster, outcome)

    async def _announce(self, what: str, call: Call, action: str, cluster: str, node: str,
                  outcome: PowerOutcome | None = None) -> asyncio.Future[None] | None:
        """Keep an event durably (outbox.py) and have it sent; returns what is done once the broker
        has acknowledged it (None without a broker)."""
        event: dict[str, Any] = {"id": uuid.uuid4().hex, "event": what, "at": time.time(), "agent": self.name,
                                 "rid": call.rid, "caller": call.caller, "action": action, "cluster": cluster,
                                 "node": node}
        if outcome is not None:
            event.update(ok=outcome.ok, state=outcome.state, devices=list(outcome.devices),
                         message=outcome.message, on_error=outcome.on_error,
                         attempts=[_attempt(a) for a in outcome.attempts])
        self.events.append(event)
        events_log.info("%s", json.dumps(event, sort_keys=True))
        if not self.broker:
            return None
        await self.outbox.keep(event)  # on disk before the device runs (attempt) or the caller hears (outcome)
        acked = self._acked[event["id"]] = asyncio.get_running_loop().create_future()
        if self._wake is not None:
            self._wake.set()
        return acked

    async def _send_outbox(self) -> None:
        """Send what the outbox holds, oldest first, each under its own id, until the broker answers ok
        (then it is deleted); after a failure wait with backoff, or until a broker (re)appears."""
        backoff = Backoff(base=0.5, cap=30.0)
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            failed = False
            while self.online and not failed:
                pending = await self.outbox.pending()
                broker = self.broker_jid
                if not pending or broker is None:  # None: the mesh file names no broker now; the events wait
                    break
                for event in pending:
                    res = await self.request(broker, EVENT_OP, _event_args(event), timeout=POST_TIMEOUT,
                                             rid=f"fence-event-{event['id']}")
                    if res.outcome is Outcome.OK:
                        await self.outbox.delivered(event["id"])
                        event["posted"] = True
                        done = self._acked.pop(event["id"], None)
                        if done is not None and not done.done():
                            done.set_result(None)
                        backoff.reset()
                        continue
                    tries = await self.outbox.tried(event["id"])
                    absent = res.outcome in (Outcome.TIMEOUT, Outcome.UNREACHABLE)
                    # A broker that is away is normal; a refusal is a configuration to fix, said
                    # loudly at first and then now and then, not every round.
                    level = logging.INFO if absent or (tries > 3 and tries % 20) else logging.WARNING
                    events_log.log(level, "the broker did not take fencing event %s (%s %s/%s) yet: %s: %s; it is"
                                   " kept and sent again", event["id"], event["action"], event["cluster"],
                                   event["node"], res.outcome.value, res.error)
                    failed = True
                    if absent:
                        break  # the rest would go the same way; a refused event holds up no other
            if failed or (not self.online and await self.outbox.pending(1)):
                try:  # wait out the backoff, or less if a broker says hello or a new event comes
                    await asyncio.wait_for(self._wake.wait(), timeout=backoff.next())
                except TimeoutError:
                    pass
                self._wake.set()


def _event_args(event: dict[str, Any]) -> dict[str, Any]:
    """An outbox event as ``mesh.fence.event``'s arguments (broker/fencing.py)."""
    return {"id": event["id"], "event": event["event"], "requester": event["caller"], "request": event["rid"],
            "action": event["action"], "cluster": event["cluster"], "node": event["node"],
            "ok": bool(event.get("ok", False)), "state": str(event.get("state") or ""),
            "message": str(event.get("message") or "")[:1000], "on_error": str(event.get("on_error") or ""),
            "at": event["at"]}


def _attempt(a: Any) -> dict[str, Any]:
    return {"device": a.device, "action": a.action, "ok": a.ok, "exit_code": a.exit_code,
            "timed_out": a.timed_out, "duration": round(a.duration, 3), "detail": a.detail}


def _result(cluster: str, outcome: PowerOutcome) -> dict[str, Any]:
    return {"cluster": cluster, "node": outcome.node, "action": outcome.action, "ok": outcome.ok,
            "state": outcome.state, "devices": list(outcome.devices), "message": outcome.message,
            "on_error": outcome.on_error, "attempts": [_attempt(a) for a in outcome.attempts]}
