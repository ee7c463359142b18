"""The one authorization hook the runtime calls before executing any op.

``Authorizer.decide`` answers for a caller's bare JID (as the XMPP server stamped it), an op and
the canonical resources it acts on. Until the RBAC issue replaces it with the casbin policy in
``rbac/``, the hook is :class:`AdminsOnly`: the admins the mesh file lists may do anything, and
everyone else nothing. Any exception while deciding is a deny.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

from .ops import OpSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # the rule that decided, for the caller's error and the audit trail


class Authorizer(Protocol):
    def decide(self, caller: str, spec: OpSpec, resources: Sequence[str]) -> Decision: ...


class AdminsOnly:
    """Default deny; the listed admins are allowed everything."""

    def __init__(self, admins: Iterable[str]) -> None:
        self.admins = frozenset(a.lower() for a in admins)

    def decide(self, caller: str, spec: OpSpec, resources: Sequence[str]) -> Decision:
        if caller.lower() in self.admins:
            return Decision(True, "caller is a mesh admin")
        return Decision(False, f"{caller} may not run {spec.name}: only the mesh file's admins may run ops"
                               " until a policy grants more")


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
