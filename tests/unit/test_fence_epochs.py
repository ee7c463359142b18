"""Fencing epochs and the fencing rules as pure logic: the broker's ledger (which outcomes open and
end an epoch), what a fenced identity may do, who may push epochs, the manual-approval rule, and
the settings that configure them."""

from __future__ import annotations

import json

import pytest

from agents.agent import Agent
from agents.authz import AdminsOnly, Decision, Request, authorize, broker_only
from agents.errors import BadArguments
from agents.fenced import INSTALL_OP, Fenced, FencedIdentities, encode_entries, parse_entries
from agents.fencing.agent import FencingAgent
from agents.fencing.devices import FencingConfigError
from agents.fencing.guard import ApprovalGuard
from agents.fencing.settings import FencingSettings, configured_nodes
from agents.ops import OpSpec, ops_of
from broker.directory import Admission, Directory, sent_by_agents
from broker.fencing import EVENT_OP, FencedNow, FenceLedger
from broker.service import Broker


async def _noop(*_a, **_k):
    return None


def spec(name: str, destructive: bool = True, effect: str | None = None) -> OpSpec:
    effect = effect or ("destructive" if destructive else "read")
    return OpSpec(name=name, summary=name, description="", params=(), effect=effect, deadline=5,
                  progress=False, resources=(), func=_noop)


def policy_rule(*admins: str):
    """The last rule of every list: the mesh's policy, here its admins."""
    policy = AdminsOnly(admins)
    return lambda request, op: policy.decide(request.caller, op, request.resources)


def outcome(action: str, ok: bool = True, node: str = "n1", at: float = 100.0, **kw) -> dict:
    return {"event": "outcome", "action": action, "cluster": "c1", "node": node, "ok": ok, "at": at,
            "state": "off" if action == "off" else "on", "requester": "pcmk@x.test",
            "identities": ["DB1@x.test"], **kw}


async def test_a_verified_off_opens_an_epoch_and_a_verified_on_ends_it():
    ledger = FenceLedger(":memory:")
    assert (await ledger.record("f@x.test", outcome("off", ok=False)))[1] is None  # a failure proves nothing
    assert (await ledger.record("f@x.test", {**outcome("off"), "event": "attempt"}))[1] is None
    assert await ledger.fenced() == []
    assert (await ledger.record("f@x.test", outcome("off")))[1] == "fenced"
    (f,) = await ledger.fenced()
    assert (f.node, f.epoch, f.fenced_at, f.fenced_by, f.identities) == ("n1", 1, 100.0, "f@x.test", ("db1@x.test",))
    assert (await ledger.record("f@x.test", outcome("off", at=150.0)))[1] is None  # still the same fencing period
    assert (await ledger.fenced())[0].fenced_at == 100.0
    assert (await ledger.record("f@x.test", outcome("on", at=200.0)))[1] == "unfenced"
    assert await ledger.fenced() == []
    assert (await ledger.record("f@x.test", outcome("off", at=300.0)))[1] == "fenced"
    assert [e["epoch"] for e in await ledger.epochs()] == [1, 2]  # numbers only grow
    assert (await ledger.epochs())[0]["unfenced_at"] == 200.0
    assert len(await ledger.events()) == 6


async def test_a_reboot_is_an_epoch_that_ends_at_once_unless_power_stayed_off():
    ledger = FenceLedger(":memory:")
    assert (await ledger.record("f@x.test", outcome("reboot")))[1] == "rebooted"
    assert await ledger.fenced() == [] and (await ledger.epochs())[0]["epoch"] == 1
    assert (await ledger.record("f@x.test", outcome("reboot", on_error="power did not come back")))[1] == "fenced"
    assert (await ledger.fenced())[0].epoch == 2


async def test_epochs_survive_a_restart(tmp_path):
    path = tmp_path / "fencing.sqlite"
    ledger = FenceLedger(path)
    await ledger.record("f@x.test", outcome("off"))
    await ledger.aclose()
    assert [f.node for f in await FenceLedger(path).fenced()] == ["n1"]


def fenced_db1() -> FencedIdentities:
    view = FencedIdentities()
    view.install([Fenced("c1", "n1", 3, 0.0, "f@x.test", "pcmk@x.test", ("db1@x.test",))])
    return view


def test_a_fenced_identity_is_refused_destructive_ops_only():
    view = fenced_db1()
    d = view.check("DB1@x.test", spec("storage.volume.destroy"))
    assert d is not None and not d.allowed
    assert "node n1 of cluster c1 was fenced at 1970-01-01T00:00:00Z (epoch 3" in d.reason
    assert d.rule == "fenced node c1/n1 epoch 3"
    assert view.check("db1@x.test", spec("storage.info", destructive=False)) is None
    assert view.check("db2@x.test", spec("storage.volume.destroy")) is None
    view.install([])  # unfenced: the broker's next push replaces the whole list
    assert view.check("db1@x.test", spec("storage.volume.destroy")) is None


