"""Results as people read them: the text the CLI prints and the chat bot sends for a call's report.

An op declares what it answers (``Result`` and ``Field`` on its ``@op``, agents/ops.py) and publishes
that with its description, so whoever renders needs only the description, none of the kind's code.
A result that is a list becomes one table of the declared columns (with a TARGET column when several
targets answered); a map becomes a block of labelled lines per target. Each field is shown as its
display says: ``bytes`` in human units, ``time`` (epoch seconds) as local ISO time, ``duration`` in
ms, s, min or h, ``state`` as a check state, ``list`` as comma-separated words, ``table`` (a list of
maps) as a nested table. An op that declares nothing is shown as labelled lines of its keys, nested
values indented: never one long line of JSON. Failed targets follow with their error, and a summary
line ends it all ("storage.volume.list: 3 of 3 ok in 41 ms"); an op whose result declares a
``summary`` field is counted by that field's values instead of "ok" ("monitor.check: 1 of 1 CRITICAL").
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from .errors import Outcome
from .ops import Field, Result
from .report import CallReport

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_NONE = "-"  # what an absent value is shown as


# -- one value -------------------------------------------------------------------------------------

def human_bytes(value: Any) -> str:
    """``1536`` -> ``1.5 KiB``: powers of 1024, three significant figures."""
    if not _is_number(value):
        return _text(value)
    size, unit = float(value), 0
    while abs(size) >= 1024 and unit < len(_BYTE_UNITS) - 1:
        size, unit = size / 1024, unit + 1
    if unit == 0:
        return f"{int(size)} B"
    return f"{size:.3g} {_BYTE_UNITS[unit]}" if abs(size) < 1000 else f"{size:.0f} {_BYTE_UNITS[unit]}"


def local_time(value: Any) -> str:
    """Epoch seconds as local ISO time to the second (``2026-12-05T17:40:03+00:00``)."""
    if not _is_number(value):
        return _text(value)
    try:
        return datetime.fromtimestamp(float(value)).astimezone().isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return _text(value)


def duration(value: Any) -> str:
    """Seconds in the unit that reads best: ``41 ms``, ``2.5 s``, ``3 min 20 s``, ``2 h 5 min``, ``3 d 4 h``."""
    if not _is_number(value):
        return _text(value)
    seconds = float(value)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.3g} s"
    for size, unit, smaller, smaller_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "min"), (60, "min", 1, "s")):
        if seconds >= size:
            whole, rest = divmod(round(seconds), size)
            part = rest // smaller
            return f"{whole} {unit} {part} {smaller_unit}" if part else f"{whole} {unit}"
    return f"{seconds:g} s"  # not reached


def check_state(value: Any) -> str:
    """A check state by name, whether sent as its name or its exit code."""
    if isinstance(value, int) and not isinstance(value, bool):
        from .monitor.states import State  # the one table of check states (standard library only)

        try:
            return State(value).name
        except ValueError:
            return str(value)
    return _text(value).upper()


def show(value: Any, display: str = "text") -> str:
    """One value on one line, as ``display`` says (a table's cell, a block's line)."""
    if value is None:
        return _NONE
    if display == "bytes":
        return human_bytes(value)
    if display == "time":
        return local_time(value)
    if display == "duration":
        return duration(value)
    if display == "state":
        return check_state(value)
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (Mapping, list, tuple)) for v in value):
        return ", ".join(map(_text, value)) or _NONE
    return _text(value)


def _text(value: Any) -> str:
    if value is None:
        return _NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer() and not math.isinf(value):
        return str(int(value))
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, Mapping):  # e.g. a workflow's parameters: name=value words
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items()) or _NONE
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) and "name" in v for v in value):
        return ", ".join(_text(v["name"]) for v in value)  # things by name (a check's arguments)
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_text, value)) or _NONE
    return json.dumps(value, sort_keys=True, default=str)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- tables and blocks -----------------------------------------------------------------------------

def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Field] = ()) -> list[str]:
    """Lines of a table: a heading line, then a line per row; columns as declared, else every key."""
    if not columns:
        names: dict[str, None] = {}
        for row in rows:
            names.update(dict.fromkeys(row))
        columns = [Field(n) for n in names]
    cells = [[c.heading.upper() for c in columns]]
    cells += [[show(row.get(c.name), c.display) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells]


def block(value: Any, fields: Sequence[Field] = ()) -> list[str]:
    """Lines showing one target's result: the declared fields of a map as ``Label: value`` (tables
    nested below their label), or every key of an undeclared map, nested values indented."""
    if isinstance(value, Mapping):
        declared = list(fields) or [Field(str(k)) for k in value]
        width = max((len(f.heading) for f in declared), default=0) + 1
        lines = []
        for f in declared:
            item = _get(value, f.name)
            # A table, a nested value of an undeclared result, or a map (a workflow's parameters, a fencing
            # agent's nodes by cluster) goes on lines of its own under its label.
            if f.display == "table" or (not fields and _nested(item)) or (isinstance(item, Mapping) and item):
                lines.append(f"{f.heading}:")
                if isinstance(item, (list, tuple)) and f.display == "table":
                    rows = [r for r in item if isinstance(r, Mapping)]
                    lines += ["  " + line for line in table(rows, f.columns)] if rows else ["  (none)"]
                else:
                    lines += ["  " + line for line in block(item)]
            else:
                lines.append(f"{f.heading + ':':<{width}} {show(item, f.display)}".rstrip())
        return lines
    if isinstance(value, (list, tuple)):
        if fields and value and all(isinstance(v, Mapping) for v in value):
            return table(value, fields)
        if not _nested(value):
            return [show(value)]
        lines = []
        for item in value:
            inner = block(item) or [_NONE]
            lines += ["- " + inner[0]] + ["  " + line for line in inner[1:]]
        return lines or ["(none)"]
    text = show(value)
    return text.splitlines() or [text]


def _get(value: Mapping[str, Any], name: str) -> Any:
    """``value[name]``; a dotted name reaches into nested maps (``spool.transfers``)."""
    if name in value or "." not in name:
        return value.get(name)
    found: Any = value
    for key in name.split("."):
        found = found.get(key) if isinstance(found, Mapping) else None
    return found


def _nested(value: Any) -> bool:
    """Whether ``value`` needs lines of its own (a map, or a list holding maps or lists)."""
    if isinstance(value, Mapping):
        return bool(value)
    return isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in value)


# -- a whole report --------------------------------------------------------------------------------

def outcome_counts(report: CallReport, result: Result | None = None) -> dict[str, int]:
    """Targets by outcome (``{"ok": 2, "timeout": 1}``); a result's ``summary`` field counts the ok
    answers by its shown value instead (``{"CRITICAL": 1}``)."""
    counts: dict[str, int] = {}
    for r in report.results:
        label = r.outcome.value
        if (r.outcome is Outcome.OK and result is not None and result.summary and isinstance(r.result, Mapping)
                and r.result.get(result.summary) is not None):
            display = next(f.display for f in result.fields if f.name == result.summary)
            label = show(r.result[result.summary], display)
        counts[label] = counts.get(label, 0) + 1
    return counts


def summary_line(report: CallReport, result: Result | None = None, elapsed: float | None = None) -> str:
    """``OP: 3 of 3 ok in 41 ms``; a result's ``summary`` field counts instead of ok (``1 of 1 CRITICAL``)."""
    counts = outcome_counts(report, result)
    total = len(report.results)
    text = ", ".join(f"{n} of {total} {label}" for label, n in counts.items()) or "no targets"
    return f"{report.op}: {text}" + (f" in {duration(elapsed)}" if elapsed is not None else "")


