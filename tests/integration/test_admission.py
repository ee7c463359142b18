"""Admission: the broker lists an account as an agent only as the mesh file configures it, and what
any account announces costs the broker bounded memory and queries.

The attackers are raw XMPP clients (tests/rawxmpp.py, written from docs/protocol.md, not the
project's runtime) with ordinary accounts on the mesh's server: they advertise the agent form with
a valid XEP-0115 hash, computed here by the XEP's own algorithm, and answer like an agent would.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import tempfile
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import pytest
import yaml

from agents import caps
from agents.authz import PolicyAuthorizer
from agents.errors import Outcome
from agents.fencing.agent import FencingAgent
from agents.gateway import Gateway, call_via_gateway_blocking
from agents.monitor.agent import MonitorAgent
from broker import service
from broker.directory import BoundedMap
from conftest import DOMAIN, until
from rawxmpp import NS_CLIENT, NS_VERTEBRA, RawXMPP, app_condition, encode_args
from sample_agent import SampleAgent

DUMMY = "/usr/lib/nagios/plugins/check_dummy"
NS_CAPS = "http://jabber.org/protocol/caps"
NS_DISCO = "http://jabber.org/protocol/disco#info"
NODE = "https://example.org/impostor"
NODE1 = "/cluster/c1/node/node1"
FIELD_TYPES = {"FORM_TYPE": "hidden", "kind": "text-single", "resources": "text-multi"}  # protocol.md 4.2
FENCE_OPS = ("fence.off", "fence.on", "fence.reboot", "fence.status", "fence.list", "fencing.info")


def caps_ver(identity: tuple[str, str, str, str], features: list[str], form: dict[str, list[str]]) -> str:
    """XEP-0115 section 5.1: the verification string of one identity, the features and one extended
    form (``form`` maps each field's var to its values; FORM_TYPE first among them)."""
    text = "/".join(identity) + "<" + "".join(f"{f}<" for f in sorted(features))
    text += form["FORM_TYPE"][0] + "<"
    for var in sorted(v for v in form if v != "FORM_TYPE"):
        text += var + "<" + "".join(f"{value}<" for value in sorted(form[var]))
    return base64.b64encode(hashlib.sha1(text.encode()).digest()).decode()


class Impostor:
    """An ordinary account that advertises itself as an agent and answers as one: disco#info with
    its form, and a forged ``ok`` to any request (``answer`` is the forged result)."""

    def __init__(self, raw: RawXMPP, kind: str, resources: list[str], ops: tuple[str, ...], answer: Any) -> None:
        self.raw, self.answer = raw, answer
        self.identity = ("automation", "rpc", "", f"vertebra {kind} agent")
        self.features = [NS_DISCO] + [f"urn:vertebra:op:{o}" for o in ops]
        self.form = {"FORM_TYPE": ["urn:vertebra:1#agent"], "kind": [kind], "resources": resources}
        self.ver = caps_ver(self.identity, self.features, self.form)
        self.ops: list[ET.Element] = []  # every request that reached it
        self.disco: list[ET.Element] = []  # every disco#info query that reached it
        self.bounce = 0  # how many disco#info queries to answer as a server with no session for it would
        self._task = asyncio.get_running_loop().create_task(self._serve())

    @classmethod
    async def login(cls, mesh: Any, kind: str, resources: list[str], ops: tuple[str, ...] = FENCE_OPS,
                    answer: Any = None, prefix: str = "intruder") -> "Impostor":
        user, password = mesh.account(prefix)
        raw = await RawXMPP.login(mesh.server.host, mesh.server.port, DOMAIN, user, password,
                                  ssl_context=mesh.server.ssl_context(), resource="agent")
        return cls(raw, kind, resources, ops, answer if answer is not None else {"state": "off"})

    def caps(self, ver: str | None = None, node: str = NODE) -> str:
        return f"<c xmlns='{NS_CAPS}' hash='sha-1' node={quoteattr(node)} ver={quoteattr(ver or self.ver)}/>"

    def info_xml(self, node: str) -> str:
        category, kind, _lang, name = self.identity
        fields = "".join(f"<field var={quoteattr(var)} type='{FIELD_TYPES[var]}'>"
                         + "".join(f"<value>{escape(v)}</value>" for v in values) + "</field>"
                         for var, values in self.form.items())
        return (f"<query xmlns='{NS_DISCO}' node={quoteattr(node)}>"
                f"<identity category='{category}' type='{kind}' name={quoteattr(name)}/>"
                + "".join(f"<feature var={quoteattr(f)}/>" for f in self.features)
                + f"<x xmlns='jabber:x:data' type='result'>{fields}</x></query>")

    async def _serve(self) -> None:
        def wanted(e: ET.Element) -> bool:
            return e.tag == f"{{{NS_CLIENT}}}iq" and e.get("type") in ("get", "set") and (
                e.find(f"{{{NS_DISCO}}}query") is not None or e.find(f"{{{NS_VERTEBRA}}}op") is not None)

        while True:
            try:
                iq = await self.raw.next(wanted, timeout=3600)
            except Exception:  # the stream closed: the test is over
                return
            to, iq_id = quoteattr(iq.get("from", "")), quoteattr(iq.get("id", ""))
            query = iq.find(f"{{{NS_DISCO}}}query")
            if query is not None and self.bounce:
                self.bounce -= 1
                self.disco.append(iq)
                await self.raw.send(f"<iq type='error' to={to} id={iq_id}><error type='cancel'><service-unavailable"
                                    " xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
            elif query is not None:
                self.disco.append(iq)
                await self.raw.send(f"<iq type='result' to={to} id={iq_id}>{self.info_xml(query.get('node', ''))}</iq>")
            else:
                self.ops.append(iq)
                await self.raw.send(f"<iq type='result' to={to} id={iq_id}><outcome xmlns='{NS_VERTEBRA}'"
                                    f" status='ok'>{encode_args(self.answer)}</outcome></iq>")

    def presences_from(self, bare: str) -> list[ET.Element]:
        return [e for e in self.raw.inbox if e.tag == f"{{{NS_CLIENT}}}presence"
                and e.get("from", "").split("/")[0] == bare]

    async def close(self) -> None:
        self._task.cancel()
        await self.raw.close()


def refusals(caplog: pytest.LogCaptureFixture, jid: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "broker.service" and r.levelno == logging.WARNING and jid in r.getMessage()
            and "refused the agent advertisement" in r.getMessage()]


def policy_file(tmp_path: Path, operator: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"roles": {"ops": {}}, "members": {"ops": [operator]},
                                    "grants": [{"role": "ops", "ops": ["fence.*", "sample.*", "mesh.**"]}]}))
    return path


