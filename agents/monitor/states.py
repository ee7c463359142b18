"""Check states: OK, WARNING, CRITICAL, UNKNOWN, their exit codes, names and order of severity; and
``plain_text``, which keeps text Vertebra writes as plugin output from being read as perfdata.

Apart from the threshold ranges (``ranges``, which re-exports ``State``) so that check_vertebra's lean
path, which needs only these, does not pay for the range parser (about 9 ms of a start).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class State(enum.IntEnum):
    """A check state; the value is the plugin exit code that means it."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3

    @classmethod
    def parse(cls, text: str | int) -> State:
        """Read a state from a name (any case, ``ok``/``warn``/``crit`` accepted) or a code 0-3."""
        if isinstance(text, bool):
            raise ValueError(f"not a check state: {text!r}")
        if isinstance(text, int):
            try:
                return cls(text)
            except ValueError:
                raise ValueError(f"not a check state: {text!r} (expected 0-3)") from None
        key = str(text).strip().upper()
        if key.isdigit():
            return cls.parse(int(key))
        key = _STATE_ALIASES.get(key, key)
        try:
            return cls[key]
        except KeyError:
            raise ValueError(
                f"not a check state: {text!r} (expected OK, WARNING, CRITICAL, UNKNOWN or 0-3)"
            ) from None

    @classmethod
    def worst(cls, states: Iterable[State | int]) -> State:
        """The most severe of ``states``: CRITICAL > WARNING > UNKNOWN > OK.

        This is the Monitoring Plugins ``max_state_alt`` order: an UNKNOWN must not hide a
        WARNING or CRITICAL elsewhere, but it still outranks OK. Raises ValueError when empty.
        """
        found = [cls(s) for s in states]
        if not found:
            raise ValueError("worst state of no states is undefined")
        return max(found, key=_SEVERITY.__getitem__)


# Nagios reads everything after a line's first "|" as perfdata. Text that is not a plugin's own output
# (a caller's value echoed in an error, usage text, a host's line in an aggregate) has each bar written
# as U+00A6 BROKEN BAR, which reads the same and splits nothing.
BAR_IN_TEXT = "\u00a6"


def plain_text(text: str) -> str:
    """``text`` as plugin output text that Nagios keeps whole: no ``|``, which would start perfdata."""
    return text.replace("|", BAR_IN_TEXT)


_STATE_ALIASES = {"WARN": "WARNING", "CRIT": "CRITICAL"}
_SEVERITY = {State.OK: 0, State.UNKNOWN: 1, State.WARNING: 2, State.CRITICAL: 3}
