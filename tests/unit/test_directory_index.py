"""The directory's indexes: JIDs kept sorted (discovery's pages start by bisection) and listed accounts
counted (whether an account is listed, asked for every op a live agent sends the broker)."""

from __future__ import annotations

from broker.directory import Capabilities, Directory

ECHO = Capabilities(kind="sample", ops=frozenset({"sample.echo"}), resources=("/host/a",))
OTHER = Capabilities(kind="sample", ops=frozenset({"sample.count"}), resources=("/host/b",))


def jids(entries):
    return [e.jid for e in entries]


def test_pages_follow_jid_order_across_adds_and_removes():
    d = Directory()
    names = [f"a{i:02d}@x/agent" for i in range(25)]
    for jid in reversed(names):  # filed in any order, listed in JID order
        d.add(jid, ECHO if int(jid[1:3]) % 5 else OTHER)
    assert jids(d.entries()) == names
    offering = [j for j in names if int(j[1:3]) % 5]
    assert jids(d.discover("sample.echo")) == offering
    assert jids(d.discover("sample.echo", limit=7)) == offering[:7]
    assert jids(d.discover("sample.echo", after=offering[6], limit=7)) == offering[7:14]
    assert jids(d.discover("sample.echo", after=names[-1], limit=7)) == []
    assert jids(d.discover("sample.echo", after="a07", limit=2)) == ["a07@x/agent", "a08@x/agent"]  # any cursor
    assert jids(d.discover(None, ["/host/b"])) == [j for j in names if not int(j[1:3]) % 5]
    d.remove(offering[7])
    d.add(offering[7], ECHO)  # removed and filed again: once, in its place
    d.add(offering[8], ECHO)  # filed again unchanged: still once
    assert jids(d.entries()) == names
    d.remove(offering[8])
    assert jids(d.discover("sample.echo", after=offering[6], limit=2)) == [offering[7], offering[9]]
    d.clear()
    assert d.entries() == [] and d.discover("sample.echo") == []


def test_listed_accounts_are_counted_per_bare_jid():
    d = Directory()
    assert not d.lists("mon1@x")
    d.add("Mon1@X/agent", ECHO)
    d.add("mon1@x/other", ECHO)
    assert d.lists("mon1@x") and d.lists("MON1@x")
    assert not d.remove("mon1@x/none")
    d.remove("Mon1@X/agent")
    assert d.lists("mon1@x")  # its other resource is still listed
    d.remove("mon1@x/other")
    assert not d.lists("mon1@x")
    d.add("mon2@x/agent", ECHO)
    d.clear()
    assert not d.lists("mon2@x")


def test_ops_offered_are_counted_as_agents_come_change_and_go():
    d = Directory()
    assert d.discover("sample.echo") == []
    d.add("a@x/agent", ECHO)
    d.add("b@x/agent", ECHO)
    assert jids(d.discover("sample.echo")) == ["a@x/agent", "b@x/agent"] and d.discover("sample.count") == []
    d.add("a@x/agent", OTHER)  # its advertisement changed: it offers the other op now
    assert jids(d.discover("sample.echo")) == ["b@x/agent"] and jids(d.discover("sample.count")) == ["a@x/agent"]
    d.remove("b@x/agent")
    assert d.discover("sample.echo") == [] and jids(d.discover(None)) == ["a@x/agent"]
    d.add("b@x/agent", ECHO)
    assert jids(d.discover("sample.echo")) == ["b@x/agent"]
    d.clear()
    d.add("c@x/agent", OTHER)
    assert d.discover("sample.echo") == [] and jids(d.discover("sample.count")) == ["c@x/agent"]
