"""Resource paths: the hierarchical names agents advertise and calls address (``/host/db1``,
``/pool/tank``, ``/cluster/c1/node/3``).

Paths are checked, never normalized: a path with ``..``, ``.``, an empty segment or a character
outside a conservative set is refused, so no spelling of a path can reach something another
spelling would not. Matching follows the original Vertebra: a call on a resource reaches agents
that hold that resource, one of its ancestors, or one of its descendants.
"""

from __future__ import annotations

import re

_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@+-]{0,127}$")
MAX_SEGMENTS = 16


class BadResource(ValueError):
    pass


def check(path: str) -> str:
    """Return ``path`` if it is a canonical resource path, else raise BadResource saying why."""
    if not isinstance(path, str) or not path.startswith("/") or path == "/":
        raise BadResource(f"resource {path!r} must be an absolute path such as /host/db1")
    segments = path[1:].split("/")
    if len(segments) > MAX_SEGMENTS:
        raise BadResource(f"resource {path!r} has more than {MAX_SEGMENTS} segments")
    for seg in segments:
        if seg in ("", ".", "..") or not _SEGMENT.match(seg):
            raise BadResource(f"resource {path!r}: segment {seg!r} is not allowed (letters, digits and"
                              " _ . : @ + - only; no empty, '.' or '..' segments)")
    return path


def related(held: str, wanted: str) -> bool:
    """True when ``held`` is ``wanted``, one of its ancestors, or one of its descendants."""
    if held == wanted:
        return True
    shorter, longer = sorted((held, wanted), key=len)
    return longer.startswith(shorter + "/")
