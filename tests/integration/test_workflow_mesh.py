"""Workflows on a real Prosody with real agents: steps in order and in parallel, approvals under
separation of duty and the two-person rule, approvals re-checked at execution, binding of duty,
rate limits, and a broker restart that resumes without repeating a finished step."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agents import audit
from agents.agent import Call
from agents.authz import AdminsOnly, PolicyAuthorizer
from agents.errors import Outcome
from agents.ops import op
from broker.service import Broker
from conftest import until
from sample_agent import SampleAgent

FILE = {"help": "a file the sample agent appends to", "pattern": "/[A-Za-z0-9_./-]+"}

WORKFLOWS = {
    "ordered": {"steps": [
        {"name": "one", "op": "sample.count", "on": ["/host/a"]},
        {"parallel": [{"name": "left", "op": "sample.echo", "on": ["/host/a"], "args": {"text": "{word}"}},
                      {"name": "right", "op": "sample.echo", "on": ["/host/a"],
                       "args": {"text": "{word}", "mode": "upper"}}]},
        {"name": "two", "op": "sample.count", "on": ["/host/a"]}],
        "params": {"word": {}}},
    "guarded": {"params": {"file": FILE}, "steps": [
        {"name": "toggle", "op": "sample.toggle", "on": ["/host/a"], "args": {"target": "{file}"},
         "destructive": True}]},
    "held": {"params": {"file": FILE}, "steps": [
        {"name": "prepare", "op": "sample.echo", "args": {"text": "ready"}, "hold": True},
        {"name": "toggle", "op": "sample.toggle", "args": {"target": "{file}"}, "destructive": True}]},
    "bound": {"steps": [
        {"name": "take", "op": "sample.echo", "args": {"text": "taken"}, "hold": True},
        {"name": "give", "op": "sample.echo", "args": {"text": "given"}, "hold": True, "bound_to": "take"}]},
    "limited": {"params": {"site": {}}, "steps": [
        {"name": "count", "op": "sample.count", "rate": {"limit": 2, "per": 3600, "key": "count:{site}"}}]},
    "restartable": {"params": {"file": FILE, "gate": FILE}, "steps": [
        {"name": "first", "op": "sample.toggle", "args": {"target": "{file}"}, "destructive": True},
        {"name": "gated", "op": "sample.gated", "args": {"target": "{gate}"}, "destructive": True},
        {"name": "last", "op": "sample.toggle", "args": {"target": "{file}"}, "destructive": True}]},
}


class GatedAgent(SampleAgent):
    """A sample agent whose ``sample.gated`` holds until the test lets it finish, so a broker can be
    stopped while that step is certainly in flight."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.gated_runs = 0

    @op("sample.gated", effect="destructive", deadline=30)
    async def gated(self, call: Call, target: str) -> int:
        """Wait for the test, then append a line to a file and return how many it has."""
        self.gated_runs += 1
        self.entered.set()
        await self.release.wait()
        with open(target, "a") as f:
            f.write("gated\n")
        return len(Path(target).read_text().splitlines())


def write_workflows(directory: Path) -> Path:
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    for name, body in WORKFLOWS.items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **body}))
    return directory


class World:
    """A broker with workflows, sample agents that obey it, and people with clients."""

    def __init__(self, mesh, tmp_path: Path) -> None:
        self.mesh, self.tmp = mesh, tmp_path
        self.broker_account = mesh.account("broker")
        self.state = tmp_path / "broker-state"
        self.state.mkdir()
        self.workflows = write_workflows(tmp_path / "workflows")
        self.people = {"operator": mesh.operator, **{n: mesh.account(n) for n in ("bob", "carol", "dave")}}
        self.authz = PolicyAuthorizer()
        members = ", ".join(jid for jid, _ in self.people.values())
        assert self.authz.load(f"roles: {{ops: {{}}}}\nmembers: {{ops: [{members}]}}\n"
                               "grants:\n  - {role: ops, ops: ['**']}\n").ok
        self.clients: dict[str, object] = {}

    def jid(self, who: str) -> str:
        return self.people[who][0]

    async def start_broker(self) -> Broker:
        jid, pw = self.broker_account
        broker = Broker(jid, pw, self.mesh.endpoint, authorizer=self.authz, state_dir=self.state,
                        settings={"workflows": str(self.workflows)})
        # A restarted broker reads the same mesh file: the agents admitted before are admitted again.
        for bare, admitted in getattr(self, "broker", broker).roster.items():
            broker.admit(bare, admitted.kind, admitted.resources, admitted.settings)
        self.broker = await self.mesh.start(broker)
        return self.broker

    async def stop_broker(self) -> None:
        await self.broker.stop()
        self.mesh.actors.remove(self.broker)

    async def agent(self, cls=SampleAgent, resources=("/host/a",)):
        # Steps come from the broker as the people's delegate: agents decide for the person a step runs
        # for, with the same rights the broker checked (here: everyone who takes part may run ops).
        return await self.mesh.agent(cls, self.broker, list(resources),
                                     authorizer=AdminsOnly([acct[0] for acct in self.people.values()]))

    async def call(self, who: str, op_name: str, **args):
        if who not in self.clients:
            self.clients[who] = await self.mesh.client(account=self.people[who])
        return await self.clients[who].request(str(self.broker.jid), op_name, args, timeout=60)

    async def ok(self, who: str, op_name: str, **args) -> dict:
        res = await self.call(who, op_name, **args)
        assert res.outcome is Outcome.OK, res.error
        return res.result

    async def live(self, agent) -> None:
        await until(lambda: any(e.jid == str(agent.jid) for e in self.broker.directory.entries()),
                    what="the agent in the broker's directory")


