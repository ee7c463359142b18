"""A caller waiting on a long op's job is never left in silence: a real sample agent process, on the real
server, is killed with SIGKILL while its job runs. The caller hears at once that the agent went offline
(the agent's directed presence, whose unavailable the server sends when the agent's session ends: agents
do not ask for stream resumption, so no hibernation delays it), ends `unreachable` if the agent does not
come back, and gets the job's `interrupted` outcome if it does; `job.status` and `vertebra job wait`
reattach to the job by its id from another session."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from sample_agent import SampleAgent

from agents.actor import Endpoint, Timeouts
from agents.agent import Call
from agents.authz import AdminsOnly
from agents.client import Client
from agents.errors import Outcome
from agents.ops import op
from agents.server import PrivateServer
from conftest import DOMAIN, ON_EJABBERD, ROOT, free_port, until


class SampleProcess:
    """A sample agent (tests/sample_agent.py) in a process of its own, under one account and one state
    directory however often it is killed and started again."""

    def __init__(self, mesh: Any, state: Path, jid: str | None = None, password: str | None = None,
                 admin: str | None = None, broker: str = "") -> None:
        self.mesh, self.broker = mesh, broker
        self.jid, self.password = (jid, password) if jid else mesh.account("sample")
        self.admin = admin or mesh.operator[0]
        self.target = f"{self.jid}/agent"
        self.state = state
        self.proc: subprocess.Popen[str] | None = None

    async def start(self) -> None:
        server = self.mesh.server
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "sample_agent.py"), self.jid, self.password, str(server.port),
             str(server.cert_path), self.broker, self.admin, "/host/sample", str(self.state)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 60)  # type: ignore[union-attr]
        assert line.strip() == "ready", f"the sample agent did not come up (exit {self.proc.poll()})"

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.proc.wait)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
async def sample(mesh, tmp_path):
    agent = SampleProcess(mesh, tmp_path / "sample-state")
    yield agent
    agent.close()


class HeldAgent(SampleAgent):
    """A sample agent with a long op that ends when the test says so (``release``)."""

    release: asyncio.Event

    @op("sample.held", effect="change", deadline=60, progress=True)
    async def held(self, call: Call) -> str:
        """A long op that ends when the test says so."""
        await self.release.wait()
        return "released"


class Notices:
    """What the caller's runtime says about the job (``job_events``)."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.job = ""

    def __call__(self, target: str, job: str, event: str) -> None:
        self.events.append(event)
        self.job = job


async def client_with(mesh: Any, timeouts: Timeouts) -> Client:
    jid, pw = mesh.operator
    return await mesh.start(Client(jid, pw, mesh.endpoint, broker="", timeouts=timeouts))


async def test_a_caller_hears_at_once_that_the_agent_went_offline_mid_job(mesh, sample):
    """Killed and not started again: the call ends unreachable, naming the job, long before its budget
    (120 s) is spent; before agents stopped asking for resumption it ended `timeout` at 120 s."""
    await sample.start()
    client = await client_with(mesh, Timeouts(offline_grace=3.0))
    notices = Notices()
    call = asyncio.create_task(client.request(sample.target, "sample.wait", {"seconds": 300}, timeout=120,
                                              job_events=notices))
    await until(lambda: "accepted" in notices.events, timeout=30, what="the job to be accepted")
    await sample.kill()
    await until(lambda: "offline" in notices.events, timeout=60, what="the caller to hear the agent went offline")
    res = await call
    assert res.outcome is Outcome.UNREACHABLE, res
    assert res.job == notices.job and notices.job in res.error and "went offline" in res.error, res


async def test_a_restarted_agent_reports_the_cut_off_job_interrupted(mesh, sample):
    """Killed and started again within the caller's grace: the caller keeps waiting and gets the job's
    outcome, `interrupted`; the agent keeps the job, and tells its caller about it by id (job.status)."""
    await sample.start()
    client = await client_with(mesh, Timeouts(offline_grace=90.0))
    notices = Notices()
    call = asyncio.create_task(client.request(sample.target, "sample.wait", {"seconds": 300}, timeout=120,
                                              job_events=notices))
    await until(lambda: "accepted" in notices.events, timeout=30, what="the job to be accepted")
    await sample.kill()
    await until(lambda: "offline" in notices.events, timeout=60, what="the caller to hear the agent went offline")
    await sample.start()
    res = await asyncio.wait_for(call, 100)
    assert res.outcome is Outcome.FAILED and res.error.startswith("interrupted:"), res
    assert res.job == notices.job and notices.events[:2] == ["accepted", "offline"], notices.events

    async def status() -> Any:
        answer = await client.request(sample.target, "job.status", {"job": res.job}, timeout=10)
        assert answer.outcome is Outcome.OK, answer
        return answer.result

    # The caller's receipt reaches the agent after the outcome reached the caller.
    shown = await until(lambda: _delivered(status()), timeout=30, what="the outcome's receipt")
    assert shown["state"] == "ended" and shown["condition"] == "interrupted" and shown["op"] == "sample.wait"
    assert re.search("stopped while running sample.wait", shown["error"]), shown

    stranger = await mesh.client(account=mesh.account("stranger"))
    other = await stranger.request(sample.target, "job.status", {"job": res.job}, timeout=10)
    assert other.outcome is Outcome.FAILED and "no job" in other.error, other


