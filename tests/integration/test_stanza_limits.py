"""One stanza cannot take an actor down: stanzas nested thousands of levels deep, sent with the raw
client by an ordinary account to an agent, the broker and the chat bot, are answered with a plain
error (IQ get/set) or dropped, and the actor keeps its connection and goes on serving. And an actor
whose connection drops again and again starts each reconnect from the shortest wait."""

from __future__ import annotations

from conftest import DOMAIN, until
from agents.protocol import MAX_STANZA_DEPTH
from broker.chat import ChatBot
from rawxmpp import NS_CLIENT, RawXMPP, outcome_of
from sample_agent import SampleAgent

DEPTH = 2000  # about 14 KB: what killed an actor's connection before
NESTED = "<a>" * DEPTH + "</a>" * DEPTH
PING = "<ping xmlns='urn:xmpp:ping'/>"
DISCO_INFO = "http://jabber.org/protocol/disco#info"


async def attack_and_check(mesh, actor) -> None:
    """Send over-deep stanzas of every kind to ``actor``; it answers each request with an error, stays
    connected, and still answers a ping and a disco#info query."""
    drops: list[object] = []
    actor.on_event("disconnected", lambda event: drops.append(event))
    raw = await RawXMPP.login(mesh.server.host, mesh.server.port, DOMAIN, *mesh.account("attacker"),
                              ssl_context=mesh.server.ssl_context())
    to = str(actor.jid)
    try:
        for kind, inner in (("set", NESTED), ("get", NESTED), ("get", f"<query xmlns='{DISCO_INFO}'>{NESTED}</query>"),
                            ("set", f"<op xmlns='urn:vertebra:1' name='x' rid='deep'>{NESTED}</op>")):
            reply = await raw.iq(to, inner, type=kind)
            assert reply.get("type") == "error"
            error = reply.find(f"{{{NS_CLIENT}}}error")
            assert error is not None and error.find("{urn:ietf:params:xml:ns:xmpp-stanzas}bad-request") is not None
            assert len(first_children(reply)) <= 4  # built afresh: nothing of the attack is echoed back
        await raw.send(f"<message to='{to}' type='chat'><body>hi</body>{NESTED}</message>")
        await raw.send(f"<iq type='result' id='nothing-pending' to='{to}'>{NESTED}</iq>")
        await raw.presence(to, NESTED)
        pong = await raw.iq(to, PING, type="get")
        assert pong.get("type") == "result"
        info = await raw.iq(to, f"<query xmlns='{DISCO_INFO}'/>", type="get")
        assert info.get("type") == "result"
        # Just deep enough is still served: the bound is on depth, not on ordinary stanzas.
        shallow = "<a>" * (MAX_STANZA_DEPTH - 2) + "</a>" * (MAX_STANZA_DEPTH - 2)
        assert (await raw.iq(to, shallow, type="get")).find(
            f"{{{NS_CLIENT}}}error/{{urn:ietf:params:xml:ns:xmpp-stanzas}}bad-request") is None
        assert actor.online and not drops, "the actor's connection was dropped"
    finally:
        await raw.close()


def first_children(element) -> list[object]:
    """The chain of first children from ``element`` down (how deep a reply is)."""
    chain = [element]
    while len(chain[-1]):
        chain.append(chain[-1][0])
    return chain


async def test_deep_stanzas_do_not_take_an_agent_down(mesh):
    agent = await mesh.agent(SampleAgent, None, ["/host/a"])
    await attack_and_check(mesh, agent)
    raw = await RawXMPP.login(mesh.server.host, mesh.server.port, DOMAIN, *mesh.operator,
                              ssl_context=mesh.server.ssl_context())
    try:
        reply = await raw.iq(str(agent.jid), raw.op_xml("sample.echo", {"text": "still here"}, timeout_ms=5000))
        assert outcome_of(reply)[1]["text"] == "still here"
    finally:
        await raw.close()


async def test_deep_stanzas_do_not_take_the_broker_down(mesh):
    broker = await mesh.broker()
    await attack_and_check(mesh, broker)


async def test_deep_stanzas_do_not_take_the_chat_bot_down(mesh, tmp_path):
    broker = await mesh.broker()
    bot_jid, bot_pw = mesh.account("bot")
    bot = await mesh.start(ChatBot(bot_jid, bot_pw, mesh.endpoint, broker=str(broker.jid),
                                   authorizer=mesh.admins, state_dir=tmp_path))
    await attack_and_check(mesh, bot)


async def test_backoff_starts_again_after_each_resumed_session(mesh):
    """An actor's TCP connection is cut again and again; each time XEP-0198 resumes the session the
    backoff is back at its first step, so drops do not add up to ever longer outages. (A cut the
    server has not noticed yet ends in a new session instead, which never tested the fix: the test
    goes on until three resumes were seen.) A client, since agents do not ask for resumption
    (docs/protocol.md 2.2)."""
    agent = await mesh.client()
    sessions: list[str] = []
    agent.on_event("session_resumed", lambda _event: sessions.append("resumed"))
    agent.on_event("session_start", lambda _event: sessions.append("new"))
    for _ in range(12):
        seen = len(sessions)
        agent.xmpp.transport.abort()  # as a network fault would: the stream is not closed cleanly
        await until(lambda: len(sessions) > seen and agent.online,  # noqa: B023 (awaited within this iteration)
                    timeout=20, what="the session back")
        if sessions[-1] == "resumed":
            # Before the fix the backoff kept counting up over resumes (each drop waited longer).
            assert agent.backoff.attempt == 0, "backoff not reset after a resumed session"
        if sessions.count("resumed") >= 3:
            break
    assert sessions.count("resumed") >= 3, f"the server resumed too few sessions to tell: {sessions}"
