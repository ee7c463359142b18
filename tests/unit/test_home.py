"""One rule finds the state directory: `vertebra` (the operator's own, ./.vertebra by default) and the
programs others start, check_vertebra and fence_vertebra, which never look in the working directory and
refuse what someone other than root and its owner could have written (as sshd's StrictModes does)."""

from __future__ import annotations

import os
import pwd
import socket
from pathlib import Path

import pytest

from agents import config
from agents.fencing import fence_vertebra
from agents.home import SYSTEM_HOME, SYSTEM_MESH, UnsafePath, check_safe, site_paths, state_home
from agents.monitor import check_vertebra


def test_the_operators_vertebra_keeps_its_working_directory_default(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VERTEBRA_HOME", raising=False)
    assert state_home() == tmp_path / ".vertebra" == config.default_home()
    monkeypatch.setenv("VERTEBRA_HOME", str(tmp_path / "env"))
    assert state_home() == config.default_home() == tmp_path / "env"
    assert state_home("given") == tmp_path / "given"


def test_programs_others_start_never_use_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".vertebra").mkdir()
    (tmp_path / ".vertebra" / "mesh.yaml").write_text("operator: operator\n")
    monkeypatch.delenv("VERTEBRA_HOME", raising=False)
    assert site_paths() == (SYSTEM_HOME, SYSTEM_MESH) == ("/var/lib/vertebra", "/etc/vertebra/mesh.yaml")
    assert fence_vertebra.vertebra_home({}) == Path(SYSTEM_HOME)
    assert check_vertebra._site(None, None) == (SYSTEM_HOME, SYSTEM_MESH)
    monkeypatch.setenv("VERTEBRA_HOME", str(tmp_path / "env"))
    assert site_paths() == (str(tmp_path / "env"), str(tmp_path / "env" / "mesh.yaml"))
    assert fence_vertebra.vertebra_home({}) == tmp_path / "env"
    assert site_paths("/srv/v") == ("/srv/v", "/srv/v/mesh.yaml")
    assert site_paths("/srv/v", "/etc/m.yaml") == ("/srv/v", "/etc/m.yaml")
    assert fence_vertebra.vertebra_home({"vertebra_home": "/srv/v"}) == Path("/srv/v")


@pytest.mark.parametrize("home, mesh, env, named", [
    (".vertebra", None, None, "--home .vertebra is not an absolute path"),
    (None, "mesh.yaml", None, "--mesh mesh.yaml is not an absolute path"),
    (None, None, "rel", "$VERTEBRA_HOME rel is not an absolute path"),
])
def test_a_relative_path_is_refused_with_a_sentence(monkeypatch, home, mesh, env, named):
    monkeypatch.delenv("VERTEBRA_HOME", raising=False)
    if env:
        monkeypatch.setenv("VERTEBRA_HOME", env)
    with pytest.raises(UnsafePath, match="give the full path") as refused:
        site_paths(home, mesh)
    assert named in str(refused.value)


@pytest.fixture
def private(tmp_path):
    """A directory only root may write, as pytest's own tree is."""
    os.chmod(tmp_path, 0o755)
    return tmp_path


def test_a_state_directory_only_its_owner_may_write_is_accepted(private):
    home = private / "home"
    home.mkdir(mode=0o750)
    (home / "mesh.yaml").write_text("{}")
    os.chmod(home / "mesh.yaml", 0o644)
    check_safe(home, "state directory")
    check_safe(home / "mesh.yaml", "mesh file")
    with pytest.raises(FileNotFoundError):
        check_safe(home / "missing", "mesh file")


@pytest.mark.parametrize("mode, who", [(0o770, "its group"), (0o757, "everyone"), (0o777, "its group and everyone")])
def test_a_state_directory_others_may_write_is_refused(private, mode, who):
    home = private / "home"
    home.mkdir()
    os.chmod(home, mode)
    with pytest.raises(UnsafePath) as refused:
        check_safe(home, "state directory")
    assert str(refused.value) == (f"refusing the state directory {home}: it is writable by {who} (mode {mode:04o});"
                                  f" only root and its owner may write it (chmod go-w {home})")


def test_a_mesh_file_others_may_write_or_a_writable_folder_above_is_refused(private):
    home = private / "home"
    home.mkdir()
    mesh = home / "mesh.yaml"
    mesh.write_text("{}")
    os.chmod(mesh, 0o664)
    with pytest.raises(UnsafePath, match="it is writable by its group"):
        check_safe(mesh, "mesh file")
    os.chmod(mesh, 0o644)
    os.chmod(home, 0o775)
    with pytest.raises(UnsafePath, match=f"{home} above it is writable by its group .* who could replace it"):
        check_safe(mesh, "mesh file")


def test_a_socket_may_let_its_group_connect_but_not_sit_in_a_folder_others_write(private):
    run = private / "run"
    run.mkdir(mode=0o750)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(run / "gateway.sock"))
        os.chmod(run / "gateway.sock", 0o660)  # connecting needs the write bit: the gateway's group may call
        check_safe(run / "gateway.sock", "gateway socket")
        os.chmod(run, 0o1777)  # sticky, as /tmp: anyone may put a socket here, owned by themselves
        check_safe(run / "gateway.sock", "gateway socket")  # root's own socket in it is still root's
        os.chmod(run, 0o777)
        with pytest.raises(UnsafePath, match="above it is writable by its group and everyone"):
            check_safe(run / "gateway.sock", "gateway socket")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another user")
def test_a_state_directory_another_user_made_in_tmp_is_refused(private):
    sticky = private / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # as /tmp
    hostile = sticky / ".vertebra"
    hostile.mkdir(mode=0o755)
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chown(hostile, nobody, -1)
    with pytest.raises(UnsafePath) as refused:
        check_safe(hostile, "state directory")
    assert str(refused.value) == (
        f"refusing the state directory {hostile}: {hostile} is owned by nobody (uid {nobody}) in {sticky}, where"
        " anyone may create files; use a state directory owned by root or by the user running this program,"
        " outside such a directory")
    # A folder above owned by someone else (not root, not the path's owner) could swap the path.
    os.chown(hostile, 0, -1)
    inner = hostile / "home"
    inner.mkdir(mode=0o700)
    os.chown(hostile, nobody, -1)
    with pytest.raises(UnsafePath, match=f"{hostile} above it is owned by nobody .* who could replace it"):
        check_safe(inner, "state directory")


def test_the_vertebra_command_refuses_what_others_could_write_too(private):
    home = private / "home"
    home.mkdir(mode=0o755)
    (home / "mesh.yaml").write_text("operator: operator\n")
    os.chmod(home / "mesh.yaml", 0o644)
    assert config.load(None, home).operator == "operator"
    os.chmod(home / "mesh.yaml", 0o666)
    with pytest.raises(config.ConfigError, match=f"refusing the mesh file {home}/mesh.yaml: it is writable by its"
                                                 " group and everyone"):
        config.load(None, home)
    os.chmod(home / "mesh.yaml", 0o644)
    os.chmod(home, 0o775)
    with pytest.raises(config.ConfigError, match=f"refusing the state directory {home}: it is writable by its group"):
        config.load(None, home)


def test_a_new_state_directory_is_made_safe_whatever_the_umask(private):
    old = os.umask(0o002)  # a site whose users share files with their group by default
    try:
        mesh = config.load(None, private / "fresh")
    finally:
        os.umask(old)
    assert (private / "fresh").stat().st_mode & 0o777 == 0o755
    assert mesh.path.stat().st_mode & 0o777 == 0o644
