"""End to end with a real Nagios 4: an active service whose command is check_vertebra reaches a
monitor agent through the mesh, and passive services receive a scheduled result through the
bridge, once by the external command file and once by the check result spool directory. Broker and
agents run as their own processes, as `vertebra agent` runs them.

Nagios runs as a site runs it: started as root, it drops to user ``nagios`` (its group here is
``vertebra``, which may reach the gateway socket, as ``usermod -aG vertebra nagios`` gives it on a
site) and runs check_vertebra as nagios, with an interpreter and code nagios can read
(tests/readable_python.py). The gateway knows nagios by its uid and calls as the mesh file's nagios
service identity, which the policy lets run checks only; the audit shows its calls under that name.
The state directory lives outside pytest's root-only temporary tree, where nagios can reach it."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from agents.monitor.output import parse_output
from conftest import DOMAIN, running, vertebra
from nagios_instance import NAGIOS, Nagios, command, host, service
from readable_python import python_for_others

DUMMY = "/usr/lib/nagios/plugins/check_dummy"
CHECK_VERTEBRA = Path(sys.executable).with_name("check_vertebra")

GROUP = "vertebra"


def _user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not (Path(NAGIOS).exists() and Path(DUMMY).exists() and CHECK_VERTEBRA.exists()) or os.geteuid() != 0
    or not _user("nagios"),
    reason="needs root, nagios4-core (and its user nagios), monitoring-plugins-basic and the installed check_vertebra")


def _agents(command_file: Path, spool: Path) -> list[dict]:
    return [
        {"name": "mon", "kind": "monitor", "resources": ["/host/web1", "/cluster/e2e/web1"], "gateway": True,
         "settings": {"checks": {"svc": {"plugin": DUMMY, "args": ["1", "slow | latency=0.5s;0.3;1;0"]}}}},
        {"name": "pub", "kind": "monitor", "resources": ["/host/web2", "/cluster/e2e/web2"],
         "settings": {"checks": {"svc": {"plugin": DUMMY, "args": ["0", "fine | latency=0.1s;0.3;1;0"]},
                                 "pas": {"plugin": DUMMY, "args": ["2", "passive problem | q=3"]}},
                      "schedule": {"pas": {"interval": 0.3, "repeats": 1}}}},
        {"name": "bridge", "kind": "monitor", "resources": ["/host/nagios"],
         "settings": {"checks": {}, "nagios": {"command_file": str(command_file), "hosts": {"placeholder": "web1"},
                                               "services": {"pas": "Passive Check"}}}},
        {"name": "spool", "kind": "monitor", "resources": ["/host/nagios-spool"],
         "settings": {"checks": {}, "nagios": {"check_result_path": str(spool), "hosts": {"placeholder": "web1"},
                                               "services": {"pas": "Spooled Check"}}}},
    ]


@pytest.fixture
def running_mesh(mesh_home, server):
    """The mesh in a state directory nagios can reach (/tmp), Nagios's own directory nagios's; yields both
    and the nagios service identity's JID."""
    try:
        gid = grp.getgrnam(GROUP).gr_gid
    except KeyError:  # as deploy/install.sh makes it
        subprocess.run(["groupadd", "--system", GROUP], check=True)
        gid = grp.getgrnam(GROUP).gr_gid
    nagios_user = pwd.getpwnam("nagios")
    site = Path(tempfile.mkdtemp(prefix="vne-", dir="/tmp"))
    try:
        nagios_dir = site / "nagios"
        (nagios_dir / "checkresults").mkdir(parents=True)
        os.chown(nagios_dir / "checkresults", nagios_user.pw_uid, gid)
        made = mesh_home(_agents(nagios_dir / "nagios.cmd", nagios_dir / "checkresults"))
        home = site / "home"
        shutil.copytree(made, home)
        os.chmod(site, 0o755)
        cfg = yaml.safe_load((home / "mesh.yaml").read_text())
        mon, pub, bridge, spool = (a["name"] for a in cfg["agents"])
        # Names get a per-test suffix: wire the publisher to the bridges now that all are known.
        cfg["agents"][1]["settings"]["publish_to"] = [bridge, spool]
        cfg["agents"][2]["settings"]["nagios"]["hosts"] = {pub: "web1"}
        cfg["agents"][3]["settings"]["nagios"]["hosts"] = {pub: "web1"}
        nagios = f"nagios-{cfg['operator'].removeprefix('operator')}"
        cfg["services"] = [{"name": nagios, "unix_user": "nagios"}]
        cfg["policy"] = "policy.yaml"
        (home / "policy.yaml").write_text(yaml.safe_dump({  # the example policy's grant for Nagios
            "roles": {"admin": {}, "nagios": {}},
            "members": {"admin": [f"{cfg['operator']}@{DOMAIN}"], "nagios": [f"{nagios}@{DOMAIN}"]},
            "grants": [{"role": "admin", "ops": ["**"]},
                       {"role": "nagios", "ops": ["mesh.discover", "monitor.check"]}]}))
        (home / "mesh.yaml").write_text(yaml.safe_dump(cfg))
        from agents import config

        server.register_many(config.load(home / "mesh.yaml", home).ensure_passwords())
        with running(home, expect_agents=4):
            yield home, nagios_dir, f"{nagios}@{DOMAIN}"
    finally:
        shutil.rmtree(site, ignore_errors=True)


def check_vertebra(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CHECK_VERTEBRA), "--home", str(home), *args], capture_output=True, text=True,
                          timeout=60, cwd="/")


