"""Pushes of the fenced nodes that pass each other, on the real server: each push says which state of the
broker's fencing ledger it is (the ledger's id and its newest event's number), and an agent ignores a list
older than the one it has, so a list read before a fence.off and delivered after it cannot unfence the
node. An agent of an earlier version, which does not advertise that it orders pushes, still gets the
list alone (it would refuse the two arguments) and is fenced like the others."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

from agents.errors import Outcome
from agents.fenced import INSTALL_OP, ORDERED, parse_entries
from agents.fencing.agent import FencingAgent
from agents.ops import Arg, op
from conftest import until
from fence_mesh import dummy_device
from sample_agent import SampleAgent


class EarlierAgent(SampleAgent):
    """fenced.install as agents had it before ordered pushes: the list alone, nothing advertised."""

    @op(INSTALL_OP, effect="change", deadline=10, sender="broker")
    async def fenced_install(self, call: Any, fenced: Annotated[str, Arg("the open epochs, as JSON")] = "[]") -> dict:
        self.fenced.install(parse_entries(fenced))
        return {}

    def _advertise_features(self) -> None:
        super()._advertise_features()
        self.vertebra.features = tuple(f for f in self.vertebra.features if f != ORDERED)


async def test_an_older_list_of_fenced_nodes_never_replaces_a_newer_one(mesh: Any, tmp_path: Path) -> None:
    broker = await mesh.broker(state_dir=tmp_path / "broker")
    node1 = tmp_path / "node1.state"
    node1.write_text("on")
    db1 = mesh.account("db")[0]
    fencing = await mesh.agent(FencingAgent, broker, ["/host/fencer"], settings={
        "clusters": {"c1": ["node1"]},
        "fencing": {"devices": {"pdu1": dummy_device(node1)}, "levels": {"node1": [["pdu1"]]}},
        "identities": {"node1": [db1]}})
    sample = await mesh.agent(SampleAgent, broker, ["/host/s1"])
    earlier = await mesh.agent(EarlierAgent, broker, ["/host/e1"])
    await until(lambda: len(broker.directory) == 3, what="the three agents listed")
    assert broker.directory.has_feature(str(sample.jid), ORDERED)
    assert not broker.directory.has_feature(str(earlier.jid), ORDERED)
    ledger, before, _ = await broker.fencing.ledger.fenced_state()

    client = await mesh.client(broker)
    off = await client.request(str(fencing.jid), "fence.off", {"cluster": "c1", "node": "node1"}, timeout=30)
    assert off.outcome is Outcome.OK and node1.read_text() == "off", off.error
    await until(lambda: all(a.fenced.of(db1) for a in (fencing, sample, earlier)), what="the fence pushed to all")
    _, version, entries = await broker.fencing.ledger.fenced_state()
    assert version > before and [e.node for e in entries] == ["node1"]
    assert (sample.fenced.ledger, sample.fenced.version) == (ledger, version)

    async def install(target: Any, **args: Any) -> Any:
        res = await broker.request(str(target.jid), INSTALL_OP, {"fenced": "[]", **args}, timeout=10)
        assert res.outcome is Outcome.OK, res.error
        return res.result

    # The list read before the fence (no node fenced), delivered now: ignored, the node stays fenced.
    assert (await install(sample, ledger=ledger, version=before))["taken"] is False
    assert sample.fenced.of(db1) and sample.fenced.version == version
    # A list from another ledger (the broker's state made anew) is taken, and so is one that says no state.
    assert (await install(sample, ledger="other", version=1))["taken"] is True and not sample.fenced.of(db1)
    assert (await broker.fencing.push_fenced())[str(sample.jid)] == ""
    assert sample.fenced.of(db1) and (sample.fenced.ledger, sample.fenced.version) == (ledger, version)
    assert (await install(sample))["taken"] is True and not sample.fenced.of(db1)
    await broker.fencing.push_fenced()

    # A verified on: the list without the node is newer, and every agent takes it.
    on = await client.request(str(fencing.jid), "fence.on", {"cluster": "c1", "node": "node1"}, timeout=30)
    assert on.outcome is Outcome.OK, on.error
    await until(lambda: not any(a.fenced.of(db1) for a in (fencing, sample, earlier)), what="the unfence pushed")
    assert sample.fenced.version > version


async def test_a_list_read_for_the_brokers_session_before_is_not_sent_in_the_next(mesh: Any, tmp_path: Path) -> None:
    """The broker reads the ledger for a push; a new session begins (its keepalive failed, say) before the
    read ends. Each agent the new session lists gets the list read for it, and the one read before is not
    sent: the new session did not ask for it. Nor is a push for an agent the session before listed."""
    broker = await mesh.broker(state_dir=tmp_path / "broker")
    sample = await mesh.agent(SampleAgent, broker, ["/host/s1"])
    await until(lambda: sample.fenced.installed_at is not None, what="the fenced nodes pushed at the listing")
    await until(lambda: not broker.vertebra.watches(str(sample.jid)), what="the push answered")
    ledger = broker.fencing.ledger
    read, reads, gate = ledger.fenced_state, [], asyncio.Event()

    async def held() -> Any:
        reads.append(broker.session)
        await gate.wait()
        return await read()

    ledger.fenced_state = held
    stale = asyncio.ensure_future(broker.fencing.push_fenced())
    await until(lambda: reads, what="the ledger read for the first session")
    old = broker.session
    broker.xmpp.reconnect(0.0, "Ping timeout after 10s")
    await until(lambda: broker.session != old and len(broker.directory) == 1, timeout=30,
                what="the agent listed in the broker's new session")
    await until(lambda: len(reads) >= 2, timeout=30, what="the ledger read for the new session's listing")
    pushed_before = sample.fenced.installed_at
    gate.set()
    assert await stale == {}, "the list read for the session before was sent in the new one"
    await until(lambda: sample.fenced.installed_at != pushed_before, timeout=30, what="the new session's push taken")
    # A listing's push that starts only after the next session began (its task ran late) is not sent either.
    ledger.fenced_state = read
    assert await broker.fencing.push_fenced([str(sample.jid)], session=old) == {}
    assert (await broker.fencing.push_fenced([str(sample.jid)]))[str(sample.jid)] == ""
