"""The monitor agent: runs the Nagios check plugins its catalogue names, and serves their results.

Ops: ``monitor.check`` (one named check with caller arguments → state, text, long text, perfdata,
duration) and ``monitor.list`` (the checks offered and their arguments). The catalogue, the
concurrency limit, scheduled checks and an optional Nagios bridge come from the agent's
``settings:`` in the mesh file (see ``settings``). Scheduled results are published to the
``publish_to`` accounts; hard state changes are posted to the broker as ``mesh.alert``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

from agents.agent import Agent, Call, info_op
from agents.errors import BadArguments, Outcome
from agents.monitor.bridge import NagiosBridge, publish_result
from agents.monitor.checks import CheckArgumentError, CheckSpec
from agents.monitor.ranges import State
from agents.monitor.runner import CheckResult, PluginPool
from agents.monitor.schedule import Scheduler, StateChange, StateTracker
from agents.monitor.settings import ScheduledCheck, parse_settings
from agents.ops import Arg, Field, Result, op
from agents import pairs

log = logging.getLogger(__name__)

# Kept back from the caller's budget: the plugin is TERMed, given KILL_GRACE, and the answer must
# still travel back before the caller gives up, so a slow plugin ends as its timeout state, not as
# a mesh timeout.
KILL_GRACE = 1.0
ANSWER_MARGIN = 0.5
ALERT_TIMEOUT = 10.0


class MonitorAgent(Agent):
    kind = "monitor"

    info = info_op("monitor")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        conf = parse_settings(self.settings)
        self.checks: dict[str, CheckSpec] = conf.checks
        self.pool = PluginPool(conf.max_concurrent)
        self.host = next((r.split("/")[2] for r in self.resources if r.startswith("/host/") and r.count("/") == 2),
                         self.name)
        domain = self.jid.domain
        self.publish_to = [_full_jid(t, domain) for t in conf.publish_to]
        self.scheduler = Scheduler(conf.schedule, self._run_scheduled, self._publish, self._alert)
        self.bridge = NagiosBridge(self, conf.bridge, domain) if conf.bridge else None
        self.alerts_posted = 0

    async def on_session(self) -> None:
        await super().on_session()
        self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()
        await super().stop()

    # -- ops -------------------------------------------------------------------------------------

    @op("monitor.check", effect="read", deadline=120, result=Result(
        Field("check"), Field("host"), Field("state", display="state"), Field("text"), Field("long_text", "details"),
        Field("duration", display="duration"),
        Field("metrics", display="table", columns=(Field("label", "metric"), Field("value"), Field("uom", "unit"),
                                                   Field("warn"), Field("crit"), Field("min"), Field("max"))),
        summary="state"))
    async def check(self, call: Call,
                    check: Annotated[str, Arg("a check this agent offers (see monitor.list)")],
                    args: Annotated[list[str], Arg("NAME=VALUE for an argument the check declares;"
                                                   " repeat for several")] = (),  # type: ignore[assignment]
                    ) -> dict:
        """Run one named check and return its state, text, long text, perfdata and duration.

        Arguments travel as NAME=VALUE words, the same words check_vertebra's -a and the CLI take;
        the check's declaration validates each one and refuses any it does not declare."""
        spec = self.checks.get(check)
        if spec is None:
            raise BadArguments(f"no check named {check!r} on {self.name}; it offers {', '.join(sorted(self.checks))}"
                               " (see monitor.list)", argument="check")
        given = parse_pairs(args)
        try:
            argv = spec.argv(given)
        except CheckArgumentError as exc:
            raise BadArguments(f"{exc}; see monitor.list for what {check!r} takes", argument="args") from None
        remaining = call.deadline - asyncio.get_running_loop().time() - KILL_GRACE - ANSWER_MARGIN
        result = await self.pool.run(argv, timeout=max(0.1, min(spec.timeout, remaining)),
                                     timeout_state=spec.timeout_state, kill_grace=KILL_GRACE)
        return self.describe_result(check, result)

    @op("monitor.list", effect="read", deadline=5, result=Result(
        Field("host"),
        Field("checks", display="table", columns=(Field("name", "check"), Field("timeout", display="duration"),
                                                  Field("arguments"), Field("description"))),
        Field("schedule", display="table", columns=(Field("name"), Field("check"),
                                                    Field("interval", display="duration"), Field("repeats")))))
    async def list_checks(self, call: Call) -> dict:
        """The checks this agent offers, with the arguments a caller may set, and its schedule."""
        return {"host": self.host, "checks": [self.checks[n].describe() for n in sorted(self.checks)],
                "schedule": [{"name": e.name, "check": e.check, "interval": e.interval, "repeats": e.repeats}
                             for e in self.scheduler.entries]}

    def describe_result(self, check: str, result: CheckResult) -> dict[str, Any]:
        return {**result.as_dict(), "check": check, "host": self.host, "agent": self.name,
                "output": result.render()}

    # -- scheduled checks ------------------------------------------------------------------------

    async def _run_scheduled(self, entry: ScheduledCheck) -> CheckResult:
        spec = self.checks[entry.check]
        return await self.pool.run(spec.argv(entry.args), timeout=spec.timeout, timeout_state=spec.timeout_state,
                                   kill_grace=KILL_GRACE)

    async def _publish(self, entry: ScheduledCheck, result: CheckResult, tracker: StateTracker) -> None:
        if not self.publish_to or not self.online:
            return
        payload = {**self.describe_result(entry.check, result), "check": entry.name, "at": time.time(),
                   "hard": tracker.is_hard, "attempt": tracker.attempt}
        for target in self.publish_to:
            publish_result(self, target, payload)

    async def _alert(self, entry: ScheduledCheck, result: CheckResult, change: StateChange) -> None:
        """Post a hard state change to the broker; a lost alert is logged, the schedule goes on."""
        broker = self.broker_jid
        if broker is None:  # a mesh without a broker: nobody to tell
            return
        args = {"check": entry.name, "host": self.host, "state": change.state.name,
                "previous": change.previous.name if change.previous is not None else "",
                "text": result.text[:1024]}
        posted = await self.request(broker, "mesh.alert", args, timeout=ALERT_TIMEOUT)
        if posted.outcome is not Outcome.OK:
            log.warning("alert %s %s→%s not posted: %s: %s", entry.name, args["previous"], args["state"],
                        posted.outcome.value, posted.error)
        else:
            self.alerts_posted += 1


def parse_pairs(words: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` check arguments into a map; a word without ``=`` or a name given twice is refused."""
    return pairs.parse_pairs(words, "monitor.check", noun="check argument", argument="args")


def _full_jid(target: str, domain: str) -> str:
    if "@" not in target:
        target = f"{target}@{domain}"
    return target if "/" in target else f"{target}/{MonitorAgent.resource}"


__all__ = ["MonitorAgent", "parse_pairs", "State"]
