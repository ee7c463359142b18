"""Check states: OK, WARNING, CRITICAL, UNKNOWN, their exit codes, names and order of severity; and
``plain_text`` (from ``exit_codes``, where a plugin's lean path has it without enum), which keeps text
Vertebra writes as plugin output from being read as perfdata.

Apart from the threshold ranges (``ranges``, which re-exports ``State``), whose parser costs a program
about 9 ms to import.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from agents.monitor.exit_codes import BAR_IN_TEXT as BAR_IN_TEXT, plain_text as plain_text


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


_STATE_ALIASES = {"WARN": "WARNING", "CRIT": "CRITICAL"}
_SEVERITY = {State.OK: 0, State.UNKNOWN: 1, State.WARNING: 2, State.CRITICAL: 3}
