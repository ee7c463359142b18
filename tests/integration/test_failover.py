"""Actors given several servers for one domain use any live one and move on when theirs goes away.

Two independent private Prosody instances with the same accounts and certificate stand in for the
nodes of a cluster here (the ejabberd cluster test covers routing between nodes); what is tested is
the actor's side: which server it connects to, and that it moves to the other when its own stops.
"""

from __future__ import annotations

import shutil

from agents.actor import Endpoint
from agents.client import Client
from agents.errors import Outcome
from agents.server import PrivateServer
from conftest import DOMAIN, free_port, until
from sample_agent import SampleAgent


async def test_actor_moves_to_another_node_when_its_own_goes_away(tmp_path):
    first = PrivateServer(tmp_path / "a", domain=DOMAIN, port=free_port())
    second = PrivateServer(tmp_path / "b", domain=DOMAIN, port=free_port())
    actors = []
    try:    # both stopped whatever fails, the second's start included
        first.start()
        # The second node serves the same domain with the same certificate, as cluster nodes do.
        (tmp_path / "b" / "server").mkdir(parents=True)
        for name in ("cert.pem", "key.pem"):
            shutil.copy(first.dir / name, tmp_path / "b" / "server" / name)
        second.start()
        for server in (first, second):
            server.register_many({"agent": "a-pw", "op": "o-pw"})
        endpoint = Endpoint(first.host, first.port, DOMAIN, first.ssl_context(),
                            alternates=((second.host, second.port),))
        agent = SampleAgent(f"agent@{DOMAIN}", "a-pw", endpoint, resources=["/host/f"])
        await agent.start()
        actors.append(agent)
        home, other = (first, second) if agent.server_address[1] == first.port else (second, first)
        home.stop()
        await until(lambda: agent.online and agent.server_address[1] == other.port, timeout=30,
                    what="the agent back online on the other node")
        client = Client(f"op@{DOMAIN}", "o-pw", Endpoint(other.host, other.port, DOMAIN, other.ssl_context()),
                        broker="")
        await client.start()
        actors.append(client)
        agent.authorizer = type(agent.authorizer)([f"op@{DOMAIN}"])
        res = await client.request(str(agent.jid), "sample.echo", {"text": "moved"}, timeout=10)
        assert res.outcome is Outcome.OK and res.result["text"] == "moved"
    finally:
        for actor in actors:
            await actor.stop()
        first.stop()
        second.stop()
