"""The runtime end to end on the real private Prosody: advertise, discover, call, every outcome."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import uuid

import msgpack

from agents import protocol
from agents.errors import Outcome
from agents.storage.agent import StorageAgent
from conftest import ROOT, until
from sample_agent import SampleAgent


async def test_agents_advertise_and_broker_discovers_by_resource(mesh):
    broker = await mesh.broker()
    db1 = await mesh.agent(SampleAgent, broker, ["/host/db1"])
    db2 = await mesh.agent(SampleAgent, broker, ["/host/db2/disk/0"])
    store = await mesh.agent(StorageAgent, broker, ["/pool/tank"])
    await until(lambda: len(broker.directory) == 3, what="three agents in the directory")

    client = await mesh.client(broker)
    everyone = await client.call("mesh.agents", {}, to=[str(broker.jid)], timeout=5)
    listed = {a["jid"]: a for a in everyone.results[0].result}
    assert listed[str(db1.jid)]["ops"] == sorted(db1.ops)
    assert listed[str(db2.jid)]["resources"] == ["/host/db2/disk/0"]
    assert listed[str(store.jid)]["kind"] == "storage"

    async def targets(op, resources):
        found = await client.call("mesh.discover", {"op": op, "resources": resources}, to=[str(broker.jid)],
                                  timeout=5)
        return {e["jid"] for e in found.results[0].result}

    # A descendant, an ancestor and the exact path all match; a sibling does not.
    assert await targets("sample.echo", ["/host"]) == {str(db1.jid), str(db2.jid)}
    assert await targets("sample.echo", ["/host/db2"]) == {str(db2.jid)}
    assert await targets("sample.echo", ["/host/db1/disk/7"]) == {str(db1.jid)}
    assert await targets("sample.echo", ["/pool/tank"]) == set()
    assert await targets("storage.info", []) == {str(store.jid)}


async def test_agents_alike_cost_one_disco_query(mesh):
    broker = await mesh.broker()
    queries = []
    original = broker._query

    async def counting(*args):
        queries.append(args[0])
        return await original(*args)

    broker._query = counting
    first = await mesh.agent(SampleAgent, broker, ["/rack/r1"])
    await mesh.agent(SampleAgent, broker, ["/rack/r1"])
    await until(lambda: len(broker.directory) == 2, what="both agents")
    # Only the first agent is ever asked: the second is served from the cache. Usually once; the first
    # was asked twice in one CI run on a loaded two-node ejabberd cluster (a query that ended without an
    # answer is asked again when the agent repeats its presence), which does not cost the second a query.
    assert queries and set(queries) == {str(first.xmpp.boundjid)}, queries
    assert len(broker.directory.caps) == 1


async def test_agent_leaves_directory_the_moment_it_disconnects(mesh):
    broker = await mesh.broker()
    agent = await mesh.agent(SampleAgent, broker, ["/host/gone"])
    await until(lambda: len(broker.directory) == 1, what="agent listed")
    await agent.stop()
    await until(lambda: len(broker.directory) == 0, timeout=5, what="agent dropped")


async def test_call_reports_every_outcome_by_name(mesh):
    broker = await mesh.broker()
    agent = await mesh.agent(SampleAgent, broker, ["/host/a"])
    await until(lambda: len(broker.directory) == 1, what="agent listed")
    client = await mesh.client(broker)

    ok = await client.call("sample.echo", {"text": "hi", "times": 2}, on=["/host/a"], timeout=5)
    assert [r.outcome for r in ok.results] == [Outcome.OK]
    assert ok.results[0].result["text"] == "hihi"
    assert ok.results[0].result["caller"] == client.jid.bare
    assert ok.exit_code == 0

    failed = await client.call("sample.fail", {}, timeout=5)
    assert failed.results[0].outcome is Outcome.FAILED
    assert "unplugged" in failed.results[0].error
    crashed = await client.call("sample.crash", {}, timeout=5)
    assert crashed.results[0].outcome is Outcome.FAILED and "boom" in crashed.results[0].error

    intruder = await mesh.client(broker, mesh.account("intruder"))
    denied = await intruder.request(str(agent.jid), "sample.echo", {"text": "x"}, timeout=5)
    assert denied.outcome is Outcome.DENIED

    slow = await client.call("sample.sleep", {"seconds": 5}, timeout=1)
    assert slow.results[0].outcome is Outcome.TIMEOUT
    assert slow.exit_code == 4

    nobody = await client.call("sample.echo", {"text": "x"}, on=["/host/nowhere"], timeout=5)
    assert [(r.target, r.outcome) for r in nobody.results] == [("/host/nowhere", Outcome.NOT_DISCOVERED)]
    assert nobody.exit_code == 6

    offline = await client.request(f"{agent.jid.bare}/elsewhere", "sample.echo", {"text": "x"}, timeout=5)
    assert offline.outcome is Outcome.UNREACHABLE


async def test_scope_one_runs_exactly_once(mesh):
    broker = await mesh.broker()
    agents = [await mesh.agent(SampleAgent, broker, ["/pool/p"]) for _ in range(3)]
    await until(lambda: len(broker.directory) == 3, what="three agents")
    client = await mesh.client(broker)
    report = await client.call("sample.count", {}, on=["/pool/p"], scope="one", timeout=5)
    assert [r.outcome for r in report.results] == [Outcome.OK]
    assert sum(a.runs for a in agents) == 1


async def test_long_op_acks_then_streams_progress_then_one_outcome(mesh):
    broker = await mesh.broker()
    await mesh.agent(SampleAgent, broker, ["/host/long"])
    await until(lambda: len(broker.directory) == 1, what="agent listed")
    client = await mesh.client(broker)
    seen = []
    report = await client.call("sample.steps", {"steps": 4}, timeout=10,
                               progress=lambda target, seq, payload: seen.append((seq, payload["step"])))
    assert report.results[0].outcome is Outcome.OK
    assert report.results[0].result == {"done": 4}
    assert seen == [(1, 1), (2, 2), (3, 3), (4, 4)]


async def test_repeated_request_id_runs_once_and_returns_first_outcome(mesh):
    agent = await mesh.agent(SampleAgent, None, ["/host/idem"])
    client = await mesh.client()
    rid = uuid.uuid4().hex
    target = str(agent.jid)
    # Two concurrent copies while the first is still running, then one after it finished.
    first, second = await asyncio.gather(client.request(target, "sample.count", {}, timeout=5, rid=rid),
                                         client.request(target, "sample.count", {}, timeout=5, rid=rid))
    third = await client.request(target, "sample.count", {}, timeout=5, rid=rid)
    assert first.result == second.result == third.result == 1
    assert agent.runs == 1
    fresh = await client.request(target, "sample.count", {}, timeout=5)
    assert fresh.result == 2
    # The same id for a different request is refused, not answered with the first one's outcome.
    other = await client.request(target, "sample.echo", {"text": "x"}, timeout=5, rid=rid)
    assert other.outcome is Outcome.FAILED and "already used for a different request" in other.error
    assert agent.runs == 2


async def test_destructive_op_is_not_repeated_after_the_agent_restarts(mesh, tmp_path):
    state = tmp_path / "durable"
    state.mkdir()
    jid, pw = mesh.account("durable")
    effect = tmp_path / "effect"

    async def start_agent():
        return await mesh.start(SampleAgent(jid, pw, mesh.endpoint, resources=["/host/d"], authorizer=mesh.admins,
                                            state_dir=state))

    agent = await start_agent()
    client = await mesh.client()
    rid = uuid.uuid4().hex
    first = await client.request(str(agent.jid), "sample.toggle", {"target": str(effect)}, timeout=5, rid=rid)
    await agent.stop()
    agent = await start_agent()
    retry = await client.request(str(agent.jid), "sample.toggle", {"target": str(effect)}, timeout=5, rid=rid)
    assert first.outcome is retry.outcome is Outcome.OK
    assert first.result == retry.result == 1
    assert effect.read_text() == "toggled\n"


async def test_repeated_request_id_of_a_long_op_gets_its_one_outcome(mesh):
    agent = await mesh.agent(SampleAgent, None, ["/host/idem-long"])
    client = await mesh.client()
    rid = uuid.uuid4().hex
    first = await client.request(str(agent.jid), "sample.steps", {"steps": 2}, timeout=5, rid=rid)
    again = await client.request(str(agent.jid), "sample.steps", {"steps": 2}, timeout=5, rid=rid)
    assert first.outcome is again.outcome is Outcome.OK
    assert first.result == again.result == {"done": 2}


async def test_bad_arguments_name_the_argument(mesh):
    agent = await mesh.agent(SampleAgent, None, ["/host/args"])
    client = await mesh.client()
    target = str(agent.jid)
    cases = [({}, "missing required argument 'text'"),
             ({"text": "x", "times": "lots"}, "argument 'times' expects integer"),
             ({"text": "x", "times": 99}, "argument 'times' must be between 1 and 10"),
             ({"text": "x", "mode": "loud"}, "argument 'mode' must be one of plain, upper"),
             ({"text": "x", "colour": "red"}, "unknown argument 'colour'")]
    for args, expected in cases:
        res = await client.request(target, "sample.echo", args, timeout=5)
        assert res.outcome is Outcome.FAILED, args
        assert res.error.startswith("bad-argument:") and expected in res.error, res.error
    bad_path = await client.request(target, "sample.echo", {"text": "x"}, on=["/host/../etc"], timeout=5)
    assert bad_path.outcome is Outcome.FAILED and "'..'" in bad_path.error
    # An agent acts only on resources related to its own, whatever a caller addresses.
    elsewhere = await client.request(target, "sample.echo", {"text": "x"}, on=["/pool/tank"], timeout=5)
    assert elsewhere.outcome is Outcome.FAILED and "holds none of /pool/tank" in elsewhere.error
    narrowed = await client.request(target, "sample.echo", {"text": "x"}, on=["/host"], timeout=5)
    assert narrowed.result["resources"] == ["/host/args"]


async def test_unknown_op_is_refused_with_what_is_offered(mesh):
    agent = await mesh.agent(SampleAgent, None, ["/host/u"])
    client = await mesh.client()
    res = await client.request(str(agent.jid), "sample.nope", {}, timeout=5)
    assert res.outcome is Outcome.FAILED
    assert "unknown-op" in res.error and "sample.echo" in res.error


async def _raw(client, agent, *, text=None, child=False, name="sample.echo"):
    """Send a hand-made request, to feed the agent what a well-behaved client never would."""
    iq = client.xmpp.make_iq_set(ito=str(agent.jid))
    iq["vertebra_op"]["name"] = name
    iq["vertebra_op"]["rid"] = uuid.uuid4().hex
    iq["vertebra_op"].xml.text = text
    if child:
        from slixmpp.xmlstream import ET
        iq["vertebra_op"].xml.append(ET.Element("{urn:vertebra:1}nested"))
    reply = await client.send_iq(iq, 5)
    assert reply["type"] == "error"
    return protocol.app_condition(reply), reply["error"]["text"]


async def test_oversized_nested_and_malformed_payloads_are_refused_before_running(mesh):
    agent = await mesh.agent(SampleAgent, None, ["/host/limits"])
    client = await mesh.client()
    big = base64.b64encode(msgpack.packb({"text": "x" * (protocol.MAX_PAYLOAD + 10)})).decode()
    cond, text = await _raw(client, agent, text=big)
    assert cond == "too-large" and "limit" in text
    deep: object = "x"
    for _ in range(protocol.MAX_DEPTH + 5):
        deep = [deep]
    cond, text = await _raw(client, agent, text=protocol.encode({"text": deep}))
    assert cond == "too-large" and "nests deeper" in text
    cond, _ = await _raw(client, agent, text="!!not base64!!")
    assert cond == "bad-payload"
    cond, _ = await _raw(client, agent, text="wQ==")  # valid base64; 0xc1 is never msgpack
    assert cond == "bad-payload"
    cond, text = await _raw(client, agent, text=protocol.encode({"text": "x"}), child=True)
    assert cond == "bad-payload" and "child" in text
    too_big = await client.request(str(agent.jid), "sample.echo", {"text": "x" * 90_000, "times": 2}, timeout=5)
    assert too_big.outcome is Outcome.FAILED and "the result of sample.echo is" in too_big.error
    # The agent is unharmed and still answers.
    ok = await client.request(str(agent.jid), "sample.echo", {"text": "still here"}, timeout=5)
    assert ok.result["text"] == "still here"


async def test_agent_killed_mid_op_ends_in_a_named_outcome(mesh, server):
    broker = await mesh.broker()
    jid, pw = mesh.account("victim")
    broker.admit(jid, SampleAgent.kind, ["/host/victim"])
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "sample_agent.py"), jid, pw, str(server.port),
                             str(server.cert_path), broker.jid.bare, mesh.operator[0], "/host/victim"],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        ready = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert ready.strip() == "ready"
        await until(lambda: len(broker.directory) == 1, what="victim listed")
        client = await mesh.client(broker)
        call = asyncio.create_task(client.call("sample.sleep", {"seconds": 20}, on=["/host/victim"], timeout=4))
        await asyncio.sleep(0.5)
        proc.kill()
        report = await asyncio.wait_for(call, 10)  # never a hang
        assert report.results[0].outcome in (Outcome.TIMEOUT, Outcome.UNREACHABLE)
    finally:
        proc.kill()
        proc.wait()


async def test_only_delegates_may_act_on_someone_elses_behalf(mesh):
    broker = await mesh.broker()
    agent = await mesh.agent(SampleAgent, broker, ["/host/deleg"])
    client = await mesh.client(broker)
    intruder = mesh.account("intruder")
    # An admin may not borrow anyone's identity, not even to make themselves someone less privileged.
    claimed = await client.request(str(agent.jid), "sample.echo", {"text": "x"}, timeout=5, behalf=intruder[0])
    assert claimed.outcome is Outcome.DENIED and "may not act on behalf of" in claimed.error
    # The broker is a delegate: the agent then decides for the person named, not for the broker.
    denied = await broker.request(str(agent.jid), "sample.echo", {"text": "x"}, timeout=5, behalf=intruder[0])
    assert denied.outcome is Outcome.DENIED and intruder[0] in denied.error
    allowed = await broker.request(str(agent.jid), "sample.echo", {"text": "x"}, timeout=5,
                                   behalf=mesh.operator[0])
    assert allowed.outcome is Outcome.OK and allowed.result["caller"] == mesh.operator[0]
    # Broker-only pushes are decided on who sends them: never accepted "for" anyone, the broker included.
    posed = await broker.request(str(agent.jid), "policy.install", {"text": "roles: {}", "issued_at": 0.0},
                                 timeout=5, behalf=broker.jid.bare)
    assert posed.outcome is Outcome.DENIED and "never sent on someone's behalf" in posed.error
    # A request id is bound to whom it is for: reused for someone else, it is refused, not replayed.
    rid = uuid.uuid4().hex
    first = await broker.request(str(agent.jid), "sample.echo", {"text": "x"}, timeout=5, rid=rid,
                                 behalf=mesh.operator[0])
    other = await broker.request(str(agent.jid), "sample.echo", {"text": "x"}, timeout=5, rid=rid,
                                 behalf=intruder[0])
    assert first.outcome is Outcome.OK
    assert other.outcome is Outcome.FAILED and "already used for a different request" in other.error
