"""The fencing agent: powers failed cluster nodes off (and back on) through real fence devices.

Ops take the node and the cluster it belongs to; their resource is ``/cluster/{cluster}/node/{node}``
so the authorization hook decides on the very node. Devices, levels and each node's cluster come
from the mesh file's agent ``settings`` (see settings.py); the agent advertises one resource per node
it can fence, so discovery on a node's path finds the agents that can fence it.

Every power op is carried out by the PowerController: off counts only when status confirms OFF,
reboot is a verified off then on, a timeout is a failure, and concurrent requests for one node and
action share one device action. A repeated request id gets the first outcome from the runtime.
Each attempt and outcome is announced (logged on ``vertebra.fencing.events`` and kept in
``events``) until the broker has a place to receive them.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from typing import Annotated, Any

from ..agent import Agent, Call, info_op
from ..config import ConfigError
from ..errors import BadArguments, OpError
from ..ops import Arg, op
from .devices import FencingConfigError
from .driver import KILL_GRACE
from .power import PowerController, PowerOutcome
from .settings import NODE_RESOURCE, SEGMENT, FencingSettings

events_log = logging.getLogger("vertebra.fencing.events")

#: Below Pacemaker's 60 s per device action; a caller's shorter budget wins (the runtime takes the
#: smaller of the two).
OP_DEADLINE = 55.0
#: Kept back from the op's time so the controller ends with its own failure (naming the device that
#: hung) before the runtime's timeout would: a killed agent gets KILL_GRACE after SIGTERM.
ANSWER_MARGIN = KILL_GRACE + 1.0
EVENTS_KEPT = 1000

Node = Annotated[str, Arg("the node to act on, as the fencing settings name it", pattern=SEGMENT)]
Cluster = Annotated[str, Arg("the cluster the node belongs to", pattern=SEGMENT)]


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

    # -- ops ------------------------------------------------------------------------------------

    @op("fence.off", destructive=True, deadline=OP_DEADLINE, resources=(NODE_RESOURCE,))
    async def off(self, call: Call, cluster: Cluster, node: Node) -> dict:
        """Power a node off; ok only when the device's status confirms OFF.

        Levels are tried in order; concurrent requests for the node share one device action."""
        return await self._power(call, "off", cluster, node)

    @op("fence.on", destructive=True, deadline=OP_DEADLINE, resources=(NODE_RESOURCE,))
    async def on(self, call: Call, cluster: Cluster, node: Node) -> dict:
        """Power a node on (unfence); ok only when the device's status confirms ON."""
        return await self._power(call, "on", cluster, node)

    @op("fence.reboot", destructive=True, deadline=OP_DEADLINE, resources=(NODE_RESOURCE,))
    async def reboot(self, call: Call, cluster: Cluster, node: Node) -> dict:
        """Power a node off (verified), then on; ok once off is verified.

        If power does not come back, the result is still ok (the node is fenced) and says so in
        on_error."""
        return await self._power(call, "reboot", cluster, node)

    @op("fence.status", deadline=OP_DEADLINE, resources=(NODE_RESOURCE,))
    async def status(self, call: Call, cluster: Cluster, node: Node) -> dict:
        """A node's power state (on or off) as its fence device reports it; failed when unknown."""
        return await self._power(call, "status", cluster, node)

    @op("fence.list", deadline=5)
    async def list_nodes(self, call: Call,
                   cluster: Annotated[str, Arg("only nodes of this cluster (default: all)")] = "") -> dict:
        """The nodes this agent can fence, by cluster."""
        clusters = self.fencing.by_cluster()
        if cluster:
            clusters = {cluster: clusters[cluster]} if cluster in clusters else {}
        return {"clusters": clusters}

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
        budget = call.deadline - asyncio.get_running_loop().time() - ANSWER_MARGIN
        if budget <= 0:
            raise OpError(f"{action} {node}: the request left too little time to run a fence device"
                          f" (it needs more than {ANSWER_MARGIN:g}s); nothing was done")
        self._announce("attempt", call, action, cluster, node)
        outcome: PowerOutcome = await getattr(self.power, action)(node, budget=budget)
        self._announce("outcome", call, action, cluster, node, outcome)
        if not outcome.ok:
            raise OpError(outcome.message)
        return _result(cluster, outcome)

    def _announce(self, what: str, call: Call, action: str, cluster: str, node: str,
                  outcome: PowerOutcome | None = None) -> None:
        event: dict[str, Any] = {"event": what, "at": time.time(), "agent": self.name, "rid": call.rid,
                                 "caller": call.caller, "action": action, "cluster": cluster,
                                 "node": node}
        if outcome is not None:
            event.update(ok=outcome.ok, state=outcome.state, devices=list(outcome.devices),
                         message=outcome.message, on_error=outcome.on_error,
                         attempts=[_attempt(a) for a in outcome.attempts])
        self.events.append(event)
        events_log.info("%s", json.dumps(event, sort_keys=True))


def _attempt(a: Any) -> dict[str, Any]:
    return {"device": a.device, "action": a.action, "ok": a.ok, "exit_code": a.exit_code,
            "timed_out": a.timed_out, "duration": round(a.duration, 3), "detail": a.detail}


def _result(cluster: str, outcome: PowerOutcome) -> dict[str, Any]:
    return {"cluster": cluster, "node": outcome.node, "action": outcome.action, "ok": outcome.ok,
            "state": outcome.state, "devices": list(outcome.devices), "message": outcome.message,
            "on_error": outcome.on_error, "attempts": [_attempt(a) for a in outcome.attempts]}
