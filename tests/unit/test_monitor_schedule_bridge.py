"""Pure parts of the monitor agent: soft/hard states, the external command line, aggregation of a
call report, settings errors and check_vertebra's command line."""

from __future__ import annotations

import random

import pytest

from agents.report import CallReport, TargetResult
from agents.errors import BadArguments, Outcome
from agents.monitor.agent import parse_pairs
from agents.monitor.aggregate import aggregate
from agents.monitor.bridge import MAX_COMMAND, MAX_OUTPUT, CheckResultSpool, check_result_file, command_line
from agents.monitor.check_vertebra import main as check_vertebra
from agents.monitor.ranges import State
from agents.monitor.schedule import StateChange, StateTracker, next_delay
from agents.monitor.settings import SettingsError, parse_settings

OK, WARN, CRIT = State.OK, State.WARNING, State.CRITICAL


def feed(tracker: StateTracker, states: list[State]) -> list[StateChange | None]:
    return [tracker.observe(s) for s in states]


def test_a_change_counts_only_after_enough_repeats_and_recovery_alerts_too() -> None:
    t = StateTracker(repeats=3)
    assert feed(t, [OK, OK, OK]) == [None, None, None]  # starting healthy is not news
    assert t.hard is OK
    assert feed(t, [CRIT, CRIT]) == [None, None] and not t.is_hard and t.hard is OK
    assert t.observe(CRIT) == StateChange(OK, CRIT) and t.is_hard
    assert t.observe(CRIT) is None  # already hard: no repeat alert
    assert feed(t, [OK, OK, OK])[-1] == StateChange(CRIT, OK)


def test_flapping_never_becomes_hard_and_a_first_problem_is_announced() -> None:
    t = StateTracker(repeats=2)
    assert feed(t, [OK, OK, CRIT, OK, CRIT, OK, CRIT, OK]) == [None] * 8
    first = StateTracker(repeats=1)
    assert first.observe(WARN) == StateChange(None, WARN)
    with pytest.raises(ValueError):
        StateTracker(0)


def test_jittered_delay_stays_within_its_bounds() -> None:
    rng = random.Random(7)
    delays = [next_delay(10, 0.2, rng) for _ in range(200)]
    assert min(delays) >= 8 and max(delays) <= 12 and len(set(delays)) > 100
    assert next_delay(5, 0, rng) == 5


def test_command_line_escapes_newlines_and_fits_one_atomic_write() -> None:
    line = command_line("web1", "Disk /", CRIT, "DISK CRITICAL\nlong one\r\nlong two | a=1", when=1700000000)
    assert line == ("[1700000000] PROCESS_SERVICE_CHECK_RESULT;web1;Disk /;2;"
                    "DISK CRITICAL\\nlong one\\nlong two | a=1\n")
    assert command_line("h", "s", OK, "C:\\path").endswith(";0;C:\\\\path\n")
    huge = command_line("h", "s", OK, "x" * 10_000 + "\n")
    assert len(huge.encode()) <= MAX_COMMAND and huge.endswith("x\n") and huge.count("\n") == 1
    for bad in ("a;b", "a\nb", ""):
        with pytest.raises(ValueError):
            command_line(bad, "s", OK, "x")


def test_command_line_never_ends_in_half_an_escape() -> None:
    for tail in ("\\", "\n", "\\\\", "é"):
        for pad in range(4):
            line = command_line("h", "s", OK, "x" * (MAX_COMMAND - 100 + pad) + tail * 60)
            output = line.split(";", 4)[4][:-1]
            assert len(line.encode()) <= MAX_COMMAND and output.startswith("x") and output[-1] != "x"
            assert (len(output) - len(output.rstrip("\\"))) % 2 == 0, output[-6:]


def test_check_result_file_is_what_nagios_4_reads() -> None:
    text = check_result_file("web1", "Disk /", CRIT, "DISK CRITICAL\nlong one\\x | a=1", start=1700000000.25,
                             finish=1700000001.000007, latency=0.5, when=1700000002)
    assert text == ("### Passive Check Result File ###\n"
                    "file_time=1700000002\n"
                    "\n"
                    "### Nagios Service Check Result ###\n"
                    "host_name=web1\n"
                    "service_description=Disk /\n"
                    "check_type=1\n"
                    "check_options=0\n"
                    "scheduled_check=0\n"
                    "reschedule_check=0\n"
                    "latency=0.500000\n"
                    "start_time=1700000000.250000\n"
                    "finish_time=1700000001.7\n"
                    "early_timeout=0\n"
                    "exited_ok=1\n"
                    "return_code=2\n"
                    "output=DISK CRITICAL\\nlong one\\\\x | a=1\n")
    huge = check_result_file("h", "s", OK, "y" * 20_000, start=1, finish=2)
    assert huge.endswith("output=" + "y" * MAX_OUTPUT + "\n")
    for bad in ("a\nb", ""):
        with pytest.raises(ValueError):
            check_result_file(bad, "s", OK, "x", start=1, finish=2)


