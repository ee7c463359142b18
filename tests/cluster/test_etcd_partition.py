"""Broker instances on three simulated hosts sharing their state through etcd, and a partition.

Three network namespaces on one bridge (tests/sim_hosts.py) each run a node of an ejabberd cluster,
an etcd member and a broker instance connected to its own host's node, with nothing shared on disk:
each instance has its own state directory. An agent runs on the leader's host and one on another
host, each in a process of its own connected to its host's node (tests/agent_process.py); the
operator's client is on the bridge's side, connected to the node of a host that stays. Then:

- the leader's host is cut off (link down) while a workflow's gated step is in flight: another
  instance takes the lead with a newer term and finishes the workflow, the gated step having run
  exactly once, and a step stamped with the old leader's term is refused by the agent;
- the partition heals: the old leader rejoins as a follower (one leader, no split brain), the next
  workflow runs each step once, and the agent on the healed host answers again;
- an etcd member dies: the next workflow still runs.

Run by ``make test-cluster`` (CI runs it); skipped, saying why, where namespaces are not permitted.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent_process import AgentProcess, spawn_agent
from agents.actor import Endpoint
from agents.client import Client
from agents.config import StateConfig
from agents.errors import Outcome
from conftest import DOMAIN, until
from etcd_broker import spawn_broker
from etcd_cluster import PrivateEtcd
from gated_agent import RELAY
from sim_hosts import EjabberdNode, SimulatedHosts, permitted

pytest.importorskip("aetcd", reason="the etcd client is the optional extra 'etcd': make install installs it")

from broker.state_etcd import EtcdLease  # noqa: E402

_why_not = permitted()
pytestmark = pytest.mark.skipif(bool(_why_not), reason=f"simulated hosts need network namespaces: {_why_not}")


async def _status(client: Client, broker: str, iid: str) -> dict[str, Any] | None:
    """The instance's status once it has finished, asked of ``broker``; None while it runs."""
    res = await client.request(broker, "workflow.status", {"instance": iid, "wait": 1}, timeout=10)
    if res.outcome is not Outcome.OK:  # an instance that is not (yet) connected: ask again
        return None
    return res.result if res.result["state"] in ("done", "failed") else None


async def _run_workflow(client: Client, broker: str) -> dict[str, Any]:
    started = await client.request(broker, "workflow.run", {"workflow": "relay", "wait": 0}, timeout=20)
    assert started.outcome is Outcome.OK, started.error
    return await until(lambda: _status(client, broker, started.result["instance"]), timeout=40,
                       what="the workflow to finish")


