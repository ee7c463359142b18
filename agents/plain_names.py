"""Resource paths and Fence Agent API keys checked without ``re``.

check_vertebra and fence_vertebra are started for every check and every fencing action, and ``re``
(with the enum it loads) costs such a start ~4 ms. A path's segments follow rbac.segments, the one
place that rule lives; a key follows the Fence Agent API (a letter or digit, then letters, digits, _
and -), which tests hold ``is_key`` to character by character.
"""

from rbac.segments import FIRST as _WORD, MAX_SEGMENTS, is_segment

_KEY_FIRST = _WORD - {"_"}
_KEY_REST = _WORD | {"-"}


def is_resource(path: str) -> bool:
    """Whether ``path`` is a canonical resource path, as ``agents.resources.check`` decides."""
    if not path.startswith("/"):
        return False
    segments = path[1:].split("/")
    return len(segments) <= MAX_SEGMENTS and all(is_segment(seg) for seg in segments)


def is_key(name: str) -> bool:
    """Whether ``name`` may be a parameter name of the Fence Agent API."""
    return bool(name) and name[0] in _KEY_FIRST and _KEY_REST.issuperset(name)
