"""Fencing safety on the real Prosody with real fence_dummy devices and a real policy: every refusal
is a decision in the refusing agent's audit log, runs nothing (the status file and the device-run
count are unchanged) and leaves the agent serving.

- an unauthorized caller, and a cluster's fencing identity aimed at another cluster's node, are
  refused by the policy (fencer-c1 on /cluster/c1/node/*, as deploy/policy.example.yaml has it);
- a person's manual fence of a cluster that requires approval is refused when sent straight to
  the agent, and runs through deploy/workflows/fence-node.yaml once two people other than the
  requester approve (the requester approving, or one approver twice, is refused);
- after a verified off the broker opens a fencing epoch, pushes it, and every agent refuses
  destructive ops from the fenced node's identities until a verified on ends it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agents import audit
from agents.authz import PolicyAuthorizer
from agents.errors import Outcome
from agents.fencing.agent import FencingAgent
from broker.service import Broker
from conftest import ROOT, until
from fence_mesh import dummy_device
from sample_agent import SampleAgent

GuardedSample = SampleAgent  # every agent refuses fenced identities' destructive ops


def policy(j: dict[str, str]) -> str:
    return f"""
roles:
  operator: {{description: "people who fence by hand and approve fences"}}
  fencer-c1: {{description: "cluster c1's fencing identity"}}
  fencer-c2: {{}}
  db: {{description: "a database that runs on node1"}}
members:
  operator: [{j['alice']}, {j['bob']}, {j['carol']}]
  fencer-c1: [{j['fence-c1']}]
  fencer-c2: [{j['fence-c2']}]
  db: [{j['db1']}]
grants:
  - {{role: operator, ops: ["fence.**"], on: ["/cluster/**"]}}
  - {{role: operator, ops: ["workflow.**", "sample.**", "mesh.**"]}}
  - {{role: fencer-c1, ops: [fence.off, fence.on, fence.reboot, fence.status], on: ["/cluster/c1/node/*"]}}
  - {{role: fencer-c2, ops: [fence.off, fence.on, fence.reboot, fence.status], on: ["/cluster/c2/node/*"]}}
  - {{role: db, ops: ["sample.**", "fence.**", "workflow.**"]}}
"""


class World:
    """A broker with the real fence workflows, a fencing agent for node1 (cluster c1, manual fences
    need approval) and node2 (cluster c2, they do not), a sample agent, and people."""

    def __init__(self, mesh, tmp_path: Path) -> None:
        self.mesh, self.tmp = mesh, tmp_path
        self.accounts = {"alice": mesh.operator, "broker": mesh.account("broker")}
        for who in ("bob", "carol", "stranger", "fence-c1", "fence-c2", "db1"):
            self.accounts[who] = mesh.account(who.replace("-", ""))
        self.jids = {who: jid for who, (jid, _) in self.accounts.items()}
        self.policy = policy(self.jids)
        self.state = {n: tmp_path / f"{n}.state" for n in ("node1", "node2")}
        for f in self.state.values():
            f.write_text("on")
        self.clients: dict[str, object] = {}
        self.events: list[dict] = []

    def authorizer(self) -> PolicyAuthorizer:
        authz = PolicyAuthorizer()
        assert authz.load(self.policy).ok
        return authz

    async def start(self) -> None:
        jid, pw = self.accounts["broker"]
        bstate = self.tmp / "broker-state"
        bstate.mkdir()
        self.broker = await self.mesh.start(Broker(
            jid, pw, self.mesh.endpoint, authorizer=self.authorizer(), state_dir=bstate,
            settings={"workflows": str(ROOT / "deploy" / "workflows")}))
        self.broker.fencing.on_fence_event(self.events.append)
        settings = {
            "clusters": {"c1": ["node1"], "c2": ["node2"]},
            "fencing": {"devices": {"pdu1": dummy_device(self.state["node1"]),
                                    "pdu2": dummy_device(self.state["node2"])},
                        "levels": {"node1": [["pdu1"]], "node2": [["pdu2"]]}},
            "identities": {"node1": [self.jids["db1"]]},
            "approval": {"c1": {"fencers": [self.jids["fence-c1"]]}},
        }
        self.fencer = await self.mesh.agent(FencingAgent, self.broker, ["/host/fencer"], settings=settings,
                                            authorizer=self.authorizer())
        self.sample = await self.mesh.agent(GuardedSample, self.broker, ["/host/db2"], authorizer=self.authorizer())
        await until(lambda: len(self.broker.directory) == 2, what="both agents in the directory")

    async def call(self, who: str, target, op: str, args: dict, on=()):
        if who not in self.clients:
            self.clients[who] = await self.mesh.client(account=self.accounts[who])
        to = target if isinstance(target, str) else str(target.jid)
        return await self.clients[who].request(to, op, args, on=list(on), timeout=30)

    async def fence(self, who: str, action: str, node: str, cluster: str | None = None, on=()):
        cluster = cluster or {"node1": "c1", "node2": "c2"}[node]
        return await self.call(who, self.fencer, f"fence.{action}", {"cluster": cluster, "node": node}, on)

    def decisions(self, agent, who: str, op: str) -> list[str]:
        """The decisions the agent's audit log holds for this caller and op."""
        return [r["decision"] for r in audit.show(agent.state_dir / "audit.sqlite", caller=self.jids[who], op=op)
                if r["kind"] == "decided"]

    async def still_serves(self) -> None:
        res = await self.fence("alice", "status", "node2")
        assert res.outcome is Outcome.OK and res.result["state"] == self.state["node2"].read_text()


