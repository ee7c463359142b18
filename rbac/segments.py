"""What one segment of a resource path may be: the rule itself, with no imports at all.

rbac.paths checks whole paths and patterns with it; check_vertebra and fence_vertebra, started for
every check and every fencing action, check their names with it without loading ``re`` (with the
enum it loads, ~4 ms of each start); op declarations advertise it as a pattern. The character sets
and the pattern say the same thing twice, side by side: tests/unit/test_rbac_paths.py holds them to
each other character by character.
"""

_WORD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_"
#: The characters a segment may start with, and those it may go on with.
FIRST = frozenset(_WORD)
REST = frozenset(_WORD + ".:@+-")
MAX_LENGTH = 128
MAX_SEGMENTS = 16
#: The same rule as a regular expression, for op declarations (their advertised argument patterns).
PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.:@+-]{0,127}"


def is_segment(name: str) -> bool:
    """Whether ``name`` is one resource path segment (a cluster, node or account name is one).
    ASCII only: the sets hold no other character."""
    return 0 < len(name) <= MAX_LENGTH and name[0] in FIRST and REST.issuperset(name)
