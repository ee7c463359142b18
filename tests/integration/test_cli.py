"""The `vertebra` command line against a real mesh: broker and agents as their own processes."""

from __future__ import annotations

import grp
import json
import shutil
import stat
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, running, until, vertebra

from agents import config
from agents.client import Client
from agents.kinds import catalogue
from broker.chat import help_for

AGENTS = [{"name": "store", "kind": "storage", "resources": ["/host/cli", "/pool/cli"]},
          {"name": "mon", "kind": "monitor", "resources": ["/host/cli"], "gateway": True}]


@pytest.fixture
def running_mesh(mesh_home):
    home = mesh_home(AGENTS)
    with running(home, expect_agents=2) as cfg:
        yield home, cfg


def test_agents_lists_live_agents_with_ops_and_resources(running_mesh):
    home, cfg = running_mesh
    out = vertebra(home, "agents")
    assert out.returncode == 0, out.stderr
    store = cfg["agents"][0]["name"]
    assert f"{store}@vertebra.test/agent  (storage)" in out.stdout
    assert "/host/cli /pool/cli" in out.stdout and "storage.info" in out.stdout
    assert "2 live agents" in out.stdout


def test_call_json_and_exit_codes(running_mesh):
    home, cfg = running_mesh
    ok = vertebra(home, "call", "storage.info", "--json")
    assert ok.returncode == 0, ok.stderr
    results = json.loads(ok.stdout)["results"]
    assert len(results) == 1
    assert set(results[0]) == {"target", "outcome", "result", "error"}
    assert results[0]["outcome"] == "ok" and results[0]["result"]["kind"] == "storage"

    both = vertebra(home, "call", "monitor.info", "--on", "/host/cli")
    assert both.returncode == 0 and both.stdout.startswith("mon")
    assert "\nmonitor.info: 1 of 1 ok in " in both.stdout

    nowhere = vertebra(home, "call", "storage.info", "--on", "/host/elsewhere", "--json")
    assert nowhere.returncode == 6
    assert json.loads(nowhere.stdout)["results"][0]["outcome"] == "not-discovered"

    bad_arg = vertebra(home, "call", "storage.info", "colour=red")
    assert bad_arg.returncode == 2 and "unknown argument 'colour'" in bad_arg.stderr

    bad_path = vertebra(home, "call", "storage.info", "--on", "/pool/../etc")
    assert bad_path.returncode == 2 and "'..'" in bad_path.stderr

    store = cfg["agents"][0]["name"]
    unknown = vertebra(home, "call", "storage.frobnicate", "--to", store, "--json")
    assert unknown.returncode == 1
    assert "unknown-op" in json.loads(unknown.stdout)["results"][0]["error"]

    gone = vertebra(home, "call", "storage.info", "--to", "nobody-here", "--json")
    assert gone.returncode == 5
    assert json.loads(gone.stdout)["results"][0]["outcome"] == "unreachable"


def test_results_read_as_tables_and_blocks_with_a_summary_line(running_mesh):
    """What an op declares of its result (published with its description) is how the CLI prints it:
    a list as a table of the declared columns, a map as labelled lines, and a summary line; a check's
    state is counted as such; --json and --yaml carry the whole result."""
    home, _cfg = running_mesh
    made = vertebra(home, "call", "storage.volume.create", "volume=db")
    assert made.returncode == 0, made.stdout + made.stderr
    assert "  volume:    db" in made.stdout.splitlines() and "storage.volume.create: 1 of 1 ok in " in made.stdout
    listed = vertebra(home, "call", "storage.volume.list")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:4] == ["VOLUME", "KIND", "USED", "EXCLUSIVE"], listed.stdout
    assert lines[1].split()[:2] == ["db", "volume"] and lines[1].split()[3] in ("B", "KiB"), listed.stdout
    assert lines[-1].startswith("storage.volume.list: 1 of 1 ok in ") and "{" not in listed.stdout
    as_yaml = yaml.safe_load(vertebra(home, "call", "storage.volume.list", "--yaml").stdout)
    assert [v["name"] for v in as_yaml["results"][0]["result"]] == ["db"]

    check = vertebra(home, "call", "monitor.check", "--on", "/host/cli", "check=dummy", "args=state=2",
                     "args=text=disk on fire")
    assert check.returncode == 0, check.stdout + check.stderr  # the call worked: the check's state is its answer
    assert "  state:    CRITICAL" in check.stdout.splitlines() and "disk on fire" in check.stdout
    last = check.stdout.splitlines()[-1]
    assert last.startswith("monitor.check: 1 of 1 CRITICAL in ") and " ok" not in last

    checks = vertebra(home, "call", "monitor.list", "--on", "/host/cli")
    assert checks.returncode == 0 and "  checks:" in checks.stdout.splitlines(), checks.stdout
    assert max(map(len, checks.stdout.splitlines())) < 400, checks.stdout  # not one line of JSON


