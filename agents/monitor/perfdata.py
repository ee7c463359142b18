"""Nagios performance data: ``'label'=value[UOM];[warn];[crit];[min];[max]``, space separated.

Parsing is tolerant, as real plugins demand: quoted labels with spaces and ``''`` for a quote,
``U`` for an unknown value, missing trailing fields, ranges as thresholds (check_procs), and stray
separators; a malformed item is skipped and reported in ``Perfdata.errors`` while the rest is kept.
Formatting writes the canonical form, so ``parse(format(parse(x))) == parse(x)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from agents.monitor.ranges import Range, format_number, parse_number, parse_range

__all__ = ["PerfDatum", "Perfdata", "parse", "format", "KNOWN_UOMS"]

# The units the guidelines define. Others seen in the wild (KiB, bps, ...) are kept as given.
KNOWN_UOMS = frozenset({"", "s", "ms", "us", "%", "B", "KB", "MB", "GB", "TB", "c"})

_VALUE_RE = re.compile(r"(?P<number>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)(?P<uom>[^\d\s;=']*)")
_NEEDS_QUOTES = re.compile(r"[\s'=]")


@dataclass(frozen=True)
class PerfDatum:
    """One performance-data item; ``value`` is None for ``U`` (the plugin could not measure)."""

    label: str
    value: float | None
    uom: str = ""
    warn: Range | None = None
    crit: Range | None = None
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if not self.label:
            raise ValueError("perfdata label must not be empty")

    def __str__(self) -> str:
        label = self.label
        if _NEEDS_QUOTES.search(label):
            label = "'" + label.replace("'", "''") + "'"
        value = "U" if self.value is None else format_number(self.value) + self.uom
        fields = [
            value,
            "" if self.warn is None else self.warn.text,
            "" if self.crit is None else self.crit.text,
            "" if self.min is None else format_number(self.min),
            "" if self.max is None else format_number(self.max),
        ]
        while len(fields) > 1 and not fields[-1]:
            fields.pop()
        return f"{label}=" + ";".join(fields)

    def as_dict(self) -> dict[str, object]:
        """Plain types for the wire: ranges as their text."""
        return {
            "label": self.label,
            "value": self.value,
            "uom": self.uom,
            "warn": None if self.warn is None else self.warn.text,
            "crit": None if self.crit is None else self.crit.text,
            "min": self.min,
            "max": self.max,
        }


class Perfdata(list[PerfDatum]):
    """The items parsed from one perfdata string, plus a sentence for each item that was skipped."""

    def __init__(self, items: Iterable[PerfDatum] = (), errors: Iterable[str] = ()) -> None:
        super().__init__(items)
        self.errors: list[str] = list(errors)


def parse(text: str) -> Perfdata:
    """Parse a perfdata string; bad items are skipped and described in ``.errors``."""
    items = Perfdata()
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos].isspace():
            pos += 1
        if pos >= end:
            return items
        start = pos
        if text[pos] == "'":
            label, pos = _quoted_label(text, pos)
            if label is None:
                items.errors.append(f"unterminated quote in perfdata item {text[start:]!r}")
                return items
            if pos >= end or text[pos] != "=":
                pos = _skip_token(text, pos)
                items.errors.append(f"no '=' after quoted label in perfdata item {text[start:pos]!r}")
                continue
            pos += 1
            fields_start = pos
            pos = _skip_token(text, pos)
            fields = text[fields_start:pos]
        else:
            pos = _skip_token(text, pos)
            token = text[start:pos]
            label, eq, fields = token.partition("=")
            if not eq:
                items.errors.append(f"no '=' in perfdata item {token!r}")
                continue
        try:
            items.append(_datum(label, fields))
        except ValueError as exc:
            items.errors.append(f"bad perfdata item {text[start:pos]!r}: {exc}")


def format(items: Iterable[PerfDatum]) -> str:  # noqa: A001 - the module's natural verb
    """Canonical perfdata text for ``items``, space separated."""
    return " ".join(str(item) for item in items)


def _quoted_label(text: str, pos: int) -> tuple[str | None, int]:
    """Read a single-quoted label starting at ``text[pos] == "'"``; ``''`` stands for one quote."""
    parts: list[str] = []
    pos += 1
    while True:
        close = text.find("'", pos)
        if close < 0:
            return None, len(text)
        parts.append(text[pos:close])
        if text.startswith("''", close):
            parts.append("'")
            pos = close + 2
            continue
        return "".join(parts), close + 1


def _skip_token(text: str, pos: int) -> int:
    while pos < len(text) and not text[pos].isspace():
        pos += 1
    return pos


def _datum(label: str, fields_text: str) -> PerfDatum:
    if not label:
        raise ValueError("empty label")
    fields = fields_text.split(";")
    if len(fields) > 5:
        # Keep going when the extras are empty: some plugins end every item with stray ';'.
        if any(fields[5:]):
            raise ValueError(f"{len(fields)} fields, at most 5 allowed")
        fields = fields[:5]
    fields += [""] * (5 - len(fields))
    value_text, warn, crit, low, high = fields
    if value_text == "U":
        value, uom = None, ""
    else:
        match = _VALUE_RE.fullmatch(value_text)
        if not match:
            raise ValueError(f"value {value_text!r} is not a number with a unit")
        value, uom = float(match["number"]), match["uom"]
    return PerfDatum(
        label=label,
        value=value,
        uom=uom,
        warn=parse_range(warn) if warn else None,
        crit=parse_range(crit) if crit else None,
        min=_optional_number(low, "min"),
        max=_optional_number(high, "max"),
    )


def _optional_number(text: str, name: str) -> float | None:
    if not text:
        return None
    try:
        return parse_number(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a number") from None
