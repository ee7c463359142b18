"""Fencing epochs survive a broker that was down, on the real server with a real fence device
(fence_dummy, type=file): a node fenced while the broker is stopped shows fenced once it is back,
from the fencing agent's durable outbox (resent until the broker answers ok, even across a restart
of the agent itself) or, when that outbox is lost, from the agent's ledger, which the broker
reconciles as the agent joins. Resends and reconciliation count each event once.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import ROOT, until, vertebra
from fence_mesh import FencingWorld, dummy_device, fencing_settings

from agents.errors import Outcome


async def fenced_nodes(world: FencingWorld) -> list[tuple[str, int, list[str]]]:
    client = await world.mesh.client()
    res = await client.request(str(world.broker.jid), "mesh.fence.epochs", {}, timeout=10)
    assert res.outcome is Outcome.OK, res.error
    return [(f["node"], f["epoch"], f["identities"]) for f in res.result["fenced"]]


async def outbox_empty(world: FencingWorld) -> bool:
    return not await world.fencer.outbox.pending()


async def events_recorded(world: FencingWorld, count: int) -> bool:
    return len(await world.broker.fencing.ledger.events()) == count


async def unfenced_and_outbox_empty(world: FencingWorld) -> bool:
    return not await world.broker.fencing.ledger.fenced() and await outbox_empty(world)


async def pending_ids(world: FencingWorld, expected: list[str]) -> bool:
    return [e["id"] for e in await world.fencer.outbox.pending()] == expected


async def fence_while_the_broker_is_down(mesh, tmp_path: Path) -> tuple[FencingWorld, str]:
    db1 = mesh.account("db")[0]
    world = FencingWorld(mesh, tmp_path, identities={"node1": [db1]})
    await world.start_broker()
    await world.start_fencer()
    await until(world.listed, what="the fencing agent listed")  # the broker knows it, to greet it again
    await world.stop(world.broker)
    client = await mesh.client()
    off = await client.request(str(world.fencer.jid), "fence.off", {"cluster": "c1", "node": "node1"}, timeout=30)
    assert off.outcome is Outcome.OK and off.result["state"] == "off", off.error
    assert world.state["node1"].read_text() == "off"
    assert [e["event"] for e in await world.fencer.outbox.pending()] == ["attempt", "outcome"]  # kept, not delivered
    return world, db1


async def test_a_node_fenced_while_the_broker_was_down_shows_fenced_after_it_restarts(mesh, tmp_path: Path):
    world, db1 = await fence_while_the_broker_is_down(mesh, tmp_path)
    await world.start_broker()  # same account, same state dir: a restart
    await until(lambda: world.broker.fencing.ledger.fenced(), timeout=30, what="the epoch recorded after the restart")
    assert await fenced_nodes(world) == [("node1", 1, [db1])]
    await until(lambda: outbox_empty(world), what="the outbox emptied by the broker's acknowledgement")
    # Delivered once each, however they got there.
    assert [(e["event"], e["action"]) for e in await world.broker.fencing.ledger.events()] == [
        ("attempt", "off"), ("outcome", "off")]


async def test_the_outbox_outlives_the_fencing_agent_too(mesh, tmp_path: Path):
    world, db1 = await fence_while_the_broker_is_down(mesh, tmp_path)
    await world.stop(world.fencer)  # its memory is gone; its state dir stays
    await world.start_broker()
    await world.start_fencer()
    await until(lambda: events_recorded(world, 2), timeout=30,
                what="both events resent by the restarted agent")
    assert await fenced_nodes(world) == [("node1", 1, [db1])]
    # The attempt is only in the outbox (the ledger keeps verified outcomes): it came from there.
    assert [e["event"] for e in await world.broker.fencing.ledger.events()] == ["attempt", "outcome"]
    await until(lambda: outbox_empty(world), what="the outbox emptied")


async def test_a_lost_outbox_is_recovered_from_the_agents_ledger(mesh, tmp_path: Path):
    world, db1 = await fence_while_the_broker_is_down(mesh, tmp_path)
    await world.stop(world.fencer)
    with sqlite3.connect(world.fencer_state / "fencing.sqlite") as db:  # the outbox is lost; the ledger is not
        db.execute("DELETE FROM outbox")
    await world.start_broker()
    await world.start_fencer()
    await until(lambda: world.broker.fencing.ledger.fenced(), timeout=30, what="the epoch reconciled from the ledger")
    assert await fenced_nodes(world) == [("node1", 1, [db1])]
    (event,) = await world.broker.fencing.ledger.events()
    assert (event["event"], event["action"], event["ok"], event.get("reconciled")) == ("outcome", "off", True, True)
    # Asking again (another join) finds nothing new.
    assert await world.broker.fencing.reconcile_fencing(str(world.fencer.jid)) == 0


async def test_an_unfence_missed_while_the_broker_was_down_ends_the_epoch_and_no_older_off_reopens_it(mesh, tmp_path):
    db1 = mesh.account("db")[0]
    world = FencingWorld(mesh, tmp_path, identities={"node1": [db1]})
    await world.start_broker()
    await world.start_fencer()
    await until(world.listed, what="the fencing agent listed")
    client = await mesh.client()
    node1 = {"cluster": "c1", "node": "node1"}
    assert (await client.request(str(world.fencer.jid), "fence.off", node1, timeout=30)).outcome is Outcome.OK
    await until(lambda: world.broker.fencing.ledger.fenced(), what="the epoch opened")
    await world.stop(world.broker)
    on = await client.request(str(world.fencer.jid), "fence.on", node1, timeout=30)
    assert on.outcome is Outcome.OK and world.state["node1"].read_text() == "on", on.error
    await world.start_broker()
    await until(lambda: unfenced_and_outbox_empty(world), timeout=30,
                what="the verified on recorded after the restart")
    assert await fenced_nodes(world) == []
    (epoch,) = await world.broker.fencing.ledger.epochs()
    assert epoch["epoch"] == 1 and epoch["unfenced_by"] == world.fencer_account[0]
    # An older off arriving late under a new id (as another agent's older report would; older than
    # the on by more than the clock-skew allowance): it is kept as an event and opens nothing.
    (off,) = [e for e in await world.broker.fencing.ledger.events() if e["event"] == "outcome" and e["action"] == "off"]
    late = {k: off[k] for k in ("event", "action", "cluster", "node", "requester", "request", "ok", "state",
                                "message", "on_error", "at")}
    answer = await world.broker.fencing._take_event(world.fencer_account[0],
                                                    {**late, "id": "late-resend", "at": off["at"] - 10})
    assert answer["change"] is None and not answer["fenced"]
    assert len(await world.broker.fencing.ledger.epochs()) == 1


async def test_an_event_the_broker_refuses_holds_up_no_other(mesh, tmp_path: Path):
    world = FencingWorld(mesh, tmp_path)
    await world.start_broker()
    await world.start_fencer()
    await until(world.listed, what="the fencing agent listed")
    # Oldest in the outbox: an event for a node the mesh file does not give this agent.
    await world.fencer.outbox.keep({"id": "not-mine", "event": "outcome", "action": "off", "cluster": "c9",
                                    "node": "node9", "ok": True, "state": "off", "at": time.time(),
                                    "caller": mesh.operator[0], "rid": "r1"})
    client = await mesh.client()
    off = await client.request(str(world.fencer.jid), "fence.off", {"cluster": "c1", "node": "node1"}, timeout=30)
    assert off.outcome is Outcome.OK, off.error
    await until(lambda: pending_ids(world, ["not-mine"]), timeout=20,
                what="node1's events delivered past the refused one")
    assert [f.node for f in await world.broker.fencing.ledger.fenced()] == ["node1"]


def test_the_issues_case_with_real_processes(mesh_home, tmp_path: Path):
    """The mesh as `vertebra` runs it (broker and fencing agent processes from one mesh file): the
    broker is stopped, node1 is fenced off through the fencing agent, the agent is restarted too, the
    broker starts again, and node1 shows fenced with the identities the mesh file gives it."""
    state = tmp_path / "node1.state"
    state.write_text("on")
    settings = {**fencing_settings({"dev": dummy_device(state)}, {"node1": [["dev"]]}),
                "identities": {"node1": ["db1@vertebra.test"]}}
    home = mesh_home([{"name": "fence", "kind": "fencing", "resources": ["/host/fencer"], "settings": settings}])
    cfg = yaml.safe_load((home / "mesh.yaml").read_text())
    fencer, broker = cfg["agents"][0]["name"], cfg["broker"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "agents.cli", "--home", str(home)]

    def start(*what: str) -> subprocess.Popen:
        return subprocess.Popen(base + list(what), env=env, cwd=ROOT,
                                stderr=open(home / f"{what[-1]}-{time.monotonic_ns()}.log", "w"))

    def call(*args: str) -> dict:
        done = vertebra(home, "call", *args, "--json")
        return json.loads(done.stdout)["results"][0] if done.stdout.strip() else {"outcome": done.stderr}

    def wait_for(check, what: str, timeout: float = 60.0):
        end, value = time.monotonic() + timeout, None
        while time.monotonic() < end:
            value = check()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what} ({value!r}); logs:\n"
                             + "\n".join(f.read_text() for f in home.glob("*.log")))

    procs = [start("broker"), start("agent", fencer)]
    try:
        wait_for(lambda: len(call("mesh.agents", "--to", broker).get("result") or []) == 1, "the agent listed")
        procs[0].terminate()
        procs[0].wait(timeout=15)
        off = call("fence.off", "cluster=c1", "node=node1", "--to", fencer, "--timeout", "30")
        assert off["outcome"] == "ok" and state.read_text() == "off", off
        procs[1].terminate()  # the fencing agent restarts too: only what it kept on disk remains
        procs[1].wait(timeout=15)
        procs[0] = start("broker")
        procs[1] = start("agent", fencer)

        def fenced():
            res = call("mesh.fence.epochs", "--to", broker)
            return res.get("outcome") == "ok" and res["result"]["fenced"]

        (epoch,) = wait_for(fenced, "node1 fenced after the broker's restart")
        assert (epoch["node"], epoch["epoch"], epoch["identities"]) == ("node1", 1, ["db1@vertebra.test"])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
