"""Op descriptions on the wire: agents answer disco on a node per op, and the broker's mesh.describe
reads them once per caps hash (agents/describe.py, broker/descriptions.py; docs/protocol.md 4.7)."""

from __future__ import annotations

from agents import describe
from agents.errors import Outcome
from agents.ops import ops_of
from conftest import until
from sample_agent import SampleAgent


async def test_mesh_describe_reads_each_op_once_per_caps_hash(mesh, monkeypatch):
    broker = await mesh.broker()
    first = await mesh.agent(SampleAgent, broker, ["/host/a"])
    second = await mesh.agent(SampleAgent, broker, ["/host/a"])  # the same ops and resources: one caps hash
    await until(lambda: len(broker.directory.discover("sample.echo")) == 2, what="both agents listed")
    asked: list[tuple[str, str]] = []
    fetch = describe.fetch_description

    async def counting(xmpp, jid, name, timeout):  # type: ignore[no-untyped-def]
        asked.append((jid, name))
        return await fetch(xmpp, jid, name, timeout)

    monkeypatch.setattr(describe, "fetch_description", counting)
    client = await mesh.client(broker)
    for _ in range(3):
        answer = await client.request(str(broker.jid), "mesh.describe", {"op": "sample.echo"}, timeout=5)
        assert answer.outcome is Outcome.OK, answer.error
        assert answer.result == ops_of(SampleAgent)["sample.echo"].describe()
    assert len(asked) == 1 and asked[0][0] in (str(first.jid), str(second.jid))

    listing = await client.request(str(broker.jid), "mesh.describe", {}, timeout=5)
    names = {o["name"]: o for o in listing.result}
    assert names["sample.echo"]["summary"] == "Send the text back." and "broker" not in names["sample.echo"]
    assert names["mesh.discover"]["broker"] is True

    unknown = await client.request(str(broker.jid), "mesh.describe", {"op": "sample.nope"}, timeout=5)
    assert unknown.outcome is Outcome.FAILED and "no live agent offers an op named 'sample.nope'" in unknown.error