def test_a_fenced_identity_is_refused_every_op_that_changes_state_and_may_still_read():
    view = fenced_db1()
    for name, effect in [("storage.volume.create", "change"), ("storage.snapshot.create", "change"),
                         ("storage.package.commit", "change"), ("storage.volume.destroy", "destructive")]:
        d = view.check("db1@x.test", spec(name, effect=effect))
        assert d is not None and not d.allowed, name
        assert f"ops that change state ({name}) are refused" in d.reason
    assert view.check("db1@x.test", spec("storage.volume.list", effect="read")) is None


def test_entries_travel_as_json_and_bad_ones_are_named():
    entries = fenced_db1().entries
    assert parse_entries(encode_entries(entries)) == list(entries)
    with pytest.raises(BadArguments, match="not JSON"):
        parse_entries("{")
    with pytest.raises(BadArguments, match="needs cluster, node, epoch"):
        parse_entries(json.dumps([{"cluster": "c1"}]))


def test_only_the_agents_broker_pushes_epochs_whatever_the_policy_says():
    install = ops_of(Agent)[INSTALL_OP]  # declared sender="broker"
    assert install.sender == "broker"
    assert broker_only(Request("broker@x.test", []), install, "broker@x.test").allowed
    assert not broker_only(Request("root@x.test", []), install, "broker@x.test").allowed
    assert not broker_only(Request("broker@x.test", []), install, None).allowed
    assert not broker_only(Request("broker@x.test", [], via="bot@x.test"), install, "broker@x.test").allowed


async def test_the_brokers_rules_refuse_a_fenced_identity_and_leave_the_rest_to_the_policy():
    ledger = FenceLedger(":memory:")
    await ledger.record("f@x.test", outcome("off"))  # node n1 (identity db1) is fenced
    rules = [FencedNow(ledger, FencedIdentities()), policy_rule("db1@x.test")]
    assert "was fenced at" in authorize(rules, Request("db1@x.test", []), spec("sample.toggle")).reason
    assert "only the mesh file's admins" in authorize(rules, Request("db2@x.test", []), spec("sample.toggle")).reason


SETTINGS = {"clusters": {"c1": ["n1"], "c2": ["n2"]},
            "fencing": {"devices": {"d": {"agent": "fence_dummy", "params": {"type": "file", "status_file": "/x"},
                                          "plugs": {"n1": "1", "n2": "2"}}},
                        "levels": {"n1": [["d"]], "n2": [["d"]]}},
            "identities": {"n1": ["DB1@x.test"]},
            "approval": {"c1": {"fencers": ["fence-c1@x.test"]}}}


FENCE_OPS = ops_of(FencingAgent)


def decide_fence(caller: str, op: str, resources: list[str], via: str = "") -> Decision:
    """The fencing agent's approval rule, then the policy (its admins), as the agent walks them."""
    rules = [ApprovalGuard(FencingSettings.from_settings(SETTINGS), lambda: "broker@x.test"),
             policy_rule("alice@x.test", "fence-c1@x.test")]
    return authorize(rules, Request(caller, resources, via), FENCE_OPS[op])


def test_a_persons_manual_fence_needs_approval_where_the_cluster_asks_for_it():
    n1, n2 = ["/cluster/c1/node/n1"], ["/cluster/c2/node/n2"]
    d = decide_fence("alice@x.test", "fence.off", n1)
    assert not d.allowed and "workflow=fence-node param=cluster=c1 param=node=n1" in d.reason
    assert decide_fence("alice@x.test", "fence.off", n2).allowed  # c2 asks for none
    assert decide_fence("alice@x.test", "fence.status", n1).allowed  # a read
    assert decide_fence("fence-c1@x.test", "fence.reboot", n1).allowed  # c1's own fencer
    assert decide_fence("alice@x.test", "fence.on", n1, via="broker@x.test").allowed
    # Another delegate (the chat bot) relays the person's own command: still needs approval.
    assert not decide_fence("alice@x.test", "fence.off", n1, via="bot@x.test").allowed
    # The policy still decides after the rule: the broker's word does not make a stranger allowed.
    assert not decide_fence("eve@x.test", "fence.off", n1, via="broker@x.test").allowed
    # Each power op names the workflow that asks for it with approval.
    assert {op: FENCE_OPS[op].approval for op in ("fence.off", "fence.on", "fence.reboot")} == {
        "fence.off": "fence-node", "fence.on": "fence-node-on", "fence.reboot": "fence-node-reboot"}
    assert not FENCE_OPS["fence.status"].approval and not FENCE_OPS["fence.list"].approval


def test_fencing_settings_name_what_is_wrong():
    s = FencingSettings.from_settings(SETTINGS)
    assert s.identities == {"n1": ("db1@x.test",)} and s.needs_approval("c1") and not s.needs_approval("c2")
    assert s.is_fencer("c1", "Fence-C1@x.test") and not s.is_fencer("c2", "fence-c1@x.test")
    with pytest.raises(FencingConfigError) as info:
        FencingSettings.from_settings({**SETTINGS, "identities": {"n9": ["db"]}, "approval": {"c9": {}, "c2": [1]}})
    problems = "\n".join(info.value.problems)
    assert "settings.identities.n9: no such node" in problems
    assert "settings.approval.c9: no such cluster" in problems and "settings.approval.c2: expected" in problems


