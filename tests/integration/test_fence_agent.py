"""The fencing agent's ops through the real mesh (Prosody, broker, client) to real fence_dummy
devices and small fence_* wrapper scripts around it: power changes the status file, failures and
hangs are failures, levels fall back, concurrent requests coalesce, a repeated rid does not rerun."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from agents.config import ConfigError
from agents.errors import Outcome
from agents.fencing.agent import FencingAgent
from conftest import until


def dummy(status_file: Path, **extra) -> dict:
    return {"agent": "fence_dummy",
            "params": {"type": "file", "status_file": str(status_file), "power_timeout": "2"}, **extra}


def counted(tmp_path: Path, name: str, log: Path, body: str = "") -> str:
    """A fence_* script that logs each action line, runs `body`, then hands stdin to fence_dummy."""
    path = tmp_path / name
    path.write_text('#!/bin/sh\ninput=$(cat)\n'
                    f'printf "%s\\n" "$input" | grep "^action=" >> {log}\n' + body +
                    '\nprintf "%s\\n" "$input" | exec /usr/sbin/fence_dummy\n')
    path.chmod(0o755)
    return str(path)


async def fencing_agent(mesh, devices: dict, levels: dict, cluster: str = "c1"):
    broker = await mesh.broker()
    agent = await mesh.agent(FencingAgent, broker, ["/host/fencer"],
                             settings={"cluster": cluster,
                                       "fencing": {"devices": devices, "levels": levels}})
    await until(lambda: len(broker.directory) == 1, what="fencing agent in the directory")
    return broker, agent, await mesh.client(broker)


async def test_off_on_reboot_status_list_through_the_mesh(mesh, tmp_path):
    state = tmp_path / "node1.state"
    state.write_text("on")
    broker, agent, client = await fencing_agent(mesh, {"dev": dummy(state)}, {"node1": [["dev"]]})
    node = {"cluster": "c1", "node": "node1"}
    where = ["/cluster/c1/node/node1"]

    off = await client.call("fence.off", node, on=where, scope="one", timeout=20)
    assert off.ok, off.to_dict()
    assert state.read_text() == "off"
    result = off.results[0].result
    assert result["state"] == "off" and result["devices"] == ["dev"]
    assert [(a["action"], a["ok"]) for a in result["attempts"]] == [("off", True), ("status", True)]

    status = await client.call("fence.status", node, on=where, scope="one", timeout=20)
    assert status.ok and status.results[0].result["state"] == "off"

    on = await client.call("fence.on", node, on=where, scope="one", timeout=20)
    assert on.ok and on.results[0].result["state"] == "on" and state.read_text() == "on"

    state.write_text("off")  # reboot must go through off and come back on
    reboot = await client.call("fence.reboot", node, on=where, scope="one", timeout=20)
    assert reboot.ok and reboot.results[0].result["on_error"] is None
    assert [a["action"] for a in reboot.results[0].result["attempts"]] == ["off", "status", "on", "status"]
    assert state.read_text() == "on"

    listed = await client.call("fence.list", {}, on=["/cluster/c1"], timeout=10)
    assert listed.ok and listed.results[0].result == {"clusters": {"c1": ["node1"]}}

    # The agent advertises one resource per node it can fence, beside its configured ones.
    assert agent.resources == ["/host/fencer", "/cluster/c1/node/node1"]
    # Attempts and outcomes are announced, with who asked.
    outcomes = [e for e in agent.events if e["event"] == "outcome"]
    assert [(e["action"], e["ok"]) for e in outcomes] == [
        ("off", True), ("status", True), ("on", True), ("reboot", True)]
    assert all(e["caller"] == mesh.operator[0] for e in agent.events)


async def test_type_fail_is_a_failure_and_names_the_consequence(mesh, tmp_path):
    devices = {"bad": {"agent": "fence_dummy", "params": {"type": "fail", "power_timeout": "1"}}}
    _, agent, client = await fencing_agent(mesh, devices, {"node1": [["bad"]]})
    report = await client.call("fence.off", {"cluster": "c1", "node": "node1"}, scope="one", timeout=20)
    assert not report.ok
    r = report.results[0]
    assert r.outcome is Outcome.FAILED
    assert "Timed out waiting to power OFF" in r.error and "do not release its resources" in r.error
    assert agent.events[-1]["ok"] is False


async def test_a_hanging_device_is_killed_at_its_deadline(mesh, tmp_path):
    log = tmp_path / "runs.log"
    hang = counted(tmp_path, "fence_hang", log, "sleep 300")
    _, agent, client = await fencing_agent(mesh, {"hang": {"agent": hang, "timeout": 1}},
                                           {"node1": [["hang"]]})
    report = await client.call("fence.off", {"cluster": "c1", "node": "node1"}, scope="one", timeout=20)
    r = report.results[0]
    assert r.outcome is Outcome.FAILED and "timed out after 1.0s and was killed" in r.error
    # The whole process group is gone: no `sleep 300` is left holding the device.
    ps = await asyncio.create_subprocess_exec("pgrep", "-f", f"{hang}", stdout=asyncio.subprocess.PIPE)
    out, _ = await ps.communicate()
    assert out.strip() == b""


async def test_the_callers_budget_bounds_a_hanging_device(mesh, tmp_path):
    log = tmp_path / "runs.log"
    hang = counted(tmp_path, "fence_hang", log, "sleep 300")
    _, _, client = await fencing_agent(mesh, {"hang": {"agent": hang, "timeout": 300}},
                                       {"node1": [["hang"]]})
    # 6 s for the whole call: the agent kills the device in time to answer with its own failure.
    report = await client.call("fence.off", {"cluster": "c1", "node": "node1"}, scope="one", timeout=6)
    r = report.results[0]
    assert r.outcome is Outcome.FAILED, r
    assert "hang: off timed out" in r.error


async def test_level_fallback_from_a_failing_device_to_a_working_one(mesh, tmp_path):
    state = tmp_path / "node1.state"
    state.write_text("on")
    devices = {"bad": {"agent": "fence_dummy", "params": {"type": "fail", "power_timeout": "1"}},
               "good": dummy(state)}
    _, _, client = await fencing_agent(mesh, devices, {"node1": [["bad"], ["good"]]})
    report = await client.call("fence.off", {"cluster": "c1", "node": "node1"}, scope="one", timeout=20)
    assert report.ok, report.to_dict()
    result = report.results[0].result
    assert result["devices"] == ["good"] and state.read_text() == "off"
    assert [(a["device"], a["action"], a["ok"]) for a in result["attempts"]] == [
        ("bad", "off", False), ("good", "off", True), ("good", "status", True)]


async def test_ten_concurrent_offs_through_the_mesh_cause_one_device_action(mesh, tmp_path):
    state = tmp_path / "node1.state"
    state.write_text("on")
    log = tmp_path / "runs.log"
    slow = counted(tmp_path, "fence_counted", log, "sleep 0.3")
    _, agent, client = await fencing_agent(
        mesh, {"d": {"agent": slow, "params": {"type": "file", "status_file": str(state)}}},
        {"node1": [["d"]]})
    # Ten requests, each with its own request id, all in flight at once.
    reports = await asyncio.gather(*(
        client.call("fence.off", {"cluster": "c1", "node": "node1"}, scope="one", timeout=20)
        for _ in range(10)))
    assert all(r.ok for r in reports), [r.to_dict() for r in reports if not r.ok]
    assert log.read_text().splitlines() == ["action=off", "action=status"]
    assert state.read_text() == "off"
    assert len([e for e in agent.events if e["event"] == "attempt"]) == 10


async def test_a_repeated_request_id_returns_the_first_outcome_without_acting(mesh, tmp_path):
    state = tmp_path / "node1.state"
    state.write_text("on")
    log = tmp_path / "runs.log"
    program = counted(tmp_path, "fence_counted", log)
    _, agent, client = await fencing_agent(
        mesh, {"d": {"agent": program, "params": {"type": "file", "status_file": str(state)}}},
        {"node1": [["d"]]})
    rid = uuid.uuid4().hex
    args = {"cluster": "c1", "node": "node1"}
    first = await client.request(str(agent.jid), "fence.off", args, rid=rid, timeout=20)
    state.write_text("on")  # someone powered it back on by hand
    again = await client.request(str(agent.jid), "fence.off", args, rid=rid, timeout=20)
    assert first.outcome is again.outcome is Outcome.OK
    assert again.result == first.result
    assert log.read_text().splitlines() == ["action=off", "action=status"]
    assert state.read_text() == "on"  # the repeat did not run the device again


async def test_wrong_cluster_or_unknown_node_changes_nothing(mesh, tmp_path):
    state = tmp_path / "node1.state"
    state.write_text("on")
    _, agent, client = await fencing_agent(mesh, {"dev": dummy(state)}, {"node1": [["dev"]]})
    wrong = await client.request(str(agent.jid), "fence.off", {"cluster": "c2", "node": "node1"}, timeout=10)
    assert wrong.outcome is Outcome.FAILED and "fences no node 'node1' in cluster 'c2'" in wrong.error
    assert "c1/node1" in wrong.error
    unknown = await client.request(str(agent.jid), "fence.off", {"cluster": "c1", "node": "node9"},
                                   timeout=10)
    assert unknown.outcome is Outcome.FAILED and "node9" in unknown.error
    bad = await client.request(str(agent.jid), "fence.off", {"cluster": "c1", "node": "../x"}, timeout=10)
    assert bad.outcome is Outcome.FAILED and "must match" in bad.error
    assert state.read_text() == "on" and not agent.events


async def test_fencing_ops_are_destructive_and_an_unauthorized_caller_is_denied(mesh, tmp_path):
    state = tmp_path / "node1.state"
    state.write_text("on")
    broker, agent, _ = await fencing_agent(mesh, {"dev": dummy(state)}, {"node1": [["dev"]]})
    assert all(agent.ops[f"fence.{a}"].destructive for a in ("off", "on", "reboot"))
    assert not agent.ops["fence.status"].destructive
    stranger = await mesh.client(broker, account=mesh.account("stranger"))
    report = await stranger.request(str(agent.jid), "fence.off", {"cluster": "c1", "node": "node1"},
                                    timeout=10)
    assert report.outcome is Outcome.DENIED
    assert state.read_text() == "on"


async def test_an_agent_without_devices_serves_but_refuses_to_fence(mesh):
    broker = await mesh.broker()
    agent = await mesh.agent(FencingAgent, broker, ["/host/fencer"])
    client = await mesh.client(broker)
    listed = await client.request(str(agent.jid), "fence.list", {}, timeout=10)
    assert listed.outcome is Outcome.OK and listed.result == {"clusters": {}}
    off = await client.request(str(agent.jid), "fence.off", {"cluster": "c1", "node": "n1"}, timeout=10)
    assert off.outcome is Outcome.FAILED and "no fence devices configured" in off.error


def test_bad_settings_stop_the_agent_with_every_problem_named(mesh, tmp_path):
    with pytest.raises(ConfigError) as info:
        FencingAgent("f@vertebra.test", "pw", mesh.endpoint, name="fence9",
                     settings={"fencing": {"devices": {"d": {"agent": "fence_nope"}},
                                           "levels": {"n1": [["d"]]}}, "colour": "red"})
    text = str(info.value)
    assert text.startswith("fencing agent fence9: settings:")
    assert "settings.colour: unknown key" in text and "unknown agent program" in text
