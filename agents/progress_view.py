"""A call's progress as people watch it: a bar redrawn in place on a terminal, plain lines elsewhere.

Long ops report progress (``<progress>`` messages, docs/protocol.md); a report that carries ``bytes``
(and, where the agent knows it, ``total``) is shown with its rate and the time left:

    storage1  capturing volume=db  [########------------]  41%  11.2 MiB of 27.3 MiB  4.1 MiB/s  ETA 4 s

A call to many agents also shows how many have answered ("3 of 40 answered"). On a terminal the lines
are redrawn in place, at most every ``REDRAW_EVERY`` seconds (a new phase or a first byte count at
once), and wiped when the call ends, before the result is printed. Anywhere else (a pipe, a log file,
CI) each report is one plain line, at most one a second per target; a report that starts a new phase
or reaches its total is always printed, and the last report of each target is printed at the end if
it was held back, so a log always ends with where each target got to. The answer count is printed
there only for a call still waiting after a second (the result's summary line counts the rest).

An agent's own ``rate`` and ``eta`` are shown when it sends them (the storage agent does); otherwise
they are worked out here from the bytes reported and the time between reports.

A workflow instance is followed (``follow_workflow``) step by step until it ends: a line for each
change of a step or of the instance. Only the standard library
and agents/render.py are used, so a call's start-up stays light.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from .render import duration, human_bytes
from .report import CallReport

PLAIN_EVERY = 1.0      # seconds between plain lines of one target (phase changes and ends always print)
REDRAW_EVERY = 0.1     # seconds between redraws of the bar on a terminal
MAX_BAR_LINES = 8      # targets shown at once on a terminal; the rest are counted on one line
_BAR_WIDTH = 20
_BYTE_KEYS = ("bytes", "total", "rate", "eta")
_SECONDS = ("seconds", "eta", "deadline", "timeout")  # keys whose numbers are seconds


@dataclass
class _Target:
    """What one target last reported, and what was shown of it."""
    payload: Any = None
    first: tuple[float, int] | None = None   # (when, bytes) of its first report with bytes: the rate's origin
    now: float = 0.0
    shown_at: float = -1e9                   # when its last plain line was printed
    shown: Any = None                        # the payload of that line
    phase: Any = None                        # the phase of its last report


class ProgressView:
    """Shows the progress reports and the answer count of one call on ``stream``.

    ``report`` and ``answered`` have the signatures the client calls back with (agents/report.py
    ``ProgressFn``); ``close`` ends the display and must be called before the result is printed."""

    def __init__(self, stream: TextIO, *, terminal: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.terminal, self.clock = stream, terminal, clock
        self._targets: dict[str, _Target] = {}
        self._answered: tuple[int, int] | None = None
        self._started = clock()
        self._answered_at: float | None = None    # when the last plain "answered" line was printed
        self._drawn = 0              # lines of the bar now on the screen
        self._drawn_at = -1e9

    @classmethod
    def for_stream(cls, stream: TextIO) -> "ProgressView":
        """A view on ``stream``: the redrawn bar when it is a terminal, plain lines otherwise."""
        isatty = getattr(stream, "isatty", None)
        return cls(stream, terminal=bool(isatty and isatty()))

    # -- what the call reports --------------------------------------------------------------------------

    def report(self, target: str, seq: int, payload: Any) -> None:
        """One progress report of ``target`` (its ``seq``-th)."""
        now = self.clock()
        t = self._targets.setdefault(target, _Target())
        done = _number(payload.get("bytes")) if isinstance(payload, dict) else None
        phase = payload.get("phase") if isinstance(payload, dict) else None
        news = t.payload is None or phase != t.phase or (done is not None and t.first is None)
        if done is not None and (t.first is None or done < t.first[1]):
            t.first = (now, int(done))   # the first count, or a transfer that started over
        t.payload, t.now, t.phase = payload, now, phase
        if self.terminal:
            self._redraw(now, force=news)
            return
        finished = isinstance(payload, dict) and done is not None and done == _number(payload.get("total"))
        if news or finished or now - t.shown_at >= PLAIN_EVERY:
            self._plain(target, t, now)

    def answered(self, done: int, total: int) -> None:
        """``done`` of the call's ``total`` targets have answered."""
        previous, self._answered = self._answered, (done, total)
        now = self.clock()
        if self.terminal:
            self._redraw(now, force=previous is None or done == total)
        elif total > 1 and now - self._started >= PLAIN_EVERY and (
                (self._answered_at is None and done < total) or (self._answered_at is not None and (
                    done == total or now - self._answered_at >= PLAIN_EVERY))):
            self._answered_at = now
            self._write(f"{done} of {total} answered\n")

    def close(self) -> None:
        """The call has ended: wipe the bar, or print each target's last report if it was held back."""
        if self.terminal:
            self._wipe()
            return
        for target, t in self._targets.items():
            if t.shown is not t.payload:
                self._plain(target, t, self.clock())

    def note(self, line: str) -> None:
        """A line that stays, written above the bar on a terminal (a line written past the view would be
        taken for part of the bar and half wiped): what the command says while the call runs."""
        self._wipe()
        self._write(line + "\n")
        if self.terminal:
            self._redraw(self.clock(), force=True)

    # -- plain lines ------------------------------------------------------------------------------------

    def _plain(self, target: str, t: _Target, now: float) -> None:
        t.shown, t.shown_at = t.payload, now
        self._write(f"{_short(target)}: {describe(t.payload, _rate(t), plain=True)}\n")

    # -- the bar ----------------------------------------------------------------------------------------

    def _redraw(self, now: float, force: bool = False) -> None:
        if not force and now - self._drawn_at < REDRAW_EVERY:
            return
        self._drawn_at = now
        width = self._columns() - 1  # a line that wraps would take two lines the wipe does not count
        lines = []
        targets = list(self._targets.items())
        for target, t in targets[-MAX_BAR_LINES:]:
            lines.append(f"{_short(target)}  {describe(t.payload, _rate(t))}")
        if len(targets) > MAX_BAR_LINES:
            lines.insert(0, f"... and {len(targets) - MAX_BAR_LINES} more reporting")
        if self._answered is not None and self._answered[1] > 1:
            done, total = self._answered
            lines.append(f"{bar(done, total)}  {done} of {total} answered")
        self._wipe()
        self._write("".join(line[:width] + "\n" for line in lines))
        self._drawn = len(lines)

    def _columns(self) -> int:
        """The terminal's width: $COLUMNS if set, else the stream's own terminal's (stdout may be a file
        while stderr is the terminal), else 100."""
        columns = os.environ.get("COLUMNS", "")
        if columns.isdigit() and int(columns) > 0:
            return int(columns)
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 100
        except (AttributeError, OSError, ValueError):
            return 100

    def _wipe(self) -> None:
        if self._drawn:
            # Up to the first line of the bar, then clear from there to the end of the screen.
            self._write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (BrokenPipeError, ValueError):  # the reader went away: progress is not worth failing for
            pass


