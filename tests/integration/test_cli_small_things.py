"""The small things a new user hits with the `vertebra` command line, each as that user meets it: the
real command line, in its own process, against a state directory (and, where it asks the mesh, the
broker and agents running as processes on the test server)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, free_port, running, until, vertebra

from agents import config

from agents.audit import AuditLog
from agents.client import Client

AGENTS = [{"name": "store", "kind": "storage", "resources": ["/host/small", "/pool/small"]}]


def audit_home(mesh_home, records_ago: dict[str, float]):
    """A state directory whose agent `store...` has an audit log with one request per rid, recorded
    that many seconds ago."""
    home = mesh_home(AGENTS)
    agent = yaml.safe_load((home / "mesh.yaml").read_text())["agents"][0]["name"]
    now = time.time()
    clock = {"at": now}
    log = AuditLog(home / "state" / agent / "audit.sqlite", clock=lambda: clock["at"])
    for rid, ago in sorted(records_ago.items(), key=lambda item: -item[1]):
        clock["at"] = now - ago
        log.decided(rid=rid, caller="alice@x.test", op="storage.info", resources=[], args={}, secret=(),
                    allowed=True, rule="mesh admins", version=0)
    log.db.close()
    return home, agent


def cli(home, *args: str, shell_tail: str = "") -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "agents.cli", "--home", str(home), *args]
    if shell_tail:  # through a shell, so a pipe ends where it does for a user
        import shlex
        return subprocess.run(" ".join(map(shlex.quote, command)) + " " + shell_tail, shell=True, cwd=ROOT,
                              capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("since, shown", [("10m", ["new"]), ("3h", ["new", "old"]), ("2H", ["new"]),
                                          ("90s", ["new"]), ("1d", ["new", "old", "older"])])
def test_audit_show_since_takes_a_time_ago(mesh_home, since, shown):
    home, agent = audit_home(mesh_home, {"new": 60, "old": 3 * 3600 - 600, "older": 5 * 3600})
    out = cli(home, "audit", "show", "--agent", agent, "--since", since)
    assert out.returncode == 0, out.stderr
    assert [rid for rid in ("new", "old", "older") if f"rid {rid})" in out.stdout] == shown


def test_audit_show_since_takes_what_its_help_says(mesh_home):
    home, agent = audit_home(mesh_home, {"new": 60, "old": 7200})
    hour_ago = time.time() - 3600
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(hour_ago))
    for since in (str(int(hour_ago)), iso, iso + "+00:00"):
        out = cli(home, "audit", "show", "--agent", agent, "--since", since)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert "rid new)" in out.stdout and "rid old)" not in out.stdout, since
    out = cli(home, "audit", "show", "--agent", agent, "--until", "30m")
    assert "rid old)" in out.stdout and "rid new)" not in out.stdout
    assert "a time ago (10m, 2h, 3d)" in cli(home, "audit", "--help").stdout
    bad = cli(home, "audit", "show", "--since", "yesterday")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--since: expected a time ago (30s, 10m, 2h, 3d, 1w), epoch seconds or ISO 8601" in bad.stderr


def test_audit_show_of_an_unknown_agent_or_into_head_gives_no_traceback(mesh_home):
    home, agent = audit_home(mesh_home, {f"r{i}": 10 for i in range(3000)})  # more than a pipe's buffer
    out = cli(home, "audit", "show", "--agent", "nosuch")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"no audit log for nosuch under {home / 'state'} (the logs there: {agent})" in out.stderr
    piped = cli(home, "audit", "show", shell_tail="| head -2")
    assert piped.stdout.splitlines()[0] == f"== {agent}" and len(piped.stdout.splitlines()) == 2
    assert piped.stderr == ""


def test_storage_replicate_takes_the_targets_short_name_as_call_to_does(mesh_home):
    home = mesh_home([{"name": "src", "kind": "storage", "resources": ["/host/src", "/pool/src"]},
                      {"name": "dst", "kind": "storage", "resources": ["/host/dst", "/pool/dst"]}])
    cfg = yaml.safe_load((home / "mesh.yaml").read_text())
    src, dst = (a["name"] for a in cfg["agents"])
    cfg["admins"].append(src)  # the source sends the target its snapshot (a policy would grant just that)
    (home / "mesh.yaml").write_text(yaml.safe_dump(cfg))
    with running(home, expect_agents=2):
        made = vertebra(home, "call", "storage.volume.create", "volume=db", "--to", src)
        assert made.returncode == 0, made.stderr
        out = vertebra(home, "call", "storage.replicate", "volume=db", f"target={dst}", "package=db-copy",
                       "--to", src, "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        (result,) = json.loads(out.stdout)["results"]
        assert result["result"]["target"].startswith(f"{dst}@{cfg['server']['domain']}")
        packages = vertebra(home, "call", "storage.package.list", "--to", dst, "--json")
        assert [p["package"] for p in json.loads(packages.stdout)["results"][0]["result"]] == ["db-copy"]
        assert "its name in the mesh file" in vertebra(home, "help", "storage.replicate").stdout


def test_a_stopped_server_is_said_at_once_not_after_the_login_timeout(mesh_home):
    home = mesh_home(AGENTS)
    cfg = yaml.safe_load((home / "mesh.yaml").read_text())
    # A port held bound but never listening: connecting is refused, and no server started meanwhile by
    # a test running beside this one (the two engines' suites run at once in CI) can take it.
    held = socket.socket()
    held.bind((cfg["server"]["host"], 0))
    cfg["server"]["port"] = held.getsockname()[1]
    cfg["server"].pop("nodes", None)  # on the ejabberd cluster, no other node to fall back on either
    (home / "mesh.yaml").write_text(yaml.safe_dump(cfg))
    with held:
        _refused_at_once(home, cfg)


def _refused_at_once(home, cfg) -> None:
    for command in (["agents"], ["call", "storage.info"], ["help"]):
        out = vertebra(home, *command)
        assert out.returncode == 5, out.stdout + out.stderr
        # Refused, so it gave up there: not "no session ... within 10s" after waiting the login timeout out.
        assert f"no server accepts connections at {cfg['server']['host']}:{cfg['server']['port']}" in (
            out.stdout + out.stderr)
        assert "within" not in out.stdout + out.stderr


def test_server_status_and_stop_find_an_ejabberd_node_started_with_engine_and_speak_words(tmp_path):
    from agents.ejabberd import ejabberd_installed

    if not ejabberd_installed():
        pytest.skip("ejabberd is not installed: run `apt-get install -y ejabberd`")
    home = tmp_path / "home"
    home.mkdir()
    # The mesh file says nothing of the engine (Prosody); the node is started with --engine ejabberd.
    mesh = {"server": {"domain": "vertebra.test", "host": "127.0.0.1", "port": free_port(),
                       "node_name": f"small{os.getpid()}@127.0.0.1"},
            "broker": "broker", "operator": "operator", "admins": ["operator"], "agents": []}
    (home / "mesh.yaml").write_text(yaml.safe_dump(mesh))
    started = vertebra(home, "server", "start", "--engine", "ejabberd", timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        status = vertebra(home, "server", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.startswith(f"running: private Ejabberd node {mesh['server']['node_name']} (pid ")
        assert "{" not in status.stdout  # words, not a Python dict
        stopped = vertebra(home, "server", "stop", timeout=120)
        assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped", stopped.stdout + stopped.stderr
    finally:
        vertebra(home, "server", "stop", "--engine", "ejabberd", timeout=120)
    after = vertebra(home, "server", "status")
    # Not 3 or 5 (denied, unreachable in the call table): a script tells "stopped" from a call's outcome.
    assert after.returncode == 7 and after.stdout.startswith(f"stopped: no private Prosody runs for {home}")


@pytest.fixture
def small_mesh(mesh_home):
    home = mesh_home(AGENTS)
    with running(home, expect_agents=1) as cfg:
        yield home, cfg


def test_a_misspelled_op_gets_did_you_mean_and_nothing_is_sent(small_mesh):
    home, _ = small_mesh
    out = vertebra(home, "call", "storage.infoo")
    assert out.returncode == 6  # not discovered, as when the call finds no agent
    assert ("vertebra: no op named 'storage.infoo' is offered by the broker or a live agent; did you mean"
            " storage.info?") in out.stderr
    assert "request id" not in out.stderr  # nothing was sent, so there is nothing to retry
    helped = vertebra(home, "help", "storage.snapshot.creat")
    assert helped.returncode == 2 and "did you mean storage.snapshot.create?" in helped.stderr
    far = vertebra(home, "help", "toaster.toast")
    assert far.returncode == 2 and "did you mean" not in far.stderr and "`vertebra help` lists" in far.stderr


def test_a_broker_op_says_and_goes_to_the_broker(small_mesh):
    home, cfg = small_mesh
    helped = vertebra(home, "help", "mesh.alerts")
    assert helped.stdout.splitlines()[-1] == f"usage: vertebra call mesh.alerts --to {cfg['broker']}"
    assert "usage: vertebra call storage.volume.create [--on RESOURCE ...]" in vertebra(
        home, "help", "storage.volume.create").stdout
    # Without --to it still reaches the broker (discovery finds agents, and the broker is not one).
    out = vertebra(home, "call", "mesh.alerts")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == ["no alerts", out.stdout.splitlines()[-1]]
    assert out.stdout.splitlines()[-1].startswith("mesh.alerts: 1 of 1 ok in ")
    direct = vertebra(home, "call", "mesh.alerts", "--to", cfg["broker"])
    assert direct.returncode == 0 and direct.stdout.startswith("no alerts\n")
    # An op the agents serve as well as the broker goes to the agents, as discovery finds them.
    agent = cfg["agents"][0]["name"]
    assert "[--on RESOURCE ...]" in vertebra(home, "help", "job.status").stdout
    job = vertebra(home, "call", "job.status", "job=nosuch", "--json")
    assert [r["target"].split("@")[0] for r in json.loads(job.stdout)["results"]] == [agent], job.stdout


def test_a_value_out_of_its_form_is_told_in_words_not_as_a_regular_expression(small_mesh):
    home, _ = small_mesh
    out = vertebra(home, "call", "storage.volume.create", "volume=bad name!")
    assert out.returncode == 2
    assert ("argument 'volume' must match the form it takes, got 'bad name!': volume name (1-64 of A-Z a-z 0-9"
            " _ . -, starting with a letter or digit, no '..')") in out.stderr
    assert "[A-Za-z" not in out.stderr and "(?!" not in out.stderr
    instance = vertebra(home, "workflow", "status", "not-an-id")
    assert instance.returncode == 2 and "got 'not-an-id': the instance id: 12 hex digits" in instance.stderr
    assert "[0-9a-f]" not in instance.stderr
    # A bound on one side only reads as such, not "between 0 and None".
    since = vertebra(home, "call", "mesh.alerts", "since=-1")
    assert since.returncode == 2 and "argument 'since' must be at least 0, got -1" in since.stderr


INTERNAL = ("policy.install", "fenced.install", "storage.package.receive", "storage.package.commit", "mesh.volumes",
            "mesh.audit.anchor", "mesh.storage.notice", "mesh.fence.event", "fence.ledger")


def test_ops_the_mesh_sends_itself_are_not_offered_to_people(small_mesh):
    home, _ = small_mesh
    listed = vertebra(home, "agents")
    assert listed.returncode == 0 and "storage.volume.create" in listed.stdout and "job.status" in listed.stdout
    helped = vertebra(home, "help")
    assert helped.returncode == 0 and "storage.volume.create" in helped.stdout
    names = {line.split()[0] for line in helped.stdout.splitlines()}
    for internal in INTERNAL:
        assert internal not in listed.stdout.split() and internal not in names, internal
    # Still described when asked by name (an operator tracing a replication reads what the source sent).
    described = vertebra(home, "help", "storage.package.receive")
    assert described.returncode == 0 and described.stdout.startswith("storage.package.receive - ")


async def test_the_chat_bot_does_not_offer_them_either(mesh_home, server):
    home = mesh_home(AGENTS)
    cfg = yaml.safe_load((home / "mesh.yaml").read_text())
    cfg["chat"] = {"account": "bot" + cfg["broker"].removeprefix("broker")}
    (home / "mesh.yaml").write_text(yaml.safe_dump(cfg))
    mesh = config.load(home / "mesh.yaml", home)
    server.register_many(mesh.ensure_passwords())
    with running(home, expect_agents=1):
        me = Client(mesh.jid(mesh.operator), mesh.password(mesh.operator), mesh.endpoint(), broker=mesh.broker_jids)
        got: list[str] = []
        me.on_event("message", lambda m: got.append(m["body"]) if m["body"] else None)
        await me.start(timeout=10)
        try:
            me.xmpp.send_message(mto=mesh.jid(mesh.chat.account), mbody="help", mtype="chat")
            listing = await until(lambda: next((b for b in got if "commands:" in b), None), 20, "the bot's list")
            assert "storage.volume.create" in listing
            for internal in INTERNAL:
                assert f" {internal} " not in listing, internal
        finally:
            await me.stop()


FAILING_WORKFLOW = """
name: clone-missing
description: Clone a snapshot the volume does not have (it fails at once).
params:
  volume: {help: "the volume"}
