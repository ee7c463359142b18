"""Calling ops on many agents: discover the targets through the broker, send to each (scope all: one
batch of requests, ``fanout.request_all``; scope one: ``Actor.request`` to one target after another),
and report for each target exactly one named outcome.

Nothing here waits without a deadline. A call has one budget (``timeout``); discovery gets at most
``Timeouts.discover`` of it; the rest is each request's (see ``Actor.request``); a target that has not
answered when the budget is spent ends as ``timeout``.

A call's targets are what discovery returned (the broker lists only agents its mesh file admits) or
what ``to`` names, nothing else; each answer is taken only from the target the request was sent to
(``XEP_Vertebra.take_reply`` and ``watch_job`` key replies and job reports by addressee).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any, Sequence

from . import fanout
from .actor import Actor, Endpoint, Timeouts
from .errors import Outcome
from .report import AnsweredFn, CallReport, JobEventFn, ProgressFn, TargetResult
from .resources import related


# Agents per discovery answer: 1,000 entries of long JIDs with a few resources each fit one payload
# (docs/protocol.md 3.2); a page that does not is asked for again in halves.
DISCOVER_PAGE = 1000


async def discover_all(actor: Actor, broker: str, op: str, on: Sequence[str], timeout: float, *,
                       page: int = DISCOVER_PAGE, behalf: str | None = None) -> TargetResult:
    """Every live agent the broker finds offering ``op`` on ``on``, asked for a page at a time
    (``mesh.discover``'s ``limit`` and ``after``, docs/protocol.md 5.1) within one ``timeout``: a mesh
    of 50,000 agents does not fit one answer. The answer is one result holding every page's agents,
    or the first page's failure."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    agents: list[dict[str, Any]] = []
    after = ""
    while True:
        args = {"op": op, "resources": list(on), "limit": page, "after": after}
        found = await actor.request(broker, "mesh.discover", args, timeout=end - loop.time(), behalf=behalf)
        if found.outcome is not Outcome.OK:
            if page > 1 and (found.error or "").startswith("too-large:"):
                page //= 2  # this page's agents hold many resources: ask for fewer at a time
                continue
            return found
        agents += found.result
        if len(found.result) < page:  # a short page is the last
            return TargetResult(found.target, Outcome.OK, result=agents)
        after = found.result[-1]["jid"]


class Client(Actor):
    """An actor that calls ops. Each client logs in with its own resource so several may run at once."""

    discover_page = DISCOVER_PAGE  # agents asked for per discovery answer (``discover_all``)

    def __init__(self, jid: str, password: str, endpoint: Endpoint, *, broker: str | Sequence[str],
                 timeouts: Timeouts = Timeouts()) -> None:
        super().__init__(jid, password, endpoint, resource=f"client-{uuid.uuid4().hex[:8]}", timeouts=timeouts)
        # A broker runs as one instance per cluster node; any live one answers discovery.
        self.brokers = [broker] if isinstance(broker, str) else list(broker)
        self.broker = self.brokers[0] if self.brokers else ""

    async def discover(self, op: str, on: Sequence[str], timeout: float) -> TargetResult:
        """Ask the broker who offers ``op`` on ``on``: its first instance that is connected answers."""
        found = TargetResult("", Outcome.UNREACHABLE, error="no broker is configured")
        for broker in self.brokers:
            found = await discover_all(self, broker, op, on, timeout, page=self.discover_page)
            if found.outcome is not Outcome.UNREACHABLE:
                break
        return found

    async def call(self, op: str, args: dict[str, Any], *, on: Sequence[str] = (), scope: str = "all",
                   to: Sequence[str] = (), timeout: float = 30.0, progress: ProgressFn | None = None,
                   rid: str | None = None, answered: AnsweredFn | None = None,
                   job_events: JobEventFn | None = None) -> CallReport:
        """Call ``op`` on every target (scope all) or on one that accepts (scope one). Give ``rid`` to
        retry an earlier call: agents that saw it return its first outcome instead of running again.
        ``answered`` hears how many targets of a scope-all call have answered, as each answer comes;
        ``job_events`` what becomes of the jobs of a long op (``Actor.request``)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        report = CallReport(op)
        scoped: dict[str, list[str]] = {}  # per target, the addressed resources it holds or relates to
        if to:
            targets = list(to)
        else:
            found = await self.discover(op, on, min(self.timeouts.discover, timeout))
            if found.outcome is not Outcome.OK:
                found.error = f"discovery through the broker failed: {found.error}"
                report.results.append(found)
                return report
            targets = [e["jid"] for e in found.result]
            scoped = {e["jid"]: [w for w in on if any(related(h, w) for h in e["resources"])] for e in found.result}
            report.results += not_discovered(op, on, found.result)
        rid = rid or uuid.uuid4().hex
        if scope == "one":
            random.shuffle(targets)
            for target in targets:
                res = await self.request(target, op, args, on=scoped.get(target, on), timeout=end - loop.time(),
                                         rid=rid, progress=progress, job_events=job_events)
                report.results.append(res)
                # Only a target that certainly did not run the op may be passed over for the next (one
                # that went offline with the job it had accepted may have done part of it).
                if res.outcome not in (Outcome.DENIED, Outcome.UNREACHABLE) or res.job:
                    report.results = [r for r in report.results if r.outcome is Outcome.NOT_DISCOVERED] + [res]
                    break
        else:
            answers = 0

            def heard(_result: TargetResult) -> None:
                nonlocal answers
                answers += 1
                if answered is not None:
                    answered(answers, len(targets))

            if answered is not None:
                answered(0, len(targets))
            # One batch for every target (agents/fanout.py): the same request as each would get alone.
            report.results += await fanout.request_all(
                self, targets, op, args, on_each=[scoped.get(t, on) for t in targets], timeout=end - loop.time(),
                rid=rid, progress=progress, job_events=job_events, answered=heard if answered is not None else None)
        return report


def not_discovered(op: str, on: Sequence[str], found: Sequence[dict[str, Any]]) -> list[TargetResult]:
    """A not-discovered result for each addressed resource no discovered agent relates to (or for
    the op itself when nothing at all offers it), from discovery's ``{jid, resources}`` entries."""
    held = [r for e in found for r in e["resources"]]
    missing = [TargetResult(w, Outcome.NOT_DISCOVERED, error=f"no live agent offers {op} on {w}")
               for w in on if not any(related(h, w) for h in held)]
    if not found and not on:
        missing.append(TargetResult("*", Outcome.NOT_DISCOVERED, error=f"no live agent offers {op}"))
    return missing
