"""``Directory.offers``: whether one listed agent offers an op, by look-up (what the broker asks for
each agent it lists; a scan of every entry there made a login storm O(agents²))."""

from __future__ import annotations

from broker.directory import Capabilities, Directory

FENCED = Capabilities(kind="sample", ops=frozenset({"fenced.install", "sample.echo"}), resources=())
PLAIN = Capabilities(kind="sample", ops=frozenset({"sample.echo"}), resources=())


def test_offers_follows_each_agent_as_it_comes_changes_and_goes():
    d = Directory()
    for i in range(1000):
        d.add(f"a{i:04d}@x/agent", FENCED if i % 2 else PLAIN)
    assert d.offers("a0001@x/agent", "fenced.install")
    assert not d.offers("a0002@x/agent", "fenced.install")
    assert d.offers("a0002@x/agent", "sample.echo")
    assert not d.offers("nobody@x/agent", "sample.echo")  # not listed
    assert not d.offers("a0001@x/other", "fenced.install")  # another resource of a listed account
    d.add("a0001@x/agent", PLAIN)  # its advertisement changed
    assert not d.offers("a0001@x/agent", "fenced.install")
    d.add("a0002@x/agent", FENCED)
    d.remove("a0002@x/agent")
    assert not d.offers("a0002@x/agent", "fenced.install") and not d.offers("a0002@x/agent", "sample.echo")
    d.add("a0003@x/agent", FENCED)
    d.clear()
    assert not d.offers("a0003@x/agent", "fenced.install")