async def test_spool_files_appear_complete_with_their_ok_marker(tmp_path) -> None:
    spool = CheckResultSpool(str(tmp_path))
    written = [await spool.write(f"result {i}\n") for i in range(50)]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(set(written)) == 50
    assert names == sorted([n.rsplit("/", 1)[1] for n in written] + [n.rsplit("/", 1)[1] + ".ok" for n in written])
    for path in written:
        name = path.rsplit("/", 1)[1]
        assert len(name) == 7 and name[0] == "c" and name[1:].isalnum()  # what Nagios 4 picks up
        assert open(path).read() == f"result {written.index(path)}\n"
    with pytest.raises(OSError, match="check result directory"):
        await CheckResultSpool(str(tmp_path / "missing")).write("x\n")


def test_aggregate_counts_missing_hosts_as_unknown() -> None:
    report = CallReport("monitor.check", [
        TargetResult("a@d/agent", Outcome.OK, {"code": 0, "host": "db1", "text": "OK", "perfdata": "x=1"}),
        TargetResult("b@d/agent", Outcome.DENIED, error="denied: no"),
        TargetResult("c@d/agent", Outcome.OK, {"code": 1, "host": "db3", "text": "WARN", "perfdata": "'a b'=2"}),
    ])
    agg = aggregate(report)
    assert agg.worst is WARN  # UNKNOWN does not hide a WARNING
    assert agg.summary() == "1 OK, 1 WARNING (db3), 1 UNKNOWN (b)"
    assert agg.perfdata() == "db1:x=1 'db3:a b'=2"
    assert "b: UNKNOWN: denied: denied: no" in agg.render()
    assert aggregate(CallReport("monitor.check")).worst is State.UNKNOWN


def test_check_arguments_are_name_value_words() -> None:
    assert parse_pairs(["warn=10:", "text=a=b"]) == {"warn": "10:", "text": "a=b"}
    for bad in (["novalue"], ["=x"], ["a=1", "a=2"]):
        with pytest.raises(BadArguments):
            parse_pairs(bad)


@pytest.mark.parametrize("settings, message", [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"max_concurrent": 0}, "max_concurrent"),
    ({"checks": {"x": {"plugin": "relative"}}}, "absolute path"),
    ({"schedule": {"nope": {}}}, "no check named 'nope'"),
    ({"schedule": {"load": {"args": {"colour": "red"}}}}, "does not take argument(s) 'colour'"),
    ({"schedule": {"load": {"interval": -1}}}, "schedule.load.interval"),
    ({"nagios": {"command_file": "rel", "hosts": {"a": "b"}}}, "absolute path"),
    ({"nagios": {"command_file": "/x", "hosts": {}}}, "nagios.hosts"),
    ({"nagios": {"command_file": "/x", "hosts": {"a": "b;c"}}}, "without ';'"),
    ({"nagios": {"hosts": {"a": "b"}}}, "exactly one of command_file"),
    ({"nagios": {"command_file": "/x", "check_result_path": "/y", "hosts": {"a": "b"}}}, "exactly one of"),
    ({"nagios": {"check_result_path": "spool", "hosts": {"a": "b"}}}, "nagios.check_result_path"),
])
def test_bad_settings_name_the_field(settings: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=None) as exc:
        parse_settings(settings)
    assert message in str(exc.value)


def test_default_settings_use_the_default_catalogue() -> None:
    conf = parse_settings(None)
    assert {"load", "disk", "procs", "users", "dummy"} <= set(conf.checks)
    assert conf.max_concurrent == 8 and conf.schedule == () and conf.bridge is None


def test_check_vertebra_usage_help_and_version_exit_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_vertebra(["-V"]) == 3 and "check_vertebra v" in capsys.readouterr().out
    assert check_vertebra(["-h"]) == 3 and "-H HOST" in capsys.readouterr().out
    assert check_vertebra(["-H", "a"]) == 3 and "-c CHECK" in capsys.readouterr().out
    assert check_vertebra(["-H", "a", "-R", "/b", "-c", "x"]) == 3 and "not allowed" in capsys.readouterr().out
    assert check_vertebra(["-H", "a", "-c", "x", "-t", "0"]) == 3 and "timeout" in capsys.readouterr().out
    assert check_vertebra(["-H", "a", "-c", "x", "-t", "5:SOMETIMES"]) == 3
    assert "not a check state" in capsys.readouterr().out