def step(status: dict, name: str) -> dict:
    return next(s for s in status["steps"] if s["name"] == name)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
async def world(mesh, tmp_path):
    w = World(mesh, tmp_path)
    await w.start_broker()
    return w


async def test_steps_run_in_order_and_in_parallel_groups(world):
    agent = await world.agent()
    await world.live(agent)
    status = await world.ok("operator", "workflow.run", workflow="ordered", param=["word=hi"])
    assert status["state"] == "done", status
    # sample.count returns how often it has run: "one" ran first, "two" after the parallel group.
    assert step(status, "one")["result"] == 1 and step(status, "two")["result"] == 2
    assert step(status, "left")["result"]["text"] == "hi" and step(status, "right")["result"]["text"] == "HI"
    assert [s["stage"] for s in status["steps"]] == [1, 2, 2, 3]
    # Steps come from the broker on the requester's behalf: the agent decides for, and both audit
    # logs name, the requester, under the same rid; the agent's record says which delegate sent it.
    assert step(status, "left")["result"]["caller"] == world.jid("operator")
    rid = step(status, "left")["rid"]
    ours = [r for r in audit.show(world.state / "audit.sqlite", op="sample.echo") if r.get("rid") == rid]
    assert ours and ours[0]["caller"] == world.jid("operator") and ours[0]["decision"] == "allow"
    theirs = [r for r in audit.show(agent.state_dir / "audit.sqlite", op="sample.echo") if r.get("rid") == rid]
    assert theirs and theirs[0]["caller"] == world.jid("operator")
    assert f"sent by {world.broker_account[0]}" in theirs[0]["rule"]


async def test_destructive_step_needs_two_approvers_neither_the_requester(world, tmp_path):
    agent = await world.agent()
    await world.live(agent)
    target = tmp_path / "toggled"
    status = await world.ok("operator", "workflow.run", workflow="guarded", param=[f"file={target}"])
    iid = status["instance"]
    assert status["state"] == "waiting" and step(status, "toggle")["state"] == "waiting"
    assert "two-person rule" in step(status, "toggle")["reason"] and not target.exists()

    own = await world.call("operator", "workflow.approve", instance=iid, step="toggle")
    assert own.outcome is Outcome.DENIED and "separation of duty" in own.error
    status = await world.ok("bob", "workflow.approve", instance=iid, step="toggle")
    assert status["state"] == "waiting" and step(status, "toggle")["approved_by"] == [world.jid("bob")]
    again = await world.call("bob", "workflow.approve", instance=iid, step="toggle")
    assert again.outcome is Outcome.DENIED and "already approved" in again.error
    assert not target.exists()  # nothing ran on one approval

    status = await world.ok("carol", "workflow.approve", instance=iid, step="toggle")
    assert status["state"] == "done" and step(status, "toggle")["result"] == 1
    assert lines(target) == ["toggled"]
    refused = [r for r in audit.show(world.state / "audit.sqlite", op="workflow.approve")
               if r["kind"] == "decided" and r["decision"] == "deny"]
    assert {r["caller"] for r in refused} == {world.jid("operator"), world.jid("bob")}
    assert any("separation of duty" in r["rule"] for r in refused)
    assert (await world.ok("bob", "workflow.status", instance=iid))["state"] == "done"  # still serving


async def test_approvals_are_rechecked_when_the_step_runs(world, tmp_path):
    agent = await world.agent()
    await world.live(agent)
    target = tmp_path / "toggled"
    status = await world.ok("operator", "workflow.run", workflow="held", param=[f"file={target}"])
    iid = status["instance"]
    assert status["state"] == "waiting" and step(status, "prepare")["state"] == "held"
    # Approving ahead: both approvals are in before the step is reached.
    await world.ok("bob", "workflow.approve", instance=iid, step="toggle", wait=0)
    await world.ok("carol", "workflow.approve", instance=iid, step="toggle", wait=0)
    world.authz.gate.revoke(world.jid("carol"))  # carol loses her rights before the step runs

    status = await world.ok("operator", "workflow.perform", instance=iid, step="prepare")
    assert step(status, "prepare")["state"] == "ok" and step(status, "prepare")["performer"] == world.jid("operator")
    toggle = step(status, "toggle")
    assert status["state"] == "waiting" and toggle["state"] == "waiting", status
    assert f"has 1 ({world.jid('bob')})" in toggle["reason"] and not target.exists()

    status = await world.ok("dave", "workflow.approve", instance=iid, step="toggle")
    assert status["state"] == "done" and lines(target) == ["toggled"]


