"""Self-service clones with guard rails on a real Prosody, a real broker and a real storage agent:
a clone belongs to whoever asked, one policy rule (/volume/*/owner/{caller}) lets each developer manage only
their own, quotas refuse with a clear error, storage.report shows space per owner, and a clone past its
expiry is destroyed with an audit record and a notice at the broker (which the ops room shows)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from agents.authz import PolicyAuthorizer
from agents.cli import _print_report
from agents.report import CallReport, TargetResult
from agents.errors import Outcome
from agents.ops import ops_of
from agents.storage.agent import StorageAgent
from conftest import until

DEV_OPS = "[storage.clone.refresh, storage.clone.rollback, storage.snapshot.create, storage.clone.destroy]"


def policy(admin: str, alice: str, bob: str) -> str:
    return f"""
roles:
  admin: {{}}
  developer: {{}}
members:
  admin: [{admin}]
  developer: [{alice}, {bob}]
grants:
  - {{role: admin, ops: ["**"]}}
  - {{role: developer, ops: [storage.clone.create], on: ["/volume/*"]}}
  - {{role: developer, ops: [storage.report, storage.volume.list]}}
  - {{role: developer, ops: {DEV_OPS}, on: ["/volume/*/owner/{{caller}}"], name: own-clones-only}}
examples:
  - {{as: {alice}, op: storage.clone.destroy, on: [/volume/c1/owner/{alice}], expect: allow}}
  - {{as: {bob}, op: storage.clone.destroy, on: [/volume/c1/owner/{alice}], expect: deny}}
  - {{as: {bob}, op: storage.snapshot.create, on: [/volume/prod], expect: deny}}
