"""The gate: decisions and the rule that made them, versions, cache invalidation, failing closed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from rbac import Gate, compile_policy
from rbac.casbin_model import casbin_decide, enforcer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = (ROOT / "deploy" / "policy.example.yaml").read_text()
D = "@vertebra.example"


def line_of(needle: str) -> int:
    return next(i for i, line in enumerate(EXAMPLE.splitlines(), 1) if needle in line)


@pytest.fixture
def gate() -> Gate:
    g = Gate()
    assert g.load(EXAMPLE).ok
    return g


def test_unknown_sender_is_denied_by_default(gate):
    d = gate.decide("stranger" + D, "storage.info", [])
    assert not d.allowed and d.rule == f"stranger{D} holds no role in the policy (default deny)"


def test_role_via_inheritance_names_the_inherited_grant(gate):
    d = gate.decide("root" + D, "storage.info", ["/pool/tank"])  # admin -> operator -> viewer
    assert d.allowed and d.version == 1
    d = gate.decide("alice" + D, "fencing.info", [])
    assert d.allowed and d.rule.startswith(f"grant line {line_of('{role: viewer, ops')}") and "viewer: *.info" in d.rule


def test_known_sender_without_the_role(gate):
    d = gate.decide("auditor" + D, "storage.snapshot.create", ["/pool/tank"])
    assert not d.allowed and "no grant lets" in d.rule


def test_deny_overrides_allow_and_is_named(gate):
    d = gate.decide("carol" + D, "storage.snapshot.create", ["/pool/prod/db"])
    assert not d.allowed and "'contractors-not-in-prod'" in d.rule


def test_every_resource_must_be_allowed(gate):
    assert gate.decide("carol" + D, "storage.info", ["/pool/test"]).allowed
    assert not gate.decide("carol" + D, "storage.info", ["/pool/test", "/pool/prod/x"]).allowed


def test_traversal_and_look_alikes_are_denied_not_normalized(gate):
    fence = "fence-c1" + D
    assert gate.decide(fence, "fence.off", ["/cluster/c1/node/2"]).allowed
    for path in ["/cluster/c1/node/../../c2/node/2", "/cluster/c1/node/%2e%2e", "/cluster/c1/node//2",
                 "/cluster/c1/node/2\x00", "/cluster/c\u0031\u0307/node/2"]:
        d = gate.decide(fence, "fence.off", [path])
        assert not d.allowed and "not allowed" in d.rule or "must be" in d.rule
    d = gate.decide(fence, "fence.\u043eff", ["/cluster/c1/node/2"])  # Cyrillic e
    assert not d.allowed and "not a canonical op name" in d.rule


def test_automation_identities_are_confined(gate):
    nagios, fence = "nagios" + D, "fence-c1" + D
    assert gate.decide(nagios, "monitor.check", ["/host/db1"]).allowed
    assert not gate.decide(nagios, "storage.snapshot.delete", ["/pool/tank"]).allowed
    assert not gate.decide(nagios, "fence.off", ["/cluster/c1/node/1"]).allowed
    assert gate.decide(fence, "fence.off", ["/cluster/c1/node/7"]).allowed
    assert not gate.decide(fence, "fence.off", ["/cluster/c2/node/7"]).allowed
    assert not gate.decide(fence, "fence.off", ["/cluster/c1"]).allowed
    assert not gate.decide(fence, "fence.off", []).allowed  # no resource named: not "any"


def test_site_scoped_grant(gate):
    alice = "alice" + D
    assert gate.decide(alice, "host.reboot", ["/host/db1"], site="dc2").allowed
    assert not gate.decide(alice, "host.reboot", ["/host/db1"], site="dc1").allowed
    assert not gate.decide(alice, "host.reboot", ["/host/db1"]).allowed


def test_refused_load_keeps_the_last_good_policy(gate):
    result = gate.load(EXAMPLE.replace("denies:", "Denies:"))
    assert not result.ok and result.version == 1
    assert f"line {line_of('denies:')}: unknown key 'Denies'" in str(result)
    assert gate.version == 1 and gate.last_error is result
    assert not gate.decide("carol" + D, "storage.snapshot.create", ["/pool/prod/db"]).allowed


def test_failing_example_refuses_the_load(gate):
    broken = EXAMPLE.replace('ops: ["storage.**"], on: ["/pool/**"]', 'ops: ["storage.**"], on: ["/pool/*"]')
    result = gate.load(broken)
    assert not result.ok
    example = line_of("op: storage.snapshot.create, on: [/pool/tank/vol1]")
    assert any("example expects allow" in p.message and p.line == example for p in result.problems)


def test_reload_and_revocation_invalidate_the_cache_at_once(gate):
    alice = "alice" + D
    assert gate.decide(alice, "storage.info", ["/pool/tank"]).allowed
    assert gate.decide(alice, "storage.info", ["/pool/tank"]).allowed  # now cached
    v = gate.revoke(alice)
    d = gate.decide(alice, "storage.info", ["/pool/tank"])
    assert not d.allowed and d.version == v == 2 and "revoked" in d.rule
    assert gate.load(EXAMPLE.replace("operator: [alice@vertebra.example]", "operator: [bob@vertebra.example]")
                     .replace("- {as: alice", "- {as: bob")).ok
    assert not gate.decide(alice, "storage.info", ["/pool/tank"]).allowed
    assert gate.decide("bob" + D, "storage.info", ["/pool/tank"]).allowed


def test_cache_answers_the_same_decision(gate):
    first = gate.decide("alice" + D, "storage.info", ["/pool/tank"])
    assert gate.decide("alice" + D, "storage.info", ["/pool/tank"]) is first


def test_any_exception_while_deciding_is_a_deny(gate, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(gate.policy, "evaluate", boom)
    d = gate.decide("root" + D, "storage.info", [])
    assert not d.allowed and "RuntimeError" in d.rule
    d = gate.decide("root" + D, None, [])  # type: ignore[arg-type]  # not even a hashable request
    assert not d.allowed


def test_no_policy_loaded_denies():
    d = Gate().decide("root" + D, "storage.info", [])
    assert not d.allowed and d.version == 0


def test_casbin_reads_the_policy_the_same_way():
    """The index the gate decides with and casbin, given the same lines, agree on random requests."""
    policy = compile_policy(EXAMPLE)
    e = enforcer(policy)
    rng = random.Random(3)
    callers = [f"{n}{D}" for n in ("alice", "carol", "root", "nagios", "fence-c1", "auditor", "nobody")]
    ops = ["storage.info", "storage.snapshot.create", "monitor.check", "fence.off", "host.reboot",
           "sample.echo"]
    paths = ["/pool/tank", "/pool/prod/db", "/pool/prod", "/cluster/c1/node/1", "/cluster/c2/node/1",
             "/cluster/c1", "/host/db1", "/pool/test/a/b"]
    for _ in range(400):
        req = (rng.choice(callers), rng.choice(ops), rng.sample(paths, rng.randint(0, 2)),
               rng.choice([None, "dc1", "dc2"]))
        assert policy.evaluate(*req).allowed == casbin_decide(e, *req).allowed, req
