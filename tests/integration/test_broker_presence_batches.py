"""The broker's greetings and acknowledgements, written many presences to a write, on the real server.

A broker greets every agent it knows at each new session and acknowledges each agent it lists; at
50,000 agents these went out one slixmpp stanza object at a time through a send queue that does not
yield, and the broker read nothing for tens of seconds. They are now written as text, a batch of
``PRESENCE_BATCH`` to a transport write, each counted for XEP-0198 (agents.fanout.write_stanzas).
The batch is made small here so that a handful of agents spans several writes.

The server's XEP-0198 count of what the broker sent must equal the broker's own, also after a
reconnect that started a new stream: slixmpp kept the old stream's count there (``Actor._on_session_bind`` resets it).
"""

from __future__ import annotations

import asyncio
import re

import broker.service as service
from conftest import server_acknowledged, until
from sample_agent import SampleAgent


async def test_greetings_and_acknowledgements_written_in_batches_list_every_agent_again(mesh, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setattr(service, "PRESENCE_BATCH", 3)
    # For each batch: how many presences, whether written in one write, whether a greeting (addressed
    # to bare JIDs; an acknowledgement goes to the agent's full JID).
    writes: list[tuple[int, bool, bool]] = []
    write_stanzas = service.fanout.write_stanzas

    # For each greeting batch: the server's XEP-0198 ack when it was written, and our count after it.
    paced: list[tuple[int, int]] = []

    def counted(xmpp, stanzas):
        sm = xmpp.plugin["xep_0198"]
        acked = sm.last_ack
        written = write_stanzas(xmpp, stanzas)
        greeting = all("/" not in re.search(r' to="([^"]*)"', text).group(1) for text in stanzas)
        writes.append((len(stanzas), written, greeting))
        if greeting:
            paced.append((acked, sm.seq))
        return written

    monkeypatch.setattr(service.fanout, "write_stanzas", counted)
    broker = await mesh.broker(state_dir=tmp_path / "broker")  # where it records the agents it greets
    agents = await asyncio.gather(*(mesh.agent(SampleAgent, broker, [f"/host/b{i}"]) for i in range(8)))
    await until(lambda: len(broker.directory) == 8, what="eight agents listed")
    jid = str(broker.jid)
    # Every agent got the broker's acknowledgement, of this session: it stopped announcing.
    await until(lambda: all(a._broker_sessions.get(jid) == broker.session for a in agents),
                what="every agent acknowledged by the broker's session")
    await until(lambda: all(a._announcer is None or a._announcer.done() for a in agents),
                what="every agent done announcing")
    assert any(written and not greeting for _n, written, greeting in writes), \
        f"no acknowledgement written as text: {writes}"

    async def server_counted_everything() -> None:
        # The server's count of what the broker sent equals the broker's own (XEP-0198): a presence
        # written as text and not counted would leave the server ahead ("inconsistent sequence numbers").
        await server_acknowledged(broker.xmpp.plugin["xep_0198"])

    await server_counted_everything()

    # A new session (as after a missed keepalive): the greeting goes to all eight in writes of at most
    # three, and every agent answers it and is listed and acknowledged again.
    writes.clear()
    paced.clear()
    sessions: list[str] = []
    broker.on_event("session_start", lambda _e: sessions.append("new"))
    old_session = broker.session
    broker.xmpp.reconnect(0.0, "Ping timeout after 10s")
    await until(lambda: sessions and broker.session != old_session, timeout=20, what="the broker's new session")
    await until(lambda: len(broker.directory) == 8, timeout=20, what="every agent listed again")
    assert sorted(e.jid for e in broker.directory.entries()) == sorted(str(a.jid) for a in agents)
    await until(lambda: all(a._broker_sessions.get(jid) == broker.session for a in agents),
                what="every agent answering the new session")

    def greetings() -> list[int]:
        return [n for n, written, greeting in writes if written and greeting]

    # Each batch waits for the server's acknowledgement of the one before, so the greeting may end
    # after the agents (told by the server that the old session went) have announced themselves.
    await until(lambda: sum(greetings()) >= 8, what=f"the greeting written to all eight: {writes}")
    assert len(greetings()) >= 3 and max(greetings()) <= 3, f"not a greeting in writes of three: {writes}"
    # No batch was written before the server had acknowledged the one before the last: the server's
    # process for the broker's session is never more than two batches behind.
    assert all(paced[k][0] >= paced[k - 2][1] for k in range(2, len(paced))), paced
    await server_counted_everything()


async def test_agents_presences_are_filed_off_the_raw_element_and_counted_once(mesh, tmp_path):
    """An admitted agent's presence whose caps hash is known is filed (or, unavailable, removed)
    without slixmpp's stanza object (``Broker._take_presence``), and every stanza the broker read is
    counted for XEP-0198 exactly once, taken that way or not."""
    broker = await mesh.broker(state_dir=tmp_path / "broker")
    received: list[int] = [0]  # presences, messages and IQs read since XEP-0198 was enabled
    spawn_event = broker.xmpp._spawn_event

    def counting(xml):
        if xml.tag.rpartition("}")[2] in ("presence", "message", "iq"):
            received[0] += 1
        spawn_event(xml)

    broker.xmpp._spawn_event = counting
    taken: list[str] = []
    take_presence = broker.xmpp.take_presence

    def counted(xml):
        took = take_presence(xml)
        if took:
            taken.append(xml.get("type") or "available")
        return took

    broker.xmpp.take_presence = counted
    sessions: list[str] = []
    broker.on_event("session_start", lambda _e: sessions.append("new"))
    broker.xmpp.add_event_handler("sm_enabled", lambda _e: received.__setitem__(0, 0))
    # The same resources, so one caps hash: the first announcement is learned by disco#info (the slow
    # path), and the others are filed off the raw element.
    agents = await asyncio.gather(*(mesh.agent(SampleAgent, broker, ["/host/same"]) for _ in range(6)))
    await until(lambda: len(broker.directory) == 6, what="six agents listed")
    # Each listed agent is pushed the fenced nodes; while that request is out, the broker watches the
    # agent's job, and a watched agent's presence goes slixmpp's way on purpose (the caller sees it). A
    # push still out across the reconnect would send some answers below that way: let them all end.
    await until(lambda: all(a.fenced.installed_at is not None for a in agents), what="the fenced nodes pushed")
    await until(lambda: not any(broker.vertebra.watches(str(a.jid)) for a in agents),
                what="the broker's pushes answered")

    # A new session: every agent answers the hello, and each answer is filed off the raw element.
    taken.clear()
    old_session = broker.session
    broker.xmpp.reconnect(0.0, "Ping timeout after 10s")
    await until(lambda: sessions and broker.session != old_session, timeout=20, what="the broker's new session")
    await until(lambda: len(broker.directory) == 6, timeout=20, what="every agent listed again")
    assert taken.count("available") >= 6, taken
    assert sorted(e.jid for e in broker.directory.entries()) == sorted(str(a.jid) for a in agents)

    # Two agents go: the server's unavailable presences take them out of the directory the same way.
    await asyncio.gather(agents[0].stop(), agents[1].stop())
    await until(lambda: len(broker.directory) == 4, what="the two stopped agents gone")
    assert taken.count("unavailable") >= 2, taken  # the agent's own, and the server's as its session ends
    assert str(agents[0].jid) not in {e.jid for e in broker.directory.entries()}

    # XEP-0198: the broker says it handled exactly what it read (too few, and the server keeps resending
    # them on a resumption; too many, and it ends the stream), and the server goes on with the session.
    sm = broker.xmpp.plugin["xep_0198"]
    assert sm.handled == received[0], (sm.handled, received[0])
    found = await (await mesh.client(broker)).discover("sample.echo", [], timeout=10)
    assert len(found.result) == 4 and sessions == ["new"]


async def test_a_second_hello_of_the_same_session_lists_an_agent_whose_answer_was_lost(mesh, tmp_path):
    # The second hello goes to the known agents the broker has not listed. One whose answer to the
    # first was lost (or came while the broker could not file it) has already answered this session;
    # it answers the second all the same, because a hello says it is one, to whatever address the
    # server delivered it (ejabberd delivers a hello to the agent's full JID, like an acknowledgement).
    broker = await mesh.broker(state_dir=tmp_path / "broker")
    agent = await mesh.agent(SampleAgent, broker, ["/host/lost"])
    full = str(agent.jid)
    await until(lambda: broker.directory.lists(full.split("/")[0]), what="the agent listed")
    await until(lambda: agent._broker_sessions.get(str(broker.jid)) == broker.session,
                what="the agent answering this session")
    await until(lambda: agent._announcer is None or agent._announcer.done(), what="the agent done announcing")
    # The session's own greeting (its second hello, to bare JIDs, a few seconds in) is over.
    await until(lambda: broker._greeting is not None and broker._greeting.done(), what="the greeting over")
    assert broker.directory.remove(full)  # its answer, as if lost: not listed, though it answered
    broker._write_presences([full], hello=True)  # addressed to its full JID, as ejabberd delivers it
    await until(lambda: broker.directory.lists(full.split("/")[0]), what="the agent listed again")
    # An acknowledgement of the same session, to the same address, is not answered: no loop.
    answered: list[str] = []
    broker.xmpp.add_event_handler("presence_available",
                                  lambda p: answered.append(str(p["from"])) if str(p["from"]) == full else None)
    assert broker.directory.remove(full)
    broker._write_presences([full])
    # The agent reads in order: an answer to the acknowledgement would reach the broker before this pong.
    await broker.xmpp.plugin["xep_0199"].ping(full, timeout=10)
    assert answered == [] and not broker.directory.lists(full.split("/")[0])
