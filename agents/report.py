"""What a call reports: one named outcome per target, and the exit code that sums them up.

Free of XMPP, so that short-lived programs reading a report from the local gateway do not pay for
loading the XMPP stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import Outcome

ProgressFn = Callable[[str, int, Any], None]
#: What becomes of a long op's job as its caller sees it: (target, job id, event), the event being
#: ``accepted``, ``offline`` (the agent's session ended while the job ran) or ``back``.
JobEventFn = Callable[[str, str, str], None]
#: How many of a call's targets have answered, of how many: (answered, targets).
AnsweredFn = Callable[[int, int], None]

#: Exit codes of `vertebra call` (and the gateway's reports), worst first.
EXIT_CODES = {Outcome.OK: 0, Outcome.FAILED: 1, Outcome.DENIED: 3, Outcome.TIMEOUT: 4,
              Outcome.UNREACHABLE: 5, Outcome.NOT_DISCOVERED: 6}
EXIT_USAGE = 2  # bad command line or arguments: nothing was sent



@dataclass
class TargetResult:
    target: str
    outcome: Outcome
    result: Any = None
    error: str | None = None
    job: str = ""  # the job id, when the target accepted the request as a long op

    def to_dict(self) -> dict[str, Any]:
        out = {"target": self.target, "outcome": self.outcome.value, "result": self.result, "error": self.error}
        if self.job:
            out["job"] = self.job
        return out


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
        return cls(data["op"], [TargetResult(r["target"], Outcome(r["outcome"]), r.get("result"), r.get("error"),
                                             r.get("job", "")) for r in data["results"]])
