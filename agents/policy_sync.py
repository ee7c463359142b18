"""How an agent takes the policy its broker pushes (the broker side is ``broker.policy``).

``policy.install`` is declared on every agent with ``sender="broker"``: its authorization is not
the policy's to decide (``agents.authz.broker_only``): it is accepted from the mesh's broker and
from nobody else, whatever a policy says, so no policy can lock its own updates out or let anyone
else replace it. The same policy text again only restarts the policy's age; a new text is linted
and its examples checked, and a refused one leaves the active policy in force.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .authz import policy_of
from .errors import OpError

INSTALL_OP = "policy.install"


def install(authorizer: Any, text: str, issued_at: float) -> dict:
    """Install or confirm a pushed policy on ``authorizer``; raises OpError saying why not."""
    authorizer = policy_of(authorizer)
    if authorizer is None:
        raise OpError("this agent runs without a policy (admins only): give its mesh file `policy: FILE`"
                      " to have it take the broker's policy")
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest == getattr(authorizer, "digest", None):
        authorizer.gate.confirm_current(issued_at)
        return {"version": authorizer.gate.version, "changed": False}
    result = authorizer.load(text, issued_at)
    if not result.ok:
        raise OpError(f"pushed policy refused, version {result.version} stays active: {result}")
    authorizer.digest = digest
    return {"version": result.version, "changed": True}
