"""The masked-copy workflow end to end on a real Prosody: the broker's workflow engine runs
deploy/workflows/masked-copy.yaml against a real storage agent on the embedded driver, whose masking hook
(the shipped deploy/masking/sqlite-mask with mask-demo.sql) runs sqlite3 over a real database in a clone.
No developer clone holds a sensitive value (every byte of every file is read); a failing hook leaves no
developer clone; and the agent refuses a masked-only clone of any snapshot a successful mask did not make."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from agents.errors import Outcome
from agents.storage.agent import StorageAgent
from agents.storage.masking import SHIPPED_HOOKS
from broker.service import Broker
from conftest import until

# Known sensitive values, beyond the demo's own: each must be gone from every developer's files.
SENSITIVE = [b"ada.lovelace@example.com", b"Lovelace", b"4556 7375 8689 9855", b"+44 20 7946 0018",
             b"zelda.secret@example.com", b"Zelda Secretary", b"6011 0009 9013 9424"]
EXTRA_ROWS = """INSERT INTO customers(name, email, phone, card, balance_cents)
VALUES ('Zelda Secretary', 'zelda.secret@example.com', '+1 555 0100 999', '6011 0009 9013 9424', 1);"""
FAILING = """#!/bin/sh
echo "masking rules are missing" >&2
exit 4
"""


def files_of(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.fixture
async def world(mesh, tmp_path):
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    shutil.copy(SHIPPED_HOOKS / "workflows" / "masked-copy.yaml", workflows)
    (tmp_path / "broker").mkdir()
    broker = await mesh.broker(state_dir=tmp_path / "broker", settings={"workflows": str(workflows)})
    failing = tmp_path / "failing-mask"
    failing.write_text(FAILING)
    failing.chmod(0o755)
    settings = {"masking": {"default": "demo", "hooks": {
        "demo": {"argv": ["masking/sqlite-mask", "app.db", "mask-demo.sql"], "timeout": 60},
        "broken": {"argv": [str(failing)], "timeout": 30}}}}
    agent = await mesh.agent(StorageAgent, broker, ["/host/db1", "/pool/p1"], settings=settings)
    client = await mesh.client(broker)
    # The source: a volume holding a real SQLite database with personal data in it.
    made = await client.request(str(agent.jid), "storage.volume.create", {"volume": "prod"}, timeout=30)
    assert made.outcome is Outcome.OK, made.error
    with sqlite3.connect(Path(made.result["path"]) / "app.db") as db:
        db.executescript((SHIPPED_HOOKS / "masking" / "demo-source.sql").read_text() + EXTRA_ROWS)
    source = b"".join(p.read_bytes() for p in files_of(Path(made.result["path"])))
    assert all(value in source for value in SENSITIVE)
    # Every step goes to the agent holding /volume/prod, which the broker knows from the agent's report.
    await until(lambda: broker.directory.discover("storage.mask", ["/volume/prod"]), what="/volume/prod located")
    return broker, agent, client


async def run(client, broker: Broker, **params) -> dict:
    words = [f"{k}={v}" for k, values in params.items() for v in (values if isinstance(values, list) else [values])]
    started = await client.request(str(broker.jid), "workflow.run",
                                   {"workflow": "masked-copy", "param": words, "wait": 8}, timeout=60)
    assert started.outcome is Outcome.OK, started.error
    status = started.result
    while status["state"] == "running":
        res = await client.request(str(broker.jid), "workflow.status", {"instance": status["instance"], "wait": 8},
                                   timeout=30)
        assert res.outcome is Outcome.OK, res.error
        status = res.result
    return status


def step(status: dict, name: str) -> dict:
    return next(s for s in status["steps"] if s["name"] == name)


async def test_no_developer_clone_holds_a_sensitive_value(world):
    broker, agent, client = world
    status = await run(client, broker, volume="prod", snapshot="s1", developers=["alice", "bob"])
    assert status["state"] == "done", status
    mask = step(status, "mask")["result"]
    assert mask["exit_code"] == 0 and mask["hook"] == "demo" and "masked 5 customers" in mask["output"]
    assert mask["deadline"] == 60 and mask["masked_from"] == "prod@s1"
    volumes = {v.name: v for v in agent.driver.list_volumes()}
    for dev in ("alice", "bob"):
        clone = volumes[f"prod-{dev}"]
        assert clone.origin == ("prod-masking-s1", "masked")
        files = files_of(agent.driver.path(clone.name))
        assert files, "the developer clone is empty"
        for path in files:
            data = path.read_bytes()
            leaked = [v for v in SENSITIVE if v in data]
            assert not leaked, f"{path} holds {leaked}"
        with sqlite3.connect(agent.driver.path(clone.name) / "app.db") as db:
            assert db.execute("SELECT count(*) FROM customers WHERE email LIKE '%@masked.invalid'").fetchone() == (5,)
            assert db.execute("SELECT count(*) FROM orders").fetchone() == (4,)  # the rest of the data is there
    # Production itself is untouched.
    assert b"zelda.secret@example.com" in (agent.driver.path("prod") / "app.db").read_bytes()


async def test_a_failing_mask_hook_leaves_no_developer_clone(world):
    broker, agent, client = world
    status = await run(client, broker, volume="prod", snapshot="s2", developers=["carol"], hook="broken")
    assert status["state"] == "failed", status
    assert step(status, "mask")["state"] == "failed"
    reason = step(status, "mask")["reason"]
    assert "exited with code 4" in reason and "masking rules are missing" in reason
    assert step(status, "developer-clone:carol")["state"] not in ("ok", "running")
    names = {v.name for v in agent.driver.list_volumes()}
    assert "prod-carol" not in names and not any(n.endswith("-carol") for n in names)
    assert agent.driver.list_snapshots("prod-masking-s2") == []


async def test_a_masked_only_clone_of_an_unmasked_snapshot_is_refused(world):
    broker, agent, client = world
    snap = await client.call("storage.snapshot.create", {"volume": "prod", "snapshot": "raw"}, on=["/volume/prod"],
                             timeout=30)
    assert snap.ok, snap.results
    # Through discovery on the volume, as `vertebra call ... --on /volume/prod` does.
    report = await client.call("storage.clone.create", {"volume": "prod", "snapshot": "raw", "clone": "prod-eve",
                                                        "masked_only": True}, on=["/volume/prod"], timeout=30)
    (result,) = report.results
    assert result.outcome is Outcome.FAILED, result
    assert "prod@raw was not produced by a successful masking hook" in result.error
    assert "prod-eve" not in {v.name for v in agent.driver.list_volumes()}
