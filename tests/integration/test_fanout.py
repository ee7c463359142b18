"""A call to many agents on the real server: its requests go out in one write, every target gets its
one outcome, and XEP-0198 counted the batch right (the server acknowledges exactly what the client
counted, nothing is resent after a resumption, and the resumed stream carries the next call)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from agents.errors import Outcome
from conftest import server_acknowledged, until
from sample_agent import SampleAgent

AGENTS = 50


async def test_a_call_to_many_agents_is_answered_by_each_and_the_stream_resumes_after(mesh, caplog):
    caplog.set_level(logging.ERROR, logger="slixmpp")
    agents: list[Any] = []
    for first in range(0, AGENTS, 10):  # ten logins at a time: fifty at once take over 15 s on a busy machine
        agents += await asyncio.gather(*(mesh.agent(SampleAgent, None, [f"/fan/{i}"])
                                         for i in range(first, first + 10)))
    client = await mesh.client()
    sm = client.xmpp.plugin["xep_0198"]
    gone = f"{agents[0].jid.bare}/elsewhere"  # no such session: the server answers for it
    targets = [str(a.jid) for a in agents] + [gone]

    writes: list[str] = []
    send_raw = client.xmpp.send_raw

    def recording(data: Any) -> None:
        writes.append(data if isinstance(data, str) else data.decode())
        send_raw(data)

    client.xmpp.send_raw = recording  # type: ignore[method-assign]
    heard: list[tuple[int, int]] = []
    seq_before = sm.seq
    report = await client.call("sample.echo", {"text": "hi"}, to=targets, timeout=20,
                               answered=lambda n, total: heard.append((n, total)))
    client.xmpp.send_raw = send_raw  # type: ignore[method-assign]

    by_target = {r.target: r for r in report.results}
    assert [r.target for r in report.results] == targets  # in the order named, one each
    for agent in agents:
        res = by_target[str(agent.jid)]
        assert res.outcome is Outcome.OK, res
        assert res.result["text"] == "hi" and res.result["caller"] == client.jid.bare
    assert by_target[gone].outcome is Outcome.UNREACHABLE
    assert heard[0] == (0, AGENTS + 1) and heard[-1] == (AGENTS + 1, AGENTS + 1) and len(heard) == AGENTS + 2
    # Every request in one write, each counted once for XEP-0198.
    batches = [w for w in writes if w.count("<iq ") == len(targets)]
    assert len(batches) == 1, [w[:200] for w in writes]
    assert sm.seq - seq_before == len(targets)
    await server_acknowledged(sm)

    # Cut the connection as a network fault would, until the server resumes the stream (a cut it has
    # not noticed yet ends in a new session instead; see test_stanza_limits).
    strays: list[str] = []  # IQ results that reach slixmpp's handlers: answers sent to us again

    def stray(stanza: Any) -> Any:
        if stanza.xml.tag == "{jabber:client}iq" and stanza.xml.get("type") in ("result", "error"):
            strays.append(stanza.xml.get("id", ""))
        return stanza

    client.xmpp.add_filter("in", stray)
    # Back to the node that holds the session (an actor tries the next node of a cluster after a cut):
    # what is tested here is the client's counting, not resumption across ejabberd nodes.
    client._addresses = [client.server_address]
    client._address = 0
    sessions: list[str] = []
    client.on_event("session_resumed", lambda _event: sessions.append("resumed"))
    client.on_event("session_start", lambda _event: sessions.append("new"))
    for _ in range(12):
        seen = len(sessions)
        client.xmpp.transport.abort()
        await until(lambda: len(sessions) > seen and client.online,  # noqa: B023 (awaited in this iteration)
                    timeout=20, what="the session back")
        if sessions[-1] == "resumed":
            break
    assert sessions[-1] == "resumed", f"the server resumed no session: {sessions}"

    # The resumed stream carries the next call: every answer, and the server's count still ours.
    again = await client.call("sample.echo", {"text": "again"}, to=targets[:-1], timeout=20)
    assert [r.outcome for r in again.results] == [Outcome.OK] * AGENTS, [r for r in again.results if r.error]
    assert all(r.result["text"] == "again" for r in again.results)
    await server_acknowledged(sm)
    # Had the answers taken off the raw XML not been counted as handled, the server would have sent
    # them again on resumption (before the second call's answers), and they would arrive here.
    assert strays == []
    assert not [r.getMessage() for r in caplog.records if "Inconsistent sequence numbers" in r.getMessage()]