@pytest.fixture
async def world(mesh, tmp_path):
    w = World(mesh, tmp_path)
    await w.start()
    return w


def refused(res, *words: str) -> None:
    assert res.outcome is Outcome.DENIED, (res.outcome, res.error)
    for w in words:
        assert w in res.error, res.error


async def test_an_unauthorized_caller_is_refused_audited_and_nothing_runs(world):
    res = await world.fence("stranger", "off", "node2")
    refused(res, "fence.off", "holds no role")
    assert world.decisions(world.fencer, "stranger", "fence.off") == ["deny"]
    assert world.state["node2"].read_text() == "on" and world.fencer.power.device_runs == 0
    assert not world.fencer.events and not world.events  # no attempt was made, so none was announced
    await world.still_serves()


async def test_a_clusters_fencing_identity_fences_only_its_own_nodes(world):
    own = await world.fence("fence-c1", "off", "node1")
    assert own.outcome is Outcome.OK and own.result["state"] == "off", own.error
    assert world.state["node1"].read_text() == "off"  # its own node: no approval needed, and done
    runs = world.fencer.power.device_runs

    other = await world.fence("fence-c1", "off", "node2")
    refused(other, world.jids["fence-c1"], "/cluster/c2/node/node2")
    # Addressing its own node while naming the other one in the arguments decides over both.
    disguised = await world.fence("fence-c1", "off", "node2", on=["/cluster/c1/node/node1"])
    refused(disguised, "/cluster/c2/node/node2")
    assert world.decisions(world.fencer, "fence-c1", "fence.off") == ["allow", "deny", "deny"]
    assert world.state["node2"].read_text() == "on" and world.fencer.power.device_runs == runs
    await world.still_serves()


async def test_a_manual_fence_needs_two_approvers_other_than_the_requester(world):
    direct = await world.fence("alice", "off", "node1")
    refused(direct, "needs a second person's approval", "workflow=fence-node")
    assert world.decisions(world.fencer, "alice", "fence.off") == ["deny"]
    assert world.state["node1"].read_text() == "on" and world.fencer.power.device_runs == 0

    broker = world.broker
    run = await world.call("alice", broker, "workflow.run",
                           {"workflow": "fence-node", "param": ["cluster=c1", "node=node1"], "wait": 5})
    assert run.outcome is Outcome.OK and run.result["state"] == "waiting", run.error
    iid = run.result["instance"]
    approve = {"instance": iid, "step": "fence", "wait": 20}

    refused(await world.call("alice", broker, "workflow.approve", approve), "separation of duty")
    first = await world.call("bob", broker, "workflow.approve", approve)
    assert first.outcome is Outcome.OK and first.result["state"] == "waiting"
    refused(await world.call("bob", broker, "workflow.approve", approve), "already approved")
    assert world.state["node1"].read_text() == "on" and world.fencer.power.device_runs == 0

    second = await world.call("carol", broker, "workflow.approve", approve)
    assert second.outcome is Outcome.OK and second.result["state"] == "done", second.result["error"]
    assert world.state["node1"].read_text() == "off"
    steps = {s["name"]: s for s in second.result["steps"]}
    assert steps["fence"]["approved_by"] == [world.jids["bob"], world.jids["carol"]]
    assert steps["verify"]["result"]["state"] == "off"
    # The fencing agent decided the step for the requester, sent by the broker (which only sends
    # approved steps): her direct request was refused, the approved one allowed.
    assert world.decisions(world.fencer, "alice", "fence.off") == ["deny", "allow"]
    (step_record,) = [r for r in audit.show(world.fencer.state_dir / "audit.sqlite", op="fence.off")
                      if r["kind"] == "decided" and r["decision"] == "allow"]
    assert step_record["rid"] == steps["fence"]["rid"] and f"sent by {broker.jid.bare}" in step_record["rule"]
    # The broker's log has each approval's decision under the workflow's constraints.
    blog = [r for r in audit.show(broker.state_dir / "audit.sqlite", op="workflow.approve")
            if r["kind"] == "decided" and r["rule"].startswith("workflow constraint")]
    assert [(r["caller"], r["decision"]) for r in blog] == [
        (world.jids["alice"], "deny"), (world.jids["bob"], "allow"), (world.jids["bob"], "deny"),
        (world.jids["carol"], "allow")]