async def _delivered(status: Any) -> Any:
    shown = await status
    return shown if shown["delivered"] else None


def vertebra_popen(home: Path, *args: str) -> subprocess.Popen[str]:
    """The real `vertebra` command line, running on while the test goes on."""
    return subprocess.Popen([sys.executable, "-m", "agents.cli", "--home", str(home), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})


async def line_matching(stream: Any, pattern: str, seen: list[str], timeout: float = 60) -> re.Match[str]:
    """Read ``stream`` until a line matches ``pattern`` (every line read goes to ``seen``)."""
    async def read() -> re.Match[str]:
        while line := await asyncio.to_thread(stream.readline):
            seen.append(line)
            if found := re.search(pattern, line):
                return found
        raise AssertionError(f"no line matched {pattern!r} in:\n{''.join(seen)}")
    return await asyncio.wait_for(read(), timeout)


async def test_vertebra_job_wait_reattaches_from_another_terminal(mesh, mesh_home, tmp_path):
    """`vertebra call` prints the job id on `accepted` and that the agent went offline when it is killed;
    `vertebra job wait ID`, started from another terminal, rides out the agent's restart; both end with the
    job's outcome, interrupted, as does `vertebra job show ID` afterwards, also without being told the
    agent (it asks every agent the broker lists)."""
    from agents import config
    from broker.service import Broker

    home = mesh_home([{"name": "sample", "kind": "monitor", "resources": ["/host/sample"]}])
    cfg = config.load(home / "mesh.yaml", home)
    name = cfg.agents[0].name
    broker = await mesh.start(Broker(cfg.jid(cfg.broker), cfg.password(cfg.broker), mesh.endpoint,
                                     authorizer=AdminsOnly([cfg.jid(cfg.operator)]), state_dir=tmp_path / "broker"))
    broker.admit(cfg.jid(name), "sample", ["/host/sample"])
    sample = SampleProcess(mesh, tmp_path / "sample-state", cfg.jid(name), cfg.password(name), cfg.jid(cfg.operator),
                           broker=broker.jid.bare)
    try:
        await sample.start()
        call = vertebra_popen(home, "call", "sample.wait", "seconds=300", "--to", name, "--timeout", "120")
        said: list[str] = []
        accepted = r"accepted the call as job (\w+); .*vertebra job wait \1 --to"
        job = (await line_matching(call.stderr, accepted, said))[1]
        waiter = vertebra_popen(home, "job", "wait", job, "--to", name, "--timeout", "120")
        await sample.kill()
        await line_matching(call.stderr, f"unreachable: the agent went offline while running job {job}", said)
        await sample.start()
        for proc in (call, waiter):
            out, err = await asyncio.to_thread(proc.communicate, timeout=100)
            assert proc.returncode == 1, (proc.args, out, err, said)
            assert "interrupted" in out and "stopped while running sample.wait" in out, (out, err)
        await until(lambda: len(broker.directory) == 1, timeout=30, what="the restarted agent listed")
        for where in (["--to", name], []):
            shown = vertebra_popen(home, "job", "show", job, *where, "--json")
            out, err = await asyncio.to_thread(shown.communicate, timeout=60)
            [status] = [r["result"] for r in json.loads(out)["results"]]
            assert shown.returncode == 1 and status["state"] == "ended" and status["condition"] == "interrupted", out
    finally:
        for proc in [p for p in locals().values() if isinstance(p, subprocess.Popen)]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        sample.close()


async def test_an_outcome_that_could_not_be_sent_reaches_the_caller_when_the_agent_is_back(mesh):
    """The job ends while its agent's connection is down: the outcome is sent once the agent has a session
    again (with its presence, so the caller hears it is back), and the caller's receipt marks it delivered."""
    agent = await mesh.agent(HeldAgent, None, ["/host/held"])
    agent.release = asyncio.Event()
    client = await client_with(mesh, Timeouts(offline_grace=60.0))
    notices = Notices()
    call = asyncio.create_task(client.request(str(agent.jid), "sample.held", {}, timeout=90, job_events=notices))
    await until(lambda: "accepted" in notices.events, what="the job to be accepted")
    agent._reconnect_later = lambda why: None  # stays away until the test connects it again
    agent.xmpp.transport.abort()
    await until(lambda: "offline" in notices.events, what="the caller to hear the agent went offline")
    agent.release.set()
    await until(lambda: notices.job in agent.jobs.delivering, what="the outcome waiting to be sent")
    del agent._reconnect_later
    agent.xmpp.connect(*agent.server_address)
    res = await asyncio.wait_for(call, 60)
    assert res.outcome is Outcome.OK and res.result == "released", res
    assert notices.events == ["accepted", "offline", "back"], notices.events
    job = await until(lambda: _delivered_job(agent, notices.job), what="the caller's receipt")
    assert job.state == "ended" and job.status == "ok"


