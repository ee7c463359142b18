"""Resource paths: the hierarchical names agents advertise and calls address (``/host/db1``,
``/pool/tank``, ``/cluster/c1/node/3``).

Paths are checked, never normalized: a path with ``..``, ``.``, an empty segment or a character
outside a conservative ASCII set is refused, so no spelling of a path can reach something another
spelling would not. The rules live once, in :mod:`rbac.paths`, which the policy matches with too;
this module is the runtime's name for them. Matching follows the original Vertebra: a call on a
resource reaches agents that hold that resource, one of its ancestors, or one of its descendants.
"""

from __future__ import annotations

from rbac.paths import MAX_SEGMENTS, BadPath, check_path, related

BadResource = BadPath  # the runtime's name; the same class, so either except clause catches it


def check(path: str) -> str:
    """Return ``path`` if it is a canonical resource path, else raise BadResource saying why."""
    return check_path(path)


__all__ = ["BadResource", "MAX_SEGMENTS", "check", "related"]
