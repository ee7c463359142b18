"""Resource paths, their segments and Fence Agent API keys checked without ``re``.

check_vertebra and fence_vertebra are started for every check and every fencing action, and ``re``
(with the enum it loads) costs such a start ~4 ms. The rules themselves live in rbac.paths (a segment is
a letter, digit or _, then up to 127 of those or . : @ + -; at most MAX_SEGMENTS segments) and in the
Fence Agent API (a key is a letter or digit, then letters, digits, _ and -); tests hold these
functions to them character by character.
"""

_SEGMENT_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_SEGMENT_REST = _SEGMENT_FIRST | frozenset(".:@+-")
_KEY_FIRST = _SEGMENT_FIRST - {"_"}
_KEY_REST = _SEGMENT_FIRST | {"-"}
MAX_SEGMENTS = 16
MAX_SEGMENT = 128


def is_segment(name: str) -> bool:
    """Whether ``name`` is one resource path segment (a cluster, node or account name is one)."""
    return (0 < len(name) <= MAX_SEGMENT and name[0] in _SEGMENT_FIRST
            and _SEGMENT_REST.issuperset(name))


def is_resource(path: str) -> bool:
    """Whether ``path`` is a canonical resource path, as ``agents.resources.check`` decides."""
    if not path.startswith("/"):
        return False
    segments = path[1:].split("/")
    return len(segments) <= MAX_SEGMENTS and all(is_segment(seg) for seg in segments)


def is_key(name: str) -> bool:
    """Whether ``name`` may be a parameter name of the Fence Agent API."""
    return bool(name) and name[0] in _KEY_FIRST and _KEY_REST.issuperset(name)