def describe(payload: Any, rate: tuple[float | None, float | None] = (None, None), *, plain: bool = False) -> str:
    """One report as words: its phase and other fields, then bytes done (of the total), the rate and the
    time left; on a terminal (``plain`` false) with a bar when the total is known. ``rate`` is (bytes
    a second, seconds left) as worked out here, used where the report does not carry its own."""
    if not isinstance(payload, dict):
        return str(payload)
    words = [str(payload["phase"])] if payload.get("phase") else []
    done, total = _number(payload.get("bytes")), _number(payload.get("total"))
    words += [f"{k}={_value(k, v)}" for k, v in payload.items() if k != "phase" and v is not None
              and not (done is not None and k in _BYTE_KEYS) and not _nested(v)]
    if done is None:
        return " ".join(words)
    speed = _number(payload.get("rate"))
    eta = _number(payload.get("eta")) if "eta" in payload else None
    if speed is None:
        speed = rate[0]
    if eta is None and "eta" not in payload:
        eta = rate[1] if total is not None else None
    amounts = [human_bytes(done) + (f" of {human_bytes(total)}" if total else "")]
    if total and not plain:
        amounts.insert(0, f"{bar(done, total)} {min(100, int(100 * done / total))}%")
    elif total:
        amounts[0] += f" ({min(100, int(100 * done / total))}%)"
    if speed is not None:
        amounts.append(f"{human_bytes(speed)}/s")
    if total and done < total:
        amounts.append("ETA unknown" if eta is None else "ETA <1 s" if eta < 1 else f"ETA {duration(eta)}")
    head = " ".join(words)
    if plain:
        return f"{head}: {', '.join(amounts)}" if head else ", ".join(amounts)
    return "  ".join([head, *amounts] if head else amounts)


