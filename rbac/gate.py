"""The gate: the active policy, its version, the decision cache, reloads and revocations.

``Gate.decide`` is what every request passes. It answers from a dict keyed by the request while the
policy version is unchanged; ``load`` (a new policy) and ``revoke`` (a JID loses everything at once)
bump the version and drop the cache in the same step. A policy that fails to lint, or whose examples
the index and casbin do not both decide as written, is refused and the last good one stays active.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .casbin_model import casbin_decide, enforcer
from .lint import PolicyRejected, compile_policy, failed_examples
from .policy import Policy
from .source import Problem

log = logging.getLogger(__name__)

CACHE_LIMIT = 100_000  # entries; a flood of distinct requests empties the cache rather than memory


@dataclass(frozen=True)
class GateDecision:
    allowed: bool
    rule: str  # the rule (or default, or revocation) that decided
    version: int  # the gate version that decided; 0 when no policy was ever loaded


@dataclass(frozen=True)
class LoadResult:
    ok: bool
    version: int  # the version now active (the old one when the load was refused)
    problems: tuple[Problem, ...] = ()

    def __str__(self) -> str:
        if self.ok:
            return f"policy version {self.version} active"
        return (f"policy refused; version {self.version} stays active:\n"
                + "\n".join(f"  {p}" for p in self.problems))


class Gate:
    """Decides requests against the active policy. Thread-compatible, not thread-safe: one per loop."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.policy: Policy | None = None
        self.version = 0  # bumped by every accepted load and every revocation
        self.loaded_at = 0.0  # clock time the active policy was installed or last confirmed current
        self.revoked: frozenset[str] = frozenset()
        self.last_error: LoadResult | None = None
        self._cache: dict[tuple[str, str, tuple[str, ...], str | None], GateDecision] = {}

    def load(self, text: str, issued_at: float | None = None) -> LoadResult:
        """Install policy text if it lints and its examples hold; else keep the active one."""
        try:
            policy = compile_policy(text)
            problems = failed_examples(policy)
            if not problems and policy.examples:
                referee = enforcer(policy)
                for ex in policy.examples:
                    if casbin_decide(referee, ex.caller, ex.op, ex.on, ex.site).allowed != ex.expect:
                        problems.append(Problem(ex.line, "casbin decides this example differently from the"
                                                         " gate; refusing a policy the two read differently"))
        except PolicyRejected as exc:
            problems = exc.problems
        except Exception as exc:  # a bug must not leave us with no policy or a half-installed one
            log.exception("policy load failed")
            problems = [Problem(0, f"policy could not be compiled ({exc.__class__.__name__}: {exc})")]
        if problems:
            self.last_error = LoadResult(False, self.version, tuple(sorted(problems)))
            log.warning("%s", self.last_error)
            return self.last_error
        self.policy = policy
        # A new policy replaces revocations too: it is written knowing who was revoked.
        self.revoked = frozenset()
        self._bump()
        self.loaded_at = self.clock() if issued_at is None else issued_at
        self.last_error = None
        return LoadResult(True, self.version)

    def confirm_current(self, issued_at: float | None = None) -> None:
        """The policy source says the active policy is still current: restart its age."""
        self.loaded_at = self.clock() if issued_at is None else issued_at

    def age(self) -> float:
        """Seconds since the active policy was installed or confirmed; infinite with no policy."""
        return float("inf") if self.policy is None else max(0.0, self.clock() - self.loaded_at)

    def revoke(self, jid: str) -> int:
        """Deny ``jid`` everything from the next request on, until a new policy is loaded."""
        self.revoked = self.revoked | {jid.lower()}
        self._bump()
        return self.version

    def _bump(self) -> None:
        self.version += 1
        self._cache = {}

    def decide(self, caller: str, op: str, resources: Sequence[str], site: str | None = None) -> GateDecision:
        """Allowed or not, and why. Never raises: any failure is a deny naming the failure."""
        try:
            key = (caller, op, tuple(resources), site)
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            decision = self._decide(caller, op, key[2], site)
            if len(self._cache) >= CACHE_LIMIT:
                self._cache = {}
            self._cache[key] = decision
            return decision
        except Exception as exc:  # fail closed
            log.exception("deciding %s %s failed", caller, op)
            return GateDecision(False, f"authorization failed ({exc.__class__.__name__}); denied", self.version)

    def _decide(self, caller: str, op: str, resources: tuple[str, ...], site: str | None) -> GateDecision:
        if self.policy is None:
            return GateDecision(False, "no policy is loaded (default deny)", self.version)
        if caller.lower() in self.revoked:
            return GateDecision(False, f"{caller} was revoked at policy version {self.version}", self.version)
        verdict = self.policy.evaluate(caller, op, resources, site)
        return GateDecision(verdict.allowed, verdict.rule, self.version)
