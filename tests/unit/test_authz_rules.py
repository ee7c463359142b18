"""Authorization as one ordered list of rules, and the facts about an op that live on its declaration."""

from __future__ import annotations

import pytest

from agents.agent import Agent
from agents.authz import AdminsOnly, Decision, Request, authorize, broker_only
from agents.ops import op, ops_of
from broker.directory import Admission, Capabilities, Directory, sent_by_agents
from broker.service import Broker


def spec(name: str = "sample.toggle", **facts):
    async def toggle(self, call) -> None:
        """Toggle."""
    return op(name, **facts)(toggle).__vertebra_op__


def test_the_first_rule_that_decides_settles_it_and_none_or_a_failure_denies():
    allow, deny = Decision(True, "yes"), Decision(False, "no")
    assert authorize([lambda r, s: None, lambda r, s: allow, lambda r, s: deny], Request("a@x", []), spec()) is allow
    assert authorize([lambda r, s: deny, lambda r, s: allow], Request("a@x", []), spec()) is deny
    nobody = authorize([lambda r, s: None], Request("a@x", []), spec())
    assert not nobody.allowed and "no rule lets a@x run sample.toggle" in nobody.reason

    def broken(r, s):
        raise RuntimeError("disk gone")
    failed = authorize([broken, lambda r, s: allow], Request("a@x", []), spec())
    assert not failed.allowed and "RuntimeError" in failed.reason
    odd = authorize([lambda r, s: "yes"], Request("a@x", []), spec())
    assert not odd.allowed


def test_a_request_context_is_what_every_rule_sees():
    seen = []
    authorize([lambda r, s: seen.append((r.caller, tuple(r.resources), r.via, s.name))],
              Request("p@x", ["/host/a"], via="bot@x"), spec())
    assert seen == [("p@x", ("/host/a",), "bot@x", "sample.toggle")]


def test_broker_only_ops_are_settled_by_who_sends_them_and_other_ops_are_not_its_business():
    install = ops_of(Agent)["policy.install"]
    assert broker_only(Request("Broker@x", []), install, "broker@x").allowed
    refused = broker_only(Request("root@x", []), install, "broker@x")
    assert not refused.allowed and "only this agent's broker (broker@x) does" in refused.reason
    assert "never sent on someone's behalf" in broker_only(Request("broker@x", [], via="broker@x"), install,
                                                           "broker@x").reason
    assert broker_only(Request("root@x", []), spec(), "broker@x") is None


def test_who_sends_an_op_is_declared_and_checked_when_it_is_declared():
    with pytest.raises(ValueError, match="sender must be one of"):
        spec(sender="someone")
    with pytest.raises(ValueError, match="no sender_kinds"):
        spec(sender="broker", sender_kinds=("storage",))
    with pytest.raises(ValueError, match="own_resources limits an op on resources"):
        spec(sender="agent", own_resources="fence that node")  # declares no resources
    assert spec(sender="live agent", sender_kinds=("storage",)).sender_kinds == ("storage",)


def test_the_brokers_ops_carry_their_facts():
    broker_ops = ops_of(Broker)  # its own and its components'
    assert {n for n, s in broker_ops.items() if s.leader} == {
        "workflow.run", "workflow.approve", "workflow.perform", "workflow.status", "workflow.list", "workflow.cancel"}
    assert {n: (s.sender, s.sender_kinds) for n, s in broker_ops.items() if s.sender != "anyone" or s.sender_kinds} == {
        "mesh.alert": ("anyone", ("monitor",)),
        "mesh.volumes": ("live agent", ("storage",)),
        "mesh.storage.notice": ("live agent", ("storage",)),
        "mesh.audit.anchor": ("live agent", ()),
        "mesh.fence.event": ("agent", ("fencing",)),
        "policy.install": ("broker", ()),
        "fenced.install": ("broker", ()),
    }
    assert broker_ops["mesh.fence.event"].own_resources == "fence that node"


def test_ops_only_configured_agents_send_are_refused_to_anyone_else_and_need_no_grant():
    roster = {"s@x": Admission("storage", ()), "m@x": Admission("monitor", ())}
    directory = Directory()
    broker_ops = ops_of(Broker)
    admins = AdminsOnly(["root@x"])
    rules = [lambda r, s: sent_by_agents(r, s, roster, directory),
             lambda r, s: admins.decide(r.caller, s, r.resources)]
    volumes, alert = broker_ops["mesh.volumes"], broker_ops["mesh.alert"]
    # Not listed yet: a "live agent" op is refused even to a configured storage agent.
    assert "only the live storage agents" in authorize(rules, Request("s@x", []), volumes).reason
    directory.add("s@x/agent", Capabilities("storage", frozenset(), ()))
    directory.add("m@x/agent", Capabilities("monitor", frozenset(), ()))
    assert authorize(rules, Request("S@x", []), volumes).allowed
    assert not authorize(rules, Request("root@x", []), volumes).allowed  # the admins' grants do not count
    assert not authorize(rules, Request("s@x", [], via="broker@x"), volumes).allowed
    # mesh.alert: live monitors without a grant, everyone else as the policy says.
    assert authorize(rules, Request("m@x", []), alert).allowed
    assert authorize(rules, Request("root@x", []), alert).allowed
    assert not authorize(rules, Request("s@x", []), alert).allowed