def test_only_a_configured_fencing_agent_announces_and_only_for_its_nodes():
    roster = {"f@x.test": Admission("fencing", ("/cluster/c1/node/n1",)),
              "m@x.test": Admission("monitor", ("/cluster/c1/node/n1",))}
    rules = [lambda request, op: sent_by_agents(request, op, roster, Directory()), policy_rule("root@x.test")]
    broker_ops = ops_of(Broker)
    event = broker_ops[EVENT_OP]
    assert authorize(rules, Request("F@x.test", ["/cluster/c1/node/n1"]), event).allowed
    assert not authorize(rules, Request("f@x.test", ["/cluster/c1/node/n2"]), event).allowed
    # Admins cannot forge one.
    assert not authorize(rules, Request("root@x.test", ["/cluster/c1/node/n1"]), event).allowed
    assert not authorize(rules, Request("m@x.test", ["/cluster/c1/node/n1"]), event).allowed  # another kind
    assert not authorize(rules, Request("f@x.test", ["/cluster/c1/node/n1"], via="broker@x.test"), event).allowed
    assert authorize(rules, Request("root@x.test", []), broker_ops["mesh.fence.epochs"]) == Decision(
        True, "caller is a mesh admin", "mesh admins")


async def test_a_fencing_recorded_by_another_broker_instance_reaches_this_ones_decisions(tmp_path):
    # Two instances of one broker share the ledger file; each decides with its own view.
    mine, other = FenceLedger(tmp_path / "fencing.sqlite"), FenceLedger(tmp_path / "fencing.sqlite")
    view = FencedIdentities()

    rules = [FencedNow(mine, view), policy_rule("db1@x.test")]
    assert authorize(rules, Request("db1@x.test", []), spec("workflow.run")).allowed
    assert not mine.written_elsewhere()  # nothing new: no re-read on the next decision
    await other.record("f@x.test", outcome("off"))
    denied = authorize(rules, Request("db1@x.test", []), spec("workflow.run"))
    assert not denied.allowed and "fenced node" in denied.reason
    await other.record("f@x.test", outcome("on", at=200.0))
    assert authorize(rules, Request("db1@x.test", []), spec("workflow.run")).allowed


async def test_an_event_is_recorded_once_per_agent_and_id():
    ledger = FenceLedger(":memory:")
    assert await ledger.record("f@x.test", outcome("off", id="e1")) == (1, "fenced", True)
    assert await ledger.record("F@x.test", outcome("off", id="e1")) == (1, None, False)  # a resend
    assert (await ledger.record("g@x.test", outcome("off", id="e1")))[2]  # another agent's e1 is another event
    assert [e["epoch"] for e in await ledger.epochs()] == [1] and len(await ledger.events()) == 2


async def test_an_outcome_older_than_the_nodes_last_change_changes_nothing():
    ledger = FenceLedger(":memory:")
    await ledger.record("f@x.test", outcome("off", at=100.0))
    await ledger.record("f@x.test", outcome("on", at=200.0))
    assert (await ledger.record("f@x.test", outcome("off", at=150.0)))[1] is None  # late: the on stands
    assert await ledger.fenced() == []
    await ledger.record("f@x.test", outcome("off", at=300.0))
    assert (await ledger.record("f@x.test", outcome("on", at=250.0)))[1] is None  # late: the off stands
    assert (await ledger.record("f@x.test", outcome("on", at=400.0, state="unknown")))[1] is None  # not verified on
    assert [f.epoch for f in await ledger.fenced()] == [2]


def test_a_nodes_identities_come_from_the_agents_configured_settings():
    assert configured_nodes(SETTINGS) == {"/cluster/c1/node/n1": ("db1@x.test",), "/cluster/c2/node/n2": ()}
    assert configured_nodes({**SETTINGS, "identities": {"n9": ["x@x.test"]}}) == {}  # does not validate
    assert configured_nodes({}) == {} and configured_nodes(None) == {}


async def test_an_agents_ledger_leaves_out_an_outcome_its_outbox_still_holds(tmp_path):
    """What its broker reconciles from: an outcome still to be delivered comes through the outbox, after
    its attempt, so the ledger the broker reads leaves it out until the broker has taken it."""
    from agents.fencing.outbox import FenceOutbox

    outbox = FenceOutbox(tmp_path / "fencing.sqlite")
    attempt = {**outcome("off", id="a1"), "event": "attempt"}
    off = outcome("off", id="o1")
    await outbox.keep(attempt)
    await outbox.keep(off)
    assert [e["id"] for e in await outbox.ledger()] == ["o1"]
    assert await outbox.ledger(delivered_only=True) == []
    await outbox.delivered("a1")
    await outbox.delivered("o1")
    assert [e["id"] for e in await outbox.ledger(delivered_only=True)] == ["o1"]
    await outbox.store.aclose()
