"""Request ids hold across restarts for every op that changes state, on both storage drivers, with a real
storage agent process killed with SIGKILL on the real server: a repeat of a create, a clone or a destroy
after the kill gets the first outcome instead of running again (it used to fail `exists` or `not-found`);
an agent killed between recording an outcome and sending it answers the repeat with that outcome; one
killed between running the op and recording it answers `interrupted`, and never runs it twice; a
workflow whose agent died between a step's execution and its answer finishes instead of failing on a
step that ran. And `vertebra call` prints the id it used and takes it back with --request-id."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from agents.errors import Outcome
from broker.workflow_store import FINISHED
from conftest import ROOT, running, until, vertebra
from test_storage_contract import btrfs_mounts  # noqa: F401  (the loop-mounted filesystem fixture)

CREATE, CLONE, DESTROY = "storage.volume.create", "storage.clone.create", "storage.volume.destroy"


@pytest.fixture(params=["embedded", "btrfs"])
def store(request, tmp_path) -> tuple[str, Path]:
    """(driver, root) of the store the agent process keeps its volumes in."""
    if request.param == "embedded":
        return "embedded", tmp_path / "store"
    return "btrfs", request.getfixturevalue("btrfs_mounts")[0] / "vertebra"


class AgentProcess:
    """A storage agent in a process of its own (tests/storage_agent_process.py), under one account and one
    state directory however often it is killed and started again."""

    def __init__(self, mesh: Any, tmp_path: Path, store: tuple[str, Path], broker: Any = None) -> None:
        self.mesh, self.driver, self.root = mesh, *store
        self.jid, self.password = mesh.account("storage")
        self.target = f"{self.jid}/agent"
        self.state = tmp_path / "agent-state"
        self.broker = broker
        self.admin = mesh.operator[0]  # whom the agent admits
        self.proc: subprocess.Popen[str] | None = None

    async def start(self, *flags: str) -> None:
        # The options first, then "--": a generated password may start with "-" (one in 64 do).
        argv = [sys.executable, str(ROOT / "tests" / "storage_agent_process.py"),
                *(["--broker", self.broker.jid.bare] if self.broker else []), *flags, "--", self.jid, self.password,
                str(self.mesh.server.port), str(self.mesh.server.cert_path), self.admin, self.driver,
                str(self.root), str(self.state)]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 60)  # type: ignore[union-attr]
        assert line.strip() == "online", f"the storage agent did not come up (exit {self.proc.poll()})"

    async def killed(self) -> None:
        """Wait for the process to have killed itself at its kill point (SIGKILL, as kill -9)."""
        assert self.proc is not None
        code = await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 60)
        assert code == -signal.SIGKILL, f"the agent ended with {code}, not at its kill point"

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.killed()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
async def agent(mesh, tmp_path, store):
    a = AgentProcess(mesh, tmp_path, store)
    yield a
    a.close()


async def ask(client: Any, agent: AgentProcess, op: str, rid: str, timeout: float = 30, **args: Any) -> Any:
    return await client.request(agent.target, op, args, timeout=timeout, rid=rid)


async def ok(client: Any, agent: AgentProcess, op: str, rid: str | None = None, **args: Any) -> Any:
    res = await ask(client, agent, op, rid or uuid.uuid4().hex, **args)
    assert res.outcome is Outcome.OK, f"{op} {args}: {res.outcome.value}: {res.error}"
    return res.result


async def volumes(client: Any, agent: AgentProcess) -> list[str]:
    return sorted(v["name"] for v in await ok(client, agent, "storage.volume.list"))


async def cut_off(client: Any, agent: AgentProcess, op: str, rid: str, **args: Any) -> Any:
    """Send the request to an agent that kills itself on its way (at the kill point it was started with),
    then start the agent again, plainly; returns what the caller got. For a quick op that is no outcome;
    a long op's job is kept by the agent, which sends its outcome once it is back, if the caller still
    waits then. A quick op's caller waits only a few seconds: its answer can never come, and the test
    would otherwise sit out the long op's wait."""
    call = asyncio.ensure_future(ask(client, agent, op, rid, timeout=15 if op == CLONE else 3, **args))
    await agent.killed()
    await agent.start()
    return await call


