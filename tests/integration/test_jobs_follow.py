"""A job whose work carries on after its agent restarts ends with that work's real outcome, not
`interrupted`: a real storage agent process replicating a volume at a throttled rate is killed with SIGKILL
mid-transfer and started again; its replicator resumes the update, and the caller (`vertebra call` with a
long --timeout, and an in-process request) and `vertebra job wait` from another process get `ok` with the
completed update, whose snapshot on the target holds the source's files. On both storage drivers.

And a caller that repeats a running job's request id is attached to the job like the first: it hears at
once that the agent went offline, and gets the outcome sent to it once the agent is back, also when the
agent process was killed and started again."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
import pytest

from agents.actor import Timeouts
from agents.authz import AdminsOnly
from agents.client import Client
from agents.errors import Outcome
from agents.storage.agent import StorageAgent
from conftest import until
from test_jobs import HeldAgent, Notices, client_with, line_matching, vertebra_popen
from test_jobs import sample  # noqa: F401  (the sample agent process fixture)
from test_request_ids_restart import AgentProcess
from test_storage_contract import btrfs_mounts  # noqa: F401  (the loop-mounted filesystem fixture)
from test_storage_ops import tree_digest

RATE = 400_000  # bytes per second: the update takes several seconds, so the kill falls mid-transfer
DATA = 4 * 1024 * 1024


@pytest.fixture(params=["embedded", "btrfs"])
def roots(request, tmp_path) -> tuple[str, Path, Path]:
    """(driver, source root, target root)."""
    if request.param == "embedded":
        return "embedded", tmp_path / "a", tmp_path / "b"
    mounts = request.getfixturevalue("btrfs_mounts")
    return "btrfs", mounts[0] / "vertebra", mounts[1] / "vertebra"


async def _sending(client: Client, source: str) -> bool:
    """Whether the source's update has sent its first bytes (and is far from done)."""
    res = await client.request(source, "storage.replication.list", {}, timeout=10)
    if res.outcome is not Outcome.OK:
        return False
    return any((a.get("progress") or {}).get("phase") == "sending" and a["progress"]["bytes"] > 0
               for a in res.result)


async def test_a_replication_job_follows_its_update_across_a_kill_and_restart(roots, mesh, mesh_home, tmp_path):
    # roots first: on btrfs the agents (which hold their catalogs open) must stop before the mounts go.
    from agents import config
    from broker.service import Broker

    driver, src_root, dst_root = roots
    home = mesh_home([{"name": "source", "kind": "storage", "resources": ["/site/a"]}])
    cfg = config.load(home / "mesh.yaml", home)
    name, operator = cfg.agents[0].name, cfg.jid(cfg.operator)
    broker = await mesh.start(Broker(cfg.jid(cfg.broker), cfg.password(cfg.broker), mesh.endpoint,
                                     authorizer=AdminsOnly([operator]), state_dir=tmp_path / "broker"))
    broker.admit(cfg.jid(name), "storage", ["/site/a"])
    source = AgentProcess(mesh, tmp_path, (driver, src_root))
    source.jid, source.password, source.target = cfg.jid(name), cfg.password(name), f"{cfg.jid(name)}/agent"
    source.broker, source.admin = broker, operator
    dst = await mesh.agent(StorageAgent, None, ["/site/b"], settings={"driver": driver, "root": str(dst_root)},
                           authorizer=AdminsOnly([operator, source.jid]))
    client = await mesh.start(Client(operator, cfg.password(cfg.operator), mesh.endpoint, broker="",
                                     timeouts=Timeouts(offline_grace=90.0)))
    procs: list[subprocess.Popen[str]] = []
    try:
        await source.start()
        made = await client.request(source.target, "storage.volume.create", {"volume": "db"}, timeout=30)
        assert made.outcome is Outcome.OK, made
        live = Path(made.result["path"])
        (live / "data").write_bytes(os.urandom(DATA))
        (live / "conf").write_text("shared_buffers = 128MB\n")

        call = vertebra_popen(home, "call", "storage.replicate", "volume=db", f"target={dst.jid.bare}",
                              f"rate={RATE}", "--to", name, "--timeout", "300", "--json")
        procs.append(call)
        said: list[str] = []
        job = (await line_matching(call.stderr, r"accepted the call as job (\w+)", said))[1]
        waiter = vertebra_popen(home, "job", "wait", job, "--to", name, "--timeout", "300", "--json")
        procs.append(waiter)
        await until(lambda: _sending(client, source.target), timeout=60, what="the update's first bytes sent")

        await source.kill()
        await line_matching(call.stderr, f"unreachable: the agent went offline while running job {job}", said)
        await source.start()

        out, err = await asyncio.to_thread(call.communicate, timeout=280)
        assert call.returncode == 0, (out, err, said)
        [called] = json.loads(out)["results"]
        assert called["outcome"] == "ok", called
        update = called["result"]
        assert update["pending"] is None and update["last"]["snapshot"] == update["last_snap"], update
        assert update["last"]["resumed_from"] > 0, update  # cut mid-transfer, resumed where the target was

        out, err = await asyncio.to_thread(waiter.communicate, timeout=280)
        assert waiter.returncode == 0, (out, err)
        [status] = [r["result"] for r in json.loads(out)["results"]]
        assert status["state"] == "ended" and status["status"] == "ok", status
        assert status["result"]["last_snap"] == update["last_snap"], status

        clone = await client.request(str(dst.jid), "storage.clone.create",
                                     {"volume": update["package"], "snapshot": update["last_snap"], "clone": "c"},
                                     timeout=60)
        assert clone.outcome is Outcome.OK, clone
        assert tree_digest(Path(clone.result["path"])) == tree_digest(live)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        source.close()


