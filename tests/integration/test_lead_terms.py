"""The leader's term on workflow steps with the default store (SQLite in the shared state directory):
every step carries the term of the lead that sent it, a new lead has a higher one, and an agent
refuses a step with a term older than the newest it has seen from the broker (``denied``, audited),
and a term that is not a positive integer (``bad-payload``)."""

from __future__ import annotations

from typing import Any

import yaml

from agents import audit
from agents.errors import Outcome
from conftest import DOMAIN, until
from rawxmpp import RawXMPP, app_condition
from sample_agent import SampleAgent

ONE_STEP = {"name": "one", "steps": [{"name": "count", "op": "sample.count", "on": ["/host/t1"]}]}


async def _run(client: Any, broker: Any) -> dict[str, Any]:
    res = await client.request(str(broker.jid), "workflow.run", {"workflow": "one", "wait": 20}, timeout=30)
    assert res.outcome is Outcome.OK and res.result["state"] == "done", res.error or res.result
    return res.result


async def test_steps_carry_the_lead_s_term_and_an_older_term_is_refused(mesh, tmp_path) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "one.yaml").write_text(yaml.safe_dump(ONE_STEP))
    broker = await mesh.broker(state_dir=tmp_path / "broker", settings={"workflows": str(workflows)})
    agent = await mesh.agent(SampleAgent, broker, ["/host/t1"])
    client = await mesh.client(broker)
    await until(lambda: broker.leadership.leading and len(broker.directory) == 1, timeout=20,
                what="the broker leading, with the agent listed")
    bare = broker.jid.bare.lower()
    first = broker.leadership.term
    await _run(client, broker)
    assert first is not None and agent._terms[bare] == first and agent.runs == 1

    # The lead is given up and taken again: a new lead, a higher term on its steps.
    await broker.leadership.stop_leading()
    broker.leadership.start_leading()
    await until(lambda: broker.leadership.leading, timeout=20, what="the broker to lead again")
    second = broker.leadership.term
    assert second is not None and second > first
    await _run(client, broker)
    assert agent._terms[bare] == second and agent.runs == 2

    # A step stamped with the first lead's term, sent late: refused, nothing runs, audited.
    late = await broker.request(str(agent.jid), "sample.count", {}, on=["/host/t1"], timeout=10,
                                rid="late-step", behalf=mesh.operator[0], term=first)
    assert late.outcome is Outcome.DENIED and "lead has ended" in (late.error or "") and agent.runs == 2
    agent.audit.flush()
    refused = [r for r in audit.show(agent.state_dir / "audit.sqlite") if r["rid"] == "late-step"]
    assert [(r["kind"], r["condition"]) for r in refused] == [("refused", "denied")]
    # Not remembered under its rid: the current leader's step under the same rid runs.
    now = await broker.request(str(agent.jid), "sample.count", {}, on=["/host/t1"], timeout=10,
                               rid="late-step", behalf=mesh.operator[0], term=second)
    assert now.outcome is Outcome.OK and agent.runs == 3

    # A term that is not a positive decimal integer is a malformed request.
    raw = await RawXMPP.login(mesh.server.host, mesh.server.port, DOMAIN, str(broker.jid.bare), _password(mesh, broker),
                              ssl_context=mesh.server.ssl_context())
    try:
        bad = await raw.iq(str(agent.jid), raw.op_xml("sample.count", {}, rid="bad-term", timeout_ms=5000,
                                                      for_=mesh.operator[0], attrs={"term": "-3"}))
        assert app_condition(bad) == "bad-payload" and agent.runs == 3
    finally:
        await raw.close()


def _password(mesh: Any, broker: Any) -> str:
    return f"pw-{broker.jid.user}"  # Mesh.account's password for the account it made


async def test_an_older_term_is_still_refused_after_the_agent_restarts(mesh, tmp_path) -> None:
    """The newest term is kept in the agent's state directory: a deposed leader's late step that reaches
    the agent after a restart is refused as it would have been before."""
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "one.yaml").write_text(yaml.safe_dump(ONE_STEP))
    broker = await mesh.broker(state_dir=tmp_path / "broker", settings={"workflows": str(workflows)})
    agent = await mesh.agent(SampleAgent, broker, ["/host/t1"])
    client = await mesh.client(broker)
    await until(lambda: broker.leadership.leading and len(broker.directory) == 1, timeout=20,
                what="the broker leading, with the agent listed")
    first = broker.leadership.term
    await broker.leadership.stop_leading()
    broker.leadership.start_leading()
    await until(lambda: broker.leadership.leading, timeout=20, what="the broker to lead again")
    second = broker.leadership.term
    assert first is not None and second is not None and second > first
    await _run(client, broker)  # the new lead's step: the agent's newest term is the second
    assert agent.runs == 1

    # The agent stops and starts again from the same state directory, as after a crash or an upgrade.
    await agent.stop()
    mesh.actors.remove(agent)
    again = await mesh.start(SampleAgent(str(agent.jid.bare), _password(mesh, agent), mesh.endpoint,
                                         resources=["/host/t1"], broker=broker.jid.bare, authorizer=mesh.admins,
                                         state_dir=agent.state_dir))
    await until(lambda: [e.jid for e in broker.directory.entries()] == [str(again.jid)], timeout=20,
                what="the restarted agent listed under its new session")
    assert again._terms.newest(str(broker.jid.bare)) == second  # read back from the state directory

    # The first lead's step, sent late, reaches the restarted agent first: refused, nothing runs, audited.
    late = await broker.request(str(again.jid), "sample.count", {}, on=["/host/t1"], timeout=10,
                                rid="late-after-restart", behalf=mesh.operator[0], term=first)
    assert late.outcome is Outcome.DENIED and "lead has ended" in (late.error or "") and again.runs == 0
    again.audit.flush()
    refused = [r for r in audit.show(again.state_dir / "audit.sqlite") if r["rid"] == "late-after-restart"]
    assert [(r["kind"], r["condition"]) for r in refused] == [("refused", "denied")]
    # The current lead's steps still run.
    await _run(client, broker)
    assert again.runs == 1
