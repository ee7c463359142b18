"""How the command line shows progress (agents/progress_view.py), on a clock the test moves: plain lines
at most one a second per target with phase changes, totals and the last report always shown; a bar
redrawn in place on a terminal; answer counts; notes that stay above the bar; and a workflow followed step
by step with its waits backing off."""

from __future__ import annotations

import io
import re

from agents.errors import Outcome
from agents.progress_view import FOLLOW_FIRST, FOLLOW_MOST, ProgressView, describe, follow_workflow
from agents.report import CallReport, TargetResult

MIB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_are_rate_limited_but_phases_totals_and_the_last_report_show():
    out, clock = io.StringIO(), Clock()
    view = ProgressView(out, clock=clock)
    view.report("s1@d/agent", 1, {"phase": "capturing", "volume": "db"})
    for step in range(1, 9):  # 8 reports in under a second: the first with bytes shows, the rest wait
        clock.now += 0.125
        view.report("s1@d/agent", step + 1, {"phase": "capturing", "volume": "db", "bytes": step * MIB,
                                             "total": 20 * MIB})
    lines = out.getvalue().splitlines()
    assert lines[0] == "s1: capturing volume=db"
    assert re.fullmatch(r"s1: capturing volume=db: 1 MiB of 20 MiB \(5%\), ETA unknown", lines[1]), lines
    assert len(lines) == 2, lines
    clock.now = 102.125  # 2 s after the first count, 8 MiB later: 4 MiB/s, 11 MiB left
    view.report("s1@d/agent", 10, {"phase": "capturing", "volume": "db", "bytes": 9 * MIB, "total": 20 * MIB})
    assert out.getvalue().splitlines()[-1] == "s1: capturing volume=db: 9 MiB of 20 MiB (45%), 4 MiB/s, ETA 2.75 s"
    clock.now += 0.125
    view.report("s1@d/agent", 11, {"phase": "capturing", "volume": "db", "bytes": 20 * MIB, "total": 20 * MIB})
    assert out.getvalue().splitlines()[-1].startswith("s1: capturing volume=db: 20 MiB of 20 MiB (100%), ")
    clock.now += 0.1
    view.report("s1@d/agent", 12, {"phase": "publishing"})  # a new phase shows at once
    clock.now += 0.1
    view.report("s1@d/agent", 13, {"phase": "publishing", "files": 3})  # held back ...
    assert out.getvalue().splitlines()[-1] == "s1: publishing"
    view.close()  # ... and shown at the end
    assert out.getvalue().splitlines()[-1] == "s1: publishing files=3"
    assert "\x1b" not in out.getvalue()


def test_an_agents_own_rate_and_eta_are_shown_as_sent():
    text = describe({"phase": "sending", "snapshot": "s2", "base": None, "bytes": 3 * MIB, "total": 12 * MIB,
                     "rate": 2 * MIB, "eta": 4.5}, plain=True)
    assert text == "sending snapshot=s2: 3 MiB of 12 MiB (25%), 2 MiB/s, ETA 4.5 s"
    # Without a total (a btrfs stream): the bytes and the rate, no percentage and no time left.
    assert describe({"phase": "sending", "bytes": MIB, "total": None, "rate": MIB}, plain=True) == \
        "sending: 1 MiB, 1 MiB/s"


def test_a_terminal_gets_a_bar_redrawn_in_place_and_wiped_at_the_end():
    out, clock = io.StringIO(), Clock()
    view = ProgressView(out, terminal=True, clock=clock)
    view.answered(0, 3)
    view.report("s1@d/agent", 1, {"phase": "cloning", "bytes": 2 * MIB, "total": 8 * MIB, "rate": MIB, "eta": 6})
    shown = out.getvalue()
    assert "[-----" in shown and "0 of 3 answered" in shown
    assert "s1  cloning  [#####---------------] 25%  2 MiB of 8 MiB  1 MiB/s  ETA 6 s" in shown
    assert "\x1b[1F\x1b[J" in shown  # the first drawing (one line) went up and was cleared for the second
    view.answered(3, 3)
    view.close()
    assert out.getvalue().endswith("\x1b[2F\x1b[J")  # the bar's two lines, wiped before the result


