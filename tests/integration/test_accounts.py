"""`vertebra account` on a real private server, Prosody and ejabberd alike: the mesh file's people and
services get accounts when the server starts, `list` shows them, `passwd` rotates a password (the old
one is refused at login, the new one accepted), `add` and `remove` manage one, and a name the mesh
file does not list is refused with what to do."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import yaml

from agents import cli
from agents import config as meshconf
from agents.ejabberd import ejabberd_installed
from conftest import free_port, vertebra
from login_probe import can_log_in

ENGINES = ["prosody", pytest.param("ejabberd", marks=pytest.mark.skipif(
    not ejabberd_installed() and os.environ.get("CI", "").lower() not in ("true", "1", "yes"),
    reason="ejabberd is not installed: run `apt-get install -y ejabberd`"))]


def login(server, jid: str, password: str) -> bool:
    return asyncio.run(can_log_in(server, jid, password))


@pytest.fixture(params=ENGINES)
def home(request, tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    srv: dict = {"domain": "vertebra.test", "port": free_port()}
    if request.param == "ejabberd":
        srv.update(engine="ejabberd", node_name=f"acct{os.getpid()}@127.0.0.1", epmd_port=free_port())
    (home / "mesh.yaml").write_text(yaml.safe_dump({
        "server": srv, "agents": [{"name": "mon1", "kind": "monitor"}],
        "people": ["alice", {"name": "bob", "unix_user": "bob"}],
        "services": [{"name": "nagios", "unix_user": "nagios"}, {"name": "fence-c1"}]}))
    started = vertebra(home, "server", "start", timeout=120)
    assert started.returncode == 0, started.stderr
    yield home
    vertebra(home, "server", "stop", timeout=60)


def test_identities_get_accounts_and_passwd_rotates(home: Path):
    mesh = meshconf.load(home / "mesh.yaml", home)
    server = cli._server(mesh)
    for name in ("alice", "bob", "nagios", "fence-c1"):
        assert mesh.password_file(name).stat().st_mode & 0o777 == 0o600
    old = mesh.password("nagios")
    assert login(server, "nagios@vertebra.test", old)

    listed = vertebra(home, "account", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1:] for line in listed.stdout.splitlines()[1:]}
    assert rows["nagios@vertebra.test"] == ["service", "nagios", "exists"]
    assert rows["alice@vertebra.test"] == ["person", "-", "exists"]
    assert rows["bob@vertebra.test"] == ["person", "bob", "exists"]
    assert rows["operator@vertebra.test"] == ["operator", "-", "exists"]

    rotated = vertebra(home, "account", "passwd", "nagios")
    assert rotated.returncode == 0, rotated.stderr
    new = mesh.password("nagios")
    assert new != old and mesh.password_file("nagios").stat().st_mode & 0o777 == 0o600
    assert not login(server, "nagios@vertebra.test", old)
    assert login(server, "nagios@vertebra.test", new)


def test_add_and_remove_only_what_the_mesh_file_names(home: Path):
    mesh = meshconf.load(home / "mesh.yaml", home)
    server = cli._server(mesh)
    removed = vertebra(home, "account", "remove", "alice")
    assert removed.returncode == 0, removed.stderr
    assert not mesh.password_file("alice").exists() and not server.has_account("alice")
    rows = vertebra(home, "account", "list").stdout
    assert any(line.split()[:1] == ["alice@vertebra.test"] and line.split()[-1] == "missing"
               for line in rows.splitlines())

    added = vertebra(home, "account", "add", "alice")
    assert added.returncode == 0, added.stderr
    assert login(server, "alice@vertebra.test", mesh.password("alice"))

    refused = vertebra(home, "account", "add", "mallory")
    assert refused.returncode == 2 and not server.has_account("mallory")
    assert "mallory is not a person or service of the mesh file" in refused.stderr
    assert "add it under people: or services: there first" in refused.stderr
    refused = vertebra(home, "account", "remove", "mon1")  # an agent: not the account command's to remove
    assert refused.returncode == 2 and server.has_account("mon1")


def test_passwd_refuses_an_unlisted_name(home: Path):
    refused = vertebra(home, "account", "passwd", "mallory")
    assert refused.returncode == 2
    assert "add it under people: or services: there first" in refused.stderr


