"""The one authorization hook the runtime calls before executing any op.

``Authorizer.decide`` answers for a caller's bare JID (as the XMPP server stamped it), an op and
the canonical resources it acts on. A mesh with a policy uses :class:`PolicyAuthorizer`, which asks
the ``rbac`` gate (default deny, denies override grants, decisions cached per policy version) and
refuses destructive ops once the policy is older than a configured age, since a stale policy may
still hold someone who was revoked. A mesh without a policy keeps :class:`AdminsOnly`: the admins
the mesh file lists may do anything, and everyone else nothing. Any exception while deciding is a
deny.
"""

from __future__ import annotations

import hashlib
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from rbac import Gate, LoadResult

from .ops import OpSpec

log = logging.getLogger(__name__)


#: The delegate (broker, chat bot) that sent the request being decided, "" when its sender asked for
#: itself. Set by the runtime around each decision, for the few rules that depend on the relay (the
#: fencing approval rule: a fence the broker's workflow engine had approved).
current_via: ContextVar[str] = ContextVar("vertebra_via", default="")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # the rule that decided, for the caller's error and the audit trail
    rule: str = ""  # the policy rule alone (reason adds words for the caller); "" for AdminsOnly
    version: int = 0  # the policy version that decided; 0 without a policy


class Authorizer(Protocol):
    def decide(self, caller: str, spec: OpSpec, resources: Sequence[str]) -> Decision: ...


class AdminsOnly:
    """Default deny; the listed admins are allowed everything."""

    def __init__(self, admins: Iterable[str]) -> None:
        self.admins = frozenset(a.lower() for a in admins)

    def decide(self, caller: str, spec: OpSpec, resources: Sequence[str]) -> Decision:
        if caller.lower() in self.admins:
            return Decision(True, "caller is a mesh admin", "mesh admins")
        return Decision(False, f"{caller} may not run {spec.name}: only the mesh file's admins may run ops"
                               " until a policy grants more", "mesh admins only")


class PolicyAuthorizer:
    """Decides with an ``rbac.Gate``; refuses destructive ops when the policy is too old.

    ``max_age`` (seconds, None for no limit) counts from when the policy was installed or last
    confirmed current by its source (``gate.confirm_current``, called when the broker re-pushes).
    """

    def __init__(self, gate: Gate | None = None, *, site: str | None = None,
                 max_age: float | None = None) -> None:
        self.gate = gate or Gate()
        self.site = site
        self.max_age = max_age
        self.source: Path | None = None  # the policy file, where this copy is the broker's
        self.digest: str | None = None  # of the active policy's text, to tell a re-push from a new one

    @classmethod
    def from_file(cls, path: str | Path, **kw: object) -> "PolicyAuthorizer":
        """An authorizer with the policy at ``path`` loaded; raises ValueError naming every problem."""
        authorizer = cls(**kw)  # type: ignore[arg-type]
        text = Path(path).read_text(encoding="utf-8")
        result = authorizer.load(text)
        if not result.ok:
            raise ValueError(f"{path}: {result}")
        authorizer.source = Path(path)
        authorizer.digest = hashlib.sha256(text.encode()).hexdigest()
        return authorizer

    def load(self, text: str, issued_at: float | None = None) -> LoadResult:
        """Install a new policy version; a refused one leaves the active policy in force."""
        return self.gate.load(text, issued_at)

    def decide(self, caller: str, spec: OpSpec, resources: Sequence[str]) -> Decision:
        d = self.gate.decide(caller, spec.name, resources, self.site)
        if not d.allowed:
            on = f" on {' '.join(resources)}" if resources else ""
            return Decision(False, f"{caller} may not run {spec.name}{on}: {d.rule}", d.rule, d.version)
        if spec.destructive and self.max_age is not None:
            age = self.gate.age()
            if age > self.max_age:
                rule = f"policy too old for destructive ops ({age:.0f}s > {self.max_age:g}s)"
                return Decision(False, f"{spec.name} is destructive and this agent's policy (version"
                                       f" {d.version}) is {age:.0f}s old, over the {self.max_age:g}s limit:"
                                       " destructive ops are refused until the broker pushes a current"
                                       " policy", rule, d.version)
        return Decision(True, d.rule, d.rule, d.version)


def policy_of(authorizer: Any) -> "PolicyAuthorizer | None":
    """The policy inside ``authorizer``, which agent kinds and the broker may wrap with rules of their
    own (each wrapper keeps the one it wraps as ``inner``); None for a mesh without a policy."""
    while not isinstance(authorizer, PolicyAuthorizer) and hasattr(authorizer, "inner"):
        authorizer = authorizer.inner
    return authorizer if isinstance(authorizer, PolicyAuthorizer) else None


def from_broker(caller: str, broker: str | None, what: str) -> Decision:
    """The rule for what only an agent's broker pushes (policies, fenced nodes): its broker may,
    nobody else may, whatever a policy says, so no policy can lock out its own updates."""
    if broker and caller.lower() == broker.lower():
        return Decision(True, f"{what} pushed by this agent's broker")
    return Decision(False, f"{caller} may not send {what} here: only this agent's broker"
                           f" ({broker or 'none configured'}) does")


def decide(authorizer: Authorizer, caller: str, spec: OpSpec, resources: Sequence[str]) -> Decision:
    """Ask ``authorizer``, turning any failure into a deny."""
    try:
        decision = authorizer.decide(caller, spec, resources)
        if isinstance(decision, Decision):
            return decision
        return Decision(False, "authorization hook gave no decision (deny)")
    except Exception as exc:  # fail closed, whatever went wrong
        log.exception("authorization hook failed for %s %s", caller, spec.name)
        return Decision(False, f"authorization failed ({exc.__class__.__name__}); denied")
