"""A second implementation of the wire protocol (tests/rawxmpp.py, written from docs/protocol.md and
sharing no code with the runtime) talks to a real agent: the protocol document is enough to interoperate."""

from __future__ import annotations

from conftest import DOMAIN
from rawxmpp import RawXMPP, app_condition, outcome_of
from sample_agent import SampleAgent


async def test_raw_client_calls_an_agent_and_reads_its_errors(mesh):
    jid, password = mesh.operator
    agent = await mesh.agent(SampleAgent, None, ["/host/db1"])
    raw = await RawXMPP.login(mesh.server.host, mesh.server.port, DOMAIN, jid, password,
                              ssl_context=mesh.server.ssl_context())
    try:
        reply = await raw.iq(str(agent.jid), raw.op_xml("sample.echo", {"text": "hi", "times": 2}, timeout_ms=5000))
        assert reply.get("type") == "result"
        status, result = outcome_of(reply)
        assert status == "ok" and result["text"] == "hihi" and result["caller"] == jid

        bad = await raw.iq(str(agent.jid), raw.op_xml("sample.echo", {"times": 2}, timeout_ms=5000))
        assert bad.get("type") == "error" and app_condition(bad) == "bad-argument"
        unknown = await raw.iq(str(agent.jid), raw.op_xml("sample.nosuch", {}, timeout_ms=5000))
        assert app_condition(unknown) == "unknown-op"
        assert await raw.alive()
    finally:
        await raw.close()