"""


@pytest.fixture
async def world(mesh):
    alice, bob = mesh.account("alice"), mesh.account("bob")
    broker = await mesh.broker()
    authz = PolicyAuthorizer(max_age=3600)
    loaded = authz.load(policy(mesh.operator[0], alice[0], bob[0]))
    assert loaded.ok, loaded
    settings = {"clones": {"per_owner": 1, "max_expiry": 3600, "warn_before": 600, "sweep_every": 0.2}}
    agent = await mesh.agent(StorageAgent, broker, ["/host/db1"], settings=settings, authorizer=authz)
    admin = await mesh.client(broker)
    clients = {"alice": await mesh.client(broker, alice), "bob": await mesh.client(broker, bob)}
    made = await admin.request(str(agent.jid), "storage.volume.create", {"volume": "prod"}, timeout=30)
    assert made.outcome is Outcome.OK, made.error
    with sqlite3.connect(f"{made.result['path']}/app.db") as db:
        db.execute("CREATE TABLE t(x)")
        db.execute("INSERT INTO t VALUES (1)")
    snap = await admin.request(str(agent.jid), "storage.snapshot.create", {"volume": "prod", "snapshot": "s1"},
                               timeout=30)
    assert snap.outcome is Outcome.OK, snap.error
    return broker, agent, admin, clients, alice[0], bob[0]


async def call(client, agent, op, **args):
    return await client.request(str(agent.jid), op, args, timeout=30)


async def test_a_developer_manages_own_clone_and_is_denied_anothers(world):
    broker, agent, admin, clients, alice, bob = world
    mine = await call(clients["alice"], agent, "storage.clone.create", volume="prod", snapshot="s1", clone="dev-a")
    assert mine.outcome is Outcome.OK, mine.error
    assert mine.result["owner"] == alice and mine.result["expires"] is not None   # the agent's maximum
    assert "exclusive_bytes" in mine.result and "shared_bytes" in mine.result
    assert (await call(clients["bob"], agent, "storage.clone.create", volume="prod", snapshot="s1",
                       clone="dev-b")).outcome is Outcome.OK
    # Alice's own clone: snapshot, roll back, refresh all allowed by the one owner rule.
    for op, args in (("storage.snapshot.create", {"volume": "dev-a", "snapshot": "mine"}),
                     ("storage.clone.rollback", {"clone": "dev-a", "snapshot": "mine"}),
                     ("storage.clone.refresh", {"clone": "dev-a", "snapshot": "s1"})):
        res = await call(clients["alice"], agent, op, **args)
        assert res.outcome is Outcome.OK, (op, res.error)
    # Bob touches Alice's clone, and production: refused, and nothing changed.
    for op, args in (("storage.clone.destroy", {"clone": "dev-a"}),
                     ("storage.clone.refresh", {"clone": "dev-a", "snapshot": "s1"}),
                     ("storage.snapshot.create", {"volume": "dev-a", "snapshot": "bobs"}),
                     ("storage.snapshot.create", {"volume": "prod", "snapshot": "bobs"})):
        res = await call(clients["bob"], agent, op, **args)
        assert res.outcome is Outcome.DENIED, (op, res)
    assert {"dev-a", "dev-b"} <= agent.driver.volume_names()
    assert [s.name for s in agent.driver.list_snapshots("dev-a")] == ["mine"]
    # The denial is in the agent's audit trail, decided over the owner resource.
    agent.audit.flush()
    await agent.audit.written()  # written on the log's own thread
    rows = agent.audit.db.execute("SELECT caller, op, body FROM records WHERE kind = 'decided'").fetchall()
    assert any(c == bob and o == "storage.clone.destroy" and '"deny"' in f and "/volume/dev-a/owner/" in f
               for c, o, f in rows), rows
    # Bob destroys his own.
    assert (await call(clients["bob"], agent, "storage.clone.destroy", clone="dev-b")).outcome is Outcome.OK


async def test_quota_exceeded_is_refused_with_a_clear_error(world, capsys):
    broker, agent, admin, clients, alice, bob = world
    assert (await call(clients["alice"], agent, "storage.clone.create", volume="prod", snapshot="s1",
                       clone="dev-a1")).outcome is Outcome.OK
    again = await call(clients["alice"], agent, "storage.clone.create", volume="prod", snapshot="s1", clone="dev-a2")
    assert again.outcome is Outcome.FAILED
    assert "quota exceeded" in again.error and "at most 1" in again.error and "dev-a1" in again.error
    assert "dev-a2" not in agent.driver.volume_names()
    too_long = await call(clients["bob"], agent, "storage.clone.create", volume="prod", snapshot="s1",
                          clone="dev-b1", expires_in=7200)
    assert too_long.outcome is not Outcome.OK and "at most 3600" in too_long.error
    report = await call(clients["bob"], agent, "storage.report")
    assert report.outcome is Outcome.OK, report.error
    owners = {o["owner"]: o for o in report.result["owners"]}
    assert owners[alice]["clones"] == 1 and bob not in owners
    assert [c["clone"] for c in report.result["clones"]] == ["dev-a1"]
    assert report.result["sources"][0]["source"] == "prod@s1"
    # The CLI shows it as tables (what `vertebra call storage.report` prints).
    declared = ops_of(type(agent))["storage.report"].result  # as the op's description publishes it
    _print_report(CallReport("storage.report", [TargetResult(str(agent.jid), Outcome.OK, report.result)]), False,
                  declared)
    shown = capsys.readouterr().out.splitlines()
    assert "  per owner:" in shown and "  per source:" in shown and "  per clone:" in shown
    assert any(line.split()[:3] == ["dev-a1", alice, "prod@s1"] for line in shown), shown


async def test_an_expired_clone_is_destroyed_with_an_audit_record_and_a_broker_notice(world):
    broker, agent, admin, clients, alice, bob = world
    made = await call(clients["alice"], agent, "storage.clone.create", volume="prod", snapshot="s1",
                      clone="dev-short", expires_in=2)
    assert made.outcome is Outcome.OK, made.error
    # The notice of the destruction is sent last, after the clone is gone and the audit record written.
    await until(lambda: any("expired and was destroyed" in n.text for n in broker.storage_notices.recent), timeout=30,
                what="the destroyed notice at the broker")
    assert "dev-short" not in agent.driver.volume_names()
    texts = [n.text for n in broker.storage_notices.recent]
    assert any("dev-short" in t and "expires in" in t for t in texts), texts   # warned before
    agent.audit.flush()
    await agent.audit.written()  # written on the log's own thread
    rows = agent.audit.db.execute("SELECT kind, op, body FROM records WHERE op = 'storage.clone.destroy'").fetchall()
    decided = [json.loads(f) for k, o, f in rows if k == "decided"]
    assert any(d["rule"].startswith("expired: clone dev-short") for d in decided), rows
    assert any(k == "ended" and json.loads(f)["outcome"] == "ok" for k, o, f in rows), rows
