"""A broker that lost its session comes back under the same full JID, and every agent is listed again.

A busy broker that misses its keepalive reconnects at once (slixmpp aborts the connection and logs in
again as ``broker@DOMAIN/broker``), and its new session starts with an empty directory and greets
every known agent at its bare JID (docs/protocol.md 4.5). Whether the server told an agent, in
between, that the old session went depends on the server and on timing: with 50,000 agents on
ejabberd many were never told, took the greeting for a broker they had already answered, and stayed
unlisted. Every presence of a broker names its session, and an agent answers a session it has not
answered (4.4), seen full JID or not. And the keepalive that made the
broker reconnect counts anything the server sent meanwhile as a sign of life (``Actor._keepalive``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from agents.client import Client
from conftest import until
from sample_agent import SampleAgent


async def test_agents_answer_a_broker_that_greets_again_under_a_full_jid_they_know(mesh, tmp_path):
    broker = await mesh.broker(state_dir=tmp_path / "broker")  # where it records the agents it greets
    hellos: list[bool] = []
    hello_known = broker._hello_known

    async def counted_hello(unlisted_only: bool = False) -> None:
        await hello_known(unlisted_only)
        hellos.append(unlisted_only)

    broker._hello_known = counted_hello
    agents = [await mesh.agent(SampleAgent, broker, [f"/host/r{i}"]) for i in range(3)]
    await until(lambda: len(broker.directory) == 3, what="three agents listed")
    jid = str(broker.jid)
    # The broker's acknowledgement follows the listing: on a cluster it may still be on its way.
    await until(lambda: all(a._brokers == {jid} for a in agents), what="every agent acknowledged by the broker")
    # The start's second hello (to agents still unlisted, a few seconds in) is over: only the
    # presences below can list the agents again.
    await until(lambda: True in hellos, what="the broker's second hello")

    def new_session() -> None:
        # The broker's side of a new session under the same full JID, with no unavailable presence
        # in between: its directory is empty and its presences carry a new session (on_session).
        broker.directory.clear()
        broker._present.clear()
        broker._session = uuid.uuid4().hex

    # Its hello at each agent's full JID, as ejabberd delivers a presence sent to a bare JID.
    new_session()
    for agent in agents:
        broker.presence(str(agent.jid))
    await until(lambda: len(broker.directory) == 3, what="every agent listed again after the hello")
    await until(lambda: all(a._brokers == {jid} for a in agents), what="still the one broker, acknowledged again")
    # Its hello to the agents' bare JIDs, as it sends it.
    new_session()
    await broker._hello_known()
    await until(lambda: len(broker.directory) == 3, what="every agent listed again after the second hello")


async def test_agents_are_listed_again_when_the_broker_reconnects_after_a_missed_keepalive(mesh):
    broker = await mesh.broker()
    agents = [await mesh.agent(SampleAgent, broker, [f"/host/k{i}"]) for i in range(3)]
    await until(lambda: len(broker.directory) == 3, what="three agents listed")
    sessions: list[str] = []
    broker.on_event("session_start", lambda _e: sessions.append("new"))
    # What slixmpp's keepalive does when its ping is not answered in time: abort and log in again.
    broker.xmpp.reconnect(0.0, "Ping timeout after 10s")
    await until(lambda: sessions, timeout=20, what="the broker's new session")
    await until(lambda: len(broker.directory) == 3, timeout=20, what="every agent listed again")
    assert sorted(e.jid for e in broker.directory.entries()) == sorted(str(a.jid) for a in agents)


async def test_a_busy_actor_keeps_its_session_while_anything_arrives_and_reconnects_when_nothing_does(mesh, caplog):
    """The keepalive ping's answer held back (as behind a backlog of thousands of presences) does not
    cost a session that keeps receiving; a connection that receives nothing at all is still given up."""
    caplog.set_level(logging.INFO, logger="agents.actor")
    jid, password = mesh.account("busy")
    busy = Client(jid, password, mesh.endpoint, broker="")
    ping = busy.xmpp.plugin["xep_0199"]
    ping.interval, ping.timeout = 1, 1  # instead of 30 and 10
    held_back: list[str] = []

    def hold_back_ping_answers(stanza):
        if stanza.name == "iq" and stanza["type"] == "result" and str(stanza["from"]) == busy.jid.host \
                and len(stanza.xml) == 0:
            held_back.append(stanza["id"])
            return None
        return stanza

    busy.xmpp.add_filter("in", hold_back_ping_answers)
    sessions: list[str] = []
    busy.on_event("session_start", lambda _e: sessions.append("new"))
    busy.on_event("disconnected", lambda _e: sessions.append("lost"))
    await mesh.start(busy)
    sender = await mesh.client()

    async def keep_sending() -> None:
        while True:
            sender.xmpp.send_message(mto=str(busy.jid), mbody="traffic")
            await asyncio.sleep(0.05)

    def kept() -> int:
        return sum("connection is kept" in r.getMessage() for r in caplog.records)

    traffic = asyncio.get_running_loop().create_task(keep_sending())
    try:
        await until(lambda: kept() >= 3, timeout=30, what="three unanswered keepalive pings")
        assert sessions == ["new"] and busy.online
    finally:
        traffic.cancel()
    # A connection that delivers nothing at all (not even the late answer): given up, as before.
    busy.xmpp.transport.pause_reading()
    await until(lambda: "lost" in sessions, timeout=30, what="a reconnection once nothing arrives")
    assert any(r.levelno == logging.WARNING and "nothing arrived meanwhile" in r.getMessage() for r in caplog.records)
    await until(lambda: busy.online, timeout=30, what="the busy actor back")
