"""One state for many hosts: a ``monitor.check`` call report turned into per-host states, the
counts of OK/WARNING/CRITICAL/UNKNOWN, the worst state, and plugin output saying all of it.

A target that did not answer with a result (denied, timeout, unreachable, not discovered, or the
check was refused) counts as UNKNOWN under its name, with the reason as its text: a cluster check
must never look healthier because a host is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agents.report import CallReport, TargetResult
from agents.errors import Outcome
from agents.monitor import perfdata as perfdata_grammar
from agents.monitor.ranges import State
from agents.monitor.states import plain_text

__all__ = ["HostState", "Aggregate", "aggregate"]


@dataclass(frozen=True)
class HostState:
    host: str
    state: State
    text: str
    perfdata: str = ""


@dataclass(frozen=True)
class Aggregate:
    hosts: tuple[HostState, ...]

    @property
    def counts(self) -> dict[str, int]:
        return {s.name: sum(h.state is s for h in self.hosts) for s in State}

    @property
    def worst(self) -> State:
        return State.worst(h.state for h in self.hosts) if self.hosts else State.UNKNOWN

    def summary(self) -> str:
        """``2 OK, 1 CRITICAL (db2)``: every state present, with the hosts in it unless OK."""
        if not self.hosts:
            return "no hosts answered"
        parts = []
        for state in State:
            names = sorted(h.host for h in self.hosts if h.state is state)
            if names:
                parts.append(f"{len(names)} {state.name}" + ("" if state is State.OK else f" ({', '.join(names)})"))
        return ", ".join(parts)

    def perfdata(self) -> str:
        """Every host's perfdata, each label prefixed with its host so they stay apart."""
        items = []
        for h in sorted(self.hosts, key=lambda h: h.host):
            for item in perfdata_grammar.parse(h.perfdata):
                items.append(perfdata_grammar.PerfDatum(f"{h.host}:{item.label}", item.value, item.uom, item.warn,
                                                        item.crit, item.min, item.max))
        return perfdata_grammar.format(items)

    def render(self) -> str:
        """Plugin output: worst state and summary, the per-host lines as long output, all perfdata (after
        the only ``|``: a bar in a host's name or text is written as ``states.BAR_IN_TEXT``)."""
        first = plain_text(f"{self.worst.name} - {self.summary()}")
        perf = self.perfdata()
        if perf:
            first += f"|{perf}"
        lines = [plain_text(f"{h.host}: {h.state.name}: {h.text}") for h in sorted(self.hosts, key=lambda h: h.host)]
        return "\n".join([first, *lines])


def aggregate(report: CallReport) -> Aggregate:
    return Aggregate(tuple(_host_state(r) for r in report.results))


def _host_state(r: TargetResult) -> HostState:
    result: Any = r.result
    if r.outcome is Outcome.OK and isinstance(result, dict) and "code" in result:
        try:
            state = State.parse(result["code"])
        except ValueError:
            return HostState(_name(r.target), State.UNKNOWN, f"unreadable state {result['code']!r}")
        return HostState(str(result.get("host") or _name(r.target)), state, str(result.get("text", "")),
                         str(result.get("perfdata", "")))
    return HostState(_name(r.target), State.UNKNOWN, f"{r.outcome.value}: {r.error or 'no result'}")


def _name(target: str) -> str:
    """``mon1@vertebra.test/agent`` → ``mon1``; a resource such as ``/host/db2`` stays as it is."""
    return target.split("@", 1)[0] if "@" in target else target