async def test_a_cluster_without_approval_lets_a_person_fence_directly(world):
    res = await world.fence("alice", "off", "node2")
    assert res.outcome is Outcome.OK and world.state["node2"].read_text() == "off", res.error


async def test_a_fenced_nodes_identities_may_run_no_destructive_op_until_it_is_unfenced(world):
    db1, target = world.jids["db1"], world.tmp / "toggled"
    before = await world.call("db1", world.sample, "sample.toggle", {"target": str(target)})
    assert before.outcome is Outcome.OK  # not fenced yet: its grant works

    off = await world.fence("fence-c1", "off", "node1")
    assert off.outcome is Outcome.OK, off.error
    # Announced: the attempt and the verified outcome, and an epoch is open.
    assert [(e["event"], e["action"], e["ok"], e["change"]) for e in world.events] == [
        ("attempt", "off", False, None), ("outcome", "off", True, "fenced")]
    epochs = await world.call("alice", world.broker, "mesh.fence.epochs", {})
    (fenced,) = epochs.result["fenced"]
    assert (fenced["cluster"], fenced["node"], fenced["epoch"], fenced["identities"]) == ("c1", "node1", 1, [db1])
    assert fenced["requester"] == world.jids["fence-c1"]
    await until(lambda: world.sample.fenced.of(db1) and world.fencer.fenced.of(db1), what="the epoch pushed")

    toggle = await world.call("db1", world.sample, "sample.toggle", {"target": str(target)})
    refused(toggle, "belongs to a fenced node", "node node1 of cluster c1 was fenced at", "epoch 1")
    fence = await world.fence("db1", "off", "node2")
    refused(fence, "was fenced at")
    assert world.decisions(world.sample, "db1", "sample.toggle") == ["allow", "deny"]
    assert world.decisions(world.fencer, "db1", "fence.off") == ["deny"]
    assert target.read_text() == "toggled\n" and world.state["node2"].read_text() == "on"
    # Reads are not refused, and everyone else is served.
    echo = await world.call("db1", world.sample, "sample.echo", {"text": "hi"})
    assert echo.outcome is Outcome.OK
    assert (await world.call("alice", world.sample, "sample.toggle", {"target": str(target)})).outcome is Outcome.OK
    await world.still_serves()
    # Nor may it act through the broker: a workflow it requests, or an approval it gives.
    run = await world.call("db1", world.broker, "workflow.run",
                           {"workflow": "fence-node", "param": ["cluster=c2", "node=node2"], "wait": 0})
    refused(run, "was fenced at")

    on = await world.fence("fence-c1", "on", "node1")
    assert on.outcome is Outcome.OK and world.state["node1"].read_text() == "on", on.error
    await until(lambda: not world.sample.fenced.of(db1), what="the end of the epoch pushed")
    again = await world.call("db1", world.sample, "sample.toggle", {"target": str(target)})
    assert again.outcome is Outcome.OK, again.error
    epochs = (await world.call("alice", world.broker, "mesh.fence.epochs", {})).result
    assert epochs["fenced"] == [] and epochs["epochs"][0]["unfenced_by"] == world.fencer.jid.bare


async def test_only_a_fencing_agent_may_announce_and_only_its_own_nodes(world):
    fake = {"id": "forged1", "event": "outcome", "action": "on", "cluster": "c1", "node": "node1", "ok": True}
    # Even someone whom the policy allows mesh.** cannot forge an unfencing.
    refused(await world.call("alice", world.broker, "mesh.fence.event", fake), "only the fencing agents the mesh")
    # The fencing agent itself, for a node it does not fence (through the broker's gate, as it would be sent).
    res = await world.fencer.request(str(world.broker.jid), "mesh.fence.event", {**fake, "node": "node9"},
                                     timeout=10)
    refused(res, "does not configure it to fence that node")
    assert world.events == [] and await world.broker.fencing.ledger.events() == []


async def test_a_restarted_broker_still_knows_the_fenced_node_and_tells_agents_that_join(world):
    assert (await world.fence("fence-c1", "off", "node1")).outcome is Outcome.OK
    await world.mesh.stop_all()  # the whole mesh goes down, the broker's state stays on disk
    world.clients.clear()
    jid, pw = world.accounts["broker"]
    broker = await world.mesh.start(Broker(jid, pw, world.mesh.endpoint, authorizer=world.authorizer(),
                                                  state_dir=world.tmp / "broker-state"))
    sample = await world.mesh.agent(GuardedSample, broker, ["/host/db3"], authorizer=world.authorizer())
    await until(lambda: sample.fenced.of(world.jids["db1"]), what="the open epoch pushed to a joining agent")
    res = await world.call("db1", sample, "sample.toggle", {"target": str(world.tmp / "t")})
    refused(res, "epoch 1")
    assert not (world.tmp / "t").exists()
