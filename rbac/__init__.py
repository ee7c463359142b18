"""Authorization policy: pure logic that imports nothing of the mesh.

A YAML policy (roles with inheritance, members as bare JIDs, grants and overriding denies of op
patterns on resource patterns, optional sites, and examples) is linted with line numbers
(:mod:`rbac.lint`), compiled (:mod:`rbac.policy`, and to casbin in :mod:`rbac.casbin_model`) and
served by a :class:`rbac.gate.Gate` that versions it, caches decisions per version and keeps the last
good policy when a load fails. :mod:`rbac.paths` is the one place resource path rules live.
"""

from .gate import Gate, GateDecision, LoadResult
from .lint import PolicyRejected, check_file, compile_policy
from .paths import BadPath, check_path

__all__ = ["Gate", "GateDecision", "LoadResult", "PolicyRejected", "check_file", "compile_policy",
           "BadPath", "check_path"]
