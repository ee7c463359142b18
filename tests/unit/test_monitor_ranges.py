"""Threshold ranges and states by the Monitoring Plugins guidelines (agents.monitor.ranges)."""

import math

import pytest

from agents.monitor.ranges import Range, State, evaluate, parse_range


@pytest.mark.parametrize(
    ("text", "value", "alerts"),
    [
        # "10": alert outside 0..10, both ends inclusive; a negative value is outside.
        ("10", 0, False),
        ("10", 10, False),
        ("10", 10.0001, True),
        ("10", -1, True),
        ("10", -0.5, True),
        # "10:": alert below 10.
        ("10:", 10, False),
        ("10:", 9.99, True),
        ("10:", 1e12, False),
        # "~:10": alert above 10, anything low is fine.
        ("~:10", -1e9, False),
        ("~:10", 10, False),
        ("~:10", 10.5, True),
        # "10:20": alert outside, ends inclusive.
        ("10:20", 10, False),
        ("10:20", 20, False),
        ("10:20", 9, True),
        ("10:20", 21, True),
        # "@10:20": alert inside, ends inclusive.
        ("@10:20", 10, True),
        ("@10:20", 20, True),
        ("@10:20", 15, True),
        ("@10:20", 9.9, False),
        ("@10:20", 20.1, False),
        # negatives and floats
        ("-10:-5", -7, False),
        ("-10:-5", -4, True),
        ("-10:-5", -10.5, True),
        ("@-1.5:1.5", 0, True),
        ("0.5:", 0.25, True),
        ("~:", -1e300, False),
        ("@~:0", -3, True),
        ("1:1", 1, False),
        ("1:1", 0, True),
    ],
)
def test_range_alerts(text: str, value: float, alerts: bool) -> None:
    assert parse_range(text).alerts(value) is alerts


def test_range_fields() -> None:
    assert parse_range("10") == Range(0, 10)
    assert parse_range("10:") == Range(10, math.inf)
    assert parse_range("~:10") == Range(-math.inf, 10)
    assert parse_range("@10:20") == Range(10, 20, inside=True)
    assert parse_range("1e3:") == Range(1000, math.inf)


@pytest.mark.parametrize(
    "text", ["10", "10:", "~:10", "10:20", "@10:20", "-3.5:7.25", "@~:0", "~:", "0:", "1e-05:2"]
)
def test_range_text_round_trips(text: str) -> None:
    parsed = parse_range(text)
    assert parse_range(parsed.text) == parsed
    assert str(parsed) == parsed.text


@pytest.mark.parametrize("text", ["", " ", "@", "~", "10:x", "x", "20:10", "-5", "1:2:3", "inf", "nan:", "10::"])
def test_bad_range_is_refused_with_the_plugins_words(text: str) -> None:
    with pytest.raises(ValueError, match="^Range format incorrect"):
        parse_range(text)


def test_range_object_refuses_inverted_ends() -> None:
    with pytest.raises(ValueError, match="Range format incorrect"):
        Range(5, 1)


def test_evaluate_tests_critical_before_warning() -> None:
    # 15 alerts for both ranges: critical must win.
    assert evaluate(15, "10", "12") is State.CRITICAL
    assert evaluate(11, "10", "12") is State.WARNING
    assert evaluate(5, "10", "12") is State.OK
    assert evaluate(5, None, None) is State.OK
    assert evaluate(5, parse_range("@0:10"), None) is State.WARNING
    with pytest.raises(ValueError, match="Range format incorrect"):
        evaluate(5, "oops", None)


def test_state_codes_and_parse() -> None:
    assert [int(s) for s in State] == [0, 1, 2, 3]
    assert State.parse("critical") is State.CRITICAL
    assert State.parse("Warn") is State.WARNING
    assert State.parse("3") is State.UNKNOWN
    assert State.parse(0) is State.OK
    for bad in ("fine", "4", 7, True):
        with pytest.raises(ValueError, match="not a check state"):
            State.parse(bad)


def test_worst_state_order() -> None:
    assert State.worst([State.OK, State.UNKNOWN]) is State.UNKNOWN
    assert State.worst([State.UNKNOWN, State.WARNING, State.OK]) is State.WARNING
    assert State.worst([0, 2, 3, 1]) is State.CRITICAL
    assert State.worst([State.OK]) is State.OK
    with pytest.raises(ValueError):
        State.worst([])
