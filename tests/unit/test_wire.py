"""Payload codec limits and resource path rules (pure functions)."""

from __future__ import annotations

import pytest

from agents import protocol, resources
from agents.errors import BadPayload, TooLarge
from broker.directory import Capabilities, Directory


def test_payload_round_trips():
    value = {"a": [1, 2.5, None, True, "x"], "b": {"c": b"bytes"}}
    assert protocol.decode(protocol.encode(value)) == value
    assert protocol.decode("") is None


def test_limits_are_checked_before_decoding():
    with pytest.raises(TooLarge, match="limit"):
        protocol.decode("A" * (protocol.MAX_TEXT + 1))
    deep: object = 1
    for _ in range(protocol.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(TooLarge, match="nests deeper"):
        protocol.decode(protocol.encode(deep))
    # Far deeper than msgpack would build: refused by the decoder's own stack limit.
    with pytest.raises(TooLarge):
        protocol.decode(__import__("base64").b64encode(b"\x91" * 5000 + b"\xc0").decode())
    with pytest.raises(BadPayload):
        protocol.decode("not*base64")
    with pytest.raises(BadPayload):
        protocol.decode("wQ==")  # 0xc1 is never used in msgpack


@pytest.mark.parametrize("bad", ["", "/", "host", "/host//db", "/host/../etc", "/host/./db", "/h\x00st",
                                 "/host/db 1", "/h\u00f6st", "/host/%2e%2e", "/x" * 17])
def test_resource_paths_are_refused_not_normalized(bad):
    with pytest.raises(resources.BadResource):
        resources.check(bad)


def test_related_matches_ancestors_and_descendants_only():
    assert resources.related("/host/db1", "/host/db1")
    assert resources.related("/host", "/host/db1/disk")
    assert resources.related("/host/db1/disk", "/host")
    assert not resources.related("/host/db1", "/host/db10")
    assert not resources.related("/host/db1", "/pool/db1")


def test_directory_discovers_by_op_and_resource():
    d = Directory()
    caps = Capabilities("storage", frozenset({"storage.info"}), ("/pool/a",))
    assert d.add("s1@x/agent", caps) is True
    assert d.add("s1@x/agent", caps) is False
    d.add("m1@x/agent", Capabilities("monitor", frozenset({"monitor.info"}), ("/host/h",)))
    assert [e.jid for e in d.discover("storage.info")] == ["s1@x/agent"]
    assert [e.jid for e in d.discover(None, ["/host"])] == ["m1@x/agent"]
    assert d.discover("storage.info", ["/pool/b"]) == []
    assert d.remove("s1@x/agent") and not d.remove("s1@x/agent")