async def test_partitioning_the_leader_s_host(tmp_path: Path) -> None:
    hosts = SimulatedHosts(3)
    hosts.create()
    etcd = PrivateEtcd(tmp_path / "etcd", hosts=hosts.addresses, wraps=[hosts.wrap(n) for n in range(3)])
    (tmp_path / "xmpp").mkdir()
    nodes = [EjabberdNode(hosts, n, tmp_path / "xmpp") for n in range(3)]
    brokers: list[subprocess.Popen[str]] = []
    actors: list[Any] = []
    agents: list[AgentProcess] = []
    observer = None
    try:
        await asyncio.to_thread(etcd.start)
        for node in nodes:  # in order: each joins the first
            await asyncio.to_thread(node.start)
        await asyncio.to_thread(nodes[0].register, {"broker": "pw-broker", "operator": "pw-operator",
                                                    "gated": "pw-gated", "bystander": "pw-bystander"})
        broker_bare, operator, agent_jid = f"broker@{DOMAIN}", f"operator@{DOMAIN}", f"gated@{DOMAIN}"
        bystander_jid = f"bystander@{DOMAIN}"
        workflows = tmp_path / "workflows"
        workflows.mkdir()
        (workflows / "relay.yaml").write_text(yaml.safe_dump(RELAY))
        state = StateConfig(endpoints=tuple(etcd.endpoints), prefix="/partition-test")
        for n in range(3):
            home = tmp_path / f"host{n + 1}"  # each host's own disk: nothing shared but etcd
            home.mkdir()
            settings = {"jid": broker_bare, "password": "pw-broker", "host": nodes[n].address,
                        "port": EjabberdNode.PORT, "domain": DOMAIN, "cert": str(nodes[0].cert_path),
                        "resource": f"broker-{n + 1}", "state_dir": str(home / "own"),
                        "shared_dir": str(home / "shared"), "etcd": list(state.endpoints), "prefix": state.prefix,
                        "admins": [operator], "workflows": str(workflows),
                        "admit": [[agent_jid, "sample", ["/host/a"]], [bystander_jid, "sample", ["/host/b"]]]}
            (home / "own").mkdir()
            (home / "shared").mkdir()
            brokers.append(await asyncio.to_thread(spawn_broker, settings, home / "broker.json", hosts.wrap(n)))
        instances = [f"{broker_bare}/broker-{n + 1}" for n in range(3)]
        observer = EtcdLease(state, "observer", term=6)
        leader, old_term = await until(observer.leader, timeout=30, what="a broker instance to lead")
        lost = instances.index(leader)
        others = [i for i in instances if i != leader]
        # The gated agent on a host that stays, the bystander on the leader's host (the one cut off), each
        # on its own host's node; the client on the bridge's side, on the node of the host that stays.
        stays = (lost + 1) % 3
        for jid, password, resource, n in ((agent_jid, "pw-gated", "/host/a", stays),
                                           (bystander_jid, "pw-bystander", "/host/b", lost)):
            home = tmp_path / f"host{n + 1}" / jid.split("@")[0]
            home.mkdir()
            agents.append(await asyncio.to_thread(spawn_agent, {
                "jid": jid, "password": password, "host": nodes[n].address, "port": EjabberdNode.PORT,
                "domain": DOMAIN, "cert": str(nodes[0].cert_path), "resources": [resource],
                "broker": broker_bare, "admins": [operator], "state_dir": str(home / "state")},
                home / "agent.json", hosts.wrap(n)))
        agent, bystander = agents
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(nodes[0].cert_path))
        endpoint = Endpoint(nodes[stays].address, EjabberdNode.PORT, DOMAIN, ctx)
        client = Client(operator, "pw-operator", endpoint, broker=instances)
        await client.start(timeout=30)
        actors.append(client)
        assert await _answers(client, bystander_jid), "the agent on the leader's host did not answer"

        # A workflow asked of another instance runs on the leader; its gated step is in flight.
        started = await client.request(others[0], "workflow.run", {"workflow": "relay", "wait": 0}, timeout=30)
        assert started.outcome is Outcome.OK, started.error
        iid = started.result["instance"]
        await until(lambda: _state_is(agent, entered=True), timeout=30, what="the gated step to reach the agent")
        assert (await agent.state())["runs"] == 1

        hosts.partition(lost)  # the leader's host is cut off, connections and all
        new_leader, new_term = await until(
            lambda: _led_by_another(observer, leader), timeout=40, what="another instance to take the lead")
        assert new_term > old_term and new_leader in others
        # The new leader resends the gated step under its rid and its term: the run in flight answers it.
        await until(lambda: _state_is(agent, term=new_term), timeout=30,
                    what="the new leader's step to reach the agent")
        await agent.release()
        status = await until(lambda: _status(client, new_leader, iid), timeout=40, what="the workflow to finish")
        steps = {s["name"]: s for s in status["steps"]}
        assert status["state"] == "done", status
        assert await _state_is(agent, gated_runs=1, runs=2) and steps["gated"]["result"] == 1

        # A step from the cut-off leader, stamped with its term, is refused once the new term is seen.
        stale = Client(broker_bare, "pw-broker", endpoint, broker="")
        await stale.start(timeout=30)
        actors.append(stale)
        late = await stale.request(f"{agent_jid}/agent", "sample.count", {}, on=["/host/a"], timeout=10,
                                   rid="late-from-the-cut-off-leader", behalf=operator, term=old_term)
        assert late.outcome is Outcome.DENIED and await _state_is(agent, runs=2), late.error

        hosts.heal(lost)  # it comes back: one leader still, the old one follows
        await until(lambda: _holders_are(observer, 3), timeout=40, what="the old leader to rejoin the election")
        assert (await observer.holders())[0] == new_leader
        await until(lambda: _answers(client, bystander_jid), timeout=40, what="the agent on the healed host to answer")
        again = await _run_workflow(client, new_leader)
        assert again["state"] == "done" and await _state_is(agent, gated_runs=2, runs=4)  # each step once

        etcd.kill(lost)  # an etcd member dies: nothing stops
        after = await _run_workflow(client, new_leader)
        assert after["state"] == "done" and await _state_is(agent, gated_runs=3, runs=6)
        assert (await observer.current()) == new_leader
    finally:
        for actor in reversed(actors):
            await actor.stop()
        for process in agents:
            await asyncio.to_thread(process.stop)
        if observer is not None:
            await observer.aclose()
        for proc in brokers:
            proc.send_signal(signal.SIGTERM)
        for proc in brokers:
            try:
                await asyncio.to_thread(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        for node in reversed(nodes):
            await asyncio.to_thread(node.stop)
        await asyncio.to_thread(etcd.stop)
        hosts.remove()


async def _led_by_another(observer: EtcdLease, old: str) -> tuple[str, int] | None:
    try:
        found = await observer.leader()
    except observer.errors:  # the member asked may be the cut-off one: ask again
        return None
    return found if found is not None and found[0] != old else None


async def _answers(client: Client, jid: str) -> bool:
    """Whether the agent ``jid`` (on its own host) runs a step the client sends it over the cluster."""
    res = await client.request(f"{jid}/agent", "sample.count", {}, on=["/host/b"], timeout=5)
    return res.outcome is Outcome.OK


async def _state_is(agent: AgentProcess, **expected: Any) -> bool:
    """Whether the agent's counters and newest term are as ``expected``."""
    state = await agent.state()
    return all(state[key] == value for key, value in expected.items())


async def _holders_are(observer: EtcdLease, count: int) -> bool:
    try:
        return len(await observer.holders()) == count
    except observer.errors:
        return False