async def test_an_impostor_with_a_valid_hash_is_not_listed_asked_or_pushed_anything(mesh, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="broker.service")
    path = policy_file(tmp_path, mesh.operator[0])
    broker = await mesh.broker(authorizer=PolicyAuthorizer.from_file(path))
    state = tmp_path / "node1.state"
    state.write_text("on")
    blank = PolicyAuthorizer()  # default deny until the broker pushes the policy
    fencer = await mesh.agent(FencingAgent, broker, ["/host/fencer"], authorizer=blank, settings={
        "cluster": "c1", "fencing": {"devices": {"pdu": {"agent": "fence_dummy", "params": {
            "type": "file", "status_file": str(state), "power_timeout": "2"}}}, "levels": {"node1": [["pdu"]]}}})
    await until(lambda: blank.gate.version > 0, what="the policy pushed to the configured fencing agent")
    assert fencer.resources == ["/host/fencer", NODE1]

    # Another account claims to be a fencing agent for the same node, with a hash of its own, then
    # replays the real agent's hash (which the broker has already learnt).
    impostor = await Impostor.login(mesh, "fencing", list(fencer.resources))
    real_node = caps.NODE
    try:
        await impostor.raw.presence(broker.jid.bare, impostor.caps())
        await impostor.raw.presence(broker.jid.bare, impostor.caps(fencer._caps_ver, real_node))
        await impostor.raw.presence(str(broker.jid), impostor.caps())
        # A ping answered after those presences: the broker has read them.
        assert (await impostor.raw.iq(str(broker.jid), "<ping xmlns='urn:xmpp:ping'/>", type="get")
                ).get("type") == "result"

        client = await mesh.client(broker)
        found = await client.request(str(broker.jid), "mesh.discover", {"op": "fence.off", "resources": [NODE1]},
                                     timeout=10)
        assert found.outcome is Outcome.OK and [e["jid"] for e in found.result] == [str(fencer.jid)]
        everyone = await client.request(str(broker.jid), "mesh.agents", {}, timeout=10)
        assert [e["jid"] for e in everyone.result] == [str(fencer.jid)]

        # Scope one picks among what discovery returned: every call reaches the real agent only.
        node = {"cluster": "c1", "node": "node1"}
        for _ in range(6):
            status = await client.call("fence.status", node, on=[NODE1], scope="one", timeout=20)
            assert [(r.target, r.outcome) for r in status.results] == [(str(fencer.jid), Outcome.OK)]
        off = await client.call("fence.off", node, on=[NODE1], scope="one", timeout=20)
        assert [(r.target, r.outcome) for r in off.results] == [(str(fencer.jid), Outcome.OK)]
        assert off.results[0].result["state"] == "off" and state.read_text() == "off"

        # Nothing ever reached the impostor: no request, no query, no acknowledgement, no policy.
        assert impostor.ops == [] and impostor.disco == []
        assert impostor.presences_from(broker.jid.bare) == []
        assert str(impostor.raw.jid) not in {e.jid for e in broker.directory.entries()}
        assert impostor.raw.jid.split("/")[0] not in await broker._known.all()
        # The broker's log says whom it refused and why.
        message = (await until(lambda: refusals(caplog, impostor.raw.jid), what="the refusal logged"))[0]
        assert "names no agent with this account" in message

        # And an account that is not a configured monitor may not post alerts.
        alert = {"check": "disk", "host": "node1", "state": "CRITICAL"}
        reply = await impostor.raw.iq(str(broker.jid), impostor.raw.op_xml("mesh.alert", alert))
        assert reply.get("type") == "error" and app_condition(reply) == "denied"
        assert list(broker.alerts.recent) == []
    finally:
        await impostor.close()


