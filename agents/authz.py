"""Authorization: one ordered list of rules, walked for every request before an op runs.

Each agent holds its rules in ``Agent.rules`` and decides with :func:`authorize`, passing the
request's context (:class:`Request`: whom it is for, the delegate that sent it, the resources it
acts on) and the op's declaration (``agents/ops.py``) as arguments. Each rule answers with a
:class:`Decision` that settles the request, or None to leave it to the next; a request no rule
settles is denied, and so is one a rule fails on. Every agent walks, in this order:

1. who may send it, from the declaration (``OpSpec.sender``): an op only the agent's broker
   sends is settled here (:func:`broker_only`); the broker then refuses anyone but the agents the
   mesh file configures the ops only they send (``broker/directory.py``, ``sent_by_agents``);
2. an agent kind's own rule, where it has one (the fencing agent's approval rule);
3. the fenced-identity guard: a fenced node's identities run no op that changes state
   (``agents/fenced.py``); after it the broker admits those agents to those ops without a grant;
4. the policy: :class:`PolicyAuthorizer`, which asks the ``rbac`` gate (default deny, denies
   override grants, decisions cached per policy version) and refuses destructive ops once the
   policy is older than a configured age, since a stale policy may still hold someone who was
   revoked; a mesh without a policy keeps :class:`AdminsOnly`: the admins the mesh file lists
   may do anything, and everyone else nothing.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Protocol, Sequence

from rbac import Gate, LoadResult

from .ops import OpSpec

log = logging.getLogger(__name__)


class Request(NamedTuple):
    """What the rules know of the request being decided (a named tuple: made for every request, and
    a frozen dataclass costs three times as much to make)."""

    caller: str  # bare JID of whom it is decided for: its sender, or whom a delegate sends it for
    resources: Sequence[str]  # the canonical resources it acts on
    via: str = ""  # the delegate (broker, chat bot) that sent it on the caller's behalf; "" if none


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


Rule = Callable[[Request, OpSpec], Decision | None]


def policy_of(authorizer: Any) -> "PolicyAuthorizer | None":
    """The policy ``authorizer`` is, or None for a mesh without a policy (admins only)."""
    return authorizer if isinstance(authorizer, PolicyAuthorizer) else None


def broker_only(request: Request, spec: OpSpec, broker: str | None) -> Decision | None:
    """The rule for what only an agent's broker sends (policies, fenced nodes; ``sender="broker"``):
    its broker may, nobody else may and nobody on someone's behalf, whatever a policy says, so no
    policy can lock out its own updates. None for every other op."""
    if spec.sender != "broker":
        return None
    if request.via:  # decided on who sends it, so nobody may send it "for" the broker
        return Decision(False, f"{spec.name} is never sent on someone's behalf")
    if broker and request.caller.lower() == broker.lower():
        return Decision(True, f"{spec.name} sent by this agent's broker")
    return Decision(False, f"{request.caller} may not send {spec.name} here: only this agent's broker"
                           f" ({broker or 'none configured'}) does")


def authorize(rules: Iterable[Rule], request: Request, spec: OpSpec) -> Decision:
    """Walk ``rules`` in order: the first decision settles it; none, or any failure, is a deny."""
    try:
        for rule in rules:
            decision = rule(request, spec)
            if decision is None:
                continue
            if isinstance(decision, Decision):
                return decision
            return Decision(False, "authorization rule gave no decision (deny)")
        return Decision(False, f"no rule lets {request.caller} run {spec.name} (deny)")
    except Exception as exc:  # fail closed, whatever went wrong
        log.exception("authorization failed for %s %s", request.caller, spec.name)
        return Decision(False, f"authorization failed ({exc.__class__.__name__}); denied")


def decide(authorizer: Authorizer, caller: str, spec: OpSpec, resources: Sequence[str]) -> Decision:
    """Ask a policy alone (the chat bot's check before it relays), turning any failure into a deny."""
    try:
        decision = authorizer.decide(caller, spec, resources)
        if isinstance(decision, Decision):
            return decision
        return Decision(False, "authorization hook gave no decision (deny)")
    except Exception as exc:  # fail closed, whatever went wrong
        log.exception("authorization hook failed for %s %s", caller, spec.name)
        return Decision(False, f"authorization failed ({exc.__class__.__name__}); denied")
