"""Results as people read them (agents.render): each display hint, tables, blocks and the summary line."""

from __future__ import annotations

from datetime import datetime

import pytest

from agents.errors import Outcome
from agents.ops import Field, Result
from agents.render import block, check_state, duration, human_bytes, local_time, render, show, summary_line, table
from agents.report import CallReport, TargetResult

VOLUMES = Result(Field("name", "volume"), Field("used_bytes", "used", "bytes"), Field("snapshots", display="list"))
CHECK = Result(Field("check"), Field("state", display="state"), Field("duration", display="duration"),
               Field("metrics", display="table", columns=(Field("label", "metric"), Field("value"))),
               summary="state")


@pytest.mark.parametrize("value, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                         (5 * 1024 ** 3, "5 GiB"), (1000 * 1024 ** 2, "1000 MiB"), (None, "-")])
def test_bytes_are_shown_in_human_units(value, text):
    assert show(value, "bytes") == text
    assert value is None or human_bytes(value) == text


def test_a_time_is_shown_as_local_iso_time():
    epoch = 1_796_000_000.25
    assert show(epoch, "time") == datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")
    assert local_time("soon") == "soon" and show(None, "time") == "-"


@pytest.mark.parametrize("seconds, text", [(0.041, "41 ms"), (2.5, "2.5 s"), (200, "3 min 20 s"), (3600, "1 h"),
                                           (7500, "2 h 5 min"), (3 * 86400 + 4 * 3600, "3 d 4 h")])
def test_durations_read_in_the_unit_that_fits(seconds, text):
    assert duration(seconds) == text == show(seconds, "duration")


@pytest.mark.parametrize("value, text", [("CRITICAL", "CRITICAL"), ("warning", "WARNING"), (2, "CRITICAL"),
                                         (3, "UNKNOWN"), (0, "OK")])
def test_check_states_are_named(value, text):
    assert check_state(value) == text == show(value, "state")


def test_lists_maps_and_plain_values_are_words_not_json():
    assert show(["s1", "s2"], "list") == "s1, s2" and show([], "list") == "-"
    assert show({"volume": "db", "developers": ["alice", "bob"]}) == "volume=db, developers=alice, bob"
    assert show([{"name": "warning", "type": "string"}, {"name": "critical"}]) == "warning, critical"
    assert show(True) == "yes" and show(3.0) == "3" and show(None) == "-"


def test_a_table_has_the_declared_columns_aligned():
    lines = table([{"name": "db", "used_bytes": 2048, "snapshots": ["s1"]},
                   {"name": "logs-archive", "used_bytes": 0, "snapshots": []}], VOLUMES.fields)
    assert lines[0].split() == ["VOLUME", "USED", "SNAPSHOTS"]
    assert lines[1].split() == ["db", "2", "KiB", "s1"] and lines[2].split() == ["logs-archive", "0", "B", "-"]
    assert lines[1].index("2 KiB") == lines[0].index("USED") == lines[2].index("0 B")


def test_a_map_is_a_block_with_nested_tables():
    lines = block({"check": "disk", "state": "WARNING", "duration": 0.5,
                   "metrics": [{"label": "/", "value": 91}], "hidden": "not declared"}, CHECK.fields)
    assert lines[:3] == ["check:    disk", "state:    WARNING", "duration: 500 ms"]
    assert lines[3] == "metrics:" and lines[4].split() == ["METRIC", "VALUE"] and lines[5].split() == ["/", "91"]
    assert not any("not declared" in line for line in lines)


def test_an_undeclared_result_is_labelled_lines_never_one_json_line():
    lines = block({"host": "web1", "checks": [{"name": "disk", "timeout": 10}], "tags": ["a", "b"]})
    assert lines == ["host:   web1", "checks:", "  - name:    disk", "    timeout: 10", "tags:   a, b"]


def test_a_list_result_from_several_targets_is_one_table_then_failures_then_the_summary():
    report = CallReport("storage.volume.list", [
        TargetResult("storage1@vertebra.test/agent", Outcome.OK, [{"name": "db", "used_bytes": 1536, "snapshots": []}]),
        TargetResult("storage2@vertebra.test/agent", Outcome.OK, [{"name": "web", "used_bytes": 0}]),
        TargetResult("storage3@vertebra.test/agent", Outcome.TIMEOUT, error="no answer in 30s")])
    lines = render(report, VOLUMES, elapsed=0.041).splitlines()
    assert lines[0].split() == ["TARGET", "VOLUME", "USED", "SNAPSHOTS"]
    assert lines[1].split() == ["storage1", "db", "1.5", "KiB", "-"] and lines[2].split()[:2] == ["storage2", "web"]
    assert lines[3] == "storage3: timeout: no answer in 30s"
    assert lines[4] == "storage.volume.list: 2 of 3 ok, 1 of 3 timeout in 41 ms"


def test_a_check_state_is_counted_as_such_in_the_summary():
    report = CallReport("monitor.check", [TargetResult("monitor1@x/agent", Outcome.OK,
                                                       {"check": "disk", "state": "CRITICAL", "metrics": []})])
    assert summary_line(report, CHECK) == "monitor.check: 1 of 1 CRITICAL"
    text = render(report, CHECK, elapsed=2.5)
    assert text.splitlines()[0] == "monitor1:" and "  state:    CRITICAL" in text.splitlines()
    assert text.endswith("monitor.check: 1 of 1 CRITICAL in 2.5 s") and "1 ok" not in text
    assert summary_line(CallReport("monitor.check"), CHECK) == "monitor.check: no targets"


def test_a_plain_result_stays_on_its_targets_line():
    report = CallReport("sample.echo", [TargetResult("a@x/agent", Outcome.OK, "HELLO"),
                                        TargetResult("a@x/other", Outcome.OK, "HI")])
    assert render(report).splitlines() == ["a@x/agent: HELLO", "a@x/other: HI", "sample.echo: 2 of 2 ok"]


def test_the_chat_bot_pages_a_long_answer_instead_of_cutting_it():
    from broker.chat import pages

    assert pages("short") == ["short"]
    text = "\n".join(f"line {n} " + "x" * 50 for n in range(100)) + "\n" + "y" * 250
    sent = pages(text, size=200)
    assert all(len(p) <= 200 for p in sent) and len(sent) > 30
    assert [p.split("\n", 1)[0] for p in sent] == [f"[page {n}/{len(sent)}]" for n in range(1, len(sent) + 1)]
    assert "\n".join(p.split("\n", 1)[1] for p in sent).replace("\n", "") == text.replace("\n", "")


def test_a_dotted_field_reaches_into_nested_maps():
    spool = Result(Field("spool.transfers", "replication spool", "table",
                         columns=(Field("package"), Field("bytes", "size", "bytes"))))
    lines = block({"spool": {"bytes": 2048, "transfers": [{"package": "p1", "bytes": 2048}]}}, spool.fields)
    assert lines[0] == "replication spool:" and lines[2].split() == ["p1", "2", "KiB"]


def test_a_declared_map_goes_on_lines_of_its_own():
    lines = block({"clusters": {"c1": ["node1", "node2"], "c2": ["node3"]}}, (Field("clusters"),))
    assert lines == ["clusters:", "  c1: node1, node2", "  c2: node3"]


def test_an_empty_list_reads_as_a_sentence_not_a_dash():
    empty = CallReport("mesh.alerts", [TargetResult("broker@x.test/broker", Outcome.OK, result=[])])
    alerts = Result(Field("check"), Field("state", display="state"), empty="no alerts")
    assert render(empty, alerts).splitlines()[0] == "no alerts"
    assert Result.from_description(alerts.describe()) == alerts  # what help and chat learn from the mesh
    assert render(empty, VOLUMES).splitlines()[0] == "(none)"
    assert render(empty).splitlines()[0] == "broker: (none)"  # an op that declares nothing


def test_a_failure_whose_condition_is_failed_says_it_once():
    report = CallReport("job.status", [TargetResult("s1@x.test/agent", Outcome.FAILED, error="failed: s1 has no job j"),
                                       TargetResult("s2@x.test/agent", Outcome.FAILED, error="bad-argument: no such")])
    lines = render(report).splitlines()
    assert lines[:2] == ["s1: failed: s1 has no job j", "s2: failed: bad-argument: no such"]
