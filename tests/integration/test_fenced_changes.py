"""A fenced node's identities may change nothing, on the real server: after a verified fence.off
(fence_dummy, a real fence agent) the broker opens an epoch, and every agent then refuses each op
that changes state, whether it is declared ``change`` or ``destructive``, to the node's identities;
reads are still served. The zombie's requests are sent with the raw client (tests/rawxmpp.py).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from agents import audit
from agents.authz import PolicyAuthorizer
from agents.errors import Outcome
from agents.fencing.agent import FencingAgent
from agents.storage.agent import StorageAgent
from broker.service import Broker
from conftest import DOMAIN, until
from fence_mesh import dummy_device
from rawxmpp import NS_CLIENT, NS_VERTEBRA, RawXMPP, decode_payload
from sample_agent import SampleAgent



def policy(admin: str, fencer: str, db1: str) -> str:
    return f"""
roles:
  admin: {{}}
  fencer: {{}}
  db: {{description: "the database on node1, which may make volumes and snapshots"}}
members:
  admin: [{admin}]
  fencer: [{fencer}]
  db: [{db1}]
grants:
  - {{role: admin, ops: ["**"]}}
  - {{role: fencer, ops: [fence.off, fence.on, fence.status], on: ["/cluster/c1/node/*"]}}
  - {{role: db, ops: ["storage.**", "sample.**", "workflow.**", "mesh.**"]}}
"""


def answer(reply: ET.Element) -> tuple[str, str | None, str]:
    """("result", None, "") or ("error", vertebra condition, sentence)."""
    if reply.get("type") == "result":
        return "result", None, ""
    error = reply.find(f"{{{NS_CLIENT}}}error")
    cond = next((c.tag.split("}", 1)[1] for c in error if c.tag.startswith(f"{{{NS_VERTEBRA}}}")), None)
    text = error.find("{urn:ietf:params:xml:ns:xmpp-stanzas}text")
    return "error", cond, text.text if text is not None else ""


async def test_a_fenced_nodes_identities_may_read_but_change_nothing(mesh, tmp_path: Path):
    admin = mesh.operator
    fencer, db1 = mesh.account("fencer"), mesh.account("db")
    text = policy(admin[0], fencer[0], db1[0])

    def authorizer() -> PolicyAuthorizer:
        authz = PolicyAuthorizer()
        assert authz.load(text).ok
        return authz

    bjid, bpw = mesh.account("broker")
    (tmp_path / "broker-state").mkdir()
    broker = await mesh.start(Broker(bjid, bpw, mesh.endpoint, authorizer=authorizer(),
                                            state_dir=tmp_path / "broker-state"))
    node1 = tmp_path / "node1.state"
    node1.write_text("on")
    fencing = await mesh.agent(FencingAgent, broker, ["/host/fencer"], authorizer=authorizer(), settings={
        "clusters": {"c1": ["node1"]},
        "fencing": {"devices": {"pdu1": dummy_device(node1)}, "levels": {"node1": [["pdu1"]]}},
        "identities": {"node1": [db1[0]]}})
    storage = await mesh.agent(StorageAgent, broker, ["/pool/tank"], authorizer=authorizer(),
                               settings={"root": str(tmp_path / "store")})
    sample = await mesh.agent(SampleAgent, broker, ["/host/db2"], authorizer=authorizer())
    await until(lambda: len(broker.directory) == 3, what="the three agents listed")

    zombie = await RawXMPP.login(mesh.server.host, mesh.server.port, DOMAIN, db1[0].split("@")[0], db1[1],
                                 ssl_context=mesh.server.ssl_context(), resource="zombie")
    try:
        async def ask(agent, op: str, args: dict) -> tuple[str, str | None, str]:
            return answer(await zombie.iq(str(agent.jid), zombie.op_xml(op, args, timeout_ms=10_000)))

        # Before the fence its grants work: it makes a volume.
        assert await ask(storage, "storage.volume.create", {"volume": "before"}) == ("result", None, "")

        client = await mesh.client(broker, account=fencer)
        off = await client.request(str(fencing.jid), "fence.off", {"cluster": "c1", "node": "node1"}, timeout=30)
        assert off.outcome is Outcome.OK and node1.read_text() == "off", off.error
        await until(lambda: all(a.fenced.of(db1[0]) for a in (storage, sample, fencing)),
                    what="the open epoch pushed to every agent")

        # Every op that changes state is refused, the ones declared "change" included.
        for agent, op, args in [(storage, "storage.volume.create", {"volume": "zombie"}),
                                (storage, "storage.snapshot.create", {"volume": "before", "snapshot": "s1"}),
                                (storage, "storage.volume.destroy", {"volume": "before"}),
                                (sample, "sample.count", {}),
                                (broker, "workflow.run", {"workflow": "none", "wait": 0})]:
            kind, cond, sentence = await ask(agent, op, args)
            assert (kind, cond) == ("error", "denied"), (op, kind, cond, sentence)
            assert "belongs to a fenced node" in sentence and "node node1 of cluster c1" in sentence, sentence
            assert f"ops that change state ({op}) are refused" in sentence, sentence
            assert "reads are still served" in sentence
        assert sample.runs == 0
        decisions = [r["decision"] for r in audit.show(storage.state_dir / "audit.sqlite", caller=db1[0],
                                                       op="storage.volume.create") if r["kind"] == "decided"]
        assert decisions == ["allow", "deny"]

        # Reads are served.
        reply = await zombie.iq(str(storage.jid), zombie.op_xml("storage.volume.list", {}, timeout_ms=10_000))
        assert reply.get("type") == "result"
        outcome = reply.find(f"{{{NS_VERTEBRA}}}outcome")
        assert [v["name"] for v in decode_payload(outcome.text)] == ["before"]  # the zombie's volume was never made
        assert (await ask(sample, "sample.echo", {"text": "hi"}))[0] == "result"
        # Everyone else still changes things.
        admin_client = await mesh.client(broker)
        made = await admin_client.request(str(storage.jid), "storage.volume.create", {"volume": "admins"}, timeout=10)
        assert made.outcome is Outcome.OK, made.error

        # A verified on ends the epoch, and its grants work again.
        on = await client.request(str(fencing.jid), "fence.on", {"cluster": "c1", "node": "node1"}, timeout=30)
        assert on.outcome is Outcome.OK and node1.read_text() == "on", on.error
        await until(lambda: not storage.fenced.of(db1[0]), what="the end of the epoch pushed")
        assert await ask(storage, "storage.volume.create", {"volume": "after"}) == ("result", None, "")
    finally:
        await zombie.close()
