"""Volume locations keep admission strict: only a live agent the mesh file configures as a storage agent
may tell the broker where volumes are (mesh.volumes), and only for its own directory entries. The
attackers are raw XMPP clients (tests/rawxmpp.py): an account the mesh file does not name, the mesh's own
admin, and a configured agent of another kind. None of them can make a call on /volume/NAME reach them."""

from __future__ import annotations

import pytest

from agents.errors import Outcome
from agents.storage.agent import StorageAgent
from broker.service import Broker
from conftest import DOMAIN, until
from rawxmpp import RawXMPP, app_condition
from sample_agent import SampleAgent


async def raw_login(mesh, account, resource="raw"):
    user, password = account[0].split("@")[0], account[1]
    return await RawXMPP.login(mesh.server.host, mesh.server.port, DOMAIN, user, password,
                               ssl_context=mesh.server.ssl_context(), resource=resource)


def located(broker, volume):
    return [e.jid for e in broker.directory.discover("storage.snapshot.list", [f"/volume/{volume}"])]


@pytest.fixture
async def scene(mesh, tmp_path):
    broker = await mesh.broker()
    store = await mesh.agent(StorageAgent, broker, ["/host/s1", "/pool/p1"])
    sample = await mesh.agent(SampleAgent, broker, ["/host/x"])
    await until(lambda: any(e.jid == str(sample.jid) for e in broker.directory.entries()), what="sample listed")
    client = await mesh.client(broker)
    made = await client.request(str(store.jid), "storage.volume.create", {"volume": "db"}, timeout=30)
    assert made.outcome is Outcome.OK, made.error
    await until(lambda: located(broker, "db") == [str(store.jid)], what="db located at its storage agent")
    return broker, store, sample


@pytest.mark.parametrize("who", ["stranger", "admin", "other-kind"])
async def test_only_storage_agents_report_volumes(mesh, scene, who):
    broker, store, sample = scene
    if who == "stranger":
        account = mesh.account("stranger")
    elif who == "admin":
        account = mesh.operator  # passes the mesh's authorizer for every other op
    else:
        account = (str(sample.jid.bare), f"pw-{sample.jid.user}")  # a configured agent, kind sample
    raw = await raw_login(mesh, account, resource="raw-report")
    try:
        reply = await raw.iq(str(broker.jid), raw.op_xml("mesh.volumes", {"volumes": ["db", "payroll"]}))
        assert reply.get("type") == "error" and app_condition(reply) == "denied", reply
    finally:
        await raw.close()
    assert located(broker, "db") == [str(store.jid)]
    assert located(broker, "payroll") == []


async def test_a_report_is_sent_again_when_a_volume_goes_and_the_broker_forgets_it(mesh, scene):
    broker, store, _ = scene
    client = await mesh.client(broker)
    gone = await client.request(str(store.jid), "storage.volume.destroy", {"volume": "db"}, timeout=30)
    assert gone.outcome is Outcome.OK, gone.error
    # The op answered after its brokers had the new list.
    assert located(broker, "db") == []


async def test_a_restarted_broker_learns_the_volumes_again(mesh, scene, tmp_path):
    broker, store, _ = scene
    jid, password = str(broker.jid.bare), f"pw-{broker.jid.user}"
    roster = dict(broker.roster)
    await broker.stop()
    mesh.actors.remove(broker)
    again = Broker(jid, password, mesh.endpoint, authorizer=mesh.admins)
    for bare, admitted in roster.items():  # the same mesh file admits the same agents
        again.admit(bare, admitted.kind, admitted.resources, admitted.settings)
    await mesh.start(again)
    # Nothing was created in between: the agent tells the new broker instance on its own.
    await until(lambda: located(again, "db") == [str(store.jid)], what="db located by the restarted broker")
