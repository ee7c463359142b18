"""The broker on every node of a two-node ejabberd cluster, and the loss of a node.

One broker instance per node (same account, resources ``broker`` and ``broker-2``, one shared state
directory), agents split over both nodes, a client on each. Every instance answers discovery for
the whole mesh; workflow ops go to the leading instance whichever instance is asked. Then node 2
goes away with the broker instance that belongs to it while that instance is running a workflow
step: its agents move to node 1 and are found again, a call in flight to one of them ends in a named
outcome, and the instance on node 1 takes the lead and finishes the workflow without running the
step again.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from agents.actor import Endpoint
from agents.authz import AdminsOnly, PolicyAuthorizer, policy_of
from agents.client import Client
from agents.errors import Outcome
from broker.service import Broker
from conftest import DOMAIN, ejabberd_cluster, until
from gated_agent import RELAY, GatedAgent
from sample_agent import SampleAgent

WORKFLOW = RELAY


class World:
    def __init__(self, nodes: list[Any], home: Path) -> None:
        self.nodes, self.home = nodes, home
        ctx = nodes[0].ssl_context()  # one certificate serves the cluster
        self.cluster = Endpoint(nodes[0].host, nodes[0].port, DOMAIN, ctx, ((nodes[1].host, nodes[1].port),))
        nodes[0].register_many({n: f"pw-{n}" for n in ("broker", "operator", "a", "b", "c")})
        self.operator = f"operator@{DOMAIN}"
        self.actors: list[Any] = []
        self.shared = home / "broker-shared"
        self.shared.mkdir()
        workflows = home / "workflows"
        workflows.mkdir(parents=True)
        (workflows / "relay.yaml").write_text(yaml.safe_dump(WORKFLOW))
        self.settings = {"workflows": str(workflows)}
        self.policy = home / "policy.yaml"
        self.write_policy(["**"])

    def write_policy(self, ops: list[str]) -> None:
        self.policy.write_text(yaml.safe_dump({"roles": {"ops": {}}, "members": {"ops": [self.operator]},
                                               "grants": [{"role": "ops", "ops": ops}]}))

    def on_node(self, n: int, alone: bool = False) -> Endpoint:
        """Node ``n`` first, the other as its alternate; ``alone``: node ``n`` only, so the actor is
        lost with it (as a process on that node's machine would be)."""
        endpoint = self.cluster.starting_at(n)
        return Endpoint(endpoint.host, endpoint.port, DOMAIN, endpoint.ssl_context, first=True) if alone else endpoint

    async def start(self, actor: Any) -> Any:
        await actor.start(timeout=30)
        self.actors.append(actor)
        return actor

    async def broker(self, n: int) -> Broker:
        resource = "broker" if n == 0 else f"broker-{n + 1}"
        (self.home / resource).mkdir()
        return await self.start(Broker(f"broker@{DOMAIN}", "pw-broker", self.on_node(n, alone=True),
                                       resource=resource, state_dir=self.home / resource, shared_dir=self.shared,
                                       authorizer=PolicyAuthorizer.from_file(self.policy), settings=self.settings))

    async def agent(self, cls: type, name: str, n: int) -> Any:
        (self.home / name).mkdir()
        for broker in (a for a in self.actors if isinstance(a, Broker)):  # as the mesh file names it for each
            broker.admit(f"{name}@{DOMAIN}", cls.kind, [f"/host/{name}"])
        return await self.start(cls(f"{name}@{DOMAIN}", f"pw-{name}", self.on_node(n), resources=[f"/host/{name}"],
                                    broker=f"broker@{DOMAIN}", state_dir=self.home / name,
                                    authorizer=AdminsOnly([self.operator])))

    async def client(self, n: int, brokers: list[str]) -> Client:
        return await self.start(Client(self.operator, "pw-operator", self.on_node(n), broker=brokers))


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from ejabberd_cluster(tmp_path_factory.mktemp("brokers"), prefix="brk")


@pytest.fixture(scope="module")
async def world(nodes: list[Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    w = World(nodes, tmp_path_factory.mktemp("brokers-world"))
    # The instance by node 2 starts first, so it leads: the node about to be lost has the leader.
    w.b2 = await w.broker(1)
    await until(lambda: w.b2.leadership.leading, what="the first broker instance to lead")
    w.b1 = await w.broker(0)
    w.a = await w.agent(GatedAgent, "a", 0)
    w.b = await w.agent(SampleAgent, "b", 1)
    w.c = await w.agent(SampleAgent, "c", 1)
    brokers = [str(w.b1.jid), str(w.b2.jid)]
    w.c1 = await w.client(0, brokers)
    w.c2 = await w.client(1, brokers[::-1])
    for broker in (w.b1, w.b2):
        await until(lambda broker=broker: len(broker.directory) == 3, timeout=20,
                    what=f"all three agents in {broker.jid}'s directory")
    yield w
    for actor in reversed(w.actors):
        await actor.stop()


def jids(*actors: Any) -> list[str]:
    return sorted(str(a.jid) for a in actors)


async def test_each_instance_answers_for_the_whole_mesh(world: World) -> None:
    assert world.b1.server_address == (world.nodes[0].host, world.nodes[0].port)
    assert world.b2.server_address == (world.nodes[1].host, world.nodes[1].port)
    assert world.b.server_address == world.b2.server_address  # agents b and c are on node 2
    assert world.b1.leadership.siblings == {str(world.b2.jid)} and world.b2.leadership.siblings == {str(world.b1.jid)}
    for client, broker in ((world.c1, world.b1), (world.c2, world.b2)):
        found = await client.discover("sample.echo", [], timeout=10)
        assert found.outcome is Outcome.OK and found.target == str(broker.jid)
        assert sorted(e["jid"] for e in found.result) == jids(world.a, world.b, world.c)


async def test_scatter_gather_from_node1_reaches_agents_on_node2(world: World) -> None:
    report = await world.c1.call("sample.echo", {"text": "hi"}, on=["/host/b", "/host/c", "/host/a"], timeout=20)
    assert sorted((r.target, r.outcome) for r in report.results) == [(j, Outcome.OK) for j in
                                                                     jids(world.a, world.b, world.c)]
    assert {r.result["caller"] for r in report.results} == {world.operator}


async def test_workflow_ops_asked_of_any_instance_are_served_by_the_leader(world: World) -> None:
    assert world.b2.leadership.leading and not world.b1.leadership.leading
    listing = await world.c1.request(str(world.b1.jid), "workflow.list", {}, timeout=20)
    assert listing.outcome is Outcome.OK, listing.error
    assert [w["name"] for w in listing.result["workflows"]] == ["relay"]
    bad = await world.c1.request(str(world.b1.jid), "workflow.run", {"workflow": "nope"}, timeout=20)
    assert bad.outcome is Outcome.FAILED and "no workflow 'nope'" in bad.error  # the leader's words, passed on


async def test_a_policy_reload_asked_of_one_instance_reaches_the_other(world: World) -> None:
    world.write_policy(["**", "sample.echo"])
    before = policy_of(world.b2.authorizer).digest
    reload = await world.c1.request(str(world.b1.jid), "policy.reload", {}, timeout=30)
    assert reload.outcome is Outcome.OK, reload.error
    assert reload.result["instances"] == {str(world.b2.jid): "ok"}
    # Otherwise the other instance's periodic re-push would bring the old version back.
    assert policy_of(world.b2.authorizer).digest == policy_of(world.b1.authorizer).digest != before


async def test_losing_a_node_moves_its_agents_and_the_lead_without_repeating_a_step(world: World) -> None:
    a, b, c = world.a, world.b, world.c
    started = await world.c1.request(str(world.b1.jid), "workflow.run", {"workflow": "relay", "wait": 0}, timeout=20)
    assert started.outcome is Outcome.OK, started.error
    iid = started.result["instance"]
    await until(a.entered.is_set, timeout=20, what="the gated step to reach agent a")
    assert a.runs == 1  # "first" has run, sent by the leader on node 2
    in_flight = asyncio.ensure_future(world.c1.call("sample.sleep", {"seconds": 20}, to=[str(b.jid)], timeout=8))
    await asyncio.sleep(0.5)

    await asyncio.to_thread(world.nodes[1].stop)  # node 2 and, with it, the broker instance on it

    report = await asyncio.wait_for(in_flight, 30)  # never hangs: it ends, and says how
    assert [r.outcome for r in report.results] in ([Outcome.TIMEOUT], [Outcome.UNREACHABLE]), report.to_dict()
    node1 = (world.nodes[0].host, world.nodes[0].port)
    await until(lambda: b.online and c.online and b.server_address == node1 == c.server_address, timeout=40,
                what="node 2's agents to reconnect to node 1")
    await until(lambda: world.b1.leadership.leading, timeout=30, what="the instance on node 1 to take the lead")
    assert not world.b2.leadership.leading and not world.b2.online
    found = await world.c1.discover("sample.echo", ["/host/b", "/host/c"], timeout=10)
    assert found.outcome is Outcome.OK and sorted(e["jid"] for e in found.result) == jids(b, c)
    report = await world.c1.call("sample.echo", {"text": "back"}, on=["/host/b", "/host/c"], timeout=20)
    assert [r.outcome for r in report.results] == [Outcome.OK, Outcome.OK], report.to_dict()

    a.release.set()
    # Asked of the instance that belonged to the lost node first: the client moves on to node 1's.
    status = None
    for _ in range(100):
        res = await world.c2.request(str(world.b1.jid), "workflow.status", {"instance": iid, "wait": 2}, timeout=10)
        assert res.outcome is Outcome.OK, res.error
        status = res.result
        if status["state"] in ("done", "failed"):
            break
    assert status is not None and status["state"] == "done", status
    steps = {s["name"]: s for s in status["steps"]}
    assert a.gated_runs == 1 and steps["gated"]["result"] == 1  # answered from the first run's record
    assert steps["gated"]["attempts"] == 2  # sent by each leader, under one request id
    assert steps["first"]["attempts"] == 1 and a.runs == 2 and steps["last"]["result"] == 2
    # The client whose first broker was the lost node's finds the mesh through the other instance.
    found = await world.c2.discover("sample.echo", [], timeout=10)
    assert found.outcome is Outcome.OK and found.target == str(world.b1.jid)
