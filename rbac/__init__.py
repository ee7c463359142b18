"""Authorization policy: pure logic that imports nothing of the mesh.

A YAML policy (roles with inheritance, members as bare JIDs, grants and overriding denies of op
patterns on resource patterns, optional sites, and examples) is linted with line numbers
(:mod:`rbac.lint`), compiled (:mod:`rbac.policy`, and to casbin in :mod:`rbac.casbin_model`) and
served by a :class:`rbac.gate.Gate` that versions it, caches decisions per version and keeps the last
good policy when a load fails. :mod:`rbac.paths` is the one place resource path rules live (a segment's
in :mod:`rbac.segments`, which the short-lived programs import on their own).
"""

from __future__ import annotations

# Neither importlib nor typing's TYPE_CHECKING: check_vertebra and fence_vertebra import rbac.segments
# on every start, and typing loads re, importlib warnings (mypy reads any TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Loaded on first use: the runtime imports rbac.paths on every start, and casbin and the policy
# compiler are not needed until a policy is.
_EXPORTS = {"Gate": "gate", "GateDecision": "gate", "LoadResult": "gate", "PolicyRejected": "lint",
            "check_file": "lint", "compile_policy": "lint", "BadPath": "paths", "check_path": "paths"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rbac' has no attribute {name!r}")
    return getattr(__import__(f"{__name__}.{_EXPORTS[name]}", fromlist=[name]), name)
