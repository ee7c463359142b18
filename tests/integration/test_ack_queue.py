"""A session that has been sent more stanzas than it has acknowledged (XEP-0198) is kept, on both servers.

A mesh concentrates traffic on a few sessions: the caller of a call to every agent reads one answer
per agent, and a restarted broker reads every agent's presence. At ejabberd's default
``max_ack_queue`` of 5,000 the server closed such a session ("Too many unacked stanzas",
policy-violation) and it reconnected into the same storm; deploy/ejabberd.yml.in lifts the cap.
Prosody keeps at most ``smacks_max_queue_size`` (500) unacknowledged stanzas for resumption and drops
the oldest beyond that, without ending the session. The server is started as `vertebra server start`
starts it; a raw client (tests/rawxmpp.py) enables stream management and then acknowledges nothing
while another session sends it 6,000 messages.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from agents import cli
from agents.config import parse
from agents.ejabberd import ejabberd_installed
from conftest import free_port, until
from rawxmpp import RawXMPP

DOMAIN = "vertebra.test"
SM = "urn:xmpp:sm:3"
MESSAGES = 6000  # more than ejabberd's default max_ack_queue


@pytest.mark.parametrize("engine", ["prosody", "ejabberd"])
async def test_a_session_that_acknowledges_late_is_not_cut(tmp_path: Path, engine: str) -> None:
    if engine == "ejabberd" and not ejabberd_installed():
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("CI must run the ejabberd tests, but ejabberd is not installed", pytrace=False)
        pytest.skip("ejabberd is not installed: run `apt-get install -y ejabberd`")
    port = free_port()
    doc: dict = {"server": {"domain": DOMAIN, "port": port, "engine": engine}, "admins": [f"operator@{DOMAIN}"]}
    if engine == "ejabberd":
        doc["server"].update(node_name=f"acks{port}@127.0.0.1", dist_port=free_port(), epmd_port=free_port())
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(doc))
    mesh = parse(doc, tmp_path / "mesh.yaml", tmp_path)
    server = cli.start_server(mesh)
    try:
        ctx = server.ssl_context()
        reader = await RawXMPP.login(server.host, server.port, DOMAIN, "operator", mesh.password("operator"),
                                     ssl_context=ctx, resource="reader")
        await reader.send(f"<enable xmlns='{SM}'/>")
        await reader.next(lambda el: el.tag == f"{{{SM}}}enabled")
        sender = await RawXMPP.login(server.host, server.port, DOMAIN, "operator", mesh.password("operator"),
                                     ssl_context=ctx, resource="sender")
        for start in range(0, MESSAGES, 500):
            await sender.send("".join(f"<message to='{reader.jid}' id='m{i}'><body>{i}</body></message>"
                                      for i in range(start, start + 500)))

        def messages() -> int:
            return sum(1 for el in reader.inbox if el.tag == "{jabber:client}message")

        await until(lambda: messages() == MESSAGES or reader.closed, timeout=60, what=f"{MESSAGES} messages")
        assert not reader.closed, "the server closed the session that had not acknowledged its stanzas"
        assert messages() == MESSAGES
        # The server asked for acknowledgements all along; none was given, and the session still works.
        assert any(el.tag == f"{{{SM}}}r" for el in reader.inbox)
        assert await reader.alive()
        await reader.send(f"<a xmlns='{SM}' h='{MESSAGES}'/>")
        assert await reader.alive()
        await sender.close()
        await reader.close()
    finally:
        server.stop()
