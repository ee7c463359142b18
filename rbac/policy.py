"""A compiled policy: roles closed over inheritance, rules indexed by role, and the decision rule.

Semantics (the same ones :mod:`rbac.casbin_model` hands to casbin): a caller may run an op on a set
of resources when, for every resource, some grant of one of the caller's roles (direct or inherited)
matches the op, the resource and the site, and no deny of any of those roles does. A deny always
wins over a grant; anything not granted is denied. A rule without ``on`` covers every resource and
also an op that names none; a rule without ``site`` covers every site.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .ops import is_op_name, match_op
from .paths import BadPath, check_path, match_pattern

ALLOW, DENY = "allow", "deny"
_NO_RESOURCE: tuple[str | None, ...] = (None,)  # what a request that addresses no resource is checked on


@dataclass(frozen=True)
class Rule:
    """One grant or deny, as written at ``line`` of the policy file."""

    effect: str  # allow | deny
    role: str
    ops: tuple[tuple[str, ...], ...]  # op patterns, as words
    on: tuple[tuple[str, ...], ...] | None  # resource patterns as segments; None: any resource
    site: str | None  # None: every site
    line: int
    label: str  # how decisions and the audit trail name this rule

    def matches(self, op: str, resource: str | None, site: str | None, caller: str | None = None) -> bool:
        if self.site is not None and self.site != site:
            return False
        if not any(match_op(words, op) for words in self.ops):
            return False
        if self.on is None:
            return True
        return resource is not None and any(match_pattern(segs, resource, caller) for segs in self.on)


@dataclass(frozen=True)
class Verdict:
    """What the policy says about one request, and the rule (or default) that said it."""

    allowed: bool
    rule: str


@dataclass(frozen=True)
class Example:
    caller: str
    op: str
    on: tuple[str, ...]
    site: str | None
    expect: bool
    line: int


@dataclass
class Policy:
    """A linted policy, ready to decide. Built only by :func:`rbac.lint.compile_policy`."""

    roles: dict[str, tuple[str, ...]]  # role -> roles it inherits directly
    members: dict[str, frozenset[str]]  # bare JID -> every role it holds, inherited ones included
    rules: tuple[Rule, ...]
    sites: frozenset[str]
    examples: tuple[Example, ...]
    digest: str  # sha256 of the source text
    # The index that keeps a cold decision cheap at 10,000 rules: a request only looks at rules of
    # the caller's roles that name its op exactly, plus that role's wildcard rules.
    _exact: dict[tuple[str, str], list[Rule]] = field(default_factory=dict, repr=False)
    _wild: dict[tuple[str, str], list[Rule]] = field(default_factory=dict, repr=False)  # (role, first word)
    _roles_sorted: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for rule in self.rules:
            if any("*" in words or "**" in words for words in rule.ops):
                firsts = {words[0] if words[0] not in ("*", "**") else "*" for words in rule.ops}
                for first in firsts:
                    self._wild.setdefault((rule.role, first), []).append(rule)
            else:
                for words in rule.ops:
                    self._exact.setdefault((rule.role, ".".join(words)), []).append(rule)
        self._roles_sorted = {jid: tuple(sorted(roles)) for jid, roles in self.members.items()}

    def roles_of(self, caller: str) -> frozenset[str]:
        return self.members.get(caller, frozenset())

    def evaluate(self, caller: str, op: str, resources: Sequence[str], site: str | None = None) -> Verdict:
        """Decide one request. Raises nothing for bad input: bad names and paths are denies."""
        if not is_op_name(op):
            return Verdict(False, f"op name {op!r} is not a canonical op name (deny)")
        for path in resources:
            try:
                check_path(path)
            except BadPath as exc:
                return Verdict(False, f"{exc} (deny)")
        roles = self._roles_sorted.get(caller)
        if not roles:
            return Verdict(False, f"{caller} holds no role in the policy (default deny)")
        rules: list[Rule] = []
        first = op.partition(".")[0]
        for role in roles:
            rules += self._exact.get((role, op), ())
            rules += self._wild.get((role, first), ())
            rules += self._wild.get((role, "*"), ())
        denies = [r for r in rules if r.effect == DENY]
        grants = [r for r in rules if r.effect == ALLOW]
        granted_by: Rule | None = None
        for resource in (resources or _NO_RESOURCE):
            for rule in denies:
                if rule.matches(op, resource, site, caller):
                    return Verdict(False, rule.label)
            grant = next((r for r in grants if r.matches(op, resource, site, caller)), None)
            if grant is None:
                where = f" on {resource}" if resource else ""
                return Verdict(False, f"no grant lets {caller} run {op}{where} (default deny)")
            granted_by = granted_by or grant
        assert granted_by is not None
        return Verdict(True, granted_by.label)


def members_closure(direct: Mapping[str, Sequence[str]], inherits: Mapping[str, Sequence[str]]
                    ) -> dict[str, frozenset[str]]:
    """Each member's roles including every role they inherit (the graph is known to be acyclic)."""
    cache: dict[str, frozenset[str]] = {}

    def closure(role: str) -> frozenset[str]:
        if role not in cache:
            out = {role}
            for parent in inherits.get(role, ()):
                out |= closure(parent)
            cache[role] = frozenset(out)
        return cache[role]

    members: dict[str, set[str]] = {}
    for role, jids in direct.items():
        for jid in jids:
            members.setdefault(jid, set()).update(closure(role))
    return {jid: frozenset(roles) for jid, roles in members.items()}
