"""The broker's shared state on a real three-member etcd (broker/state_etcd.py), beside the lead:
the rate limits of workflow steps, counted by compare-and-swap so that instances racing for the
last slot cannot both have it; the workflow store, which answers as the SQLite one does and loses no
write to a race; and the choice of store from the mesh file's broker state (broker/shared_state.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agents.config import StateConfig
from broker import shared_state
from broker.constraints import APPROVED, RateLimits
from broker.workflow_store import WorkflowStore
from conftest import until
from etcd_cluster import PrivateEtcd

pytest.importorskip("aetcd", reason="the etcd client is the optional extra 'etcd': make install installs it")

from broker.leadership import Deposed  # noqa: E402
from broker.fencing import FenceLedger  # noqa: E402
from broker.state_etcd import (EtcdFenceLedger, EtcdKnownAgents, EtcdLease, EtcdRateLimits,  # noqa: E402
                               EtcdWorkflowStore, LeadLost)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with PrivateEtcd(tmp_path_factory.mktemp("etcd-state")) as cluster:
        yield cluster


async def test_racing_instances_never_take_more_than_the_limit(etcd: PrivateEtcd) -> None:
    cfg = StateConfig(endpoints=tuple(etcd.endpoints), prefix="/rates-test")
    clock = Clock()
    one, two = EtcdRateLimits(cfg, clock), EtcdRateLimits(cfg, clock)
    try:
        verdicts = await asyncio.gather(*(limits.take("fence.off", 5, 60, f"op{n}@x")
                                          for n in range(12) for limits in (one, two)))
        granted = [v for v in verdicts if v.ok]
        assert len(granted) == 5
        assert sorted(v.reason for v in granted) == [f"rate limit: use {n} of 5 in 60s" for n in range(1, 6)]
        refused = [v.reason for v in verdicts if not v.ok]
        assert refused and set(refused) == {"rate limit: fence.off already used 5 times in the last 60s (at most 5)"}
        assert not (await one.take("fence.off", 5, 60, "late@x")).ok
        assert (await one.take("other.op", 5, 60, "op@x")).ok  # every key counts apart
        clock.now += 61  # the window has moved past every use
        assert (await two.take("fence.off", 5, 60, "op@x")).reason == "rate limit: use 1 of 5 in 60s"
    finally:
        await one.aclose()
        await two.aclose()


async def test_the_mesh_file_s_state_chooses_the_store(etcd: PrivateEtcd, tmp_path: Path) -> None:
    on_sqlite = SimpleNamespace(state_config=None, shared_dir=tmp_path)
    limits = shared_state.rate_limits(on_sqlite)
    lease = shared_state.lease(on_sqlite, "b@x/broker", 6)
    assert isinstance(limits, RateLimits) and (tmp_path / shared_state.RATES_FILE).is_file()
    assert await lease.take() == 1 and (tmp_path / shared_state.LEASE_FILE).is_file()
    await limits.aclose()
    await lease.aclose()
    on_etcd = SimpleNamespace(state_config=StateConfig(endpoints=tuple(etcd.endpoints), prefix="/choice"),
                              shared_dir=tmp_path / "unused")
    limits, lease = shared_state.rate_limits(on_etcd), shared_state.lease(on_etcd, "b@x/broker", 6)
    try:
        assert isinstance(limits, EtcdRateLimits) and isinstance(lease, EtcdLease)
        assert (await limits.take("k", 1, 60, "a@x")).ok and await lease.take() is not None
        assert not (tmp_path / "unused").exists()
    finally:
        await limits.aclose()
        await lease.aclose()


async def _workflow_story(store: Any) -> dict[str, Any]:
    """The same writes on a store, and what it then answers (times left out: each store takes its own)."""
    await store.create("i1", "patch", "alice@x", {"node": "n1"}, [["a"], ["b"]], ["a", "b"])
    await store.create("i2", "patch", "alice@x", {}, [["a"]], ["a"])
    await store.set_step("i1", "a", state="held", reason="held until someone performs it")
    await store.add_event("i1", APPROVED, "a", "bob@x")
    await store.start_step("i1", "a", "carol@x", "agent@x/agent")
    await store.set_step("i1", "a", state="ok", outcome="ok", result={"n": 1, "at": {"x"}}, attempts=1)
    await store.set_instance("i2", "done")
    await store.set_instance("i1", "waiting", "step b waits for approvals")
    untimed = ("created", "updated", "started", "ended")

    def strip(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k not in untimed}

    return {"instance": strip(await store.instance("i1") or {}), "none": await store.instance("nope"),
            "instances": [strip(r) for r in await store.instances()],
            "done": [r["id"] for r in await store.instances(state="done")], "unfinished": await store.unfinished(),
            "steps": {k: strip(v) for k, v in (await store.steps("i1")).items()},
            "step": strip(await store.step("i1", "a")),
            "history": [(e.kind, e.step, e.actor) for e in await store.history("i1")]}


async def test_the_workflow_store_on_etcd_answers_as_the_sqlite_one(etcd: PrivateEtcd, tmp_path: Path) -> None:
    sqlite_store = WorkflowStore(tmp_path / "workflows.sqlite")
    etcd_store = EtcdWorkflowStore(StateConfig(endpoints=tuple(etcd.endpoints), prefix="/workflow-test"))
    try:
        on_sqlite, on_etcd = await _workflow_story(sqlite_store), await _workflow_story(etcd_store)
        assert on_etcd == on_sqlite
        assert on_etcd["step"]["state"] == "ok" and on_etcd["step"]["performer"] == "carol@x"
        assert on_etcd["history"] == [("requested", "a", "alice@x"), ("requested", "b", "alice@x"),
                                      ("approved", "a", "bob@x"), ("performed", "a", "carol@x")]
        assert on_etcd["unfinished"] == ["i1"] and on_etcd["done"] == ["i2"]
    finally:
        await sqlite_store.aclose()
        await etcd_store.aclose()


async def test_racing_writers_of_one_step_lose_nothing(etcd: PrivateEtcd) -> None:
    cfg = StateConfig(endpoints=tuple(etcd.endpoints), prefix="/workflow-race")
    one, two = EtcdWorkflowStore(cfg), EtcdWorkflowStore(cfg)
    try:
        await one.create("r1", "patch", "alice@x", {}, [["a"]], ["a"])
        with pytest.raises(Exception, match="exists already"):
            await two.create("r1", "patch", "mallory@x", {}, [["a"]], ["a"])
        # Six changes to six fields of the same step at once, from two writers: each read-modify-write
        # that loses a race reads again, so every change is there in the end.
        changes = {"attempts": 3, "rate_taken": 1, "outcome": "ok", "reason": "why", "target": "a@x/agent",
                   "performer": "carol@x"}
        await asyncio.gather(*(store.set_step("r1", "a", **{field: value})
                               for store, (field, value) in zip((one, two) * 3, changes.items())))
        row = await two.step("r1", "a")
        assert {k: row[k] for k in changes} == changes and row["state"] == "pending"
        assert (await one.instance("r1") or {})["requester"] == "alice@x"
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_record_written_last_here_is_changed_without_a_read_and_loses_no_other_write(
        etcd: PrivateEtcd) -> None:
    cfg = StateConfig(endpoints=tuple(etcd.endpoints), prefix="/workflow-written")
    one, two = EtcdWorkflowStore(cfg), EtcdWorkflowStore(cfg)
    reads: list[bytes] = []
    get = one.client.get

    async def counted_get(key: bytes, *args: Any, **kwargs: Any) -> Any:
        reads.append(key)
        return await get(key, *args, **kwargs)

    one.client.get = counted_get  # type: ignore[method-assign]
    try:
        await one.create("w1", "patch", "alice@x", {}, [["a"]], ["a"])
        # Each change starts from this instance's own last write of the record, the create included.
        await one.start_step("w1", "a", "carol@x", "agent@x/agent")
        await one.set_step("w1", "a", attempts=1)
        await one.set_instance("w1", "running")
        assert reads == []
        # Another instance writes the record: the change made here next finds its own write stale,
        # reads the record again, and keeps the other's change.
        await two.set_step("w1", "a", reason="two's note")
        await one.set_step("w1", "a", state="ok", outcome="ok")
        assert len(reads) == 1
        row = await two.step("w1", "a")
        assert (row["attempts"], row["state"], row["performer"], row["reason"]) == (1, "ok", "carol@x", "two's note")
        assert [e.kind for e in await two.history("w1")] == ["requested", "performed"]
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_leader_deposed_without_noticing_cannot_change_the_workflows(etcd: PrivateEtcd) -> None:
    cfg = StateConfig(endpoints=tuple(etcd.endpoints), prefix="/workflow-fenced")
    old, new = EtcdLease(cfg, "b@x/broker", term=2), EtcdLease(cfg, "b@x/broker-2", term=2)
    mine = EtcdWorkflowStore(cfg, lead=old.fencing)
    theirs = EtcdWorkflowStore(cfg, lead=new.fencing)
    try:
        assert await old.take() is not None
        await mine.create("f1", "patch", "alice@x", {}, [["a"]], ["a"])  # written under its lead
        await mine.set_step("f1", "a", attempts=1)
        # It stalls (no renewal): its lease runs out in etcd and the other instance leads.
        await until(new.take, timeout=20, what="the other instance to lead once the first stopped renewing")
        with pytest.raises(LeadLost, match="lead .* has ended") as refused:
            await mine.set_step("f1", "a", attempts=2, state="ok")
        assert isinstance(refused.value, Deposed)  # the engine stops as when it notices itself
        with pytest.raises(LeadLost):
            await mine.create("f2", "patch", "alice@x", {}, [["a"]], ["a"])
        with pytest.raises(LeadLost):
            await mine.start_step("f1", "a", "carol@x", "agent@x/agent")
        row = await theirs.step("f1", "a")
        assert (row["attempts"], row["state"]) == (1, "pending") and await theirs.instance("f2") is None
        assert [e.kind for e in await theirs.history("f1")] == ["requested"]
        await theirs.set_step("f1", "a", attempts=2)  # the leader's own writes go through
        assert (await mine.step("f1", "a"))["attempts"] == 2
    finally:
        for closing in (mine, theirs, old, new):
            await closing.aclose()


async def test_known_agents_are_shared_through_etcd(etcd: PrivateEtcd) -> None:
    cfg = StateConfig(endpoints=tuple(etcd.endpoints), prefix="/known-test")
    mine, other = EtcdKnownAgents(cfg), EtcdKnownAgents(cfg)  # two instances of a broker
    try:
        mine.add("a@example.net")
        mine.add("a@example.net")  # seen again: nothing new
        other.add("b@example.net")
        await until(lambda: _all_are(mine, ["a@example.net", "b@example.net"]), timeout=10,
                    what="both instances' agents in etcd")
        assert await other.all() == ["a@example.net", "b@example.net"]
    finally:
        await mine.aclose()
        await other.aclose()
    again = EtcdKnownAgents(cfg)  # a restarted broker greets them
    try:
        assert await again.all() == ["a@example.net", "b@example.net"]
    finally:
        await again.aclose()


async def _all_are(known: EtcdKnownAgents, jids: list[str]) -> bool:
    return await known.all() == jids


def _fence_event(kind: str, action: str, node: str, at: float, event_id: str, **more: Any) -> dict[str, Any]:
    return {"event": kind, "action": action, "cluster": "c1", "node": node, "ok": True, "at": at,
            "requester": "pcmk@x.test", "identities": ["DB1@x.test"], "id": event_id, **more}


async def _fencing_story(ledger: Any) -> dict[str, Any]:
    """The same events recorded in a ledger, and what it then answers."""
    recorded = [await ledger.record("F@x.test", event) for event in (
        _fence_event("attempt", "off", "n1", 90.0, "a1"),
        _fence_event("outcome", "off", "n1", 100.0, "o1", state="off"),
        _fence_event("outcome", "off", "n1", 100.0, "o1", state="off"),  # resent: recorded once
        _fence_event("outcome", "on", "n1", 200.0, "o2", state="on"),
        _fence_event("outcome", "reboot", "n1", 300.0, "o3", state="on"),
        _fence_event("outcome", "off", "n1", 150.0, "o4", state="off"),  # older than the last change
        _fence_event("outcome", "off", "n2", 400.0, "o5", state="off"),
        _fence_event("outcome", "off", "n2", 401.0, "o6", ok=False))]
    return {"recorded": recorded, "epochs": await ledger.epochs(), "n1": await ledger.epochs("c1", "n1"),
            "fenced": await ledger.fenced(), "open": await ledger.open_epoch("c1", "n2"),
            "none": await ledger.open_epoch("c1", "n1"), "events": await ledger.events(),
            "page": await ledger.events(since=3, limit=2),
            "state": (await ledger.fenced_state())[1:]}  # the ledger's id aside: each has its own


async def test_the_fence_ledger_on_etcd_answers_as_the_sqlite_one(etcd: PrivateEtcd, tmp_path: Path) -> None:
    sqlite_ledger = FenceLedger(tmp_path / "fencing.sqlite")
    etcd_ledger = EtcdFenceLedger(StateConfig(endpoints=tuple(etcd.endpoints), prefix="/fencing-test"))
    try:
        on_sqlite, on_etcd = await _fencing_story(sqlite_ledger), await _fencing_story(etcd_ledger)
        assert on_etcd == on_sqlite
        assert on_etcd["recorded"] == [(1, None, True), (2, "fenced", True), (2, None, False), (3, "unfenced", True),
                                       (4, "rebooted", True), (5, None, True), (6, "fenced", True), (7, None, True)]
        assert [(f.node, f.epoch, f.identities) for f in on_etcd["fenced"]] == [("n2", 1, ("db1@x.test",))]
        assert [e["seq"] for e in on_etcd["page"]] == [6, 7]  # the latest two after 3
        assert on_etcd["state"] == (7, on_etcd["fenced"])  # the open epochs as of the newest event
    finally:
        await sqlite_ledger.aclose()
        await etcd_ledger.aclose()


async def test_instances_share_the_fence_ledger_and_never_reuse_a_number(etcd: PrivateEtcd) -> None:
    cfg = StateConfig(endpoints=tuple(etcd.endpoints), prefix="/fencing-shared")
    one, two = EtcdFenceLedger(cfg), EtcdFenceLedger(cfg)
    try:
        assert two.written_elsewhere() is True and two.fenced_now() == []  # the first decision installs it
        recorded = await asyncio.gather(*(ledger.record("f@x.test", _fence_event("attempt", "off", "n9", n, f"r{n}"))
                                          for n in range(10) for ledger in (one, two) if n % 2 == (ledger is two)))
        assert sorted(seq for seq, _, _ in recorded) == list(range(1, 11))
        await until(lambda: not two.written_elsewhere(), timeout=10, what="the other instance to settle")
        assert (await one.record("f@x.test", _fence_event("outcome", "off", "n9", 50.0, "off9", state="off")))[1] \
            == "fenced"
        # The other instance's synchronous rule learns of it without being told.
        await until(two.written_elsewhere, timeout=10, what="the other instance to see the new epoch")
        assert [(f.node, f.identities) for f in two.fenced_now()] == [("n9", ("db1@x.test",))]
        # Which state of the ledger a push is: the same id and number whichever instance reads it.
        assert (await one.fenced_state())[:2] == (await two.fenced_state())[:2] == ((await one.fenced_state())[0], 11)
    finally:
        await one.aclose()
        await two.aclose()


async def test_the_member_in_use_dying_loses_no_write(etcd: PrivateEtcd) -> None:
    """After every other test on the module's cluster: it kills one of its members."""
    cfg = StateConfig(endpoints=tuple(etcd.endpoints), prefix="/member-dies")
    store, limits, ledger = EtcdWorkflowStore(cfg), EtcdRateLimits(cfg), EtcdFenceLedger(cfg)
    try:
        await store.create("d1", "patch", "alice@x", {}, [["a"]], ["a"])
        assert (await limits.take("k", 2, 60, "a@x")).ok and await ledger.events() == []
        in_use = {store.client._member, limits.client._member, ledger.client._member}
        assert len(in_use) == 1  # every client starts on the first member given
        etcd.kill(in_use.pop())
        await asyncio.to_thread(etcd.wait_healthy)
        # Each next call finds its member gone and carries on with another: nothing is lost or doubled.
        await store.start_step("d1", "a", "carol@x", "agent@x/agent")
        await store.set_step("d1", "a", state="ok", outcome="ok", attempts=1)
        verdict = await limits.take("k", 2, 60, "b@x")
        recorded = await ledger.record("f@x.test", _fence_event("outcome", "off", "n1", 10.0, "e1", state="off"))
        assert verdict.reason == "rate limit: use 2 of 2 in 60s" and recorded == (1, "fenced", True)
        row = await store.step("d1", "a")
        assert (row["state"], row["performer"], row["attempts"]) == ("ok", "carol@x", 1)
        assert [e.kind for e in await store.history("d1")] == ["requested", "performed"]
        assert not (await limits.take("k", 2, 60, "c@x")).ok
    finally:
        for closing in (store, limits, ledger):
            await closing.aclose()


def test_without_the_etcd_client_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "aetcd", None)  # as if the optional extra were not installed
    monkeypatch.delitem(sys.modules, "broker.state_etcd", raising=False)
    monkeypatch.delattr("broker.state_etcd", raising=False)
    broker = SimpleNamespace(state_config=StateConfig(endpoints=("h:2379",)), shared_dir=None)
    with pytest.raises(ValueError, match=r"etcd client cannot be loaded .*make install.*vertebra\[etcd\]"):
        shared_state.workflow_store(broker)
