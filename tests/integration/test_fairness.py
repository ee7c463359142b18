"""One account's flood does not crowd out other senders, and leaves nothing behind on disk.

With the raw client an ordinary account floods an agent with op requests: what is over its rate or
its queue is refused at once with ``resource-constraint`` (the caller's outcome: failed, "too many
requests from you; retry later"), what was taken is served, and another sender's call is served
meanwhile. Denied destructive requests, however many, leave no durable request-log row."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from conftest import DOMAIN
from agents import config
from agents.authz import AdminsOnly
from agents.errors import Outcome
from agents.intake import IntakeLimits
from rawxmpp import NS_CLIENT, RawXMPP, app_condition, outcome_of
from sample_agent import SampleAgent

FLOOD = 2000


async def flood(raw: RawXMPP, to: str, op: str, args: dict, count: int) -> list:
    """Send ``count`` requests in one write, as fast as the socket takes them; return every answer."""
    ids = [f"flood{i}" for i in range(count)]
    await raw.send("".join(f"<iq type='set' id='{iq_id}' to='{to}'>{raw.op_xml(op, args, timeout_ms=30000)}</iq>"
                           for iq_id in ids))
    wanted = set(ids)
    answers = []
    while wanted:
        reply = await raw.next(lambda e: e.tag == f"{{{NS_CLIENT}}}iq" and e.get("id") in wanted, timeout=30)
        wanted.discard(reply.get("id"))
        answers.append(reply)
    return answers


async def test_a_flood_is_refused_cheaply_and_others_are_still_served(mesh):
    limits = IntakeLimits(burst=50, per_second=5, queued=20, running=4)
    flooder = mesh.account("flooder")  # an admin too: what is taken is served, not denied
    agent = await mesh.agent(SampleAgent, None, ["/host/a"], requests=limits,
                             authorizer=AdminsOnly([mesh.operator[0], flooder[0]]))
    raw = await RawXMPP.login(mesh.server.host, mesh.server.port, DOMAIN, *flooder,
                              ssl_context=mesh.server.ssl_context())
    operator = await mesh.client()
    try:
        to = str(agent.jid)
        # The operator's call is sent while the agent is still working through the flood.
        answers_task = flood(raw, to, "sample.echo", {"text": "x"}, FLOOD)
        answers, report = await asyncio.gather(
            answers_task, operator.call("sample.echo", {"text": "admin"}, to=[to], timeout=20))
        assert report.results[0].outcome is Outcome.OK and report.results[0].result["text"] == "admin"

        refused = [a for a in answers if a.get("type") == "error"]
        assert {app_condition(a) for a in refused} == {"resource-constraint"}
        stanza_errors = {child.tag for a in refused for child in a.find(f"{{{NS_CLIENT}}}error")}
        assert "{urn:ietf:params:xml:ns:xmpp-stanzas}resource-constraint" in stanza_errors
        served = [a for a in answers if a.get("type") == "result"]
        assert all(outcome_of(a)[0] == "ok" for a in served)
        # Of 2,000, the burst, the queue and what the rate refilled meanwhile: the rest was refused.
        assert refused and len(served) < FLOOD // 4
        # Refused unread: nothing of them is remembered under their request ids.
        flooder_bare = flooder[0]
        assert sum(1 for caller, _rid in agent._requests._seen if caller == flooder_bare) == len(served)

        # The flooder's own project Client reads the refusal as failed, with the sentence to act on.
        own = await mesh.client(account=flooder)
        results = []
        for _ in range(100):  # the bucket refills 5 a second: a burst of calls gets refused soon
            results.append((await own.call("sample.echo", {"text": "me"}, to=[to], timeout=10)).results[0])
            if results[-1].outcome is not Outcome.OK:
                break
        assert results[-1].outcome is Outcome.FAILED
        assert "resource-constraint: too many requests from you; retry later" in results[-1].error
    finally:
        await raw.close()


async def test_denied_destructive_requests_leave_no_durable_rows(mesh):
    agent = await mesh.agent(SampleAgent, None, ["/host/a"])
    stranger = mesh.account("stranger")  # holds no role: every destructive request is denied
    raw = await RawXMPP.login(mesh.server.host, mesh.server.port, DOMAIN, *stranger,
                              ssl_context=mesh.server.ssl_context())
    try:
        answers = await flood(raw, str(agent.jid), "sample.toggle", {"target": "/tmp/never"}, 300)
        conditions = [app_condition(a) for a in answers]
        # What the intake took is denied; what came faster than it takes is refused unread.
        assert "denied" in conditions and set(conditions) <= {"denied", "resource-constraint"}
        # Also never admitted: an unknown op and bad arguments.
        await flood(raw, str(agent.jid), "sample.nosuch", {}, 5)
        await flood(raw, str(agent.jid), "sample.toggle", {"nope": 1}, 5)
    finally:
        await raw.close()
    # An admitted destructive request is still kept, so the log is known to work.
    admin = await mesh.client()
    target = mesh.home / "toggled"
    report = await admin.call("sample.toggle", {"target": str(target)}, to=[str(agent.jid)], timeout=10)
    assert report.results[0].outcome is Outcome.OK
    db = sqlite3.connect(agent.state_dir / "requests.sqlite")
    try:
        rows = db.execute("SELECT caller, COUNT(*) FROM outcomes GROUP BY caller").fetchall()
    finally:
        db.close()
    assert rows == [(mesh.operator[0], 1)]


def test_the_mesh_file_sets_an_agents_request_limits(tmp_path):
    def parse(requests):
        agent = {"name": "s1", "kind": "storage", **({"requests": requests} if requests is not None else {})}
        return config.parse({"agents": [agent]}, tmp_path / "mesh.yaml", tmp_path).agents[0].requests

    assert parse(None) == IntakeLimits()
    assert parse({"burst": 10, "per_second": 2}) == IntakeLimits(burst=10, per_second=2.0, queued=IntakeLimits().queued,
                                                                 running=IntakeLimits().running)
    with pytest.raises(config.ConfigError, match=r"agents\[0\]\.requests\.burst"):
        parse({"burst": 0})
    with pytest.raises(config.ConfigError, match="unknown key 'rate'"):
        parse({"rate": 5})