def test_options_and_pairs_mix_in_any_order_and_timeouts_must_be_positive(running_mesh):
    home, _cfg = running_mesh
    # The form `vertebra help OP` prints: options first, then key=value.
    mixed = vertebra(home, "call", "storage.volume.list", "--on", "/pool/cli", "--json")
    assert mixed.returncode == 0, mixed.stderr
    after = vertebra(home, "call", "storage.info", "--on", "/host/cli", "colour=red", "--json")
    assert after.returncode == 2 and "unknown argument 'colour'" in after.stderr  # the pair reached the op

    stray = vertebra(home, "call", "storage.info", "--on", "/host/cli", "stray")
    assert stray.returncode == 2 and "unrecognized arguments: stray" in stray.stderr
    for bad in ("0", "-1", "nan", "inf", "soon"):
        refused = vertebra(home, "call", "storage.volume.create", "volume=never", "--timeout", bad)
        assert refused.returncode == 2 and "--timeout" in refused.stderr, (bad, refused.stderr)
    listed = vertebra(home, "call", "storage.volume.list", "--json")
    assert "never" not in listed.stdout  # a refused command line sent nothing


def test_gateway_socket_is_owner_only_and_keeps_the_callers_identity(running_mesh, server):
    home, cfg = running_mesh
    sock = home / "run" / "gateway.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    try:  # with the group vertebra (deploy/install.sh makes it), its members may connect; else nobody else
        group = grp.getgrnam("vertebra").gr_gid
    except KeyError:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    else:
        assert (stat.S_IMODE(sock.stat().st_mode), sock.stat().st_gid) == (0o660, group)
        assert (stat.S_IMODE(sock.parent.stat().st_mode), sock.parent.stat().st_gid) == (0o750, group)
    info = vertebra(home, "call", "storage.info", "--json")
    assert json.loads(info.stdout)["results"][0]["outcome"] == "ok"

    # Another identity through the same gateway is still itself, and the agents deny it.
    intruder = dict(cfg, operator="intruder" + cfg["operator"])
    (home / "intruder.yaml").write_text(yaml.safe_dump(intruder))
    server.register(intruder["operator"], "intruder-pw")
    (home / "secrets" / f"{intruder['operator']}.password").write_text("intruder-pw")
    denied = vertebra(home, "--mesh", str(home / "intruder.yaml"), "call", "storage.info", "--json")
    assert denied.returncode == 3, denied.stdout + denied.stderr
    assert json.loads(denied.stdout)["results"][0]["outcome"] == "denied"
    assert "may not read storage.info's description" in denied.stderr  # nor its description: said, not silent


def test_direct_login_when_no_gateway_runs(running_mesh, tmp_path):
    home, _ = running_mesh
    other = tmp_path / "nogateway"
    shutil.copytree(home, other, ignore=shutil.ignore_patterns("run", "*.sock"))
    out = vertebra(other, "call", "storage.info", "--json")
    assert out.returncode == 0, out.stderr
    assert not (other / "run").exists()


def test_unreachable_server_is_a_named_outcome_not_a_hang(mesh_home):
    home = mesh_home(AGENTS)
    cfg = yaml.safe_load((home / "mesh.yaml").read_text())
    cfg["server"]["port"] = 1  # nothing listens there
    (home / "mesh.yaml").write_text(yaml.safe_dump(cfg))
    out = vertebra(home, "call", "storage.info", "--timeout", "3", "--json")
    assert out.returncode == 5
    assert json.loads(out.stdout)["results"][0]["outcome"] == "unreachable"


def test_a_broker_instance_the_mesh_has_no_node_for_is_refused(mesh_home):
    home = mesh_home(AGENTS)
    nodes = len(yaml.safe_load((home / "mesh.yaml").read_text())["server"].get("nodes", [])) + 1
    out = vertebra(home, "broker", "--instance", str(nodes + 1))
    assert out.returncode == 2
    assert f"broker instance {nodes + 1}: the mesh file's server has {nodes} node(s)" in out.stderr