async def test_a_repeat_after_a_kill_gets_the_first_outcome(agent, mesh):
    await agent.start()
    client = await mesh.client()
    made = [await ask(client, agent, CREATE, "make-v", volume="v") for _ in range(2)]
    await ok(client, agent, "storage.snapshot.create", volume="v", snapshot="s")
    cloned = [await ask(client, agent, CLONE, "clone-c", volume="v", snapshot="s", clone="c") for _ in range(2)]
    await ok(client, agent, CREATE, volume="gone")
    destroyed = [await ask(client, agent, DESTROY, "destroy-gone", volume="gone") for _ in range(2)]
    for first, again in (made, cloned, destroyed):
        assert first.outcome is again.outcome is Outcome.OK, (first, again)
        assert first.result == again.result

    await agent.kill()
    await agent.start()
    # Today's main ran each of these again: `exists`, `exists`, `not-found`.
    for rid, op, args, (first, _) in (("make-v", CREATE, {"volume": "v"}, made),
                                      ("clone-c", CLONE, {"volume": "v", "snapshot": "s", "clone": "c"}, cloned),
                                      ("destroy-gone", DESTROY, {"volume": "gone"}, destroyed)):
        after = await ask(client, agent, op, rid, **args)
        assert after.outcome is Outcome.OK, f"{op} repeated after the kill: {after.outcome.value}: {after.error}"
        assert after.result == first.result
    # Not run again, and a new id runs anew: the volume is there once, so a new create of it is refused.
    assert await volumes(client, agent) == ["c", "v"]
    fresh = await ask(client, agent, CREATE, uuid.uuid4().hex, volume="v")
    assert fresh.outcome is Outcome.FAILED and fresh.error.startswith("exists:"), fresh
    # The same id for another request is still refused after the restart, not answered with the first.
    other = await ask(client, agent, CREATE, "make-v", volume="w")
    assert other.outcome is Outcome.FAILED and "already used for a different request" in other.error


async def test_a_quick_ops_caller_hears_at_once_that_its_agent_died(agent, mesh):
    """An agent killed while it runs a quick op: its caller, who would wait two minutes, is told that the
    agent went away (Prosody bounces the request; ejabberd, which had it acknowledged, does not, and the
    caller's ping of the silent agent finds its session gone), not left to its timeout."""
    await agent.start("--die-before-answering", CREATE)
    client = await mesh.client()
    res = await ask(client, agent, CREATE, "make-v", timeout=120, volume="v")
    assert res.outcome is Outcome.TIMEOUT and "went away before answering" in res.error, res
    await agent.killed()


async def test_killed_between_recording_and_answering_the_repeat_gets_the_outcome(agent, mesh):
    """The kill falls after the op ran and its outcome was recorded, before the caller was answered: for a
    create, a destroy and a clone (a long op, whose answer is its job's outcome message)."""
    await agent.start("--die-before-answering", CREATE)
    client = await mesh.client()
    assert (await cut_off(client, agent, CREATE, "make-v", volume="v")).outcome is not Outcome.OK
    made = await ok(client, agent, CREATE, "make-v", volume="v")
    assert made["name"] == "v" and Path(made["path"]).is_dir()

    await ok(client, agent, CREATE, volume="gone")
    await agent.kill()
    await agent.start("--die-before-answering", DESTROY)
    assert (await cut_off(client, agent, DESTROY, "destroy-gone", volume="gone")).outcome is not Outcome.OK
    await ok(client, agent, DESTROY, "destroy-gone", volume="gone")

    await ok(client, agent, "storage.snapshot.create", volume="v", snapshot="s")
    await agent.kill()
    await agent.start("--die-before-answering", CLONE)
    first = await cut_off(client, agent, CLONE, "clone-c", volume="v", snapshot="s", clone="c")
    clone = await ok(client, agent, CLONE, "clone-c", volume="v", snapshot="s", clone="c")
    assert clone["name"] == "c" and Path(clone["path"]).is_dir()
    assert first.outcome is not Outcome.OK or first.result == clone  # delivered late, or not at all: the same
    assert await volumes(client, agent) == ["c", "v"]


async def test_killed_between_running_and_recording_the_repeat_is_told_interrupted(agent, mesh):
    """The kill falls after the op changed the store, before its outcome was recorded: a repeat is told
    `interrupted` (it may have taken effect; look) and the op is not run a second time. For a create, a
    destroy and a clone (a long op, whose job the restarted agent reports interrupted too)."""
    await agent.start("--die-after-running", CREATE)
    client = await mesh.client()
    assert (await cut_off(client, agent, CREATE, "make-v", volume="v")).outcome is not Outcome.OK
    again = await ask(client, agent, CREATE, "make-v", volume="v")
    assert again.outcome is Outcome.FAILED and again.error.startswith("interrupted:"), again
    assert "may or may not have taken effect" in again.error and "new request id" in again.error
    assert await volumes(client, agent) == ["v"]  # it had run, once

    await agent.kill()
    await agent.start("--die-after-running", DESTROY)
    assert (await cut_off(client, agent, DESTROY, "destroy-v", volume="v")).outcome is not Outcome.OK
    again = await ask(client, agent, DESTROY, "destroy-v", volume="v")
    assert again.outcome is Outcome.FAILED and again.error.startswith("interrupted:"), again
    assert await volumes(client, agent) == []

    await ok(client, agent, CREATE, volume="w")
    await ok(client, agent, "storage.snapshot.create", volume="w", snapshot="s")
    await agent.kill()
    await agent.start("--die-after-running", CLONE)
    first = await cut_off(client, agent, CLONE, "clone-c", volume="w", snapshot="s", clone="c")
    assert first.outcome is not Outcome.OK, first  # reported interrupted by the restarted agent, or unreachable
    again = await ask(client, agent, CLONE, "clone-c", volume="w", snapshot="s", clone="c")
    assert again.outcome is Outcome.FAILED and again.error.startswith("interrupted:"), again
    assert await volumes(client, agent) == ["c", "w"]


