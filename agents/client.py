"""Calling ops: discover the targets through the broker, send, follow progress, and report for each
target exactly one named outcome — ok, failed, denied, timeout, unreachable or not-discovered.

Nothing here waits without a deadline. A call has one budget (``timeout``); discovery gets at most
``Timeouts.discover`` of it; each request tells its agent how long it has left, less
``Timeouts.reply_margin`` so that the agent's own timeout answer can still arrive; a target that
has not answered when the budget is spent ends as ``timeout``.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from slixmpp import Iq

from . import protocol
from .actor import Actor, Endpoint
from .errors import OpError, Outcome, UNREACHABLE_CONDITIONS, error_for
from .resources import related

ProgressFn = Callable[[str, int, Any], None]

#: Exit codes of `vertebra call` (and the gateway's reports), worst first.
EXIT_CODES = {Outcome.OK: 0, Outcome.FAILED: 1, Outcome.DENIED: 3, Outcome.TIMEOUT: 4,
              Outcome.UNREACHABLE: 5, Outcome.NOT_DISCOVERED: 6}
EXIT_USAGE = 2  # bad command line or arguments: nothing was sent


@dataclass(frozen=True)
class Timeouts:
    discover: float = 5.0  # asking the broker who offers an op
    reply_margin: float = 0.25  # kept back from the agent's budget for its answer to travel


@dataclass
class TargetResult:
    target: str
    outcome: Outcome
    result: Any = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "outcome": self.outcome.value, "result": self.result,
                "error": self.error}


@dataclass
class CallReport:
    op: str
    results: list[TargetResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.outcome is Outcome.OK for r in self.results)

    @property
    def exit_code(self) -> int:
        """0 when every target is ok; else the highest code among the targets' outcomes."""
        if not self.results:
            return EXIT_CODES[Outcome.NOT_DISCOVERED]
        return max(EXIT_CODES[r.outcome] for r in self.results) if not self.ok else 0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.outcome.value] = out.get(r.outcome.value, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "results": [r.to_dict() for r in self.results], "summary": self.counts()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CallReport":
        return cls(data["op"], [TargetResult(r["target"], Outcome(r["outcome"]), r.get("result"), r.get("error"))
                                for r in data["results"]])


class Client(Actor):
    """An actor that calls ops. Each client logs in with its own resource so several may run at once."""

    def __init__(self, jid: str, password: str, endpoint: Endpoint, *, broker: str,
                 timeouts: Timeouts = Timeouts()) -> None:
        super().__init__(jid, password, endpoint, resource=f"client-{uuid.uuid4().hex[:8]}")
        self.broker = broker
        self.timeouts = timeouts

    async def call(self, op: str, args: dict[str, Any], *, on: Sequence[str] = (), scope: str = "all",
                   to: Sequence[str] = (), timeout: float = 30.0, progress: ProgressFn | None = None) -> CallReport:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        report = CallReport(op)
        scoped: dict[str, list[str]] = {}  # per target, the addressed resources it holds or relates to
        if to:
            targets = list(to)
        else:
            found = await self.request(self.broker, "mesh.discover", {"op": op, "resources": list(on)},
                                       timeout=min(self.timeouts.discover, timeout))
            if found.outcome is not Outcome.OK:
                found.error = f"discovery through the broker failed: {found.error}"
                report.results.append(found)
                return report
            targets = [e["jid"] for e in found.result]
            scoped = {e["jid"]: [w for w in on if any(related(h, w) for h in e["resources"])] for e in found.result}
            held = [r for e in found.result for r in e["resources"]]
            for wanted in on:
                if not any(related(h, wanted) for h in held):
                    report.results.append(TargetResult(wanted, Outcome.NOT_DISCOVERED,
                                                       error=f"no live agent offers {op} on {wanted}"))
            if not targets and not on:
                report.results.append(TargetResult("*", Outcome.NOT_DISCOVERED,
                                                   error=f"no live agent offers {op}"))
        rid = uuid.uuid4().hex
        if scope == "one":
            random.shuffle(targets)
            for target in targets:
                res = await self.request(target, op, args, on=scoped.get(target, on), timeout=end - loop.time(),
                                         rid=rid, progress=progress)
                report.results.append(res)
                # Only a target that certainly did not run the op may be passed over for the next.
                if res.outcome not in (Outcome.DENIED, Outcome.UNREACHABLE):
                    report.results = [r for r in report.results if r.outcome is Outcome.NOT_DISCOVERED] + [res]
                    break
        else:
            report.results += await asyncio.gather(*(
                self.request(t, op, args, on=scoped.get(t, on), timeout=end - loop.time(), rid=rid,
                             progress=progress)
                for t in targets))
        return report

    async def request(self, target: str, op: str, args: dict[str, Any], *, on: Sequence[str] = (),
                      timeout: float, rid: str | None = None, progress: ProgressFn | None = None) -> TargetResult:
        """Send one request to one agent and wait for its one outcome, at most ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        rid = rid or uuid.uuid4().hex
        iq = self.xmpp.make_iq_set(ito=target)
        req = iq["vertebra_op"]
        req["name"], req["rid"] = op, rid
        req["timeout"] = str(max(1, int((timeout - self.timeouts.reply_margin) * 1000)))
        if on:
            req["on"] = " ".join(on)
        req.xml.text = protocol.encode(args)
        jobs = self.watch_job(target, rid)  # before sending: progress may follow the ack at once
        try:
            try:
                reply = await self.send_iq(iq, max(0.0, end - loop.time()))
            except asyncio.TimeoutError:
                return TargetResult(target, Outcome.TIMEOUT, error=f"no answer within {timeout:g}s")
            except ConnectionError as exc:
                # The request may have arrived and run: that is not "unreachable", which would let
                # scope one try the next target.
                return TargetResult(target, Outcome.TIMEOUT, error=f"{exc} before an answer came; the op may have run")
            if reply["type"] == "error":
                return _from_error(target, reply)
            if reply.xml.find(f"{{{protocol.NS}}}accepted") is None:
                return _from_outcome(target, reply["vertebra_outcome"])
            while True:
                try:
                    msg = await asyncio.wait_for(jobs.get(), max(0.0, end - loop.time()))
                except asyncio.TimeoutError:
                    return TargetResult(target, Outcome.TIMEOUT,
                                        error=f"accepted, but no outcome within {timeout:g}s")
                if msg.xml.find(f"{{{protocol.NS}}}outcome") is not None:
                    return _from_outcome(target, msg["vertebra_outcome"])
                if progress is not None:
                    p = msg["vertebra_progress"]
                    try:
                        progress(target, int(p["seq"] or 0), protocol.decode(p.xml.text))
                    except (ValueError, OpError):  # a garbled report is skipped; the outcome still counts
                        pass
        finally:
            self.unwatch_job(target, rid)


def _from_error(target: str, reply: Iq) -> TargetResult:
    err = reply["error"]
    condition = protocol.app_condition(reply)
    text = err["text"] or err["condition"]
    if condition is None and err["condition"] in UNREACHABLE_CONDITIONS:
        return TargetResult(target, Outcome.UNREACHABLE, error=f"{target} is not connected ({err['condition']})")
    if condition is None:
        return TargetResult(target, Outcome.FAILED, error=f"{err['condition']}: {text}")
    return TargetResult(target, error_for(condition, text).outcome, error=f"{condition}: {text}")


def _from_outcome(target: str, outcome: Any) -> TargetResult:
    try:
        payload = protocol.decode(outcome.xml.text)
    except Exception as exc:  # an agent's malformed answer is that agent's failure, not ours
        return TargetResult(target, Outcome.FAILED, error=f"unreadable outcome: {exc}")
    if outcome["status"] == "ok":
        return TargetResult(target, Outcome.OK, result=payload)
    condition = outcome["condition"] or "failed"
    return TargetResult(target, error_for(condition, str(payload)).outcome, error=f"{condition}: {payload}")
