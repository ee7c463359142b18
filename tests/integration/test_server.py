"""The private Prosody server: life cycle, accounts and TLS, against the real prosody binary."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.ports import free_port
from agents.server import PrivateServer, ServerError
from login_probe import can_log_in


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateServer]:
    srv = PrivateServer(tmp_path / "home", port=free_port())
    yield srv
    srv.stop()


def test_start_reports_running_and_writes_private_files(server: PrivateServer) -> None:
    server.start()
    status = server.status()
    assert status["running"] is True
    assert isinstance(status["pid"], int) and _pid_exists(status["pid"])
    assert (status["host"], status["port"], status["domain"]) == (server.host, server.port, "vertebra.test")
    assert oct(server.key_path.stat().st_mode & 0o777) == "0o600"
    assert oct(server.log_path.stat().st_mode & 0o777) == "0o600"  # it names every login
    config = server.config_path.read_text()
    assert f"c2s_ports = {{ {server.port} }}" in config
    with socket.create_connection((server.host, server.port), timeout=5):
        pass


def test_loaded_modules_follow_the_design(server: PrivateServer) -> None:
    server.start()
    # Ask the running server itself, through its private admin socket.
    out = subprocess.run(
        ["prosodyctl", "--config", str(server.config_path), "shell", f'module:list("{server.domain}")'],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    loaded = set(out.split())
    assert {"saslauth", "tls", "disco", "ping", "smacks", "roster", "auth_internal_hashed"} <= loaded
    assert not loaded & {"limits", "s2s", "register", "register_ibr", "offline"}


def test_certificate_names_the_domain(server: PrivateServer) -> None:
    server.start()
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(server.cert_path)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "DNS:vertebra.test" in out


async def test_registered_account_logs_in_and_wrong_password_fails(server: PrivateServer) -> None:
    server.start()
    server.register("alice", "correct horse")
    assert await can_log_in(server, "alice", "correct horse") is True
    assert await can_log_in(server, "alice", "battery staple") is False


async def test_register_updates_password_and_many_accounts_work(server: PrivateServer) -> None:
    server.start()
    server.register("bob", "first")
    server.register("bob", "second")
    server.register_many({f"agent-{i:04d}": f"pw-{i}" for i in range(200)})
    assert await can_log_in(server, "bob", "second") is True
    assert await can_log_in(server, "bob", "first") is False
    assert await can_log_in(server, "agent-0199", "pw-199") is True


async def test_accounts_written_while_stopped_survive_start(server: PrivateServer) -> None:
    server.register("carol", "pw")
    server.start()
    assert await can_log_in(server, "carol", "pw") is True


async def test_pinned_context_rejects_another_server(server: PrivateServer, tmp_path: Path) -> None:
    server.start()
    other = PrivateServer(tmp_path / "other", port=free_port())
    other.start()
    try:
        other.register("dave", "pw")
        assert await can_log_in(other, "dave", "pw") is True
        # Same domain, same account, but a certificate this server's context does not trust.
        assert await can_log_in(other, "dave", "pw", ctx=server.ssl_context()) is False
    finally:
        other.stop()


def test_stop_leaves_no_process(server: PrivateServer) -> None:
    server.start()
    pid = server.status()["pid"]
    assert server.stop() is True
    assert not _pid_exists(pid)
    assert not server.pidfile.exists()
    assert server.status()["running"] is False
    assert server.stop() is False


def test_second_start_is_harmless(server: PrivateServer) -> None:
    server.start()
    pid = server.status()["pid"]
    server.start()
    status = server.status()
    assert status["running"] is True and status["pid"] == pid


def test_open_file_limit_is_raised_for_many_clients(server: PrivateServer) -> None:
    server.start()
    limits = Path(f"/proc/{server.status()['pid']}/limits").read_text()
    soft, hard = next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3:5]
    assert soft == hard


def test_start_with_different_config_while_running_is_refused(server: PrivateServer) -> None:
    server.start()
    moved = PrivateServer(server.home, port=free_port())
    with pytest.raises(ServerError, match="different config"):
        moved.start()


def test_port_taken_by_another_socket_gives_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        srv = PrivateServer(tmp_path / "home", port=port)
        with pytest.raises(ServerError, match=f"port {port} .* already in use"):
            srv.start()
        assert srv.status()["running"] is False


def test_stale_pidfile_is_cleared(server: PrivateServer) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    server.dir.mkdir(parents=True)
    server.pidfile.write_text(f"{dead.pid}\n")
    assert server.status()["running"] is False
    assert not server.pidfile.exists()
    server.pidfile.write_text("not a pid\n")
    server.start()
    assert server.status()["running"] is True


def test_pidfile_of_unrelated_process_is_not_trusted(server: PrivateServer) -> None:
    server.dir.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        server.pidfile.write_text(f"{sleeper.pid}\n")
        assert server.status()["running"] is False
        assert server.stop() is False
        assert sleeper.poll() is None  # never signal a process that is not ours
    finally:
        sleeper.kill()
        sleeper.wait()


def test_bad_input_is_rejected_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="invalid XMPP domain"):
        PrivateServer(tmp_path, domain="Not A Domain")
    srv = PrivateServer(tmp_path, port=free_port())
    with pytest.raises(ServerError, match="invalid account name"):
        srv.register("Alice@x", "pw")
    with pytest.raises(ServerError, match="invalid password"):
        srv.register("alice", "")
    with pytest.raises(ServerError, match="start the server first"):
        srv.ssl_context()


def test_prosody_exiting_early_reports_log_tail(server: PrivateServer, tmp_path: Path, monkeypatch) -> None:
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    (deploy / "prosody.cfg.lua.in").write_text("this is not lua ${port}\n")
    monkeypatch.setenv("VERTEBRA_DEPLOY_DIR", str(deploy))
    with pytest.raises(ServerError, match="exited") as info:
        server.start()
    assert "prosody.log" in str(info.value)
    assert server.status()["running"] is False


def test_lost_pidfile_is_recovered_so_the_server_can_be_stopped(server: PrivateServer) -> None:
    server.start()
    pid = server.status()["pid"]
    server.pidfile.unlink()
    server.start()  # finds its own running Prosody instead of calling the port taken
    assert server.status()["pid"] == pid
    assert server.stop() is True
    assert not _pid_exists(pid)


async def test_home_with_awkward_characters(tmp_path: Path) -> None:
    srv = PrivateServer(tmp_path / 'my "mesh" \\ home', port=free_port())
    try:
        srv.start()
        srv.register("erin", "pw")
        assert await can_log_in(srv, "erin", "pw") is True
    finally:
        srv.stop()


def test_no_python_runs_in_the_forked_child_before_prosody(tmp_path: Path) -> None:
    """Python code run in the child between fork and exec (at-fork handlers of libraries, such as gRPC's for
    the etcd client) can abort it there: the start must fork and exec with none run. An at-fork handler that
    writes to a pipe tells whether any ran."""
    script = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from agents.ports import free_port
from agents.server import PrivateServer
r, w = os.pipe()
os.register_at_fork(after_in_child=lambda: os.write(w, b"x"))
srv = PrivateServer({str(tmp_path / "home")!r}, port=free_port())
srv.start()
try:
    os.set_blocking(r, False)
    try:
        ran = os.read(r, 64)
    except BlockingIOError:
        ran = b""
    print(f"handlers run in children: {{len(ran)}}")
finally:
    srv.stop()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "handlers run in children: 0", done.stdout + done.stderr
