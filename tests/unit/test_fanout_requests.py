"""The fan-out's stand-ins for slixmpp: a request written as text is the stanza slixmpp would write, and
a fresh stream has no outgoing filter the fan-out does not know (the slixmpp code it repeats is held to
the release it was written against by tests/unit/test_xmpp_speedups.py)."""

from __future__ import annotations

import ssl

import pytest
from slixmpp.xmlstream import tostring

from agents import fanout, protocol
from agents.actor import Actor, Endpoint


def test_a_fresh_stream_has_only_the_outgoing_filters_the_fanout_knows() -> None:
    actor = Actor("c@example.org", "x", Endpoint("h", 1, "example.org", ssl.create_default_context()))
    filters = fanout._filters(actor.xmpp)
    assert filters["out_sync"] == [actor.xmpp.plugin["xep_0198"]._handle_outgoing]
    assert not filters["out_sce"]
    assert {f.__qualname__ for f in filters["out"]} <= fanout._IQ_NEUTRAL_OUT_FILTERS


@pytest.mark.parametrize("to, attrs, text", [
    ("a@example.org/r", {"name": "sample.echo", "rid": "r1", "timeout": "4750", "deadline": "1764979200000"}, "gqE="),
    ("a@example.org/r&'\"<>", {"name": "x", "rid": "r", "timeout": "1", "deadline": "2", "on": "/a b/&<",
                               "for": "op@example.org", "term": "7"}, ""),
])
def test_a_request_written_as_text_is_what_slixmpp_writes(to: str, attrs: dict[str, str], text: str) -> None:
    actor = Actor("c@example.org", "x", Endpoint("h", 1, "example.org", ssl.create_default_context()))
    xmpp = actor.xmpp
    base = {k: attrs[k] for k in ("name", "rid", "timeout", "deadline")}
    ons = [attrs["on"].split(" ")] if "on" in attrs else [[]]
    term = int(attrs["term"]) if "term" in attrs else None
    (written,), (op_attrs,) = fanout.serialise_requests(["x1"], [to], base, attrs.get("for"), term, text, ons)
    assert op_attrs == attrs
    iq = protocol.request(xmpp, to, attrs, text, iq_id="x1")
    assert written == tostring(iq.xml, xmlns=xmpp.default_ns, stream=xmpp, top_level=True)
