"""A broker whose shared state is out of reach as its session starts (etcd down, or cut off) still does
what it does on its own once etcd answers: it greets the agents its instances know, and pushes the fenced
nodes to each agent that joins. Both ask the state again with backoff for as long as the broker runs
(broker.shared_state.until_answered). Each used to ask once, and the failure ended it ("Task exception was
never retrieved"): the agents online before that session were never greeted (one the server never told
of the broker's restart, docs/protocol.md 4.4, stayed unlisted until the broker's next session), and an
agent that joined then never learnt which nodes were fenced until the next epoch opened or closed."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from broker import shared_state
from agents import protocol
from agents.config import StateConfig
from broker.service import Broker
from conftest import until
from etcd_cluster import PrivateEtcd
from sample_agent import SampleAgent

pytest.importorskip("aetcd", reason="the etcd client is the optional extra 'etcd': make install installs it")

from broker.state_etcd import EtcdKnownAgents  # noqa: E402  (after the check above)


def _is_hello(pres: Any) -> bool:
    marker = pres.xml.find(protocol.BROKER_SESSION)
    return marker is not None and marker.get("hello") == "1"


async def test_the_broker_greets_the_known_agents_once_etcd_answers(mesh: Any, tmp_path: Path, monkeypatch: Any,
                                                                    caplog: Any) -> None:
    monkeypatch.setattr(shared_state, "RETRY_CAP", 1.0)   # asks again each second once backed off
    caplog.set_level(logging.WARNING, logger="broker.shared_state")
    etcd = PrivateEtcd(tmp_path / "etcd", size=1)
    state = StateConfig(endpoints=tuple(etcd.endpoints), prefix=f"/greeting-{os.getpid()}")
    jid, password = mesh.account("broker")
    agent_jid, agent_password = mesh.account("sample")
    await asyncio.to_thread(etcd.start)
    member = etcd.members[0].proc
    assert member is not None
    try:
        known = EtcdKnownAgents(state)       # an earlier session of the broker listed the agent
        known.add(agent_jid)
        await known.aclose()
        member.send_signal(signal.SIGSTOP)   # etcd cut off: every call to it times out
        (tmp_path / "broker").mkdir()
        broker = await mesh.start(Broker(jid, password, mesh.endpoint, state_dir=tmp_path / "broker", state=state,
                                         authorizer=mesh.admins))
        broker.admit(agent_jid, SampleAgent.kind, ["/host/a"])
        (tmp_path / "agent").mkdir()
        agent = await mesh.start(SampleAgent(agent_jid, agent_password, mesh.endpoint, resources=["/host/a"],
                                             broker=jid, state_dir=tmp_path / "agent", authorizer=mesh.admins))
        installs: list[Any] = []            # the fenced nodes pushed to the agent since it joined
        take = agent.fenced.install
        monkeypatch.setattr(agent.fenced, "install",
                            lambda entries, *state: (installs.append(entries), take(entries, *state))[1])
        hellos: list[str] = []
        agent.xmpp.add_event_handler("presence_available",
                                     lambda p: hellos.append(str(p["from"])) if _is_hello(p) else None)
        greeting = broker._greeting
        assert greeting is not None
        await until(lambda: greeting.done() or "greeting the agents this broker's instances know waits" in caplog.text,
                    timeout=30, what="the greeting's first ask for the known agents to fail")
        assert not greeting.done(), "the greeting gave up when etcd did not answer"
        await until(lambda: "pushing the fenced nodes waits" in caplog.text, timeout=30,
                    what="the push of the fenced nodes to the agent that joined waiting for etcd")
        assert hellos == [] and installs == []

        member.send_signal(signal.SIGCONT)
        await until(lambda: hellos, timeout=30, what="the broker's hello once etcd answers")
        assert hellos[0] == str(broker.jid)
        await until(lambda: broker.directory.lists(agent_jid), what="the agent listed")
        await until(lambda: installs, timeout=30, what="the fenced nodes pushed to the agent once etcd answers")
        assert installs[0] == []             # none is fenced; what matters is that the agent was told
    finally:
        member.send_signal(signal.SIGCONT)
        etcd.stop()


async def test_a_call_whose_channel_another_call_closed_fails_as_unreachable(tmp_path: Path) -> None:
    """grpc cancels the calls in flight on a channel it closes. When one call finds the member down and
    moves on, the others on the same client fail as unreachable (what their callers handle), never with a
    CancelledError that would stop whatever awaited them; a real cancellation still cancels."""
    from broker.state_etcd import EtcdClient

    etcd = PrivateEtcd(tmp_path / "etcd", size=1)
    await asyncio.to_thread(etcd.start)
    member = etcd.members[0].proc
    assert member is not None
    client = EtcdClient(StateConfig(endpoints=tuple(etcd.endpoints), prefix="/closed"))
    try:
        await client.get(b"/closed/warm")          # connected: the calls below share one channel
        member.send_signal(signal.SIGSTOP)
        first = asyncio.ensure_future(client.get(b"/closed/a"))
        await asyncio.sleep(0.5)
        second = asyncio.ensure_future(client.get(b"/closed/b"))   # in flight when the first gives up
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert [type(r).__name__ for r in results if not isinstance(r, EtcdClient.errors)] == []
        third = asyncio.ensure_future(client.get(b"/closed/c"))
        await asyncio.sleep(0.2)
        third.cancel()
        with pytest.raises(asyncio.CancelledError):
            await third
    finally:
        member.send_signal(signal.SIGCONT)
        await client.close()
        etcd.stop()
