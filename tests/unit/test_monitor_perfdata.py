"""Performance-data grammar, real-world quirks and round trips (agents.monitor.perfdata)."""

import math

import pytest

from agents.monitor import perfdata
from agents.monitor.perfdata import PerfDatum
from agents.monitor.ranges import Range

# Perfdata exactly as the Debian plugins print it (from the golden outputs), after Nagios' split.
GOLDEN = {
    "check_load": "load1=2.960;5.000;10.000;0; load5=4.330;4.000;8.000;0; load15=2.520;3.000;6.000;0;",
    "check_load -r": (
        "load1=2.960;;;0; scaled_load1=1.480;0.010;100.000;0; load5=4.330;;;0; "
        "scaled_load5=2.165;0.010;100.000;0; load15=2.520;;;0; scaled_load15=1.260;0.010;100.000;0;"
    ),
    "check_disk": "/=26389512192B;216442024755;243497277849;0;270552530944",
    "check_procs": "procs=114;250;400;0;",
    "check_procs -c 1:1": "procs=0;;1:1;0;",
    "check_users": "users=0;5;10;0",
    "check_swap": "swap=0B;0;0;0;0",
}


def test_check_load_fields() -> None:
    items = perfdata.parse(GOLDEN["check_load"])
    assert not items.errors
    assert [i.label for i in items] == ["load1", "load5", "load15"]
    assert items[0] == PerfDatum("load1", 2.96, "", Range(0, 5), Range(0, 10), 0.0, None)


def test_check_disk_bytes_and_slash_label() -> None:
    (item,) = perfdata.parse(GOLDEN["check_disk"])
    assert item.label == "/"
    assert item.uom == "B"
    assert item.value == 26389512192
    assert item.max == 270552530944


def test_check_procs_range_valued_threshold() -> None:
    (item,) = perfdata.parse(GOLDEN["check_procs -c 1:1"])
    assert item.warn is None
    assert item.crit == Range(1, 1)
    assert item.crit.alerts(0)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_perfdata_parses_cleanly_and_round_trips(name: str) -> None:
    items = perfdata.parse(GOLDEN[name])
    assert items and not items.errors
    assert perfdata.parse(perfdata.format(items)) == items


def test_quoted_labels_with_spaces_and_escaped_quote() -> None:
    items = perfdata.parse("'free space /var'=10% 'it''s'=1c ''''=2")
    assert not items.errors
    assert [i.label for i in items] == ["free space /var", "it's", "'"]
    assert items[0].uom == "%"
    assert items[1].uom == "c"
    assert perfdata.format(items) == "'free space /var'=10% 'it''s'=1c ''''=2"


def test_unknown_value_and_missing_trailing_fields() -> None:
    items = perfdata.parse("a=U b=1 c=2;3 d=4;;5 e=U;1;2;0;10")
    assert not items.errors
    assert items[0].value is None
    assert items[1] == PerfDatum("b", 1.0)
    assert items[2].warn == Range(0, 3) and items[2].crit is None
    assert items[3].warn is None and items[3].crit == Range(0, 5)
    assert items[4].value is None and items[4].max == 10


@pytest.mark.parametrize(
    ("text", "value", "uom"),
    [
        ("t=1.5s", 1.5, "s"),
        ("t=20ms", 20, "ms"),
        ("t=7us", 7, "us"),
        ("p=99.5%", 99.5, "%"),
        ("m=10B", 10, "B"),
        ("m=10KB", 10, "KB"),
        ("m=10MB", 10, "MB"),
        ("m=10GB", 10, "GB"),
        ("m=10TB", 10, "TB"),
        ("n=12345c", 12345, "c"),
        ("x=-3.25", -3.25, ""),
        ("x=1e3", 1000, ""),
        ("x=.5", 0.5, ""),
    ],
)
def test_units_of_measure(text: str, value: float, uom: str) -> None:
    (item,) = perfdata.parse(text)
    assert item.value == value
    assert item.uom == uom
    assert uom in perfdata.KNOWN_UOMS


def test_range_thresholds_of_every_form() -> None:
    (item,) = perfdata.parse("x=5;@10:20;~:30;0;100")
    assert item.warn == Range(10, 20, inside=True)
    assert item.crit == Range(-math.inf, 30)
    (item,) = perfdata.parse("x=5;10:;-1:1")
    assert item.warn == Range(10, math.inf)
    assert item.crit == Range(-1, 1)


def test_bad_items_are_skipped_reported_and_parsing_goes_on() -> None:
    items = perfdata.parse("good=1 novalue =3 bad=abc worse=1;10:x last=2;;;;; toomany=1;2;3;4;5;6 end=9")
    assert [i.label for i in items] == ["good", "last", "end"]
    assert len(items.errors) == 5
    joined = "\n".join(items.errors)
    for word in ("novalue", "=3", "abc", "10:x", "toomany"):
        assert word in joined


def test_unterminated_quote_is_reported() -> None:
    items = perfdata.parse("a=1 'broken label=2")
    assert [i.label for i in items] == ["a"]
    assert "unterminated quote" in items.errors[0]


def test_extra_whitespace_and_empty_input() -> None:
    assert perfdata.parse("") == []
    assert perfdata.parse("   ").errors == []
    items = perfdata.parse("  a=1 \t  b=2  ")
    assert [i.label for i in items] == ["a", "b"]


def test_format_quotes_only_when_needed_and_drops_empty_tail() -> None:
    items = [
        PerfDatum("plain", 1.0, "ms", Range(0, 10)),
        PerfDatum("with space", None),
        PerfDatum("a=b", 2.0, "", None, Range(5, math.inf), 0.0, 10.0),
    ]
    assert perfdata.format(items) == "plain=1ms;10 'with space'=U 'a=b'=2;;5:;0;10"
    assert perfdata.parse(perfdata.format(items)) == items


@pytest.mark.parametrize(
    "text",
    [
        "'a b'=1.25KB;@0:1;~:2;0;3 c=U d=-1e-07s;;;; e=12345678901234567890",
        "'x''y z'=3%;1:2 '='=0",
        "weird=7KiB;;;",  # a unit outside the guidelines is kept as given
    ],
)
def test_round_trip_is_stable(text: str) -> None:
    once = perfdata.parse(text)
    assert not once.errors
    assert perfdata.parse(perfdata.format(once)) == once


def test_datum_as_dict_uses_plain_types() -> None:
    (item,) = perfdata.parse("procs=0;;1:1;0;")
    assert item.as_dict() == {
        "label": "procs", "value": 0.0, "uom": "", "warn": None, "crit": "1:1", "min": 0.0, "max": None,
    }


def test_empty_label_is_refused() -> None:
    with pytest.raises(ValueError, match="label"):
        PerfDatum("", 1.0)
