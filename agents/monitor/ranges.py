"""Nagios threshold ranges, the one place their rules live, and the check states (``State``, from
``states``, kept apart so that check_vertebra's lean path reads them without loading this module).

Ranges follow the Monitoring Plugins guidelines: ``[@]start:end`` with both ends inclusive; ``10``
means 0..10, ``10:`` means 10..infinity, ``~:10`` means -infinity..10, and a range alerts when the
value lies outside it, or inside it with a leading ``@``. Critical is tested before warning.
The monitor agent and ``check_vertebra`` both evaluate thresholds through this module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .states import State

__all__ = ["State", "Range", "parse_range", "evaluate", "format_number"]


# A decimal number as plugins print it; no inf/nan words, which Python's float() would accept.
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_RANGE_RE = re.compile(rf"(?P<at>@)?(?:(?P<start>{_NUMBER}|~)?(?P<colon>:))?(?P<end>{_NUMBER})?")


def format_number(value: float) -> str:
    """Shortest faithful text for a number: ``10`` rather than ``10.0``, full precision otherwise."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def parse_number(text: str) -> float:
    """Parse a plugin-style decimal number; ValueError names the bad text."""
    if not _NUMBER_RE.fullmatch(text):
        raise ValueError(f"not a number: {text!r}")
    return float(text)


@dataclass(frozen=True)
class Range:
    """An inclusive threshold range; ``inside`` is the ``@`` form (alert inside, not outside)."""

    start: float = 0.0
    end: float = math.inf
    inside: bool = False

    def __post_init__(self) -> None:
        # Normalise ints so equal ranges compare and print alike however they were built.
        object.__setattr__(self, "start", float(self.start))
        object.__setattr__(self, "end", float(self.end))
        if math.isnan(self.start) or math.isnan(self.end):
            raise ValueError("Range format incorrect: NaN is not a range end")
        if self.start > self.end:
            raise ValueError(
                f"Range format incorrect: start {format_number(self.start)} "
                f"is above end {format_number(self.end)}"
            )

    def alerts(self, value: float) -> bool:
        """True when ``value`` should raise the alert this range stands for."""
        within = self.start <= value <= self.end
        return within if self.inside else not within

    @property
    def text(self) -> str:
        """Canonical range text; ``parse_range(r.text) == r``."""
        prefix = "@" if self.inside else ""
        end = "" if self.end == math.inf else format_number(self.end)
        if self.start == 0 and end:
            return f"{prefix}{end}"
        start = "~" if self.start == -math.inf else format_number(self.start)
        return f"{prefix}{start}:{end}"

    def __str__(self) -> str:
        return self.text


def parse_range(text: str) -> Range:
    """Parse ``[@][start:]end`` (``~`` for minus infinity, empty end for infinity).

    Raises ValueError starting "Range format incorrect", the words the plugins use.
    """
    if not isinstance(text, str):
        raise ValueError(f"Range format incorrect: expected text, got {type(text).__name__}")
    body = text.strip()
    match = _RANGE_RE.fullmatch(body)
    # Empty text, a lone "@" or "~", or "5:" style text with nothing at all are not ranges.
    if not match or not (match["end"] or match["colon"]):
        raise ValueError(f"Range format incorrect: {text!r}")
    start_text = match["start"]
    if start_text == "~":
        start = -math.inf
    elif start_text:
        start = float(start_text)
    else:
        start = 0.0
    end = float(match["end"]) if match["end"] else math.inf
    if start > end:
        raise ValueError(
            f"Range format incorrect: {text!r} (start {format_number(start)} "
            f"is above end {format_number(end)})"
        )
    return Range(start, end, inside=bool(match["at"]))


def _as_range(spec: Range | str | None) -> Range | None:
    if spec is None or isinstance(spec, Range):
        return spec
    return parse_range(spec)


def evaluate(value: float, warn: Range | str | None, crit: Range | str | None) -> State:
    """The state of ``value`` against optional warning and critical ranges, critical first."""
    crit_range, warn_range = _as_range(crit), _as_range(warn)
    if crit_range is not None and crit_range.alerts(value):
        return State.CRITICAL
    if warn_range is not None and warn_range.alerts(value):
        return State.WARNING
    return State.OK
