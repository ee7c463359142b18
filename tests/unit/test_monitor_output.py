"""Plugin output split as Nagios 4 splits it, on every golden output (agents.monitor.output)."""

import pytest

from agents.monitor.aggregate import Aggregate, HostState
from agents.monitor.output import PluginOutput, parse_output
from agents.monitor.states import State

# (plugin command, exact stdout from golden/nagios-plugins.txt, expected split)
GOLDEN = [
    ("check_dummy 0", "OK: all good\n", PluginOutput("OK: all good")),
    ("check_dummy 1", "WARNING: be careful\n", PluginOutput("WARNING: be careful")),
    ("check_dummy 2", "CRITICAL: on fire\n", PluginOutput("CRITICAL: on fire")),
    ("check_dummy 3", "UNKNOWN\n", PluginOutput("UNKNOWN")),
    ("check_dummy 4", "UNKNOWN: Status 4 is not a supported error state\n",
     PluginOutput("UNKNOWN: Status 4 is not a supported error state")),
    ("check_dummy usage",
     "check_dummy: Could not parse arguments\nUsage:\n check_dummy <integer state> [optional text]\n",
     PluginOutput("check_dummy: Could not parse arguments",
                  "Usage:\n check_dummy <integer state> [optional text]\n")),
    ("check_dummy -V", "check_dummy v2.3.3 (monitoring-plugins 2.3.3)\n",
     PluginOutput("check_dummy v2.3.3 (monitoring-plugins 2.3.3)")),
    ("check_dummy multi-line",
     "OK: line one | a=1\nline two\nline three | b=2;3;4\n",
     PluginOutput("OK: line one", "line two\nline three ", "a=1 b=2;3;4")),
    # no space before '|', trailing space after the perfdata
    ("check_load",
     "LOAD WARNING - total load average: 2.96, 4.33, 2.52|load1=2.960;5.000;10.000;0; "
     "load5=4.330;4.000;8.000;0; load15=2.520;3.000;6.000;0; \n",
     PluginOutput("LOAD WARNING - total load average: 2.96, 4.33, 2.52", "",
                  "load1=2.960;5.000;10.000;0; load5=4.330;4.000;8.000;0; load15=2.520;3.000;6.000;0;")),
    ("check_load -r",
     "LOAD WARNING - scaled load average: 1.48, 2.17, 1.26 - total load average: 2.96, 4.33, 2.52|"
     "load1=2.960;;;0; scaled_load1=1.480;0.010;100.000;0; load5=4.330;;;0; "
     "scaled_load5=2.165;0.010;100.000;0; load15=2.520;;;0; scaled_load15=1.260;0.010;100.000;0; \n",
     PluginOutput("LOAD WARNING - scaled load average: 1.48, 2.17, 1.26 - total load average: 2.96, 4.33, 2.52",
                  "",
                  "load1=2.960;;;0; scaled_load1=1.480;0.010;100.000;0; load5=4.330;;;0; "
                  "scaled_load5=2.165;0.010;100.000;0; load15=2.520;;;0; scaled_load15=1.260;0.010;100.000;0;")),
    ("check_load usage",
     "check_load: Could not parse arguments\nUsage:\ncheck_load [-r] -w WLOAD1,WLOAD5,WLOAD15 "
     "-c CLOAD1,CLOAD5,CLOAD15 [-n NUMBER_OF_PROCS]\n",
     PluginOutput("check_load: Could not parse arguments",
                  "Usage:\ncheck_load [-r] -w WLOAD1,WLOAD5,WLOAD15 -c CLOAD1,CLOAD5,CLOAD15 "
                  "[-n NUMBER_OF_PROCS]\n")),
    # ';|' then a leading space and the label '/'
    ("check_disk ok",
     "DISK OK - free space: / 78729MiB (75% inode=97%);| /=26389512192B;216442024755;243497277849;0;270552530944\n",
     PluginOutput("DISK OK - free space: / 78729MiB (75% inode=97%);", "",
                  "/=26389512192B;216442024755;243497277849;0;270552530944")),
    ("check_disk critical",
     "DISK CRITICAL - free space: / 78729MiB (75% inode=97%);| /=26389512192B;2705525309;5411050618;0;270552530944\n",
     PluginOutput("DISK CRITICAL - free space: / 78729MiB (75% inode=97%);", "",
                  "/=26389512192B;2705525309;5411050618;0;270552530944")),
    ("check_disk missing",
     "DISK CRITICAL - /nonexistent is not accessible: No such file or directory\n",
     PluginOutput("DISK CRITICAL - /nonexistent is not accessible: No such file or directory")),
    ("check_procs", "PROCS OK: 114 processes | procs=114;;;0;\n",
     PluginOutput("PROCS OK: 114 processes", "", "procs=114;;;0;")),
    ("check_procs -w -c", "PROCS OK: 114 processes | procs=114;250;400;0;\n",
     PluginOutput("PROCS OK: 114 processes", "", "procs=114;250;400;0;")),
    ("check_procs critical", "PROCS CRITICAL: 114 processes | procs=114;1;2;0;\n",
     PluginOutput("PROCS CRITICAL: 114 processes", "", "procs=114;1;2;0;")),
    # a range inside the perfdata
    ("check_procs -C init -c 1:1",
     "PROCS CRITICAL: 0 processes with command name 'init' | procs=0;;1:1;0;\n",
     PluginOutput("PROCS CRITICAL: 0 processes with command name 'init'", "", "procs=0;;1:1;0;")),
    # no newline at all
    ("check_procs bad range", "Range format incorrect", PluginOutput("Range format incorrect")),
    ("check_users", "USERS OK - 0 users currently logged in |users=0;5;10;0\n",
     PluginOutput("USERS OK - 0 users currently logged in", "", "users=0;5;10;0")),
    ("check_swap",
     "SWAP CRITICAL - 0% free (0MB out of 0MB) - Swap is either disabled, not present, or of zero size. "
     "|swap=0B;0;0;0;0\n",
     PluginOutput("SWAP CRITICAL - 0% free (0MB out of 0MB) - Swap is either disabled, not present, "
                  "or of zero size.", "", "swap=0B;0;0;0;0")),
    ("check_tcp refused", "connect to address 127.0.0.1 and port 1: Connection refused\n",
     PluginOutput("connect to address 127.0.0.1 and port 1: Connection refused")),
    # negate keeps the plugin's OK text while exiting 2: the text is not the state.
    ("negate check_dummy 0", "OK: fine\n", PluginOutput("OK: fine")),
]