def bar(done: float, total: float, width: int = _BAR_WIDTH) -> str:
    """``[#####---------------]``: ``done`` of ``total``."""
    filled = 0 if total <= 0 else max(0, min(width, int(width * done / total)))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _rate(t: _Target) -> tuple[float | None, float | None]:
    """Bytes a second since the target's first count, and the seconds left at that rate."""
    if t.first is None or not isinstance(t.payload, dict):
        return None, None
    done, total = _number(t.payload.get("bytes")), _number(t.payload.get("total"))
    elapsed = t.now - t.first[0]
    if done is None or elapsed <= 0:
        return None, None
    speed = (done - t.first[1]) / elapsed
    left = (total - done) / speed if total is not None and speed > 0 else None
    return speed, left


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _value(key: str, value: Any) -> str:
    """A report's value as a word: byte counts in units, seconds as a duration, lists joined by commas."""
    if _number(value) is not None and key in _SECONDS:
        return duration(value)
    if _number(value) is not None and (key.endswith("bytes") or key == "rate"):
        return f"{human_bytes(value)}/s" if key == "rate" else human_bytes(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _nested(value: Any) -> bool:
    """Maps, and lists holding maps or lists: detail for the result, not for a line of progress."""
    return isinstance(value, dict) or (isinstance(value, (list, tuple))
                                       and any(isinstance(v, (dict, list, tuple)) for v in value))


def _short(target: str) -> str:
    """A target by its account (``storage1``), as the result's lines name it."""
    return target.split("@", 1)[0] if "@" in target else target


# -- following a workflow instance -------------------------------------------------------------------

#: A workflow instance's states that never change again, and the exit code each ends a follower with.
WORKFLOW_ENDS = {"done": 0, "failed": 1, "cancelled": 1}
FOLLOW_FIRST = 0.5     # seconds the broker may hold a status request, after a change
FOLLOW_MOST = 8.0      # ... and at most (what workflow.status's wait allows), while nothing changes


def follow_workflow(status: dict[str, Any], fetch: Callable[[float, str], CallReport], stream: TextIO, *,
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> dict[str, Any] | CallReport:
    """Follow a workflow instance from its ``status`` until it ends, writing a line on ``stream`` for each
    change of a step or of the instance, and a running step's progress as a call's (a bar on a terminal,
    plain lines elsewhere: ``ProgressView``); return its last status (in one of ``WORKFLOW_ENDS``), or
    the report of a status request that failed.

    ``fetch(wait, since)`` is a ``workflow.status`` request. The broker announces each change of an
    instance: given ``since`` (the status's ``changes`` digest) it answers at the instance's next change,
    or after ``wait`` seconds (``FOLLOW_MOST``), so each step shows as it happens. A status without a
    digest (a broker that does not announce changes) is asked again with backoff: after a change the
    next request waits ``FOLLOW_FIRST`` (the broker holds it until the instance stops running), while
    nothing changes the wait doubles up to ``FOLLOW_MOST``. Either way an answer that came at once with
    nothing new is followed by a pause of the rest of its wait, so nothing is asked in a loop."""
    view = ProgressView.for_stream(stream)
    seen: dict[str, Any] = {}
    wait, rest, since = FOLLOW_FIRST, 0.0, ""
    try:
        while True:
            changed = _show_changes(status, seen, view)
            if status.get("state") in WORKFLOW_ENDS:
                return status
            # Something changed that no line shows (a performer taken, the time it was updated): ask now.
            moved = changed or str(status.get("changes") or "") != since
            if not moved and rest > 0:
                sleep(rest)
            since = str(status.get("changes") or "")
            wait = FOLLOW_MOST if since else FOLLOW_FIRST if changed else min(wait * 2, FOLLOW_MOST)
            asked = clock()
            report = fetch(wait, since)
            if not report.ok:
                return report
            status = report.results[0].result
            rest = wait - (clock() - asked)
    finally:
        view.close()


def _show_changes(status: dict[str, Any], seen: dict[str, Any], view: ProgressView) -> bool:
    """For each step, its new progress report to ``view``, and a line when its state (or what it waits
    for) differs from ``seen``; then a line for the instance if it changed. Whether anything did."""
    changed = False
    now = time.strftime("%H:%M:%S")
    for step in status.get("steps") or ():
        name = step["name"]
        progress = step.get("progress")
        news = progress is not None and seen.get("progress " + name) != progress
        if news:
            seen["progress " + name] = progress
            changed = True
        if news and step.get("state") in ("ok", "failed"):  # where it got to, then how it ended
            view.report(f"step {name}", 0, progress)
        key: tuple[Any, ...] = (step.get("state"), step.get("target"), step.get("outcome"), step.get("reason"),
                                len(step.get("approved_by") or ()))
        if seen.get("step " + name) != key:
            seen["step " + name] = key
            words = f"{now}  step {name} ({step.get('op')}): {step.get('state')}"
            if step.get("target"):
                words += f" on {_short(str(step['target']))}"
            if step.get("approved_by"):
                words += f", approved by {', '.join(map(_short, step['approved_by']))}"
            if step.get("reason") and step.get("state") != "ok":
                words += f": {step['reason']}"
            view.note(words)
            changed = True
        if news and step.get("state") not in ("ok", "failed"):  # running: its line, then how far it is
            view.report(f"step {name}", 0, progress)
    key = (status.get("state"), status.get("error"))
    if seen.get("instance") != key:
        seen["instance"] = key
        view.note(f"{now}  instance {status.get('instance')} ({status.get('workflow')}): {status.get('state')}"
                  + (f": {status['error']}" if status.get("error") else ""))
        changed = True
    return changed