steps:
  - name: clone
    op: storage.clone.create
    on: ["/volume/{volume}"]
    args: {volume: "{volume}", snapshot: "nosuch", clone: "{volume}-copy"}
"""


def test_workflow_run_of_a_workflow_that_fails_exits_non_zero(mesh_home):
    home = mesh_home(AGENTS)
    (home / "workflows").mkdir()
    (home / "workflows" / "clone-missing.yaml").write_text(FAILING_WORKFLOW)
    with running(home, expect_agents=1):
        made = vertebra(home, "call", "storage.volume.create", "volume=db")
        assert made.returncode == 0, made.stderr
        run = vertebra(home, "workflow", "run", "clone-missing", "volume=db")
        # The op answered (the broker ran it), but the workflow did not do what was asked.
        assert run.returncode == 1, run.stdout + run.stderr
        assert re.search(r"^  state: +failed$", run.stdout, re.M), run.stdout
        assert "nosuch" in run.stdout
        # Its request id, printed before it was sent, retries it: the same instance answers, none starts.
        rid = re.search(r"^vertebra: request id (\S+); to retry this call", run.stderr, re.M)
        assert rid, run.stderr
        first = re.search(r"^  instance: +(\S+)$", run.stdout, re.M)
        again = vertebra(home, "workflow", "run", "clone-missing", "volume=db", "--request-id", rid[1], "--json")
        assert again.returncode == 1, again.stdout + again.stderr
        assert first and json.loads(again.stdout)["results"][0]["result"]["instance"] == first[1], again.stdout
        listed = vertebra(home, "workflow", "list", "--json")
        assert len(json.loads(listed.stdout)["results"][0]["result"]["instances"]) == 1, listed.stdout