@pytest.mark.parametrize(("stdout", "expected"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_golden_output(stdout: str, expected: PluginOutput) -> None:
    parsed = parse_output(stdout)
    assert parsed == expected
    assert not parsed.metrics.errors


@pytest.mark.parametrize(("stdout", "expected"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_render_parses_back(stdout: str, expected: PluginOutput) -> None:
    assert parse_output(parse_output(stdout).render()) == expected


def test_everything_after_the_perfdata_line_is_perfdata() -> None:
    out = parse_output("OK - text\nlong 1\nlong 2 | p1=1\np2=2;3\nnot long either=4\n")
    assert out.text == "OK - text"
    assert out.long_text == "long 1\nlong 2 "
    assert out.perfdata == "p1=1 p2=2;3 not long either=4"
    assert [m.label for m in out.metrics] == ["p1", "p2", "either"]
    assert out.metrics.errors  # "not" and "long" have no '='


def test_only_the_first_bar_splits_the_first_line() -> None:
    out = parse_output("OK a|b=1|c=2")
    assert out.text == "OK a"
    assert out.perfdata == "b=1|c=2"


def test_perfdata_line_starting_with_a_bar() -> None:
    out = parse_output("OK\nlong\n| x=1\n")
    assert out.long_text == "long\n"
    assert out.perfdata == "x=1"


def test_first_and_later_perfdata_are_kept_apart() -> None:
    # Nagios would glue these into "a=1b=2"; we keep a space so both items survive.
    out = parse_output("OK|a=1\nlong|b=2\n")
    assert out.perfdata == "a=1 b=2"
    assert [m.label for m in out.metrics] == ["a", "b"]


def test_empty_and_blank_output() -> None:
    assert parse_output("") == PluginOutput("")
    assert parse_output("\n") == PluginOutput("")
    assert parse_output("  \t\r\n") == PluginOutput("")


def test_leading_bars_are_skipped_like_strtok() -> None:
    assert parse_output("||OK text|a=1") == PluginOutput("OK text", "", "a=1")


def test_carriage_returns_are_stripped_from_text_and_perfdata() -> None:
    out = parse_output("OK done |a=1\r\n")
    assert out == PluginOutput("OK done", "", "a=1")


def test_render_writes_no_space_before_the_bar_and_nothing_but_perfdata_after_it() -> None:
    assert PluginOutput("OK: fine", "", "a=1").render() == "OK: fine|a=1"
    made = PluginOutput("CRITICAL: check 'x|y' failed", "caller said a|b\nand c", "a=1")
    assert made.render() == "CRITICAL: check 'x\u00a6y' failed|a=1\ncaller said a\u00a6b\nand c"
    back = parse_output(made.render())
    assert (back.text, back.long_text, back.perfdata) == ("CRITICAL: check 'x\u00a6y' failed",
                                                         "caller said a\u00a6b\nand c", "a=1")
    assert parse_output(PluginOutput("UNKNOWN: a|b").render()).perfdata == ""


def test_an_aggregate_keeps_host_text_out_of_its_perfdata() -> None:
    hosts = (HostState("db1", State.OK, "OK: fine", "conns=5"),
             HostState("db|2", State.UNKNOWN, "denied: check 'x|y' may not run"))
    out = Aggregate(hosts).render()
    assert out.split("\n") == ["UNKNOWN - 1 OK, 1 UNKNOWN (db\u00a62)|db1:conns=5", "db1: OK: OK: fine",
                               "db\u00a62: UNKNOWN: denied: check 'x\u00a6y' may not run"]
    parsed = parse_output(out)
    assert parsed.perfdata == "db1:conns=5" and not parsed.metrics.errors
