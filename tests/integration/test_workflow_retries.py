"""A workflow.run retried under the same request id starts one workflow instance, whichever broker
instance the retry reaches (the leader itself, or another that forwards it) and whichever instance leads
by then: two broker instances of one account sharing a state directory, on the private Prosody."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from agents import audit
from agents.errors import Outcome
from broker.service import Broker
from conftest import until
from sample_agent import SampleAgent

ONE_STEP = {"name": "one", "steps": [{"name": "count", "op": "sample.count", "on": ["/host/r1"]}]}
ECHO = {"name": "echo", "steps": [{"name": "echo", "op": "sample.echo", "on": ["/host/r1"], "args": {"text": "hi"}}]}


async def test_a_retried_workflow_run_starts_one_instance_whoever_is_asked(mesh: Any, tmp_path: Path) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "one.yaml").write_text(yaml.safe_dump(ONE_STEP))
    (workflows / "echo.yaml").write_text(yaml.safe_dump(ECHO))
    shared, settings = tmp_path / "shared", {"workflows": str(workflows)}
    shared.mkdir()

    first = await mesh.broker(state_dir=tmp_path / "first", shared_dir=shared, settings=settings)
    await until(lambda: first.leadership.leading, timeout=20, what="the first instance to lead")
    account = (str(first.jid.bare), f"pw-{first.jid.user}")

    async def instance(resource: str) -> Broker:
        broker = await mesh.start(Broker(*account, mesh.endpoint, resource=resource, state_dir=tmp_path / resource,
                                         shared_dir=shared, authorizer=mesh.admins, settings=settings))
        broker.admit(str(agent.jid.bare), SampleAgent.kind, ["/host/r1"])
        await until(lambda: len(broker.directory) == 1, timeout=20, what=f"the agent in {broker.jid}'s directory")
        return broker

    agent = await mesh.agent(SampleAgent, first, ["/host/r1"])
    second = await instance("second")
    client = await mesh.client(first)

    async def run(broker: Broker, rid: str, workflow: str = "one") -> Any:
        return await client.request(str(broker.jid), "workflow.run", {"workflow": workflow, "wait": 20}, rid=rid,
                                    timeout=30)

    asked = await run(second, "run-once")  # forwarded to the leader
    assert asked.outcome is Outcome.OK and asked.result["state"] == "done", asked.error or asked.result
    iid = asked.result["instance"]
    assert agent.runs == 1
    # Each instance's audit log has the request, and the forwarding one's says under which request id the
    # leader's has it: the leader decided it for the caller, under that id.
    assert first.audit is not None and second.audit is not None
    for log in (first.audit, second.audit):
        log.flush()
        await log.written()
    caller, leader_jid = str(client.jid.bare), str(first.xmpp.boundjid)
    ended = [r for r in audit.show(second.audit.path, op="workflow.run")
             if r["kind"] == "ended" and r["rid"] == "run-once"]
    assert [(r["caller"], r["outcome"], r.get("passed_to")) for r in ended] == [(caller, "ok", leader_jid)]
    passed_rid = ended[0]["passed_rid"]
    decided = [r for r in audit.show(first.audit.path, op="workflow.run", caller=caller)
               if r["kind"] == "decided"]
    assert [r["rid"] for r in decided] == [passed_rid] and passed_rid.startswith("fw-")
    assert f"served by {leader_jid} as rid {passed_rid}" in audit.format_record(ended[0])

    # The answer was lost, say, and the client retries: of the leader itself (which never saw this request
    # from the client, only from the other instance), then of a new instance with an empty request log.
    again = await run(first, "run-once")
    assert again.outcome is Outcome.OK and again.result["instance"] == iid, again.error or again.result
    third = await instance("third")
    again = await run(third, "run-once")
    assert again.outcome is Outcome.OK and again.result["instance"] == iid, again.error or again.result

    # The lead moves: the new leader finds the instance in the shared store.
    await first.leadership.stop_leading()
    await until(lambda: second.leadership.leading or third.leadership.leading, timeout=20,
                what="another instance to take the lead")
    again = await run(first, "run-once-more")  # a new request id is a new run
    assert again.outcome is Outcome.OK and again.result["instance"] != iid and agent.runs == 2
    leader = second if second.leadership.leading else third
    again = await run(leader, "run-once")
    assert again.outcome is Outcome.OK and again.result["instance"] == iid, again.error or again.result
    assert agent.runs == 2
    # The same request id for another workflow, through an instance whose request log and the leader's
    # have not seen it: the shared store refuses it, saying why, and nothing starts.
    other = await run(await instance("fourth"), "run-once", workflow="echo")
    assert other.outcome is Outcome.FAILED and "this request id already started workflow one" in other.error

    listing = await client.request(str(leader.jid), "workflow.list", {}, timeout=20)
    assert listing.outcome is Outcome.OK and len(listing.result["instances"]) == 2
