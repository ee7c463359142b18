"""The monitor agent on the real Prosody with the real plugins: its ops, security, aggregation,
scheduled checks with soft/hard states, alerts to the broker, and the bridge's command lines."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agents.errors import Outcome
from agents.monitor.agent import MonitorAgent
from agents.monitor.aggregate import aggregate
from agents.monitor.ranges import State
from conftest import until

DUMMY = "/usr/lib/nagios/plugins/check_dummy"

pytestmark = pytest.mark.skipif(not Path(DUMMY).exists(), reason="monitoring-plugins-basic is not installed")


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


async def test_check_runs_the_plugin_and_list_shows_arguments(mesh):
    broker = await mesh.broker()
    mon = await mesh.agent(MonitorAgent, broker, ["/host/mon-a"])
    await until(lambda: len(broker.directory) == 1, what="the monitor agent in the directory")
    client = await mesh.client(broker)

    report = await client.call("monitor.check", {"check": "dummy", "args": ["state=2", "text=disk on fire"]},
                               on=["/host/mon-a"], timeout=10)
    assert report.ok, report.results
    result = report.results[0].result
    assert (result["state"], result["code"], result["text"]) == ("CRITICAL", 2, "CRITICAL: disk on fire")
    assert result["host"] == "mon-a" and result["exit_code"] == 2 and result["duration"] > 0
    assert result["output"] == "CRITICAL: disk on fire"

    load = await client.call("monitor.check", {"check": "load", "args": ["warn=99,99,99", "crit=100,100,100"]},
                             to=[str(mon.jid)], timeout=10)
    metrics = {m["label"]: m for m in load.results[0].result["metrics"]}
    assert load.results[0].result["state"] == "OK" and set(metrics) == {"load1", "load5", "load15"}
    assert metrics["load1"]["warn"] == "99" and metrics["load1"]["crit"] == "100"

    listing = await client.call("monitor.list", {}, to=[str(mon.jid)], timeout=5)
    checks = {c["name"]: c for c in listing.results[0].result["checks"]}
    assert {"load", "disk", "procs", "users", "dummy"} <= set(checks)
    assert [a["name"] for a in checks["dummy"]["arguments"]] == ["state", "text"]


async def test_unknown_check_and_undeclared_argument_are_refused_clearly(mesh, tmp_path):
    ran = tmp_path / "ran"
    plugin = script(tmp_path, "touching", f'touch {ran}\necho "OK - ran"\n')
    mon = await mesh.agent(MonitorAgent, None, ["/host/mon-b"],
                           settings={"checks": {"t": {"plugin": plugin, "arguments": {
                               "warn": {"type": "range", "option": "-w"}}}}})
    client = await mesh.client()

    unknown = await client.request(str(mon.jid), "monitor.check", {"check": "rm-rf"}, timeout=5)
    assert unknown.outcome is Outcome.FAILED
    assert "no check named 'rm-rf'" in unknown.error and "it offers t" in unknown.error

    for bad in (["command=/bin/sh"], ["warn=10", "warn=20"], ["novalue"], ["warn=not-a-range"]):
        refused = await client.request(str(mon.jid), "monitor.check", {"check": "t", "args": bad}, timeout=5)
        assert refused.outcome is Outcome.FAILED and "bad-argument" in refused.error, (bad, refused)
    assert "does not take argument(s) 'command'" in (await client.request(
        str(mon.jid), "monitor.check", {"check": "t", "args": ["command=x"]}, timeout=5)).error
    assert not ran.exists(), "a refused request must not run the plugin"


async def test_shell_metacharacters_arrive_as_one_literal_argv_element(mesh, tmp_path):
    record = tmp_path / "argv"
    # The plugin writes each argument on its own NUL-terminated record, exactly as received.
    plugin = script(tmp_path, "argv", f'printf "%s\\0" "$@" > {record}\necho "OK - $# args"\n')
    evil = f"x; touch {tmp_path}/pwned && echo $(id) `id` | cat > {tmp_path}/pwned2 & '\"\\ *"
    mon = await mesh.agent(MonitorAgent, None, ["/host/mon-c"], settings={"checks": {"argv": {
        "plugin": plugin, "args": ["--fixed"],
        "arguments": {"text": {"type": "str", "option": "--text", "pattern": r"[^\x00-\x1f]{0,300}"}}}}})
    client = await mesh.client()
    res = await client.request(str(mon.jid), "monitor.check", {"check": "argv", "args": [f"text={evil}"]}, timeout=5)
    assert res.outcome is Outcome.OK, res.error
    assert res.result["text"] == "OK - 3 args"
    assert record.read_bytes().split(b"\0")[:-1] == [b"--fixed", b"--text", evil.encode()]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()


async def test_a_caller_who_is_not_allowed_is_denied_and_nothing_runs(mesh, tmp_path):
    ran = tmp_path / "ran"
    plugin = script(tmp_path, "touching", f'touch {ran}\necho "OK"\n')
    mon = await mesh.agent(MonitorAgent, None, ["/host/mon-d"], settings={"checks": {"t": {"plugin": plugin}}})
    stranger = await mesh.client(account=mesh.account("nagios"))
    res = await stranger.request(str(mon.jid), "monitor.check", {"check": "t"}, timeout=5)
    assert res.outcome is Outcome.DENIED and "may not run monitor.check" in res.error
    assert not ran.exists()


async def test_aggregate_across_hosts_gives_counts_worst_state_and_all_perfdata(mesh):
    broker = await mesh.broker()

    def svc(code: int, text: str) -> dict:
        return {"checks": {"svc": {"plugin": DUMMY, "args": [str(code), f"{text} | conns=5;10;20;0"]}}}

    await mesh.agent(MonitorAgent, broker, ["/host/db1", "/cluster/agg/db1"], settings=svc(0, "fine"))
    await mesh.agent(MonitorAgent, broker, ["/host/db2", "/cluster/agg/db2"], settings=svc(2, "down"))
    await mesh.agent(MonitorAgent, broker, ["/host/db3", "/cluster/agg/db3"], settings=svc(0, "fine"))
    await until(lambda: len(broker.directory) == 3, what="three monitor agents")
    client = await mesh.client(broker)
    report = await client.call("monitor.check", {"check": "svc"}, on=["/cluster/agg"], timeout=10)
    agg = aggregate(report)
    assert agg.worst is State.CRITICAL
    assert agg.counts == {"OK": 2, "WARNING": 0, "CRITICAL": 1, "UNKNOWN": 0}
    assert agg.summary() == "2 OK, 1 CRITICAL (db2)"
    first, *lines = agg.render().split("\n")
    assert first == ("CRITICAL - 2 OK, 1 CRITICAL (db2)|db1:conns=5;10;20;0 db2:conns=5;10;20;0"
                     " db3:conns=5;10;20;0")
    assert lines == ["db1: OK: OK: fine", "db2: CRITICAL: CRITICAL: down", "db3: OK: OK: fine"]


async def test_scheduled_check_alerts_the_broker_on_hard_changes_and_bridges_results(mesh, tmp_path):
    broker = await mesh.broker()
    state_file = tmp_path / "state"
    state_file.write_text("0")
    plugin = script(tmp_path, "flip", f'read s < {state_file}\necho "state $s|v=$s"\nexit $s\n')
    command_file = tmp_path / "nagios.cmd"
    command_file.write_text("")
    bridge_jid, bridge_pw = mesh.account("bridge")
    pub_jid, pub_pw = mesh.account("monitor")
    broker.admit(pub_jid, MonitorAgent.kind, ["/host/web1"])  # the publisher only: it alerts the broker
    bridge = await mesh.start(MonitorAgent(bridge_jid, bridge_pw, mesh.endpoint, resources=["/host/nagios"],
                                           authorizer=mesh.admins, settings={"nagios": {
                                               "command_file": str(command_file), "hosts": {pub_jid: "web1"},
                                               "services": {"flip": "Flip Service"}}}))
    publisher = await mesh.start(MonitorAgent(pub_jid, pub_pw, mesh.endpoint, resources=["/host/web1"],
                                              broker=broker.jid.bare, authorizer=mesh.admins, settings={
                                                  "checks": {"flip": {"plugin": plugin}},
                                                  "publish_to": [bridge_jid],
                                                  "schedule": {"flip": {"interval": 0.1, "jitter": 0.1,
                                                                        "repeats": 2}}}))
    await until(lambda: bridge.bridge.written >= 2, what="published results written by the bridge")
    state_file.write_text("2")
    await until(lambda: any(a.state == "CRITICAL" for a in broker.alerts.recent), what="a CRITICAL alert")
    state_file.write_text("0")
    await until(lambda: any(a.state == "OK" for a in broker.alerts.recent), what="a recovery alert")

    alerts = [(a.previous, a.state, a.check, a.host, a.source) for a in broker.alerts.recent]
    assert alerts[:2] == [("OK", "CRITICAL", "flip", "web1", pub_jid), ("CRITICAL", "OK", "flip", "web1", pub_jid)]
    client = await mesh.client(broker)
    listed = await client.call("mesh.alerts", {}, to=[str(broker.jid)], timeout=5)
    assert [a["state"] for a in listed.results[0].result][:2] == ["CRITICAL", "OK"]

    lines = command_file.read_text().splitlines()
    assert lines and all(";web1;Flip Service;" in line and "PROCESS_SERVICE_CHECK_RESULT" in line for line in lines)
    assert any(line.endswith(";2;state 2|v=2") for line in lines)
    assert publisher.alerts_posted >= 2 and bridge.bridge.dropped == 0


async def test_bridge_drops_results_from_agents_it_does_not_know(mesh, tmp_path):
    command_file = tmp_path / "nagios.cmd"
    command_file.write_text("")
    bridge = await mesh.agent(MonitorAgent, None, ["/host/nagios2"], settings={"nagios": {
        "command_file": str(command_file), "hosts": {"someone-else": "web9"}}})
    stranger = await mesh.agent(MonitorAgent, None, ["/host/web9"], settings={
        "checks": {"d": {"plugin": DUMMY, "args": ["0", "hi"]}}, "publish_to": [str(bridge.jid)],
        "schedule": {"d": {"interval": 0.1, "repeats": 1}}})
    await until(lambda: bridge.bridge.dropped >= 1, what="a dropped result")
    assert command_file.read_text() == "" and stranger.scheduler.last
