"""``key=value`` words, the one parser for them: op arguments on the command line and in chat, the check
arguments check_vertebra passes on (``-a NAME=VALUE``), and a workflow run's parameters.

(The Fence Agent API's stdin lines are another format, with comments and blank lines: agents/fencing/fence_api.py.)
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from .errors import BadArguments

__all__ = ["parse_pairs"]


def parse_pairs(words: Iterable[str], subject: str, *, many: Collection[str] = (), noun: str = "argument",
                argument: str | None = None) -> dict[str, Any]:
    """``key=value`` words into a map; a key in ``many`` gathers its values in a list. A word without
    ``=`` or with an empty key, and any other key given twice, are refused with BadArguments naming
    ``subject`` (an op, a workflow) and ``noun``; ``argument`` is the argument the error is about (default:
    the key given twice)."""
    out: dict[str, Any] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise BadArguments(f"{subject}: expected key=value, got {word!r}",
                               **({"argument": argument} if argument else {}))
        if key in many:
            out.setdefault(key, []).append(value)
        elif key in out:
            raise BadArguments(f"{subject}: {noun} {key!r} given twice", argument=argument or key)
        else:
            out[key] = value
    return out
