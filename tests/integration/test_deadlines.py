"""Absolute deadlines on the real server (docs/protocol.md section 9): a request carries the sender's
wall-clock deadline beside its relative timeout, and an agent never starts a request whose deadline
(plus the clock-skew allowance) has passed, however long the request was held up on the way. And a
short deadline never shortens someone else's fence: a caller that joins a fence in flight only stops
waiting (real fence_dummy devices).

The attacks are sent with the raw client (tests/rawxmpp.py), written from the protocol text; the
frozen agent is a real process stopped with SIGSTOP while a destructive request waits for it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from agents import audit, protocol
from agents.errors import Outcome
from agents.fencing.agent import FencingAgent
from agents.fencing.devices import DeviceRegistry
from agents.fencing.power import PowerController, StillInFlight
from agents.gateway import Gateway, call_via_gateway, call_via_gateway_blocking
from conftest import DOMAIN, ROOT, until
from fence_mesh import dummy_device
from rawxmpp import NS_CLIENT, NS_VERTEBRA, RawXMPP
from sample_agent import SampleAgent


async def raw_operator(mesh) -> RawXMPP:
    jid, password = mesh.operator  # a mesh admin: what it asks is allowed, so only the deadline can stop it
    return await RawXMPP.login(mesh.server.host, mesh.server.port, DOMAIN, jid.split("@")[0], password,
                               ssl_context=mesh.server.ssl_context(), resource="raw")


def now_ms() -> int:
    return int(time.time() * 1000)


def answer_to(iq_id: str):
    return lambda e: e.tag == f"{{{NS_CLIENT}}}iq" and e.get("id") == iq_id and e.get("type") in ("result", "error")


def condition(reply: ET.Element) -> tuple[str | None, str]:
    """The Vertebra application condition of an error answer, and its sentence."""
    error = reply.find(f"{{{NS_CLIENT}}}error")
    assert error is not None, ET.tostring(reply)
    cond = next((c.tag.split("}", 1)[1] for c in error if c.tag.startswith(f"{{{NS_VERTEBRA}}}")), None)
    text = error.find("{urn:ietf:params:xml:ns:xmpp-stanzas}text")
    return cond, text.text if text is not None else ""


async def test_a_request_held_up_while_its_agent_was_stopped_is_never_started(mesh, server, tmp_path):
    broker = await mesh.broker()
    jid, pw = mesh.account("frozen")
    broker.admit(jid, SampleAgent.kind, ["/host/frozen"])
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "sample_agent.py"), jid, pw, str(server.port),
                             str(server.cert_path), broker.jid.bare, mesh.operator[0], "/host/frozen"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    target, effect, raw_effect = f"{jid}/agent", tmp_path / "powered-off", tmp_path / "raw-powered-off"
    raw = None
    try:
        ready = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert ready.strip() == "ready"
        client = await mesh.client(broker)
        raw = await raw_operator(mesh)
        proc.send_signal(signal.SIGSTOP)

        # The runtime's own caller, and a raw one that keeps listening after it has given up.
        deadline_ms = now_ms() + 3000
        await raw.send(f"<iq type='set' id='late1' to='{target}'>"
                       + raw.op_xml("sample.toggle", {"target": str(raw_effect)}, timeout_ms=3000,
                                    attrs={"deadline": str(deadline_ms)}) + "</iq>")
        latest = time.time() + 3  # no later than the client's deadline
        res = await client.request(target, "sample.toggle", {"target": str(effect)}, timeout=3)
        assert res.outcome is Outcome.TIMEOUT, (res.outcome, res.error)
        # Both callers have given up; once their deadlines are past by the skew allowance, too, the agent wakes.
        await until(lambda: time.time() > latest + protocol.CLOCK_SKEW_ALLOWANCE + 0.5, timeout=15,
                    what="the deadlines to pass")
        proc.send_signal(signal.SIGCONT)

        late = await raw.next(answer_to("late1"), timeout=20)
        cond, text = condition(late)
        assert cond == "timeout" and "was not started" in text and "nothing was done" in text, text
        # It is awake and serving, and neither held-up request ran.
        fresh = await client.request(target, "sample.echo", {"text": "awake"}, timeout=10)
        assert fresh.outcome is Outcome.OK
        assert not effect.exists() and not raw_effect.exists()
        again = await client.request(target, "sample.toggle", {"target": str(effect)}, timeout=10)
        assert again.outcome is Outcome.OK and again.result == 1  # what the held-up one would have done
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
        if raw is not None:
            await raw.close()


async def test_a_request_whose_deadline_has_passed_is_answered_timeout_audited_and_not_run(mesh, tmp_path):
    agent = await mesh.agent(SampleAgent, None, ["/host/late"])
    raw = await raw_operator(mesh)
    target, effect = str(agent.jid), tmp_path / "effect"
    try:
        # Its relative timeout alone would let it run; its deadline is 10 s gone.
        stale = raw.op_xml("sample.toggle", {"target": str(effect)}, rid="stale-1", timeout_ms=5000,
                           attrs={"deadline": str(now_ms() - 10_000)})
        cond, text = condition(await raw.iq(target, stale))
        assert cond == "timeout" and "sample.toggle was not started" in text and "nothing was done" in text, text
        assert "allowing 2s of clock skew" in text
        assert not effect.exists()
        # Audited: allowed by the policy, then ended as timeout without running.
        def records() -> list[tuple[str, str]]:
            return [(r["kind"], r.get("decision") or r.get("outcome"))
                    for r in audit.show(agent.state_dir / "audit.sqlite", op="sample.toggle") if r["rid"] == "stale-1"]

        await until(lambda: len(records()) == 2, what="both audit records")
        assert records() == [("decided", "allow"), ("ended", "timeout")], records()
        # Not remembered under its rid, since it never started: sent again in time, it runs (once).
        retry = raw.op_xml("sample.toggle", {"target": str(effect)}, rid="stale-1", timeout_ms=5000,
                           attrs={"deadline": str(now_ms() + 5000)})
        for _ in range(2):
            reply = await raw.iq(target, retry)
            assert reply.get("type") == "result" and effect.read_text() == "toggled\n", ET.tostring(reply)

        # A deadline that is not a whole number of milliseconds is refused, not ignored.
        for bad in ("soon", "1.5e12", "-5"):
            reply = await raw.iq(target, raw.op_xml("sample.toggle", {"target": str(effect)}, timeout_ms=5000,
                                                    attrs={"deadline": bad}))
            cond, text = condition(reply)
            assert cond == "bad-payload" and "'deadline' must be" in text, (bad, text)
        assert effect.read_text() == "toggled\n"

        # An older sender states no deadline: its relative timeout alone applies, as before.
        reply = await raw.iq(target, raw.op_xml("sample.toggle", {"target": str(effect)}, timeout_ms=5000))
        assert reply.get("type") == "result" and effect.read_text() == "toggled\ntoggled\n"
    finally:
        await raw.close()


async def test_the_deadline_also_ends_an_op_that_has_started(mesh):
    agent = await mesh.agent(SampleAgent, None, ["/host/capped"])
    raw = await raw_operator(mesh)
    try:
        # 30 s by the relative timeout, but the sender's deadline is one second away: the op is
        # stopped at that deadline (plus the skew allowance), not left to sleep for 20 s.
        req = raw.op_xml("sample.sleep", {"seconds": 20}, timeout_ms=30_000, attrs={"deadline": str(now_ms() + 1000)})
        cond, text = condition(await raw.iq(str(agent.jid), req, timeout=15))
        assert cond == "timeout" and "did not finish within" in text, text
    finally:
        await raw.close()


async def test_a_short_caller_joining_a_fence_in_flight_does_not_cut_its_budget(mesh, tmp_path):
    node1 = tmp_path / "node1.state"
    node1.write_text("on")
    # fence_dummy waits power_wait seconds after switching, so the off is in flight for a while.
    fencing = await mesh.agent(FencingAgent, None, ["/host/fencer"], settings={
        "clusters": {"c1": ["node1"]},
        "fencing": {"devices": {"pdu1": dummy_device(node1, power_wait="3")}, "levels": {"node1": [["pdu1"]]}}})
    first, hurried = await mesh.client(), await mesh.client()
    args = {"cluster": "c1", "node": "node1"}
    started = asyncio.create_task(first.request(str(fencing.jid), "fence.off", args, timeout=30))
    await until(lambda: fencing.power.in_flight("node1", "off"), what="the off in flight")

    # Two seconds: less than the fence needs, and less than a fence device's answer margin.
    short = await hurried.request(str(fencing.jid), "fence.off", args, timeout=2)
    assert short.outcome is Outcome.TIMEOUT, (short.outcome, short.error)
    assert "still in progress" in short.error and "keeps its own" in short.error, short.error

    done = await started
    assert done.outcome is Outcome.OK and done.result["state"] == "off", done.error
    assert node1.read_text() == "off"
    # One device action (off, then the status that verifies it): the short caller neither cut it
    # short nor started one of its own; the verified result is recorded.
    assert [(a["action"], a["ok"]) for a in done.result["attempts"]] == [("off", True), ("status", True)]
    assert fencing.power.device_runs == 2
    outcomes = [e for e in fencing.events if e["event"] == "outcome"]
    assert [(e["ok"], e["state"]) for e in outcomes] == [(True, "off")]


async def test_the_power_controller_keeps_the_budget_of_the_action_a_caller_joins(tmp_path):
    node1 = tmp_path / "node1.state"
    node1.write_text("on")
    power = PowerController(DeviceRegistry.from_config({"devices": {"pdu1": dummy_device(node1, power_wait="2")},
                                                        "levels": {"node1": [["pdu1"]]}}))
    started = asyncio.create_task(power.off("node1", budget=30))
    await until(lambda: power.in_flight("node1", "off"), what="the off in flight")
    # Joining with almost no time, and none to wait: it stops waiting, the action goes on.
    with pytest.raises(StillInFlight, match="keeps its own 30s budget"):
        await power.off("node1", budget=0.01, wait=0.01)
    outcome = await started
    assert outcome.ok and outcome.state == "off" and node1.read_text() == "off"
    assert power.device_runs == 2
    # With nothing in flight, too little time starts nothing.
    refused = await power.on("node1", budget=0)
    assert not refused.ok and "too little time" in refused.message and power.device_runs == 2


async def test_the_gateway_sends_nothing_for_a_program_whose_deadline_has_passed(mesh, tmp_path):
    broker = await mesh.broker()
    agent = await mesh.agent(SampleAgent, broker, ["/host/gw"])
    folder = Path(tempfile.mkdtemp(prefix="vgw-"))  # short: a socket path has at most 107 bytes
    gw = await mesh.start(Gateway(folder / "run" / "gateway.sock", mesh.endpoint, str(broker.jid)))
    effect = tmp_path / "effect"
    call = {"op": "sample.toggle", "args": {"target": str(effect)}, "to": [str(agent.jid)], "scope": "all",
            "timeout": 10.0}
    # A program that gave up before the gateway read its call (the gateway was busy or stopped).
    late = await call_via_gateway(gw.path, *mesh.operator, {**call, "deadline": time.time() - 1})
    (res,) = late.results
    assert res.outcome is Outcome.TIMEOUT and "nothing was sent" in res.error, res
    # Nor does any actor send a request it has no time left for.
    none_left = await broker.request(str(agent.jid), "sample.toggle", {"target": str(effect)}, timeout=0)
    assert none_left.outcome is Outcome.TIMEOUT and "nothing was sent" in none_left.error
    assert not effect.exists()
    # A program in time: the gateway stamps its deadline itself, and the call runs.
    report = await call_via_gateway(gw.path, *mesh.operator, call)
    assert report.results[0].outcome is Outcome.OK, report
    blocking = await asyncio.to_thread(call_via_gateway_blocking, gw.path, *mesh.operator, call)  # check_vertebra's way
    assert blocking["results"][0]["outcome"] == "ok", blocking
    assert effect.read_text() == "toggled\ntoggled\n"