async def test_an_agent_reads_nobodys_caps_and_states_its_own(mesh):
    """An agent asks nobody about the caps hash in a presence (no disco#info to strangers, nothing
    cached); its own presences carry its hash, which its disco#info on the caps node verifies."""
    broker = await mesh.broker()
    agent = await mesh.agent(SampleAgent, broker, ["/host/plain"])
    await until(lambda: len(broker.directory) == 1, what="the agent listed (its caps verified)")
    impostor = await Impostor.login(mesh, "sample", ["/host/plain"], ops=("sample.toggle",))
    try:
        for n in range(3):  # new hashes, to its bare and full JID
            await impostor.raw.presence(str(agent.jid), impostor.caps(ver=f"{n}{impostor.ver[1:]}"))
            await impostor.raw.presence(agent.jid.bare, impostor.caps(ver=f"x{n}{impostor.ver[2:]}"))
        # Answered after the presences were read: a query they caused would have been sent before.
        for _ in range(2):
            reply = await impostor.raw.iq(str(agent.jid), "<ping xmlns='urn:xmpp:ping'/>", type="get")
            assert reply.get("type") == "result"
        assert impostor.disco == []
        node = f"{caps.NODE}#{agent._caps_ver}"
        answer = await impostor.raw.iq(str(agent.jid), f"<query xmlns='{NS_DISCO}' node='{node}'/>", type="get")
        features = [f.get("var") for f in answer.iter(f"{{{NS_DISCO}}}feature")]
        assert NS_CAPS in features and "urn:vertebra:op:sample.toggle" in features
    finally:
        await impostor.close()


@pytest.mark.skipif(not Path(DUMMY).exists(), reason="monitoring-plugins-basic is not installed")
async def test_the_gateway_never_remembers_an_impostor(mesh):
    broker = await mesh.broker()
    monitor = await mesh.agent(MonitorAgent, broker, ["/host/gw1"])
    impostor = await Impostor.login(mesh, "monitor", ["/host/gw1"], ops=("monitor.check",),
                                    answer={"code": 0, "output": "OK: forged"})
    gw = Gateway(Path(tempfile.mkdtemp(prefix="vgw-")) / "gateway.sock", mesh.endpoint, str(broker.jid))
    await gw.start()
    try:
        await until(lambda: len(broker.directory) == 1, what="the monitor agent listed")
        await impostor.raw.presence(broker.jid.bare, impostor.caps())
        await impostor.raw.iq(str(broker.jid), "<ping xmlns='urn:xmpp:ping'/>", type="get")  # read by now
        call = {"op": "monitor.check", "args": {"check": "dummy", "args": ["text=real"]}, "on": ["/host/gw1"],
                "scope": "one", "to": [], "timeout": 10.0}
        for _ in range(4):  # check_vertebra -H gw1, four times
            report = await asyncio.to_thread(call_via_gateway_blocking, gw.path, *mesh.operator, call)
            assert [(r["target"], r["outcome"]) for r in report["results"]] == [(str(monitor.jid), "ok")]
            assert report["results"][0]["result"]["output"] == "OK: real"
        assert gw._holders == {(mesh.operator[0], "monitor.check", "/host/gw1"): str(monitor.jid)}
        assert impostor.ops == []
    finally:
        await gw.stop()
        await impostor.close()


