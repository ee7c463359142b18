"""Discovery a page at a time, on the real server: a mesh whose discovery answer does not fit one
payload (docs/protocol.md 3.2) is still found whole, by ``mesh.discover``'s ``limit`` and ``after``.

The client's page is made small here (the product asks for 1,000 agents at a time) so that a handful
of agents spans several pages; the second test makes each agent's entry large instead, so that the
real payload limit refuses the unpaged answer and the client's page must shrink to fit.
"""

from __future__ import annotations

import asyncio

from agents.errors import Outcome
from conftest import until
from sample_agent import SampleAgent


async def test_discovery_of_more_agents_than_one_page_holds(mesh):
    broker = await mesh.broker()
    agents = await asyncio.gather(*(mesh.agent(SampleAgent, broker, [f"/host/h{i}"]) for i in range(23)))
    await until(lambda: len(broker.directory) == 23, timeout=30, what="23 agents listed")
    everyone = sorted(str(a.jid) for a in agents)
    client = await mesh.client(broker)

    # The op itself: a page is at most `limit` agents in JID order, starting after `after`.
    first = await client.request(str(broker.jid), "mesh.discover", {"op": "sample.echo", "limit": 10}, timeout=10)
    assert first.outcome is Outcome.OK, first.error
    assert [e["jid"] for e in first.result] == everyone[:10]
    last = await client.request(str(broker.jid), "mesh.discover",
                                {"op": "sample.echo", "limit": 10, "after": everyone[19]}, timeout=10)
    assert [e["jid"] for e in last.result] == everyone[20:]
    assert last.result[0]["resources"] and last.result[0]["resources"][0].startswith("/host/h")

    # The client pages through all of them (three pages of 10, the last one short) and calls each.
    client.discover_page = 10
    found = await client.discover("sample.echo", [], timeout=10)
    assert found.outcome is Outcome.OK and [e["jid"] for e in found.result] == everyone
    report = await client.call("sample.echo", {"text": "hi"}, timeout=20)
    assert sorted(r.target for r in report.results) == everyone
    assert all(r.outcome is Outcome.OK and r.result["text"] == "hi" for r in report.results)

    # Scoped by resource, across pages: only the agents holding what was asked for.
    found = await client.discover("sample.echo", ["/host/h3", "/host/h17"], timeout=10)
    assert sorted(e["jid"] for e in found.result) == sorted(str(agents[i].jid) for i in (3, 17))

    # A page boundary that falls exactly on the end: a fourth, empty page ends it.
    client.discover_page = 23
    found = await client.discover("sample.echo", [], timeout=10)
    assert [e["jid"] for e in found.result] == everyone

    # An agent that leaves between pages is simply not on the later ones.
    client.discover_page = 10
    await agents[-1].stop()
    await until(lambda: len(broker.directory) == 22, what="the stopped agent gone")
    found = await client.discover("sample.echo", [], timeout=10)
    assert [e["jid"] for e in found.result] == [j for j in everyone if j != str(agents[-1].jid)]


async def test_discovery_answer_over_the_payload_limit_is_asked_for_in_smaller_pages(mesh):
    broker = await mesh.broker()
    # 300 resources of ~100 characters: each agent's entry is ~31 KB, so six of them exceed 160 KiB.
    resources = [f"/site/s{i:03d}/{'x' * 90}" for i in range(300)]
    agents = await asyncio.gather(*(mesh.agent(SampleAgent, broker, resources) for _ in range(8)))
    await until(lambda: len(broker.directory) == 8, timeout=30, what="8 agents listed")
    client = await mesh.client(broker)

    whole = await client.request(str(broker.jid), "mesh.discover", {"op": "sample.echo"}, timeout=10)
    assert whole.outcome is Outcome.FAILED and whole.error.startswith("too-large:"), whole
    too_big = await client.request(str(broker.jid), "mesh.discover", {"op": "sample.echo", "limit": 8}, timeout=10)
    assert too_big.error.startswith("too-large:"), too_big

    found = await client.discover("sample.echo", [], timeout=20)  # 1,000 a page, halved until a page fits
    assert found.outcome is Outcome.OK, found.error
    assert [e["jid"] for e in found.result] == sorted(str(a.jid) for a in agents)
    assert all(e["resources"] == resources for e in found.result)


async def test_bad_page_arguments_are_refused(mesh):
    broker = await mesh.broker()
    client = await mesh.client(broker)
    res = await client.request(str(broker.jid), "mesh.discover", {"op": "sample.echo", "limit": -1}, timeout=10)
    assert res.outcome is Outcome.FAILED and res.error.startswith("bad-argument:"), res
    res = await client.request(str(broker.jid), "mesh.discover", {"op": "sample.echo", "after": 5}, timeout=10)
    assert res.outcome is Outcome.FAILED and res.error.startswith("bad-argument:"), res