def test_nagios_runs_check_vertebra_and_receives_bridged_results(running_mesh):
    home, nagios_dir, nagios_jid = running_mesh
    python, env = python_for_others()
    run = " ".join(["/usr/bin/env", *(f"{k}={v}" for k, v in env.items()), python, "-m",
                    "agents.monitor.check_vertebra"])
    objects = (command("check_vertebra", f"{run} --home {home} -H $HOSTNAME$ -c $ARG1$ -t 20")
               + host("web1") + service("web1", "Mesh Service", "check_vertebra!svc")
               + service("web1", "Passive Check", "host-up", active=False)
               + service("web1", "Spooled Check", "host-up", active=False))
    nagios = Nagios(nagios_dir, objects, user="nagios", group=GROUP)
    nagios.verify()
    nagios.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = nagios.services()
            active = status.get(("web1", "Mesh Service"), {})
            passive = status.get(("web1", "Passive Check"), {})
            spooled = status.get(("web1", "Spooled Check"), {})
            if all(s.get("has_been_checked") == "1" for s in (active, passive, spooled)):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"nagios recorded no results: {nagios.services()}\n{nagios.log()}")
        assert nagios.proc is not None
        uids = next(line for line in Path(f"/proc/{nagios.proc.pid}/status").read_text().splitlines()
                    if line.startswith("Uid:")).split()[1:]
    finally:
        nagios.stop()
    assert active["current_state"] == "1", active
    assert active["plugin_output"] == "WARNING: slow"
    assert active["performance_data"] == "latency=0.5s;0.3;1;0"
    assert active["check_type"] == "0"  # active
    assert passive["current_state"] == "2", passive
    assert passive["plugin_output"] == "CRITICAL: passive problem"
    assert passive["performance_data"] == "q=3"
    assert passive["check_type"] == "1"  # passive
    assert spooled["current_state"] == "2", spooled
    assert spooled["plugin_output"] == "CRITICAL: passive problem"
    assert spooled["performance_data"] == "q=3"
    assert spooled["check_type"] == "1"  # passive
    assert float(spooled["check_latency"]) < 30 and float(spooled["check_execution_time"]) < 30
    # Nagios took the files it read away, with their markers; none is left half-written.
    left = [p.name for p in (nagios_dir / "checkresults").iterdir()]
    assert all(name.startswith("c") and len(name) in (7, 10) for name in left), left
    # Nagios ran as nagios, and its checks went out as the nagios identity, not the operator.
    assert set(uids) == {str(pwd.getpwnam("nagios").pw_uid)}, uids
    audited = vertebra(home, "audit", "show", "--caller", nagios_jid, "--op", "monitor.check")
    assert "monitor.check" in audited.stdout, audited.stdout + audited.stderr


def test_check_vertebra_exit_codes_aggregate_and_mesh_problems(running_mesh, tmp_path):
    home, _, _ = running_mesh
    one = check_vertebra(home, "-H", "web1", "-c", "svc")
    assert (one.returncode, one.stdout) == (1, "WARNING: slow|latency=0.5s;0.3;1;0\n")

    many = check_vertebra(home, "-R", "/cluster/e2e", "-c", "svc")
    assert many.returncode == 1, many.stdout
    assert many.stdout.splitlines()[0] == ("WARNING - 1 OK, 1 WARNING (web1)|web1:latency=0.5s;0.3;1;0"
                                           " web2:latency=0.1s;0.3;1;0")

    nobody = check_vertebra(home, "-H", "nosuchhost", "-c", "svc", "-t", "5")
    assert nobody.returncode == 3
    assert nobody.stdout.startswith("UNKNOWN - check_vertebra: not-discovered on /host/nosuchhost")
    bad = check_vertebra(home, "-H", "web1", "-c", "svc", "-a", "evil=1")
    assert bad.returncode == 3 and "does not take argument(s) 'evil'" in bad.stdout

    # A caller's value with a bar, echoed back in the answer, and the usage text: nothing follows a bar
    # but perfdata (here none), and there is no space before one.
    for args in (["-H", "web1", "-c", "no|such"], ["-H", "web1", "-c", "svc", "-a", "evil=a|b"],
                 ["-H", "web|1", "-c", "svc"], ["-R", "/cluster/e2e", "-c", "no|such"], ["-h"], ["-H", "web1"]):
        done = check_vertebra(home, *args)
        assert done.returncode == 3, (args, done.stdout)
        assert parse_output(done.stdout).perfdata == "" and "|" not in done.stdout, (args, done.stdout)
        if "no|such" in args or "web|1" in args:  # the value is echoed in the answer, its bar written as ¦
            assert "no\u00a6such" in done.stdout or "web\u00a61" in done.stdout, (args, done.stdout)

    # No gateway socket in this copy of the state directory: check_vertebra logs in directly.
    direct = tmp_path / "direct"
    shutil.copytree(home, direct, ignore=shutil.ignore_patterns("run", "state", "*.log"))
    assert not (direct / "run").exists()
    alone = check_vertebra(direct, "-H", "web1", "-c", "svc")
    assert (alone.returncode, alone.stdout) == (1, "WARNING: slow|latency=0.5s;0.3;1;0\n")

    # An account the mesh does not admit (the bridge agent's own): denied, and said so.
    bridge = yaml.safe_load((home / "mesh.yaml").read_text())["agents"][2]["name"]
    denied = check_vertebra(direct, "--account", bridge, "-H", "web1", "-c", "svc")
    assert denied.returncode == 3 and denied.stdout.startswith("UNKNOWN - check_vertebra: denied on "), denied.stdout
    assert "may not run" in denied.stdout