async def test_a_configured_agent_claiming_more_than_its_configuration_is_refused(mesh, caplog):
    caplog.set_level(logging.WARNING, logger="broker.service")
    broker = await mesh.broker()
    subset = await mesh.agent(SampleAgent, broker, ["/host/sub1"])
    broker.admit(subset.jid.bare, SampleAgent.kind, ["/host/sub1", "/host/sub2"])  # claims fewer: fine
    greedy_jid, greedy_pw = mesh.account("greedy")
    broker.admit(greedy_jid, SampleAgent.kind, ["/host/mine"])
    greedy = await mesh.start(SampleAgent(greedy_jid, greedy_pw, mesh.endpoint, resources=["/host/mine", "/host/db9"],
                                          broker=broker.jid.bare, authorizer=mesh.admins))
    other_jid, other_pw = mesh.account("miskind")
    broker.admit(other_jid, "monitor", ["/host/mk"])
    miskind = await mesh.start(SampleAgent(other_jid, other_pw, mesh.endpoint, resources=["/host/mk"],
                                           broker=broker.jid.bare, authorizer=mesh.admins))

    (superset,) = await until(lambda: refusals(caplog, str(greedy.jid)), what="the superset claim refused")
    assert "/host/db9" in superset and "/host/mine" in superset and "beyond its configured" in superset
    (wrong_kind,) = await until(lambda: refusals(caplog, str(miskind.jid)), what="the wrong kind refused")
    assert "'sample'" in wrong_kind and "'monitor'" in wrong_kind
    await until(lambda: [e.jid for e in broker.directory.entries()] == [str(subset.jid)], what="the subset listed")
    client = await mesh.client(broker)
    found = await client.request(str(broker.jid), "mesh.discover", {"op": "sample.echo"}, timeout=10)
    assert [e["jid"] for e in found.result] == [str(subset.jid)]
    # Refused agents were never acknowledged, so they are still announcing.
    assert not greedy._brokers and not miskind._brokers and subset._brokers

    # A listed agent that is not a configured monitor may not post alerts either.
    alert = await subset.request(str(broker.jid), "mesh.alert", {"check": "c", "host": "h", "state": "OK"},
                                 timeout=10)
    assert alert.outcome is Outcome.DENIED and list(broker.alerts.recent) == []


async def test_kinds_the_broker_does_not_know_are_refused(mesh, caplog):
    caplog.set_level(logging.WARNING, logger="broker.service")
    broker = await mesh.broker()
    impostor = await Impostor.login(mesh, "teleporter", ["/host/tp"], ops=("teleport.now",))
    try:
        # Configured as storage, it advertises a kind nobody configured and the distribution lacks.
        broker.admit(impostor.raw.jid, "storage", ["/host/tp"])
        await impostor.raw.presence(broker.jid.bare, impostor.caps())
        (message,) = await until(lambda: refusals(caplog, impostor.raw.jid), what="the unknown kind refused")
        assert "'teleporter'" in message and "does not know" in message
        assert len(impostor.disco) == 1  # a configured account's hash is learnt, once
        assert len(broker.directory) == 0 and impostor.presences_from(broker.jid.bare) == []
    finally:
        await impostor.close()


async def test_a_query_the_server_could_not_deliver_is_asked_again_at_the_next_announcement(mesh):
    # On an ejabberd cluster the broker's disco#info to an agent that has just logged in to another node
    # can bounce as service-unavailable (that node's session has not reached the broker's node yet).
    # Remembered as a bad hash, the agent would stay unlisted for a minute.
    broker = await mesh.broker()
    impostor = await Impostor.login(mesh, "sample", ["/host/late"], ops=("sample.echo",), prefix="sample")
    try:
        broker.admit(impostor.raw.jid.split("/")[0], SampleAgent.kind, ["/host/late"])
        impostor.bounce = 1
        await impostor.raw.presence(broker.jid.bare, impostor.caps())
        await until(lambda: len(impostor.disco) == 1 and not broker._learning, what="the first query bounced")
        assert len(broker.directory) == 0
        await impostor.raw.presence(broker.jid.bare, impostor.caps())  # its next announcement
        await until(lambda: len(broker.directory) == 1, what="the agent listed at its next announcement")
        assert len(impostor.disco) == 2
        # A hash its own answer does not prove is still remembered as bad: asked about once.
        bad = impostor.caps(ver=base64.b64encode(b"not what it answers").decode())
        await impostor.raw.presence(broker.jid.bare, bad)
        await until(lambda: len(impostor.disco) == 3 and not broker._learning, what="the bad hash's query answered")
        await impostor.raw.presence(broker.jid.bare, bad)
        for _ in range(2):  # answered after the presence was read: a query it caused would have come first
            await impostor.raw.iq(str(broker.jid), "<ping xmlns='urn:xmpp:ping'/>", type="get")
        assert len(impostor.disco) == 3
    finally:
        await impostor.close()


