"""The policy gate on real agents and a real Prosody: each refusal runs nothing, tells the caller why,
leaves a decision in the audit trail, and the agent goes on serving."""

from __future__ import annotations

import logging

import pytest

from agents.authz import PolicyAuthorizer
from agents.errors import Outcome
from sample_agent import SampleAgent


def policy(operator: str, helper: str, contractor: str) -> str:
    return f"""
roles:
  viewer: {{}}
  operator: {{inherits: [viewer]}}
  contractor: {{inherits: [operator]}}
members:
  operator: [{operator}]
  viewer: [{helper}]
  contractor: [{contractor}]
grants:
  - {{role: viewer, ops: ["*.info", sample.echo]}}
  - {{role: operator, ops: ["sample.**"], on: ["/host/**"]}}
denies:
  - {{role: contractor, ops: [sample.count], on: ["/host/prod/**"], name: contractors-not-in-prod}}
examples:
  - {{as: {operator}, op: sample.count, on: [/host/a], expect: allow}}
  - {{as: {contractor}, op: sample.count, on: [/host/prod/db], expect: deny}}
"""


@pytest.fixture
async def setup(mesh, caplog):
    caplog.set_level(logging.INFO, logger="vertebra.audit")
    helper, contractor, stranger = mesh.account("helper"), mesh.account("contractor"), mesh.account("stranger")
    authz = PolicyAuthorizer(max_age=3600)
    assert authz.load(policy(mesh.operator[0], helper[0], contractor[0])).ok
    agent = await mesh.agent(SampleAgent, None, ["/host/a", "/host/prod/db"], authorizer=authz)
    clients = {"operator": await mesh.client(), "helper": await mesh.client(account=helper),
               "contractor": await mesh.client(account=contractor),
               "stranger": await mesh.client(account=stranger)}
    return agent, authz, clients, caplog


async def count(client, agent, on=("/host/a",), op="sample.count"):
    return await client.request(str(agent.jid), op, {}, on=list(on), timeout=5)


def audit_lines(caplog, allowed: bool) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "vertebra.audit" and r.getMessage().startswith("decide")
            and f"allowed={allowed}" in r.getMessage()]


async def still_serves(clients, agent) -> None:
    ok = await count(clients["operator"], agent)
    assert ok.outcome is Outcome.OK, ok.error


async def test_unknown_sender_is_denied(setup):
    agent, _, clients, caplog = setup
    res = await count(clients["stranger"], agent)
    assert res.outcome is Outcome.DENIED and "holds no role in the policy" in res.error
    assert agent.runs == 0
    assert any("stranger" in line for line in audit_lines(caplog, False))
    await still_serves(clients, agent)
    assert agent.runs == 1


async def test_known_sender_without_the_role(setup):
    agent, _, clients, caplog = setup
    res = await count(clients["helper"], agent)
    assert res.outcome is Outcome.DENIED and "no grant lets" in res.error and "sample.count" in res.error
    assert agent.runs == 0 and audit_lines(caplog, False)
    echo = await clients["helper"].request(str(agent.jid), "sample.echo", {"text": "hi"}, timeout=5)
    assert echo.outcome is Outcome.OK  # the grant the role does have still works
    await still_serves(clients, agent)


async def test_role_via_inheritance(setup):
    agent, _, clients, caplog = setup
    res = await count(clients["contractor"], agent)  # contractor -> operator grant
    assert res.outcome is Outcome.OK and agent.runs == 1
    assert any("grant line" in line for line in audit_lines(caplog, True))


async def test_deny_overrides_allow(setup):
    agent, _, clients, caplog = setup
    res = await count(clients["contractor"], agent, on=["/host/prod/db"])
    assert res.outcome is Outcome.DENIED and "contractors-not-in-prod" in res.error
    assert agent.runs == 0 and any("contractors-not-in-prod" in line for line in audit_lines(caplog, False))
    await still_serves(clients, agent)


async def test_path_traversal_in_a_resource_is_refused(setup):
    agent, _, clients, caplog = setup
    for path in ["/host/a/../prod/db", "/host/%2e%2e/prod", "/host//a", "/host/\u0430"]:
        res = await count(clients["contractor"], agent, on=[path])
        assert res.outcome is Outcome.FAILED and "is not allowed" in res.error, path
    assert agent.runs == 0
    await still_serves(clients, agent)


async def test_look_alike_op_name_runs_nothing(setup):
    agent, _, clients, _ = setup
    res = await count(clients["operator"], agent, op="sample.c\u043eunt")  # Cyrillic o
    assert res.outcome is Outcome.FAILED and "is not an op of" in res.error
    assert agent.runs == 0
    await still_serves(clients, agent)


async def test_misspelt_effect_is_refused_and_the_old_policy_stays(setup, mesh):
    agent, authz, clients, _ = setup
    text = policy(mesh.operator[0], "h@vertebra.test", "c@vertebra.test").replace("denies:", "Deny:")
    result = authz.load(text)
    assert not result.ok and "unknown key 'Deny'" in str(result) and authz.gate.version == 1
    res = await count(clients["contractor"], agent, on=["/host/prod/db"])
    assert res.outcome is Outcome.DENIED and "contractors-not-in-prod" in res.error
    await still_serves(clients, agent)


async def test_revocation_takes_effect_on_the_next_request(setup, mesh):
    agent, authz, clients, caplog = setup
    await still_serves(clients, agent)
    authz.gate.revoke(mesh.operator[0])
    res = await count(clients["operator"], agent)
    assert res.outcome is Outcome.DENIED and "revoked" in res.error
    assert agent.runs == 1 and any("revoked" in line for line in audit_lines(caplog, False))


async def test_stale_policy_refuses_destructive_ops_only(setup):
    agent, authz, clients, _ = setup
    authz.gate.confirm_current(issued_at=authz.gate.clock() - 7200)
    res = await clients["operator"].request(str(agent.jid), "sample.steps", {"steps": 1}, on=["/host/a"],
                                            timeout=5)
    assert res.outcome is Outcome.DENIED and "destructive" in res.error and "over the 3600s limit" in res.error
    await still_serves(clients, agent)  # sample.count is not destructive