async def _delivered_job(agent: Any, job_id: str) -> Any:
    job = await agent.jobs.get(job_id)
    return job if job is not None and job.delivered else None


@pytest.mark.each_engine
async def test_an_outcome_in_flight_when_the_server_is_killed_is_sent_again(tmp_path):
    """The XMPP server (a private one of this test's, of the engine under test) is killed with SIGKILL as
    the job ends, so its outcome goes nowhere (or into a dead connection); once the server is back and
    both have new sessions, the agent sends it again, and the caller, still waiting, gets it, and
    acknowledges it."""
    if ON_EJABBERD:
        from agents.ejabberd import PrivateEjabberd

        server: Any = PrivateEjabberd(tmp_path / "server", DOMAIN, port=free_port(), node_name="jobkill@127.0.0.1")
    else:
        server = PrivateServer(tmp_path / "server", domain=DOMAIN, port=free_port())
    server.start()
    actors: list[Any] = []
    try:
        server.register_many({"held": "h-pw", "op": "o-pw"})
        endpoint = Endpoint(server.host, server.port, DOMAIN, server.ssl_context())
        agent = HeldAgent(f"held@{DOMAIN}", "h-pw", endpoint, resources=["/host/held"],
                          authorizer=AdminsOnly([f"op@{DOMAIN}"]), state_dir=tmp_path / "held")
        agent.release = asyncio.Event()
        client = Client(f"op@{DOMAIN}", "o-pw", endpoint, broker="", timeouts=Timeouts(offline_grace=60.0))
        for actor in (agent, client):
            await actor.start()
            actors.append(actor)
        notices = Notices()
        call = asyncio.create_task(client.request(str(agent.jid), "sample.held", {}, timeout=90,
                                                  job_events=notices))
        await until(lambda: "accepted" in notices.events, what="the job to be accepted")
        os.kill(int(server.pidfile.read_text()), signal.SIGKILL)
        agent.release.set()
        await until(lambda: not agent.online and not client.online, what="both to lose the server")
        server.start()
        res = await asyncio.wait_for(call, 80)
        assert res.outcome is Outcome.OK and res.result == "released", res
        assert (await until(lambda: _delivered_job(agent, notices.job), timeout=30, what="the receipt")).status == "ok"
    finally:
        for actor in actors:
            await actor.stop()
        server.stop()


async def test_a_storage_agent_killed_during_a_snapshot_reports_it_interrupted(mesh, tmp_path):
    """A real storage agent (embedded driver) killed with SIGKILL once a snapshot's implementation has run,
    before its job ended: the caller hears it went offline, and after the restart gets `interrupted`."""
    from test_request_ids_restart import AgentProcess

    agent = AgentProcess(mesh, tmp_path, ("embedded", tmp_path / "store"))
    try:
        await agent.start()
        client = await client_with(mesh, Timeouts(offline_grace=90.0))
        made = await client.request(agent.target, "storage.volume.create", {"volume": "v"}, timeout=30)
        assert made.outcome is Outcome.OK, made
        await agent.kill()
        await agent.start("--die-after-running", "storage.snapshot.create")
        notices = Notices()
        call = asyncio.create_task(client.request(agent.target, "storage.snapshot.create",
                                                  {"volume": "v", "snapshot": "s"}, timeout=120, job_events=notices))
        await agent.killed()
        await until(lambda: "offline" in notices.events, timeout=60, what="the caller to hear the agent went offline")
        await agent.start()
        res = await asyncio.wait_for(call, 100)
        assert res.outcome is Outcome.FAILED and res.error.startswith("interrupted:"), res
        assert "stopped while running storage.snapshot.create" in res.error and res.job == notices.job, res
    finally:
        agent.close()


async def test_through_the_local_gateway_the_program_hears_of_the_job_and_gets_its_outcome(mesh, sample):
    """A program calling through the gateway gets the job events as frames (accepted, offline, back) and
    the job id in its report, across a kill -9 and restart of the agent."""
    from agents.gateway import Gateway, call_via_gateway

    await sample.start()
    gw = Gateway(Path(tempfile.mkdtemp(prefix="vgw-")) / "run" / "gateway.sock", mesh.endpoint, "")
    await gw.start()
    try:
        notices = Notices()
        call = asyncio.create_task(call_via_gateway(
            gw.path, *mesh.operator, {"op": "sample.wait", "args": {"seconds": 300}, "to": [sample.target],
                                      "timeout": 120.0}, job_events=notices))
        await until(lambda: "accepted" in notices.events, timeout=30, what="the job to be accepted")
        await sample.kill()
        await until(lambda: "offline" in notices.events, timeout=60, what="the program to hear the agent went offline")
        await sample.start()
        report = await asyncio.wait_for(call, 100)
        [res] = report.results
        assert res.outcome is Outcome.FAILED and res.error.startswith("interrupted:") and res.job == notices.job, res
    finally:
        await gw.stop()