async def test_binding_of_duty_between_held_steps(world):
    agent = await world.agent()
    await world.live(agent)
    iid = (await world.ok("operator", "workflow.run", workflow="bound"))["instance"]
    status = await world.ok("bob", "workflow.perform", instance=iid, step="take")
    assert step(status, "take")["state"] == "ok" and step(status, "give")["state"] == "held"
    other = await world.call("carol", "workflow.perform", instance=iid, step="give")
    assert other.outcome is Outcome.DENIED and "binding of duty" in other.error and world.jid("bob") in other.error
    status = await world.ok("bob", "workflow.perform", instance=iid, step="give")
    assert status["state"] == "done" and step(status, "give")["performer"] == world.jid("bob")


async def test_a_cancelled_instance_takes_no_more_steps(world):
    agent = await world.agent()
    await world.live(agent)
    iid = (await world.ok("operator", "workflow.run", workflow="bound"))["instance"]
    status = await world.ok("operator", "workflow.cancel", instance=iid)
    assert status["state"] == "cancelled" and world.jid("operator") in status["error"]
    late = await world.call("bob", "workflow.perform", instance=iid, step="take")
    assert late.outcome is Outcome.FAILED and "already cancelled" in late.error
    status = await world.ok("operator", "workflow.status", instance=iid)
    assert [s["state"] for s in status["steps"]] == ["held", "pending"]


async def test_rate_limit_refuses_the_one_over(world):
    agent = await world.agent()
    await world.live(agent)
    runs = await asyncio.gather(*(world.ok("operator", "workflow.run", workflow="limited", param=["site=dc1"])
                                  for _ in range(3)))
    states = sorted(r["state"] for r in runs)
    assert states == ["done", "done", "failed"], runs
    refused = next(r for r in runs if r["state"] == "failed")
    assert "rate limit" in refused["error"] and step(refused, "count")["outcome"] == "denied"
    assert agent.runs == 2  # the refused step never reached the agent
    other = await world.ok("operator", "workflow.run", workflow="limited", param=["site=dc2"])
    assert other["state"] == "done"  # the limit is per key: another site has its own
    denied = [r for r in audit.show(world.state / "audit.sqlite", op="sample.count") if r.get("decision") == "deny"]
    assert len(denied) == 1 and "rate limit" in denied[0]["rule"]


async def test_refusals_at_run_time(world):
    unknown = await world.call("operator", "workflow.run", workflow="nosuch")
    assert unknown.outcome is Outcome.FAILED and "no workflow 'nosuch'" in unknown.error and "ordered" in unknown.error
    missing = await world.call("operator", "workflow.run", workflow="guarded")
    assert missing.outcome is Outcome.FAILED and "missing parameter 'file'" in missing.error
    sneaky = await world.call("operator", "workflow.run", workflow="ordered", param=["word=../etc"])
    assert sneaky.outcome is Outcome.FAILED and "must match" in sneaky.error
    stranger = world.mesh.account("stranger")
    world.people["stranger"] = stranger
    denied = await world.call("stranger", "workflow.run", workflow="ordered", param=["word=hi"])
    assert denied.outcome is Outcome.DENIED
    listing = await world.ok("operator", "workflow.list")
    assert {w["name"] for w in listing["workflows"]} == set(WORKFLOWS) and listing["instances"] == []


async def test_broker_restart_resumes_without_repeating_a_finished_step(world, tmp_path):
    agent = await world.agent(GatedAgent)
    await world.live(agent)
    toggled, gated = tmp_path / "toggled", tmp_path / "gated"
    status = await world.ok("operator", "workflow.run", workflow="restartable",
                            param=[f"file={toggled}", f"gate={gated}"])
    iid = status["instance"]
    for name in ("gated", "last", "first"):  # "first" last: its second approval sets the run going
        for who in ("bob", "carol"):
            await world.ok(who, "workflow.approve", instance=iid, step=name, wait=0)
    await until(agent.entered.is_set, what="the gated step to reach the agent")
    assert lines(toggled) == ["toggled"]  # "first" has run

    await world.stop_broker()  # with "gated" in flight: its outcome never reaches this broker
    agent.release.set()
    await until(lambda: lines(gated) == ["gated"], what="the agent to finish the gated step")

    await world.start_broker()  # same account, same state directory
    async def finished() -> bool:
        return (await world.broker.workflows.workflow_store.instance(iid))["state"] == "done"

    await until(finished, timeout=30, what="the resumed instance to finish")
    status = await world.ok("operator", "workflow.status", instance=iid)
    assert status["state"] == "done", status
    # "first" did not run again, "gated" was answered from the agent's record of its first run.
    assert lines(toggled) == ["toggled", "toggled"] and lines(gated) == ["gated"]
    assert agent.gated_runs == 1 and step(status, "gated")["result"] == 1
    assert step(status, "gated")["attempts"] == 2  # sent by each broker, under one request id
    assert step(status, "first")["attempts"] == 1
    assert step(status, "last")["result"] == 2