def test_help_is_what_the_live_agents_describe(mesh_home, tmp_path):
    fencing = {"cluster": "c1", "fencing": {"devices": {"pdu": {"agent": "fence_dummy", "params": {
        "type": "file", "status_file": str(tmp_path / "s")}}}, "levels": {"node1": [["pdu"]]}}}
    home = mesh_home([*AGENTS, {"name": "fence", "kind": "fencing", "resources": ["/host/f"], "settings": fencing}])
    with running(home, expect_agents=3):
        out = vertebra(home, "help", "mesh.discover")
        assert out.returncode == 0, out.stderr
        assert "resources=list of string" in out.stdout and "only agents offering this op" in out.stdout
        # An agent's op, from the agent's disco node: the same text its declaration gives.
        created = vertebra(home, "help", "storage.volume.create")
        assert created.returncode == 0, created.stderr
        assert created.stdout.strip() == catalogue()["storage.volume.create"].help_text()
        listing = vertebra(home, "help")
        assert "storage.info" in listing.stdout and "fencing.info" in listing.stdout
        assert "monitor.check" in listing.stdout
        missing = vertebra(home, "help", "storage.nope")
        assert missing.returncode == 2 and "no op named" in missing.stderr
    # No mesh running: a clear message, not a traceback, and no kind's code loaded to give it.
    down = vertebra(home, "help", "storage.info", "--timeout", "2")
    assert down.returncode == 5 and "start the mesh" in down.stderr, down.stderr


async def test_chat_bot_beside_the_broker_describes_the_live_agents_ops(mesh_home, server):
    """The bot `vertebra broker` starts (the mesh file's chat:) is given no ops: it offers what the
    broker and the live agents describe."""
    home = mesh_home(AGENTS)
    cfg = yaml.safe_load((home / "mesh.yaml").read_text())
    cfg["chat"] = {"account": "bot" + cfg["broker"].removeprefix("broker")}
    (home / "mesh.yaml").write_text(yaml.safe_dump(cfg))
    mesh = config.load(home / "mesh.yaml", home)
    server.register_many(mesh.ensure_passwords())
    with running(home, expect_agents=2):
        me = Client(mesh.jid(mesh.operator), mesh.password(mesh.operator), mesh.endpoint(), broker=mesh.broker_jids)
        got: list[str] = []
        me.on_event("message", lambda m: got.append(m["body"]) if m["body"] else None)
        await me.start(timeout=10)
        try:
            bot = mesh.jid(mesh.chat.account)
            me.xmpp.send_message(mto=bot, mbody="help storage.volume.create", mtype="chat")
            answer = await until(lambda: next(iter(got), None), 20, "the bot's help")
            assert answer == help_for(catalogue()["storage.volume.create"])
            me.xmpp.send_message(mto=bot, mbody="help", mtype="chat")
            listing = await until(lambda: next((b for b in got if "commands:" in b), None), 20, "the bot's list")
            assert "storage.info" in listing and "monitor.check" in listing and "mesh.agents" in listing
            assert "fencing.info" not in listing  # no fencing agent is live
        finally:
            await me.stop()


@pytest.mark.parametrize("command", [["help", "storage.info"], ["call", "storage.info"],
                                     ["workflow", "list"]])
def test_help_call_and_workflow_load_no_kind_code(running_mesh, command):
    home, _cfg = running_mesh
    probe = ("import sys, agents.cli; code = agents.cli.main(sys.argv[1:]);"
             " print(code, sorted(m for m in sys.modules if m.split('.')[0] in ('blake3', 'zstandard', 'casbin',"
             " 'broker') or m.startswith(('agents.storage', 'agents.fencing', 'agents.monitor'))))")
    out = subprocess.run([sys.executable, "-c", probe, "--home", str(home), *command], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    code, loaded = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert loaded == "[]", out.stdout + out.stderr
    assert code == "0", out.stdout + out.stderr


def test_bad_mesh_file_names_the_field(tmp_path):
    (tmp_path / "mesh.yaml").write_text("agents:\n  - name: a1\n    kind: toaster\n")
    out = vertebra(tmp_path, "agents")
    assert out.returncode == 2
    assert "agents[0].kind: expected one of fencing, monitor, storage, got 'toaster'" in out.stderr