async def test_a_repeat_of_a_running_jobs_request_is_attached_to_the_job(mesh):
    """A second session of the caller repeats the request id of a job that is running: it is told the
    same job, hears when the agent's connection goes, and gets the outcome, sent once the agent is back.
    (It used to get neither the offline presence nor, the outcome being sent once while the agent was
    away, the outcome: it waited out its deadline.)"""
    agent = await mesh.agent(HeldAgent, None, ["/host/held"])
    agent.release = asyncio.Event()
    first = await client_with(mesh, Timeouts(offline_grace=60.0))
    repeater = await client_with(mesh, Timeouts(offline_grace=60.0))
    notices, repeated = Notices(), Notices()
    calls = [asyncio.create_task(client.request(str(agent.jid), "sample.held", {}, timeout=90, rid="held-1",
                                                job_events=heard))
             for client, heard in ((first, notices), (repeater, repeated))]
    await until(lambda: "accepted" in notices.events and "accepted" in repeated.events,
                what="both sessions told of the job")
    assert repeated.job == notices.job
    agent._reconnect_later = lambda why: None  # stays away until the test connects it again
    agent.xmpp.transport.abort()
    await until(lambda: "offline" in repeated.events, what="the repeating session to hear the agent went offline")
    agent.release.set()
    await until(lambda: notices.job in agent.jobs.delivering, what="the outcome waiting to be sent")
    del agent._reconnect_later
    agent.xmpp.connect(*agent.server_address)
    for call in calls:
        res = await asyncio.wait_for(call, 60)
        assert res.outcome is Outcome.OK and res.result == "released" and res.job == notices.job, res
    assert repeated.events == ["accepted", "offline", "back"], repeated.events
    await until(lambda: not agent.jobs.delivering, what="both callers' receipts")


async def test_a_session_attached_by_a_repeat_gets_the_outcome_after_the_agent_restarts(mesh, sample):  # noqa: F811
    """The attachment is on the agent's disk: a sample agent process killed with SIGKILL while the job runs
    and started again sends its `interrupted` outcome to the repeating session as to the first."""
    await sample.start()
    first = await client_with(mesh, Timeouts(offline_grace=90.0))
    repeater = await client_with(mesh, Timeouts(offline_grace=90.0))
    notices, repeated = Notices(), Notices()
    calls = [asyncio.create_task(first.request(sample.target, "sample.wait", {"seconds": 300}, timeout=120,
                                               rid="wait-1", job_events=notices))]
    await until(lambda: "accepted" in notices.events, timeout=30, what="the job to be accepted")
    calls.append(asyncio.create_task(repeater.request(sample.target, "sample.wait", {"seconds": 300}, timeout=120,
                                                      rid="wait-1", job_events=repeated)))
    await until(lambda: "accepted" in repeated.events, timeout=30, what="the repeat to be told of the job")
    await sample.kill()
    await until(lambda: "offline" in repeated.events, timeout=60, what="the repeating session to hear it went")
    await sample.start()
    for call in calls:
        res = await asyncio.wait_for(call, 100)
        assert res.outcome is Outcome.FAILED and res.error.startswith("interrupted:"), res
        assert res.job == notices.job and "stopped while running sample.wait" in res.error, res
    assert repeated.events == ["accepted", "offline", "back"], repeated.events
