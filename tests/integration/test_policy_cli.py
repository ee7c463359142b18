"""A mesh file with an RBAC policy: the agents enforce it, audit every decision, and the CLI
checks policies offline and verifies the audit chains."""

from __future__ import annotations

import json
import sqlite3

import pytest
import yaml

from conftest import ROOT, running, vertebra


@pytest.fixture
def policed_mesh(mesh_home, tmp_path):
    home = mesh_home([{"name": "store", "kind": "storage", "resources": ["/host/p"]}])
    cfg = yaml.safe_load((home / "mesh.yaml").read_text())
    operator = f"{cfg['operator']}@vertebra.test"
    policy = {"roles": {"viewer": {}},
              "members": {"viewer": [operator]},
              "grants": [{"role": "viewer", "ops": ["*.info", "mesh.**"]}],
              "examples": [{"as": operator, "op": "storage.info", "expect": "allow"},
                           {"as": operator, "op": "storage.volume.destroy", "on": ["/volume/v"],
                            "expect": "deny"}]}
    (home / "policy.yaml").write_text(yaml.safe_dump(policy))
    cfg["policy"] = "policy.yaml"
    (home / "mesh.yaml").write_text(yaml.safe_dump(cfg))
    with running(home, expect_agents=1):
        yield home, cfg


def test_policy_decides_and_every_decision_is_audited(policed_mesh):
    home, cfg = policed_mesh
    allowed = vertebra(home, "call", "storage.info", "--json")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    denied = vertebra(home, "call", "storage.volume.list", "--json")
    assert denied.returncode == 3
    assert "may not run storage.volume.list" in json.loads(denied.stdout)["results"][0]["error"]

    shown = vertebra(home, "audit", "show", "--agent", cfg["agents"][0]["name"], "--op", "storage.volume.list")
    assert shown.returncode == 0
    assert "DENY" in shown.stdout and "storage.volume.list" in shown.stdout
    ok = vertebra(home, "audit", "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # Tamper with one record: verify names it and fails.
    db = sqlite3.connect(home / "state" / cfg["agents"][0]["name"] / "audit.sqlite")
    triggers = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")]
    for t in triggers:
        db.execute(f"DROP TRIGGER {t}")
    table = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND sql LIKE '%prev%'").fetchone()[0]
    db.execute(f"UPDATE {table} SET caller = 'someone-else@vertebra.test' WHERE rowid = 1")
    db.commit()
    db.close()
    bad = vertebra(home, "audit", "verify", "--agent", cfg["agents"][0]["name"])
    assert bad.returncode == 1
    assert "record" in bad.stdout


def test_policy_check_names_the_line(tmp_path):
    (tmp_path / "p.yaml").write_text("roles:\n  a: {}\ngrants:\n  - {role: a, ops: [x.y], effect: Deny}\n")
    out = vertebra(tmp_path, "policy", "check", str(tmp_path / "p.yaml"))
    assert out.returncode == 1
    assert "line 4: unknown key 'effect'" in out.stdout
    good = vertebra(tmp_path, "policy", "check", str(ROOT / "deploy" / "policy.example.yaml"))
    assert good.returncode == 0 and "every example holds" in good.stdout
