"""Policy distribution on the real server: the broker reloads its policy file and pushes it; agents
take pushes from their broker only; a refused file changes nothing; a joining agent gets the policy."""

from __future__ import annotations

import yaml

from agents.authz import PolicyAuthorizer
from agents.errors import Outcome
from conftest import until
from sample_agent import SampleAgent


def policy(operator: str, ops: list[str]) -> str:
    return yaml.safe_dump({
        "roles": {"ops": {}},
        "members": {"ops": [operator]},
        "grants": [{"role": "ops", "ops": ops + ["policy.reload", "mesh.**"]}],
    })


async def test_reload_pushes_the_new_policy_and_only_the_broker_may_push(mesh, tmp_path):
    operator = mesh.operator[0]
    path = tmp_path / "policy.yaml"
    path.write_text(policy(operator, ["sample.echo", "sample.count"]))
    broker = await mesh.broker(authorizer=PolicyAuthorizer.from_file(path))
    agent = await mesh.agent(SampleAgent, broker, ["/host/pp"], authorizer=PolicyAuthorizer.from_file(path))
    await until(lambda: len(broker.directory) == 1, what="agent listed")
    client = await mesh.client(broker)
    target = str(agent.jid)
    assert (await client.request(target, "sample.echo", {"text": "x"}, timeout=5)).outcome is Outcome.OK

    # Revoke sample.echo in the file; reload through the broker.
    path.write_text(policy(operator, ["sample.count"]))
    reload = await client.request(str(broker.jid), "policy.reload", {}, timeout=20)
    assert reload.outcome is Outcome.OK, reload.error
    assert reload.result["agents"] == 1 and reload.result["failed"] == {}
    denied = await client.request(target, "sample.echo", {"text": "x"}, timeout=5)
    assert denied.outcome is Outcome.DENIED
    assert (await client.request(target, "sample.count", {}, timeout=5)).outcome is Outcome.OK

    # A refused file names the line and changes nothing anywhere.
    path.write_text("roles: {ops: {}}\ngrants:\n  - {role: ops, ops: ['**'], efect: allow}\n")
    refused = await client.request(str(broker.jid), "policy.reload", {}, timeout=20)
    assert refused.outcome is Outcome.FAILED and "line 3" in refused.error
    assert (await client.request(target, "sample.echo", {"text": "x"}, timeout=5)).outcome is Outcome.DENIED
    assert (await client.request(target, "sample.count", {}, timeout=5)).outcome is Outcome.OK

    # Nobody but the broker may push, not even a caller the policy allows everything.
    everything = policy(operator, ["**"])
    pushed = await client.request(target, "policy.install", {"text": everything, "issued_at": 0.0}, timeout=5)
    assert pushed.outcome is Outcome.DENIED and "only this agent's broker" in pushed.error
    assert (await client.request(target, "sample.echo", {"text": "x"}, timeout=5)).outcome is Outcome.DENIED


async def test_an_agent_that_joins_gets_the_current_policy(mesh, tmp_path):
    operator = mesh.operator[0]
    path = tmp_path / "policy.yaml"
    path.write_text(policy(operator, ["sample.count"]))
    broker = await mesh.broker(authorizer=PolicyAuthorizer.from_file(path))
    blank = PolicyAuthorizer()  # no policy yet: default deny until the broker pushes one
    agent = await mesh.agent(SampleAgent, broker, ["/host/late"], authorizer=blank)
    await until(lambda: blank.gate.version > 0, what="policy pushed on join")
    client = await mesh.client(broker)
    assert (await client.request(str(agent.jid), "sample.count", {}, timeout=5)).outcome is Outcome.OK
    assert (await client.request(str(agent.jid), "sample.echo", {"text": "x"}, timeout=5)).outcome is Outcome.DENIED
