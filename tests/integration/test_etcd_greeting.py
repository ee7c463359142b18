"""A broker whose shared state is out of reach as its session starts (etcd down, or cut off) still greets
the agents its instances know, once etcd answers: the greeting asks for the known agents again with
backoff for as long as the broker runs. It used to ask once, and the failure ended the greeting: the
agents online before that session were never greeted, and an agent the server never told of the broker's
restart (docs/protocol.md 4.4) stayed unlisted until the broker's next session."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest

import broker.service as service
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
    monkeypatch.setattr(service, "KNOWN_RETRY_CAP", 1.0)   # asks again each second once backed off
    caplog.set_level(logging.WARNING, logger="broker.service")
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
        hellos: list[str] = []
        agent.xmpp.add_event_handler("presence_available",
                                     lambda p: hellos.append(str(p["from"])) if _is_hello(p) else None)
        greeting = broker._greeting
        assert greeting is not None
        await until(lambda: greeting.done() or "cannot read the agents known to this broker's instances" in caplog.text,
                    timeout=30, what="the greeting's first ask for the known agents to fail")
        assert not greeting.done(), "the greeting gave up when etcd did not answer"
        assert hellos == []

        member.send_signal(signal.SIGCONT)
        await until(lambda: hellos, timeout=30, what="the broker's hello once etcd answers")
        assert hellos[0] == str(broker.jid)
        await until(lambda: broker.directory.lists(agent_jid), what="the agent listed")
    finally:
        member.send_signal(signal.SIGCONT)
        etcd.stop()
