"""Who the broker believes about fencing, on the real server, attacked with the raw client
(tests/rawxmpp.py): ``mesh.fence.event`` is taken only from an account the broker's configuration
admits as a fencing agent, for a node that configuration gives it to fence; the identities an epoch
locks out are the configured ones, never the event's; an event is counted once however often it is
resent; and the fencing agent's ledger is read by its broker alone.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from pathlib import Path

from conftest import DOMAIN, until
from fence_mesh import FencingWorld
from rawxmpp import NS_CLIENT, RawXMPP, app_condition, encode_args, outcome_of

from agents.errors import Outcome


def forged(action: str, node: str = "node1", **extra) -> dict:
    return {"id": f"forged-{action}-{node}", "event": "outcome", "action": action, "cluster": "c1", "node": node,
            "ok": True, "state": action, "requester": "someone@vertebra.test", **extra}


async def login(mesh, account: tuple[str, str], near=None) -> RawXMPP:
    """A raw session, on the server node ``near`` (an actor) is connected to when given: on an ejabberd
    cluster a session made a moment ago on one node is not yet routable from the other, and a test
    where the broker asks the raw client must not race that."""
    jid, password = account
    host, port = near.server_address if near is not None else (mesh.server.host, mesh.server.port)
    return await RawXMPP.login(host, port, DOMAIN, jid.split("@")[0], password,
                               ssl_context=mesh.server.ssl_context(), resource="raw")


async def post(raw: RawXMPP, broker, args: dict) -> ET.Element:
    return await raw.iq(str(broker.jid), raw.op_xml("mesh.fence.event", args))


def denied(reply: ET.Element, *words: str) -> None:
    assert reply.get("type") == "error" and app_condition(reply) == "denied", ET.tostring(reply)
    text = ET.tostring(reply, encoding="unicode")
    for w in words:
        assert w in text, text


async def _outbox_empty(world: FencingWorld) -> bool:
    return not await world.fencer.outbox.pending()


async def epochs(world: FencingWorld) -> dict:
    """mesh.fence.epochs as an operator sees it."""
    res = await world.client.request(str(world.broker.jid), "mesh.fence.epochs", {}, timeout=10)
    assert res.outcome is Outcome.OK, res.error
    return res.result


async def world_with_client(mesh, tmp_path: Path, db1: str) -> FencingWorld:
    world = FencingWorld(mesh, tmp_path, identities={"node1": [db1]})
    await world.start_broker()
    await world.start_fencer()
    await until(world.listed, what="the fencing agent listed")
    world.client = await mesh.client()  # the operator, a mesh admin
    return world


async def test_an_impostor_can_neither_open_an_epoch_nor_close_a_real_one(mesh, tmp_path: Path):
    db1, stranger = mesh.account("db"), mesh.account("stranger")
    world = await world_with_client(mesh, tmp_path, db1[0])
    broker = world.broker
    # A monitor the mesh file configures is an agent of the mesh, but not a fencing one.
    monitor = mesh.account("monitor")
    broker.admit(monitor[0], "monitor", ["/host/mon"])
    impostors = [await login(mesh, stranger), await login(mesh, monitor), await login(mesh, mesh.operator)]
    try:
        for raw in impostors:  # the admin too: no policy makes an account a fencing agent
            denied(await post(raw, broker, forged("off")), "only the fencing agents the mesh file configures")
        assert (await epochs(world)) == {"fenced": [], "epochs": []}
        assert await broker.fencing.ledger.events() == []

        # A real, verified fence opens epoch 1 with the configured identities ...
        client = world.client
        off = await client.request(str(world.fencer.jid), "fence.off", {"cluster": "c1", "node": "node1"}, timeout=30)
        assert off.outcome is Outcome.OK and world.state["node1"].read_text() == "off", off.error
        await until(lambda: broker.fencing.ledger.fenced(), what="the epoch opened")
        before = await epochs(world)
        (fenced,) = before["fenced"]
        assert (fenced["node"], fenced["epoch"], fenced["identities"]) == ("node1", 1, [db1[0]])

        # ... which no impostor can end: the zombie's own account least of all.
        zombie = await login(mesh, db1)
        impostors.append(zombie)
        for raw in impostors:
            denied(await post(raw, broker, forged("on")), "only the fencing agents the mesh file configures")
        assert await epochs(world) == before
        assert [e["agent"] for e in await broker.fencing.ledger.events()] == [world.fencer_account[0]] * 2
    finally:
        for raw in impostors:
            await raw.close()


async def test_a_fencing_agents_event_names_no_identities_and_only_its_own_nodes(mesh, tmp_path: Path):
    db1, admin = mesh.account("db"), mesh.operator[0]
    world = await world_with_client(mesh, tmp_path, db1[0])
    broker = world.broker
    # The fencing agent's own account, speaking raw: what it may claim is still the configuration's.
    raw = await login(mesh, world.fencer_account)
    try:
        # Naming who belongs to the node (here: the admin, to lock them out) is not part of the op.
        reply = await post(raw, broker, forged("off", identities=[admin]))
        assert reply.get("type") == "error" and app_condition(reply) == "bad-argument", ET.tostring(reply)
        # A node its configuration does not give it (another cluster's, or one it does not have).
        denied(await post(raw, broker, forged("off", node="node9")), "does not configure it to fence that node")
        denied(await raw.iq(str(broker.jid), raw.op_xml("mesh.fence.event", {**forged("off"), "cluster": "c2"})),
               "does not configure it to fence that node")
        assert (await epochs(world))["epochs"] == []

        # Its own node: the epoch locks out the configured identities, whoever the event names.
        reply = await post(raw, broker, forged("off"))
        assert reply.get("type") == "result", ET.tostring(reply)
        status, result = outcome_of(reply)
        assert status == "ok" and result["change"] == "fenced" and result["epoch"] == 1
        (fenced,) = (await epochs(world))["fenced"]
        assert fenced["identities"] == [db1[0]] and admin not in fenced["identities"]

        # Resent (the agent did not hear the answer): one event, still epoch 1, nothing changes.
        again = await post(raw, broker, forged("off"))
        status, result = outcome_of(again)
        assert status == "ok" and result["duplicate"] and result["change"] is None and result["epoch"] == 1
        assert len(await broker.fencing.ledger.events()) == 1
        assert [e["epoch"] for e in (await epochs(world))["epochs"]] == [1]
    finally:
        await raw.close()


async def test_only_the_broker_may_read_a_fencing_agents_ledger(mesh, tmp_path: Path):
    world = await world_with_client(mesh, tmp_path, mesh.account("db")[0])
    raw = await login(mesh, mesh.operator)  # a mesh admin: the policy allows them everything else
    try:
        reply = await raw.iq(str(world.fencer.jid), raw.op_xml("fence.ledger", {}))
        denied(reply, "only this agent's broker")
    finally:
        await raw.close()
    # The broker reads it (what it reconciles from); nothing is new when it has every event.
    client = world.client
    assert (await client.request(str(world.fencer.jid), "fence.off", {"cluster": "c1", "node": "node2"},
                                 timeout=30)).outcome is Outcome.OK
    await until(lambda: world.broker.fencing.ledger.fenced(), what="the epoch opened")
    await until(lambda: _outbox_empty(world), what="the agent to hear the broker took its events")
    res = await world.broker.request(str(world.fencer.jid), "fence.ledger", {}, timeout=10)
    assert res.outcome is Outcome.OK and [(e["node"], e["action"], e["ok"]) for e in res.result["entries"]] == [
        ("node2", "off", True)]
    assert await world.broker.fencing.reconcile_fencing(str(world.fencer.jid)) == 0
    assert len(await world.broker.fencing.ledger.events()) == 2  # the attempt and the outcome, once each


async def test_a_ledger_counts_only_from_a_configured_fencing_agent_for_its_own_nodes(mesh, tmp_path: Path):
    world = await world_with_client(mesh, tmp_path, mesh.account("db")[0])
    broker, client = world.broker, world.client
    assert (await client.request(str(world.fencer.jid), "fence.off", {"cluster": "c1", "node": "node1"},
                                 timeout=30)).outcome is Outcome.OK
    await until(lambda: broker.fencing.ledger.fenced(), what="the epoch opened")
    before = await epochs(world)

    # An agent of another kind is never asked for a ledger at all.
    monitor = mesh.account("monitor")
    broker.admit(monitor[0], "monitor", ["/host/mon"])
    raw = await login(mesh, monitor, near=broker)
    try:
        assert await broker.fencing.reconcile_fencing(raw.jid) == 0
        assert not [e for e in raw.inbox if e.tag == f"{{{NS_CLIENT}}}iq"]
    finally:
        await raw.close()

    # A fencing agent configured for another cluster's node: its ledger's "node1 is on" is not taken.
    other = mesh.account("fencing")
    broker.admit(other[0], "fencing", [], {**world.settings, "cluster": "c2",
                                           "fencing": {**world.settings["fencing"], "levels": {"node3": [["pdu1"]]}},
                                           "identities": {}})
    raw = await login(mesh, other, near=broker)
    try:
        asking = asyncio.ensure_future(broker.fencing.reconcile_fencing(raw.jid))
        request = await raw.next(lambda e: e.tag == f"{{{NS_CLIENT}}}iq" and e.get("type") == "set")
        lie = {"entries": [forged("on"), {**forged("on", node="node3", cluster="c2"), "ok": False}]}
        await raw.send(f"<iq type='result' id='{request.get('id')}' to='{request.get('from')}'>"
                       f"<outcome xmlns='urn:vertebra:1' status='ok'>{encode_args(lie)}</outcome></iq>")
        assert await asking == 0  # node1 is not its node; its own node3's entry is no verified outcome
    finally:
        await raw.close()
    assert (await epochs(world))["fenced"] == before["fenced"]