async def test_a_flood_of_invented_caps_hashes_costs_bounded_memory_and_queries(mesh):
    broker = await mesh.broker()
    agent = await mesh.agent(SampleAgent, broker, ["/host/steady"])
    await until(lambda: len(broker.directory) == 1, what="the real agent listed")
    # One configured account gone rogue, one account nobody configured; neither answers queries fast.
    rogue = await Impostor.login(mesh, "sample", ["/host/rogue"], ops=("sample.echo",), prefix="rogue")
    broker.admit(rogue.raw.jid, SampleAgent.kind, ["/host/rogue"])
    stranger = await Impostor.login(mesh, "sample", ["/host/x"], ops=("sample.echo",), prefix="stranger")
    rogue._task.cancel()  # it never answers: each query it gets stays in flight until the broker's timeout
    hashes = 5000
    try:
        for who in (rogue, stranger):
            for start in range(0, hashes, 500):
                await who.raw.send("".join(f"<presence to={quoteattr(broker.jid.bare)}>"
                                           f"{who.caps(base64.b64encode(uuid.uuid4().bytes).decode())}</presence>"
                                           for _ in range(start, start + 500)))
            reply = await who.raw.iq(str(broker.jid), "<ping xmlns='urn:xmpp:ping'/>", type="get", timeout=60)
            assert reply.get("type") == "result"  # the broker has handled the whole flood

        assert len(broker._learning) <= service.LEARNING_LIMIT
        assert sum(broker._querying.values()) <= service.QUERIES_PER_SENDER
        assert len(broker._bad_caps) <= service.BAD_CAPS_CACHE
        assert len(broker.directory.caps) <= broker.directory.caps.limit
        queries = [e for e in rogue.raw.inbox if e.find(f"{{{NS_DISCO}}}query") is not None]
        assert 1 <= len(queries) <= service.QUERY_BURST
        assert stranger.disco == []  # an account the mesh file does not name costs no query at all

        client = await mesh.client(broker)
        found = await client.request(str(broker.jid), "mesh.discover", {"op": "sample.echo"}, timeout=10)
        assert found.outcome is Outcome.OK and [e["jid"] for e in found.result] == [str(agent.jid)]
    finally:
        await rogue.close()
        await stranger.close()


def test_bounded_map_forgets_the_least_recently_used_first():
    cache: BoundedMap[str, int] = BoundedMap(3)
    for i in range(5):
        cache[f"k{i}"] = i
    assert list(cache) == ["k2", "k3", "k4"] and len(cache) == 3
    assert cache.get("k2") == 2  # used: now the most recent
    cache["k5"] = 5
    assert list(cache) == ["k4", "k2", "k5"] and cache.get("k3") is None


async def test_the_broker_a_mesh_file_starts_admits_exactly_its_agents(mesh_home, tmp_path):
    from agents import config
    from agents.cli import build_actor

    fencing = {"cluster": "c1", "fencing": {"devices": {"pdu": {"agent": "fence_dummy", "params": {
        "type": "file", "status_file": str(tmp_path / "s")}}}, "levels": {"node1": [["pdu"]]}},
        "identities": {"node1": ["db1@vertebra.test"]}}
    home = mesh_home([{"name": "fence", "kind": "fencing", "resources": ["/host/f"], "settings": fencing},
                      {"name": "mon", "kind": "monitor", "resources": ["/host/m"]}])
    mesh = config.load(home / "mesh.yaml", home)
    broker = build_actor(mesh, mesh.broker)
    fence, mon = (mesh.jid(a.name) for a in mesh.agents)
    assert sorted(broker.roster) == sorted([fence, mon])
    assert (broker.roster[fence].kind, broker.roster[fence].resources) == ("fencing", ("/host/f", NODE1))
    assert broker.roster[fence].settings["identities"] == {"node1": ["db1@vertebra.test"]}
    assert (broker.roster[mon].kind, broker.roster[mon].resources) == ("monitor", ("/host/m",))
    await broker.stop()  # never started: closes its stores
