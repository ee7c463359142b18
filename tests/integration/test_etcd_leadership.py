"""The workflow lead on etcd (broker/state_etcd.py) and the term every step carries.

A private three-member etcd on loopback (tests/etcd_cluster.py) stands in for the cluster the
broker's instances share across machines: it holds the lead, the workflow instances and the rate
limits. The election is checked on its own (terms only grow, a
member may die, an instance the server says has gone is replaced at once), then two broker instances
run a workflow: the leader, in a process of its own, is suspended (SIGSTOP) while a step is in flight,
the other takes over and finishes the workflow without running the step again, and a step stamped
with the suspended leader's term is refused by the agent (``denied``, audited).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from agents import audit
from agents.config import StateConfig
from agents.errors import Outcome
from conftest import DOMAIN, ROOT, until
from etcd_broker import spawn_broker
from etcd_cluster import PrivateEtcd
from gated_agent import RELAY, GatedAgent

pytest.importorskip("aetcd", reason="the etcd client is the optional extra 'etcd': make install installs it")

from broker.state_etcd import EtcdLease  # noqa: E402  (after the check above)

@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with PrivateEtcd(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


def state(cluster: PrivateEtcd, prefix: str) -> StateConfig:
    return StateConfig(endpoints=tuple(cluster.endpoints), prefix=prefix)


async def test_one_leader_at_a_time_and_each_new_lead_has_a_newer_term(etcd: PrivateEtcd) -> None:
    cfg = state(etcd, "/election-test")
    one, two = EtcdLease(cfg, "b@x/broker", term=2), EtcdLease(cfg, "b@x/broker-2", term=2)
    try:
        first = await one.take()
        assert first is not None and await two.take() is None
        assert await one.take() == first and await two.current() == "b@x/broker"  # renewed: the same lead
        # The server says the leader's session ended: the other takes over at once, with a newer term.
        second = await two.take(gone="b@x/broker")
        assert second is not None and second > first and await one.current() == "b@x/broker-2"
        assert await one.take() is None  # the old leader, back, waits its turn
        # A leader that stops renewing (stalled, partitioned) loses the lead when its lease runs out,
        # and by its own clock it knows that it may have: it no longer counts itself leader.
        third = await until(one.take, timeout=20, what="the lead to pass once the leader stopped renewing")
        assert third > second and time.monotonic() >= two.valid_until
        # Losing a member of three changes nothing: the client moves on to the others.
        etcd.kill(2)
        await asyncio.to_thread(etcd.wait_healthy)  # the two left elect a new etcd leader if need be
        assert await one.take() == third and await two.take() is None
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_suspended_leader_is_replaced_and_its_late_step_is_refused(
        etcd: PrivateEtcd, mesh: Any, tmp_path: Path) -> None:
    prefix = f"/vertebra-{os.getpid()}"
    broker_jid, broker_pw = mesh.account("broker")
    operator = mesh.operator[0]
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "relay.yaml").write_text(yaml.safe_dump(RELAY))
    shared = tmp_path / "shared"
    shared.mkdir()
    agent_jid, agent_pw = mesh.account("gated")
    settings = {"jid": broker_jid, "password": broker_pw, "host": mesh.server.host, "port": mesh.server.port,
                "domain": DOMAIN, "cert": str(mesh.server.cert_path), "resource": "broker",
                "state_dir": str(tmp_path / "broker-1"), "shared_dir": str(shared), "etcd": etcd.endpoints[:2],
                "prefix": prefix, "admins": [operator], "workflows": str(workflows),
                "admit": [[agent_jid, "sample", ["/host/a"]]]}
    (tmp_path / "broker-1").mkdir()
    first = await asyncio.to_thread(spawn_broker, settings, tmp_path / "broker-1.json")
    observer = EtcdLease(state(etcd, prefix), "observer", term=6)
    try:
        # The instance in its own process leads; its term is the fencing token of its steps.
        found = await until(observer.leader, timeout=20, what="the first instance to lead")
        assert found[0] == f"{broker_jid}/broker"
        old_term = found[1]
        from broker.service import Broker
        (tmp_path / "broker-2").mkdir()
        second = await mesh.start(Broker(broker_jid, broker_pw, mesh.endpoint, resource="broker-2",
                                         state_dir=tmp_path / "broker-2", shared_dir=shared,
                                         state=state(etcd, prefix), authorizer=mesh.admins,
                                         settings={"workflows": str(workflows)}))
        second.admit(agent_jid, "sample", ["/host/a"])
        (tmp_path / "agent").mkdir()
        agent = await mesh.start(GatedAgent(agent_jid, agent_pw, mesh.endpoint, resources=["/host/a"],
                                            broker=broker_jid, state_dir=tmp_path / "agent",
                                            authorizer=mesh.admins))
        await until(lambda: len(second.directory) == 1, timeout=20, what="the agent in the second instance's directory")
        assert not second.leadership.leading
        client = await mesh.client(second)

        # Asked of the second instance, run by the leader: the gated step is in flight from it.
        started = await client.request(str(second.jid), "workflow.run", {"workflow": "relay", "wait": 0}, timeout=20)
        assert started.outcome is Outcome.OK, started.error
        iid = started.result["instance"]
        await until(agent.entered.is_set, timeout=20, what="the gated step to reach the agent")
        assert agent.runs == 1

        first.send_signal(signal.SIGSTOP)  # stalled, session and all, as a paused VM would be
        await until(lambda: second.leadership.leading, timeout=30, what="the second instance to take the lead")
        new_term = second.leadership.term
        assert new_term is not None and new_term > old_term
        # The new leader resends the step in flight under its rid and its own term: answered from the
        # first run, never run again, once it ends.
        await until(lambda: agent._terms.newest(broker_jid) == new_term, timeout=20,
                    what="the new leader's step to reach the agent")
        agent.release.set()
        res = await until(lambda: _finished(client, second, iid), timeout=30, what="the workflow to finish")
        steps = {s["name"]: s for s in res["steps"]}
        assert res["state"] == "done", res
        assert agent.gated_runs == 1 and steps["gated"]["result"] == 1 and agent.runs == 2
        # The instance, its steps, the lead, the known agents and the fence ledger lived in etcd, not in
        # the shared directory.
        assert not ({"workflows.sqlite", "leader.sqlite", "rates.sqlite", "broker.sqlite", "fencing.sqlite"}
                    & {p.name for p in shared.iterdir()})

        # A step the old leader sends late, stamped with its term, is refused: nothing runs.
        late = await second.request(str(agent.jid), "sample.count", {}, on=["/host/a"], timeout=10,
                                    rid="late-step-from-the-old-leader", behalf=operator, term=old_term)
        assert late.outcome is Outcome.DENIED and "lead has ended" in (late.error or ""), late.error
        assert agent.runs == 2
        agent.audit.flush()
        refused = [r for r in audit.show(tmp_path / "agent" / "audit.sqlite", op="sample.count")
                   if r["rid"] == "late-step-from-the-old-leader"]
        assert [r["kind"] for r in refused] == ["refused"] and refused[0]["condition"] == "denied"
        # The current leader's term still counts.
        now = await second.request(str(agent.jid), "sample.count", {}, on=["/host/a"], timeout=10,
                                   rid="a-step-from-the-leader", behalf=operator, term=new_term)
        assert now.outcome is Outcome.OK and agent.runs == 3

        # The old leader wakes up: it finds its lead gone and takes nothing back.
        first.send_signal(signal.SIGCONT)
        assert await observer.current() == f"{broker_jid}/broker-2"
        status = await _finished(client, second, iid)
        assert status is not None and status["state"] == "done" and agent.gated_runs == 1
    finally:
        first.send_signal(signal.SIGCONT)
        first.terminate()
        try:
            await asyncio.to_thread(first.wait, 20)
        except Exception:
            first.kill()
            await asyncio.to_thread(first.wait)
        await observer.aclose()


async def _finished(client: Any, broker: Any, iid: str) -> dict[str, Any] | None:
    res = await client.request(str(broker.jid), "workflow.status", {"instance": iid, "wait": 1}, timeout=10)
    assert res.outcome is Outcome.OK, res.error
    return res.result if res.result["state"] in ("done", "failed") else None


async def test_the_mesh_file_s_broker_state_puts_vertebra_broker_on_etcd(etcd: PrivateEtcd, mesh_home: Any) -> None:
    home = mesh_home([])
    mesh = yaml.safe_load((home / "mesh.yaml").read_text())
    name = mesh["broker"]
    mesh["broker"] = {"name": name, "state": f"{etcd.url}/from-the-mesh-file"}
    (home / "mesh.yaml").write_text(yaml.safe_dump(mesh))
    log = (home / "broker.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "agents.cli", "--home", str(home), "broker"], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    observer = EtcdLease(state(etcd, "/from-the-mesh-file"), "observer", term=6)
    try:
        found = await until(observer.leader, timeout=30, what="`vertebra broker` to lead in etcd")
        assert found[0] == f"{name}@{DOMAIN}/broker"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert await observer.holders() == []  # it gave the lead up as it stopped
        # Its workflows' store was etcd too: nothing of it in the broker's state directory (which it used).
        assert (home / "state" / name / "audit.sqlite").is_file()
        assert not list((home / "state").rglob("workflows.sqlite"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        await observer.aclose()
