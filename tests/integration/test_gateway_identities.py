"""check_vertebra as Nagios runs it: as user ``nagios`` (with the group ``vertebra``), from /tmp, with a
clean environment, through a real mesh whose monitor agent serves the gateway. The gateway knows the
caller by its uid: nagios needs no password, its calls are audited as its own identity, the policy
grants it checks only, and a user the mesh file does not map is refused with a sentence.

The interpreter: user nagios must reach the venv and the code. A checkout or venv out of its reach
(a private directory such as `mktemp -d` makes, or a venv made from pyenv's Python under /root) is
copied to a readable place and run with Debian's /usr/bin/python3: tests/readable_python.py."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import DOMAIN, running, vertebra
from readable_python import python_for_others

DUMMY = "/usr/lib/nagios/plugins/check_dummy"
GROUP = "vertebra"


def _user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not _user("nagios") or not Path(DUMMY).exists() or shutil.which("runuser") is None,
    reason="needs root, the nagios user (nagios4-core), check_dummy (monitoring-plugins-basic) and runuser")


def _as(user: str, *argv: str, extra_env: dict[str, str] | None = None,
        cwd: str | Path = "/tmp") -> subprocess.CompletedProcess[str]:
    """``argv`` as ``user`` with the group vertebra, from /tmp, in a clean environment: as Nagios runs a plugin."""
    env = ["PATH=/usr/bin:/bin", *(f"{k}={v}" for k, v in (extra_env or {}).items())]
    return subprocess.run(["runuser", "-u", user, "-G", GROUP, "--", "env", "-i", *env, *argv],
                          capture_output=True, text=True, timeout=90, cwd=cwd)


def _python_for(user: str) -> tuple[str, dict[str, str]]:
    """The interpreter ``user`` can run Vertebra with, and the environment it needs (tests/readable_python.py)."""
    return python_for_others()


@pytest.fixture(scope="module")
def group() -> int:
    try:
        return grp.getgrnam(GROUP).gr_gid
    except KeyError:  # as deploy/install.sh makes it
        subprocess.run(["groupadd", "--system", GROUP], check=True)
        return grp.getgrnam(GROUP).gr_gid


@pytest.fixture
def site(server, group):
    """A state directory outside pytest's (root-only) temporary tree, with a monitor agent serving the
    gateway, a nagios service identity mapped to Unix user nagios, and a policy granting it checks only."""
    home = Path(tempfile.mkdtemp(prefix="vgi-", dir="/tmp"))  # 0700: the gateway opens it to its group
    suffix = home.name.removeprefix("vgi-").lower().replace("_", "-")
    nagios = f"nagios-{suffix}"
    try:
        (home / "server").mkdir()
        (home / "server" / "cert.pem").write_bytes(server.cert_path.read_bytes())
        operator = f"operator-{suffix}"
        (home / "policy.yaml").write_text(yaml.safe_dump({
            "roles": {"admin": {}, "nagios": {}},
            "members": {"admin": [f"{operator}@{DOMAIN}"], "nagios": [f"{nagios}@{DOMAIN}"]},
            "grants": [{"role": "admin", "ops": ["**"]},
                       {"role": "nagios", "ops": ["mesh.discover", "monitor.check"]}]}))
        (home / "mesh.yaml").write_text(yaml.safe_dump({
            "server": {"domain": DOMAIN, "host": server.host, "port": server.port},
            "broker": f"broker-{suffix}", "operator": operator, "admins": [operator], "policy": "policy.yaml",
            "services": [{"name": nagios, "unix_user": "nagios"}],
            "agents": [{"name": f"mon-{suffix}", "kind": "monitor", "resources": ["/host/web1"], "gateway": True,
                        "settings": {"checks": {"ok": {"plugin": DUMMY, "args": ["0", "fine"]},
                                                "crit": {"plugin": DUMMY, "args": ["2", "broken"]}}}}]}))
        from agents import config

        mesh = config.load(home / "mesh.yaml", home)
        server.register_many(mesh.ensure_passwords())
        with running(home, expect_agents=1):
            yield home, mesh
    finally:
        shutil.rmtree(home, ignore_errors=True)


def check_vertebra(user: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    python, env = _python_for(user)
    return _as(user, python, "-m", "agents.monitor.check_vertebra", "--home", str(home), *args, extra_env=env)


def test_socket_is_open_to_the_group_only(site, group):
    home, _ = site
    sock, run = home / "run" / "gateway.sock", home / "run"
    assert (sock.stat().st_mode & 0o777, sock.stat().st_gid) == (0o660, group)
    assert (run.stat().st_mode & 0o777, run.stat().st_gid) == (0o750, group)
    assert home.stat().st_mode & 0o077 == 0o010 and home.stat().st_gid == group  # search only, for the group
    assert (home / "secrets").stat().st_mode & 0o777 == 0o700  # no password readable by nagios


def test_nagios_checks_without_a_password_and_is_audited_as_itself(site):
    home, mesh = site
    nagios = mesh.identities[0].name
    ok = check_vertebra("nagios", home, "-H", "web1", "-c", "ok")
    assert (ok.returncode, ok.stdout.strip()) == (0, "OK: fine"), ok.stdout + ok.stderr
    crit = check_vertebra("nagios", home, "-H", "web1", "-c", "crit", "-t", "20")
    assert (crit.returncode, crit.stdout.strip()) == (2, "CRITICAL: broken"), crit.stderr
    # The full path too (a timeout state sends it there): it reads the mesh file, not a password.
    full = check_vertebra("nagios", home, "-H", "web1", "-c", "crit", "-t", "20:WARNING")
    assert (full.returncode, full.stdout.strip()) == (2, "CRITICAL: broken"), full.stdout + full.stderr

    jid = f"{nagios}@{DOMAIN}"
    deadline = time.monotonic() + 15
    while True:
        shown = vertebra(home, "audit", "show", "--caller", jid, "--op", "monitor.check")
        if shown.stdout.count("monitor.check") >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert shown.stdout.count("monitor.check") >= 3, shown.stdout + shown.stderr
    assert mesh.operator not in shown.stdout


def test_policy_denies_nagios_any_other_op(site):
    home, _ = site
    python, env = _python_for("nagios")
    denied = _as("nagios", python, "-m", "agents.cli", "--home", str(home), "call", "monitor.list", "--json",
                 extra_env=env)
    assert denied.returncode == 3, denied.stdout + denied.stderr
    assert json.loads(denied.stdout)["results"][0]["outcome"] == "denied"
    # Naming another identity is refused by the gateway, with a sentence.
    other = check_vertebra("nagios", home, "-H", "web1", "-c", "ok", "--account", site[1].operator)
    assert other.returncode == 3
    assert f"Unix user nagios calls through the gateway as {site[1].identities[0].name}@{DOMAIN} only" in other.stdout


def test_an_unmapped_user_is_refused_with_a_sentence(site):
    home, _ = site
    refused = check_vertebra("nobody", home, "-H", "web1", "-c", "ok")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    line = refused.stdout.strip()
    assert line.startswith("UNKNOWN - check_vertebra: the gateway refuses Unix user nobody"), line
    assert "add one under people: or services: with unix_user: nobody" in line


@pytest.fixture
def hostile():
    """What any local user can do to Nagios's working directory: a ``.vertebra`` of their own (here
    nobody's) with a mesh file and a fake gateway socket anyone may connect to, in a directory that is
    to nagios what /tmp is (root's, sticky, writable by all). Yields it and the fake socket's listener,
    which must never see a connection."""
    tmp = Path(tempfile.mkdtemp(prefix="vgi-tmp-", dir="/tmp"))
    os.chmod(tmp, 0o1777)
    home = tmp / ".vertebra"
    (home / "run").mkdir(parents=True)
    (home / "mesh.yaml").write_text("server: {domain: evil.test}\noperator: operator\n")
    nobody = pwd.getpwnam("nobody")
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(home / "run" / "gateway.sock"))
        listener.listen(8)
        listener.setblocking(False)
        os.chmod(home / "run" / "gateway.sock", 0o777)
        for path in (home, home / "run", home / "mesh.yaml", home / "run" / "gateway.sock"):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        yield tmp, home, listener
    finally:
        listener.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _never_connected(listener: socket.socket) -> bool:
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return True
    return False


def test_a_state_directory_another_user_left_in_tmp_is_never_used(hostile):
    tmp, home, listener = hostile
    python, env = _python_for("nagios")
    # From that directory, with nothing named: the system location, never ./.vertebra.
    found = _as("nagios", python, "-m", "agents.monitor.check_vertebra", "-H", "web1", "-c", "ok", extra_env=env,
                cwd=tmp)
    assert str(home) not in found.stdout + found.stderr and _never_connected(listener)
    if not os.path.exists("/etc/vertebra/mesh.yaml"):  # a machine that is not a Vertebra site
        assert found.returncode == 3, found.stdout + found.stderr
        assert found.stdout.strip() == ("UNKNOWN - check_vertebra: no mesh file at /etc/vertebra/mesh.yaml: give"
                                        " --home (the state directory) or --mesh, or set $VERTEBRA_HOME;"
                                        " check_vertebra never looks in the working directory"), found.stdout
    # Named outright (a careless $VERTEBRA_HOME): refused, with the reason.
    named = _as("nagios", python, "-m", "agents.monitor.check_vertebra", "-H", "web1", "-c", "ok",
                extra_env={**env, "VERTEBRA_HOME": str(home)}, cwd=tmp)
    assert named.returncode == 3, named.stdout + named.stderr
    assert named.stdout.strip() == (
        f"UNKNOWN - check_vertebra: refusing the state directory {home}: {home} is owned by nobody"
        f" (uid {pwd.getpwnam('nobody').pw_uid}) in {tmp}, where anyone may create files; use a state directory"
        " owned by root or by the user running this program, outside such a directory"), named.stdout
    assert _never_connected(listener)


def test_a_state_directory_or_mesh_file_others_may_write_is_refused(site):
    home, _ = site
    mode = home.stat().st_mode & 0o7777
    os.chmod(home, mode | 0o020)
    try:
        refused = check_vertebra("nagios", home, "-H", "web1", "-c", "ok")
    finally:
        os.chmod(home, mode)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert refused.stdout.strip() == (f"UNKNOWN - check_vertebra: refusing the state directory {home}: it is writable"
                                      f" by its group (mode {mode | 0o020:04o}); only root and its owner may write it"
                                      f" (chmod go-w {home})")
    mesh_mode = (home / "mesh.yaml").stat().st_mode & 0o7777
    os.chmod(home / "mesh.yaml", 0o646)
    try:
        refused = check_vertebra("nagios", home, "-H", "web1", "-c", "ok", "-t", "20:CRITICAL")  # the full path
    finally:
        os.chmod(home / "mesh.yaml", mesh_mode)
    assert refused.returncode == 3
    assert f"refusing the mesh file {home}/mesh.yaml: it is writable by everyone (mode 0646)" in refused.stdout
    ok = check_vertebra("nagios", home, "-H", "web1", "-c", "ok")
    assert (ok.returncode, ok.stdout.strip()) == (0, "OK: fine"), ok.stdout + ok.stderr