async def test_a_workflow_step_that_ran_before_its_agent_died_is_not_failed(mesh, tmp_path, store):
    """The broker resends a step whose answer never came under the same request id: the agent, killed
    between running it and answering, answers the resend from its record, and the workflow finishes."""
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "make.yaml").write_text(yaml.safe_dump({"name": "make", "params": {"name": {}}, "steps": [
        {"name": "create", "op": CREATE, "on": ["/site/a"], "args": {"volume": "{name}"}, "timeout": 4,
         "retries": 8},
        {"name": "snapshot", "op": "storage.snapshot.create", "on": ["/site/a"],
         "args": {"volume": "{name}", "snapshot": "first"}}]}))
    (tmp_path / "broker-state").mkdir()
    broker = await mesh.broker(state_dir=tmp_path / "broker-state", settings={"workflows": str(workflows)})
    agent = AgentProcess(mesh, tmp_path, store, broker)
    broker.admit(agent.jid, "storage", ["/site/a"])
    try:
        await agent.start("--die-before-answering", CREATE)
        await until(lambda: broker.directory.discover(CREATE, ["/site/a"]), what="the agent in the directory")
        client = await mesh.client()
        started = await client.request(str(broker.jid), "workflow.run", {"workflow": "make", "param": ["name=db"],
                                                                         "wait": 0}, timeout=30)
        assert started.outcome is Outcome.OK, started.error
        iid = started.result["instance"]
        await agent.killed()  # the create ran and was recorded; its answer never left
        await agent.start()

        async def finished() -> dict | None:
            status = await client.request(str(broker.jid), "workflow.status", {"instance": iid}, timeout=10)
            return status.result if status.result and status.result["state"] in FINISHED else None

        status = await until(finished, timeout=120, what="the workflow to end")
        assert status["state"] == "done", status
        create = next(s for s in status["steps"] if s["name"] == "create")
        assert create["attempts"] >= 2 and create["result"]["name"] == "db"
    finally:
        agent.close()


@pytest.mark.parametrize("gateway", [False, True], ids=["direct", "through-the-gateway"])
def test_the_command_line_retries_under_the_request_id_it_printed(mesh_home, gateway):
    """`vertebra call` says which request id it used for an op that changes state, and takes it back with
    --request-id: the retry is answered with the first outcome (a new id would have failed `exists`), and
    --json stays parseable. The same through the local gateway, which the command line uses when one runs.
    A malformed id is refused before anything is sent."""
    agents = [{"name": "store", "kind": "storage", "resources": ["/host/rid"]}]
    if gateway:
        agents.append({"name": "mon", "kind": "monitor", "resources": ["/host/rid"], "gateway": True})
    home = mesh_home(agents)
    with running(home, expect_agents=len(agents)):
        assert (home / "run" / "gateway.sock").exists() == gateway
        made = vertebra(home, "call", "storage.volume.create", "volume=db", "--json")
        assert made.returncode == 0, made.stdout + made.stderr
        first = json.loads(made.stdout)["results"][0]
        (rid,) = re.findall(r"give --request-id (\S+)", made.stderr)
        again = vertebra(home, "call", "storage.volume.create", "volume=db", "--json", "--request-id", rid)
        assert again.returncode == 0, again.stdout + again.stderr
        assert json.loads(again.stdout)["results"][0] == first
        assert f"request id {rid};" in again.stderr
        fresh = vertebra(home, "call", "storage.volume.create", "volume=db", "--json")
        assert fresh.returncode != 0 and "exists" in fresh.stdout
        # A read needs no retry: no id line.
        listed = vertebra(home, "call", "storage.volume.list")
        assert listed.returncode == 0 and "request id" not in listed.stderr
        for bad in ("", "has space", "x" * 129):
            refused = vertebra(home, "call", "storage.volume.create", "volume=other", "--request-id", bad)
            assert refused.returncode == 2 and "--request-id" in refused.stderr, refused.stderr
        assert [v["name"] for v in json.loads(vertebra(home, "call", "storage.volume.list", "--json").stdout)[
            "results"][0]["result"]] == ["db"]
