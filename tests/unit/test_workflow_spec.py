"""Workflow definitions: what a file may say, the errors that name the field, and a run's plan."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml

from broker.workflow_spec import Plan, WorkflowError, fill, load_dir, parse
from broker.workflow_store import WorkflowStore
from broker.constraints import APPROVED, PERFORMED, REQUESTED

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "workflows"


def wf(text: str):
    return parse(yaml.safe_load(text), "wf.yaml")


def error(text: str) -> str:
    with pytest.raises(WorkflowError) as exc:
        wf(text)
    return str(exc.value)


def test_the_examples_load_and_plan():
    good, bad = load_dir(EXAMPLES)
    assert bad == {} and {"fence-verify-release", "masked-copy"} <= set(good)
    plan = good["masked-copy"].plan({"volume": "proddb", "developers": ["alice", "bob"]})
    assert [s.name for s in plan.stages[-1]] == ["developer-clone:alice", "developer-clone:bob"]
    assert plan.stages[-1][1].args["clone"] == "proddb-bob" and plan.stages[0][0].args["snapshot"] == "nightly"
    # Developers' clones come from the masked snapshot only, at the agent holding the volume.
    assert [s.op for s in plan.steps()][:3] == ["storage.snapshot.create", "storage.clone.create", "storage.mask"]
    assert plan.stages[-1][0].args["masked_only"] is True and plan.stages[-1][0].on == ["/volume/proddb"]


def test_installed_destructive_ops_keep_the_two_person_rule_whatever_the_file_says():
    good, _ = load_dir(EXAMPLES)
    plan = good["fence-verify-release"].plan({"cluster": "c1", "node": "3"}, lambda op: op == "fence.off")
    fence = plan.step("fence")
    assert fence.destructive and fence.needed == 2 and fence.on == ["/cluster/c1/node/3"]
    assert fence.rate == {"key": "fence.off:/cluster/c1", "limit": 3, "per": 3600.0}
    assert plan.step("verify").needed == 0


def test_bare_on_key_is_the_resources_not_yaml_true():
    w = wf("name: a\nsteps:\n  - {name: s, op: x.y, on: [/host/a]}\n")
    assert w.stages[0][0].on == ("/host/a",)


def test_parallel_group_is_one_stage_and_plan_round_trips_through_json():
    w = wf("name: a\nparams: {n: {}}\nsteps:\n  - {name: s, op: x.y}\n"
           "  - parallel: [{name: p, op: x.y, args: {v: '{n}'}}, {name: q, op: x.z}]\n")
    plan = w.plan({"n": "7"})
    assert [[s.name for s in st] for st in plan.stages] == [["s"], ["p", "q"]]
    assert Plan.from_json(plan.to_json()) == plan and plan.step("p").args == {"v": "7"}


def test_parameters_cannot_smuggle_path_segments():
    w = wf("name: a\nparams: {node: {}}\nsteps:\n  - {name: s, op: x.y, on: ['/cluster/c1/node/{node}']}\n")
    with pytest.raises(WorkflowError, match="must match"):
        w.plan({"node": "../../c2/node/1"})
    with pytest.raises(WorkflowError, match="missing parameter 'node'"):
        w.plan({})
    with pytest.raises(WorkflowError, match="unknown parameter 'nod'"):
        w.plan({"node": "1", "nod": "2"})


def test_fill_keeps_a_whole_list_and_refuses_one_inside_text():
    assert fill("{xs}", {"xs": ["a", "b"]}) == ["a", "b"]
    assert fill({"k": ["{x}-1", 3]}, {"x": "v"}) == {"k": ["v-1", 3]}
    with pytest.raises(WorkflowError, match="whole value"):
        fill("pre-{xs}", {"xs": ["a"]})


@pytest.mark.parametrize("text, expected", [
    ("name: a\nsteps: []\n", "steps: expected a non-empty list"),
    ("name: a\nsteps:\n  - {name: s, op: x.y, aprovals: 2}\n", "steps[0]: unknown key 'aprovals'"),
    ("name: a\nsteps:\n  - {name: s, op: X}\n", "steps[0].op: expected an op name"),
    ("name: a\nsteps:\n  - {name: s, op: x.y}\n  - {name: s, op: x.z}\n", "step s: step names must be unique"),
    ("name: a\nsteps:\n  - {name: s, op: x.y, args: {v: '{nope}'}}\n", "undeclared parameter 'nope'"),
    ("name: a\nsteps:\n  - {name: s, op: x.y, bound_to: t}\n  - {name: t, op: x.y}\n", "'t' is not an earlier step"),
    ("name: a\nsteps:\n  - {name: s, op: x.y, rate: {limit: 0, per: 60}}\n", "rate.limit"),
    ("name: a\nparams: {d: {}}\nsteps:\n  - {name: s, op: x.y, for_each: d, as: x}\n", "'d' is not a list parameter"),
    ("name: a\nsteps:\n  - {name: s, op: x.y, destructive: yes please}\n", "destructive: expected true or false"),
    ("name: A\nsteps:\n  - {name: s, op: x.y}\n", "name: expected a lowercase name"),
])
def test_mistakes_name_the_file_and_field(text, expected):
    message = error(text)
    assert message.startswith("wf.yaml: ") and expected in message


def test_a_broken_file_is_reported_and_the_others_still_load(tmp_path):
    (tmp_path / "good.yaml").write_text("name: good\nsteps:\n  - {name: s, op: x.y}\n")
    (tmp_path / "bad.yaml").write_text("name: bad\nsteps:\n  - {name: s, op: x.y, typo: 1}\n")
    good, bad = load_dir(tmp_path)
    assert set(good) == {"good"} and "unknown key 'typo'" in bad["bad.yaml"]


async def test_store_keeps_state_and_history_across_reopening(tmp_path):
    path = tmp_path / "workflows.sqlite"
    store = WorkflowStore(path)
    await store.create("abc", "w", "alice", {"n": "1"}, [[{"name": "s"}]], ["s", "t"])
    await store.add_event("abc", APPROVED, "s", "bob")
    await store.start_step("abc", "s", "alice", "agent@x/agent")
    await store.aclose()
    store = WorkflowStore(path)
    assert await store.unfinished() == ["abc"] and (await store.instance("abc"))["params"] == {"n": "1"}
    step = await store.step("abc", "s")
    assert step["state"] == "running" and step["target"] == "agent@x/agent"
    kinds = [(e.kind, e.step, e.actor) for e in await store.history("abc")]
    assert kinds == [(REQUESTED, "s", "alice"), (REQUESTED, "t", "alice"), (APPROVED, "s", "bob"),
                     (PERFORMED, "s", "alice")]
    await store.set_instance("abc", "done")
    assert await store.unfinished() == [] and (await store.instances())[0]["state"] == "done"
    await store.aclose()


async def test_store_runs_its_statements_off_the_event_loop(tmp_path):
    """Every statement runs on the store's own thread: the event loop's thread never touches the file."""
    store = WorkflowStore(tmp_path / "workflows.sqlite")
    loop_thread, threads = threading.get_ident(), set()
    store.store.db.set_trace_callback(lambda _sql: threads.add(threading.get_ident()))
    await store.create("abc", "w", "alice", {}, [[{"name": "s"}]], ["s"])
    await store.set_step("abc", "s", attempts=1, result={"x": 1})
    assert (await store.step("abc", "s"))["result"] == {"x": 1}
    assert threads and loop_thread not in threads
    with pytest.raises(ValueError, match="no field instance"):
        await store.set_step("abc", "s", instance="other")
    await store.aclose()
