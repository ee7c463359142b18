"""Reconnect and re-advertise after the XMPP server restarts (on a server of its own)."""

from __future__ import annotations

from agents.actor import Endpoint
from agents.authz import AdminsOnly
from agents.client import Client
from agents.errors import Outcome
from agents.server import PrivateServer
from broker.service import Broker
from conftest import DOMAIN, free_port, until
from sample_agent import SampleAgent


async def test_actors_reconnect_and_readvertise_after_server_restart(tmp_path):
    server = PrivateServer(tmp_path, domain=DOMAIN, port=free_port())
    server.start()
    actors = []
    try:
        server.register_many({"broker": "b-pw", "agent": "a-pw", "op": "o-pw"})
        endpoint = Endpoint(server.host, server.port, DOMAIN, server.ssl_context())
        admins = AdminsOnly([f"op@{DOMAIN}"])
        broker = Broker(f"broker@{DOMAIN}", "b-pw", endpoint, authorizer=admins, state_dir=tmp_path)
        broker.admit(f"agent@{DOMAIN}", SampleAgent.kind, ["/host/r"])
        agent = SampleAgent(f"agent@{DOMAIN}", "a-pw", endpoint, resources=["/host/r"],
                            broker=f"broker@{DOMAIN}", authorizer=admins)
        client = Client(f"op@{DOMAIN}", "o-pw", endpoint, broker=f"broker@{DOMAIN}/broker")
        for actor in (broker, agent, client):
            await actor.start()
            actors.append(actor)
        await until(lambda: len(broker.directory) == 1, what="agent listed")

        added = []
        original_add = broker.directory.add
        broker.directory.add = lambda jid, caps: added.append(jid) or original_add(jid, caps)
        server.stop()
        await until(lambda: not agent.online and not broker.online, what="sessions lost")
        server.start()

        await until(lambda: agent.online and broker.online and client.online, timeout=30, what="reconnected")
        await until(lambda: str(agent.jid) in added, timeout=15, what="agent re-advertised")
        report = await client.call("sample.echo", {"text": "back"}, on=["/host/r"], timeout=10)
        assert [r.outcome for r in report.results] == [Outcome.OK]
        assert report.results[0].result["text"] == "back"
    finally:
        for actor in actors:
            await actor.stop()
        server.stop()