def render(report: CallReport, result: Result | None = None, elapsed: float | None = None) -> str:
    """The report as text: the answers (one table, or a block per target), the failures, a summary."""
    names = _names([r.target for r in report.results])
    answered = [r for r in report.results if r.outcome is Outcome.OK]
    fields = result.fields if result is not None else ()
    lines: list[str] = []
    if answered and fields and all(isinstance(r.result, list) for r in answered):
        rows = [dict(row, **({"\0target": names[r.target]} if len(answered) > 1 else {}))
                for r in answered for row in r.result if isinstance(row, Mapping)]
        columns = ([Field("\0target", "target")] if len(answered) > 1 else []) + list(fields)
        lines += table(rows, columns) if rows else [(result.empty if result is not None else "") or "(none)"]
    else:
        for r in answered:
            inner = block(r.result, fields) if r.result != [] else [(result.empty if result else "") or "(none)"]
            if r.result == [] or len(inner) == 1 and not isinstance(r.result, (Mapping, list, tuple)) or not inner:
                lines.append(f"{names[r.target]}: {inner[0] if inner else _NONE}")
            else:
                lines += [f"{names[r.target]}:"] + ["  " + line for line in inner]
    for r in report.results:
        if r.outcome is not Outcome.OK:
            # An error sent with a condition that is the outcome's own name ("failed: ...") says it once.
            error = (r.error or "").removeprefix(f"{r.outcome.value}: ")
            lines.append(f"{names[r.target]}: {r.outcome.value}" + (f": {error}" if error else ""))
    lines.append(summary_line(report, result, elapsed))
    return "\n".join(lines)


def _names(targets: Sequence[str]) -> dict[str, str]:
    """Each target by its account (``storage1``), or in full where two share an account."""
    short = {t: t.split("@", 1)[0] if "@" in t else t for t in targets}
    taken: dict[str, int] = {}
    for name in short.values():
        taken[name] = taken.get(name, 0) + 1
    return {t: name if taken[name] == 1 else t for t, name in short.items()}