def test_answer_counts_in_a_pipe_only_for_a_call_still_waiting_after_a_second():
    out, clock = io.StringIO(), Clock()
    quick = ProgressView(out, clock=clock)
    quick.answered(0, 5)
    clock.now += 0.2
    quick.answered(5, 5)
    assert out.getvalue() == ""  # the summary line says as much
    slow = ProgressView(out, clock=clock)
    slow.answered(0, 5)
    clock.now += 1.5
    slow.answered(2, 5)
    clock.now += 0.1
    slow.answered(3, 5)
    clock.now += 0.1
    slow.answered(5, 5)
    assert out.getvalue().splitlines() == ["2 of 5 answered", "5 of 5 answered"]


def test_notes_are_lines_that_stay_above_the_bar():
    out, clock = io.StringIO(), Clock()
    view = ProgressView(out, terminal=True, clock=clock)
    view.report("s1@d/agent", 1, {"phase": "cloning", "bytes": MIB, "total": 4 * MIB})
    view.note("vertebra: s1 accepted the call as job ab12")
    # Wiped, the note written, the bar drawn again below it.
    assert "\x1b[1F\x1b[Jvertebra: s1 accepted the call as job ab12\ns1  cloning" in out.getvalue()
    plain = io.StringIO()
    ProgressView(plain, clock=clock).note("vertebra: s1 is back")
    assert plain.getvalue() == "vertebra: s1 is back\n"


def _status(state: str, *steps: tuple[str, str], error: str = "") -> dict:
    return {"instance": "i1", "workflow": "copy", "state": state, "error": error,
            "steps": [{"name": n, "op": "storage.snapshot.create", "state": s, "target": "st1@d/agent" if s == "ok"
                       else "", "outcome": "", "reason": "", "approved_by": []} for n, s in steps]}


def test_a_workflow_is_followed_step_by_step_with_waits_that_back_off():
    answers = [_status("running", ("snap", "running"), ("clone", "pending")),
               _status("running", ("snap", "running"), ("clone", "pending")),  # nothing new: the wait doubles
               _status("waiting", ("snap", "ok"), ("clone", "held"), error="held"),
               _status("waiting", ("snap", "ok"), ("clone", "held"), error="held"),  # at once: a pause
               _status("done", ("snap", "ok"), ("clone", "ok"))]
    waits, pauses, clock = [], [], Clock()

    def fetch(wait: float, since: str) -> CallReport:
        assert since == ""  # a broker that gives no digest: asked again with backoff
        waits.append(wait)
        return CallReport("workflow.status", [TargetResult("broker", Outcome.OK, answers.pop(0))])

    out = io.StringIO()
    final = follow_workflow(_status("running", ("snap", "pending"), ("clone", "pending")), fetch, out,
                            sleep=pauses.append, clock=clock)
    assert final["state"] == "done" and not answers
    assert waits == [FOLLOW_FIRST, FOLLOW_FIRST, 2 * FOLLOW_FIRST, FOLLOW_FIRST, 2 * FOLLOW_FIRST]
    assert pauses == [FOLLOW_FIRST, FOLLOW_FIRST]  # answers that came at once are not asked again at once
    said = [line.split("  ", 1)[1] for line in out.getvalue().splitlines()]
    assert said == ["step snap (storage.snapshot.create): pending", "step clone (storage.snapshot.create): pending",
                    "instance i1 (copy): running",
                    "step snap (storage.snapshot.create): running",
                    "step snap (storage.snapshot.create): ok on st1", "step clone (storage.snapshot.create): held",
                    "instance i1 (copy): waiting: held",
                    "step clone (storage.snapshot.create): ok on st1", "instance i1 (copy): done"]
    assert FOLLOW_MOST >= 2 * FOLLOW_FIRST


def test_a_broker_that_announces_changes_is_asked_for_the_next_one():
    answers = [dict(_status("running", ("snap", "ok"), ("clone", "running")), changes="b" * 16),
               dict(_status("running", ("snap", "ok"), ("clone", "running")), changes="b" * 16),  # its wait ran out
               dict(_status("running", ("snap", "ok"), ("clone", "running")), changes="c" * 16),  # unseen change
               dict(_status("done", ("snap", "ok"), ("clone", "ok")), changes="d" * 16)]
    asked, pauses, clock = [], [], Clock()

    def fetch(wait: float, since: str) -> CallReport:
        asked.append((wait, since))
        clock.now += wait if len(asked) == 2 else 0.01  # the broker held the second request its whole wait
        return CallReport("workflow.status", [TargetResult("broker", Outcome.OK, answers.pop(0))])

    first = dict(_status("running", ("snap", "running"), ("clone", "pending")), changes="a" * 16)
    final = follow_workflow(first, fetch, io.StringIO(), sleep=pauses.append, clock=clock)
    assert final["state"] == "done"
    assert asked == [(FOLLOW_MOST, "a" * 16), (FOLLOW_MOST, "b" * 16), (FOLLOW_MOST, "b" * 16),
                     (FOLLOW_MOST, "c" * 16)]
    assert pauses == []  # each answer came with a change (shown or not), or after the whole wait


def test_following_ends_with_a_status_request_that_fails():
    failed = CallReport("workflow.status", [TargetResult("broker", Outcome.UNREACHABLE, error="gone")])
    got = follow_workflow(_status("running", ("snap", "running")), lambda wait, since: failed, io.StringIO(),
                          sleep=lambda s: None)
    assert got is failed


def test_a_report_without_a_byte_count_reads_as_words_in_units():
    # Replication's last report: its own sizes and seconds in units, the per-connection detail left out.
    done = {"phase": "done", "snapshot": "r1-000001", "base": None, "stream_bytes": 6 * MIB + 512,
            "sent_bytes": 6 * MIB + 512, "resumed_from": 0, "attempts": 1,
            "connections": [{"resumed_from": 0, "sent_bytes": 6 * MIB + 512}], "seconds": 1.5, "rate": 4 * MIB,
            "action": "r1"}
    assert describe(done, plain=True) == ("done snapshot=r1-000001 stream_bytes=6 MiB sent_bytes=6 MiB"
                                          " resumed_from=0 attempts=1 seconds=1.5 s rate=4 MiB/s action=r1")


def test_a_followed_steps_progress_shows_under_its_line():
    running = _status("running", ("snap", "running"))
    running["steps"][0]["progress"] = {"phase": "capturing", "volume": "db", "bytes": MIB, "total": 2 * MIB}
    done = _status("done", ("snap", "ok"))
    done["steps"][0]["progress"] = {"phase": "capturing", "volume": "db", "bytes": 2 * MIB, "total": 2 * MIB}
    out = io.StringIO()
    follow_workflow(running, lambda wait, since: CallReport("workflow.status", [
        TargetResult("broker", Outcome.OK, done)]), out, sleep=lambda s: None)
    said = [line.split("  ", 1)[-1] for line in out.getvalue().splitlines()]
    assert said[0] == "step snap (storage.snapshot.create): running"
    assert said[1].startswith("step snap: capturing volume=db: 1 MiB of 2 MiB (50%)")
    assert said[3].startswith("step snap: capturing volume=db: 2 MiB of 2 MiB (100%)")
    assert said[4] == "step snap (storage.snapshot.create): ok on st1" and said[-1] == "instance i1 (copy): done"


def test_bar_lines_are_cut_to_the_terminal_so_none_wraps(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    out = io.StringIO()
    view = ProgressView(out, terminal=True, clock=Clock())
    view.report("storage1@d/agent", 1, {"phase": "capturing", "volume": "a-long-volume-name", "bytes": MIB,
                                         "total": 8 * MIB, "rate": MIB, "eta": 7})
    drawn = [line for line in re.split(r"\x1b\[\d*F\x1b\[J", out.getvalue()) if line]
    assert drawn and all(len(line) <= 39 for chunk in drawn for line in chunk.splitlines()), drawn
