"""The private ejabberd node and a two-node ejabberd cluster on loopback, against the real Debian
ejabberd: life cycle, accounts, pinned TLS with SCRAM, and an op across the cluster.

Without ejabberd these tests skip (with the command that installs it); under CI (CI=true) they fail,
because CI must run them.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.actor import Endpoint
from agents.authz import AdminsOnly
from agents.client import Client
from agents.ejabberd import PrivateEjabberd, ejabberd_installed
from agents.errors import Outcome
from agents.ports import bind_error, free_port
from agents.server import ServerError
from login_probe import can_log_in
from sample_agent import SampleAgent

DOMAIN = "vertebra.test"


@pytest.fixture(autouse=True, scope="module")
def _need_ejabberd() -> None:
    if ejabberd_installed():
        return
    reason = "ejabberd is not installed: run `apt-get install -y ejabberd` (Debian package ejabberd 23.01)"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI must run the ejabberd tests, but {reason}", pytrace=False)
    pytest.skip(reason)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _epmd_answers(port: int) -> bool:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERL_")}
    env["ERL_EPMD_PORT"] = str(port)
    return subprocess.run(["epmd", "-names"], env=env, capture_output=True).returncode == 0


def _endpoint(node: PrivateEjabberd) -> Endpoint:
    return Endpoint.pinned(node.host, node.port, node.domain, str(node.cert_path))


# -- one node -------------------------------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> Iterator[PrivateEjabberd]:
    n = PrivateEjabberd(tmp_path / "home", DOMAIN, port=free_port(), node_name="solo@127.0.0.1")
    yield n
    n.stop()


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateEjabberd]:
    """One running node shared by the tests that only add accounts and log in."""
    n = PrivateEjabberd(tmp_path_factory.mktemp("solo"), DOMAIN, port=free_port(), node_name="shared@127.0.0.1")
    n.start()
    yield n
    n.stop()


def test_node_starts_on_loopback_with_private_files(node: PrivateEjabberd) -> None:
    node.start()
    status = node.status()
    assert status["running"] is True and _pid_exists(status["pid"])
    assert (status["engine"], status["node"], status["port"]) == ("ejabberd", "solo@127.0.0.1", node.port)
    assert node.dir == node.home / "ejabberd-solo"
    assert oct(node.key_path.stat().st_mode & 0o777) == "0o600"
    assert oct(node.cookie_path.stat().st_mode & 0o777) == "0o400"
    config = node.config_path.read_text()
    assert f"port: {node.port}" in config and "starttls_required: true" in config
    # Everything the node listens on (client port, Erlang distribution) is on loopback.
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    ours = [line.split()[3] for line in listening.splitlines() if f"pid={status['pid']}," in line]
    assert f"127.0.0.1:{node.port}" in ours and f"127.0.0.1:{node.dist_port}" in ours
    assert all(addr.startswith("127.0.0.1:") for addr in ours), ours
    # A standalone node uses no epmd: nothing of the system's (/etc/ejabberd, /var/lib/ejabberd) either.
    argv = Path(f"/proc/{status['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"-start_epmd" in argv and argv[argv.index(b"-start_epmd") + 1] == b"false"
    assert not any(b"/var/lib/ejabberd" in a or b"/etc/ejabberd" in a for a in argv)


async def test_client_logs_in_over_pinned_tls_with_scram_only(solo: PrivateEjabberd, tmp_path: Path) -> None:
    node = solo
    node.register("alice", "correct horse")
    assert await can_log_in(node, "alice", "correct horse") is True
    assert await can_log_in(node, "alice", "battery staple") is False
    # PLAIN is not offered, even over TLS.
    assert await can_log_in(node, "alice", "correct horse", mech="PLAIN") is False
    # A context that trusts another certificate for the same domain refuses this node.
    other = PrivateEjabberd(tmp_path / "other", DOMAIN, port=free_port(), node_name="other@127.0.0.1")
    other.dir.mkdir(parents=True)
    other._ensure_cert()
    assert await can_log_in(node, "alice", "correct horse", ctx=other.ssl_context()) is False


async def test_vertebra_client_and_agent_on_one_node(solo: PrivateEjabberd, tmp_path: Path) -> None:
    node = solo
    node.register_many({"operator": "op-pw", "sample": "agent-pw"})
    (tmp_path / "agent").mkdir()
    endpoint = _endpoint(node)
    agent = SampleAgent(f"sample@{DOMAIN}", "agent-pw", endpoint, resources=["/host/a"], broker=None,
                        state_dir=tmp_path / "agent", authorizer=AdminsOnly([f"operator@{DOMAIN}"]))
    client = Client(f"operator@{DOMAIN}", "op-pw", endpoint, broker="")
    await agent.start()
    try:
        await client.start()
        try:
            report = await client.call("sample.echo", {"text": "hi", "times": 2}, to=[str(agent.jid)], timeout=10)
        finally:
            await client.stop()
    finally:
        await agent.stop()
    assert [r.outcome for r in report.results] == [Outcome.OK]
    assert report.results[0].result["text"] == "hihi"
    assert report.results[0].result["caller"] == f"operator@{DOMAIN}"


async def test_register_many_creates_and_updates_accounts(solo: PrivateEjabberd) -> None:
    node = solo
    node.register("bob", "first")
    node.register("bob", "second")
    node.register_many({f"agent-{i:04d}": f"pw-{i}" for i in range(300)})
    users = node.ctl("registered_users", DOMAIN).split()
    assert "bob" in users and sorted(u for u in users if u.startswith("agent-")) == \
        [f"agent-{i:04d}" for i in range(300)]
    assert await can_log_in(node, "bob", "second") is True
    assert await can_log_in(node, "bob", "first") is False
    assert await can_log_in(node, "agent-0299", "pw-299") is True


async def test_account_changes_survive_a_kill_9_right_after_them(node: PrivateEjabberd) -> None:
    """An account added, a password changed and an account removed are on disk when the call returns: a
    SIGKILL of the node right after each loses none of them (Mnesia's log buffers writes for seconds;
    a removed account that came back after a crash would let a revoked identity in again)."""
    def kill_and_start() -> None:
        pid = int(node.pidfile.read_text())
        os.killpg(os.getpgid(pid), signal.SIGKILL)     # the VM and its port programs, as systemd would
        for _ in range(200):     # gone, and its listening socket closed with it
            if node.status()["running"] is False and bind_error(node.host, node.port) is None:
                break
            time.sleep(0.05)
        assert node.status()["running"] is False, f"the node (pid {pid}) outlived SIGKILL"
        node.start()

    node.start()
    node.register_many({"kept": "pw-1", "revoked": "pw-r"})
    kill_and_start()
    assert node.has_account("kept") and node.has_account("revoked")
    node.register("kept", "pw-2")
    assert node.unregister("revoked") is True
    kill_and_start()
    assert not node.has_account("revoked")
    assert await can_log_in(node, "kept", "pw-2") is True
    assert await can_log_in(node, "kept", "pw-1") is False


def test_register_needs_a_running_node_and_valid_names(node: PrivateEjabberd) -> None:
    with pytest.raises(ServerError, match="not running"):
        node.register("carol", "pw")
    with pytest.raises(ServerError, match="invalid account name"):
        node.register("Carol@x", "pw")
    with pytest.raises(ServerError, match="invalid password"):
        node.register("carol", "")
    with pytest.raises(ServerError, match="start the node first"):
        node.ssl_context()


def test_stop_leaves_no_process_and_second_start_is_harmless(node: PrivateEjabberd) -> None:
    node.start()
    pid = node.status()["pid"]
    node.start()
    assert node.status()["pid"] == pid
    assert node.stop() is True
    assert not _pid_exists(pid)
    assert not node.pidfile.exists()
    assert node.status()["running"] is False
    assert node.stop() is False


def test_start_with_different_config_while_running_is_refused(node: PrivateEjabberd) -> None:
    node.start()
    moved = PrivateEjabberd(node.home, DOMAIN, port=free_port(), node_name=node.node_name)
    with pytest.raises(ServerError, match="different config"):
        moved.start()
    # The same ejabberd.yml, but other options for the Erlang VM that runs it.
    rescheduled = PrivateEjabberd(node.home, DOMAIN, port=node.port, node_name=node.node_name, schedulers=1)
    with pytest.raises(ServerError, match="different config"):
        rescheduled.start()
    assert node.status()["running"] is True


def test_lost_pidfile_is_recovered_so_the_node_can_be_stopped(node: PrivateEjabberd) -> None:
    node.start()
    pid = node.status()["pid"]
    node.pidfile.unlink()
    assert node.status()["pid"] == pid
    assert node.stop() is True
    assert not _pid_exists(pid)


def test_port_taken_by_another_socket_gives_clear_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        n = PrivateEjabberd(tmp_path / "home", DOMAIN, port=port, node_name="squat@127.0.0.1")
        with pytest.raises(ServerError, match=f"port {port} .* already in use"):
            n.start()
        assert n.status()["running"] is False


def test_node_failing_to_start_reports_its_log(node: PrivateEjabberd, tmp_path: Path, monkeypatch) -> None:
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    template = (Path(__file__).resolve().parents[2] / "deploy" / "ejabberd.yml.in").read_text()
    (deploy / "ejabberd.yml.in").write_text(template.replace("auth_password_format: scram",
                                                             "auth_password_format: rot13"))
    monkeypatch.setenv("VERTEBRA_DEPLOY_DIR", str(deploy))
    with pytest.raises(ServerError, match="exited") as info:
        node.start(timeout=60)
    assert "rot13" in str(info.value) and "last lines of" in str(info.value)
    assert node.status()["running"] is False


def test_missing_ejabberd_says_how_to_install(node: PrivateEjabberd, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(node.home / "no-such-bin"))
    with pytest.raises(ServerError, match="apt-get install ejabberd"):
        node.start()


def _scheduler_threads(pid: int) -> list[str]:
    names = [(t / "comm").read_text().strip() for t in Path(f"/proc/{pid}/task").iterdir()]
    return sorted(n for n in names if re.fullmatch(r"\d+_scheduler", n))


def test_a_node_given_its_share_of_schedulers_runs_that_many(tmp_path: Path) -> None:
    shared = PrivateEjabberd(tmp_path, DOMAIN, port=free_port(), node_name="shares@127.0.0.1", schedulers=1)
    shared.start()
    try:
        assert _scheduler_threads(shared.status()["pid"]) == ["1_scheduler"]
    finally:
        shared.stop()


def test_bad_arguments_are_rejected_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="invalid XMPP domain"):
        PrivateEjabberd(tmp_path, "Not A Domain")
    with pytest.raises(ServerError, match="Erlang node name"):
        PrivateEjabberd(tmp_path, DOMAIN, node_name="no-host")
    with pytest.raises(ServerError, match="spaces"):
        PrivateEjabberd(tmp_path / "my mesh", DOMAIN)
    with pytest.raises(ServerError, match="invalid schedulers 0"):
        PrivateEjabberd(tmp_path, DOMAIN, schedulers=0)


# -- two nodes, one cluster -----------------------------------------------------------------------


def _cluster(home: Path) -> tuple[PrivateEjabberd, PrivateEjabberd]:
    epmd = free_port()  # a private epmd: the machine's own (port 4369) is never touched
    first = PrivateEjabberd(home, DOMAIN, port=free_port(), node_name="node1@127.0.0.1", epmd_port=epmd)
    second = PrivateEjabberd(home, DOMAIN, port=free_port(), node_name="node2@127.0.0.1", epmd_port=epmd,
                             cluster_join=first.node_name, tls_from=first.dir)
    return first, second


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrivateEjabberd, PrivateEjabberd]]:
    first, second = _cluster(tmp_path_factory.mktemp("cluster"))
    try:
        first.start()
        second.start()
        yield first, second
    finally:
        second.stop()
        first.stop()


def test_both_nodes_see_one_cluster(cluster: tuple[PrivateEjabberd, PrivateEjabberd]) -> None:
    first, second = cluster
    both = ["node1@127.0.0.1", "node2@127.0.0.1"]
    assert first.cluster_nodes() == both
    assert second.cluster_nodes() == both
    assert first.cookie_path.read_text() == second.cookie_path.read_text()
    assert first.cert_path.read_bytes() == second.cert_path.read_bytes()


async def test_account_registered_once_logs_in_on_both_nodes(cluster: tuple[PrivateEjabberd, PrivateEjabberd]) -> None:
    first, second = cluster
    first.register("dora", "pw-dora")
    second.register("emil", "pw-emil")
    for node in (first, second):
        assert await can_log_in(node, "dora", "pw-dora") is True
        assert await can_log_in(node, "emil", "pw-emil") is True
    # One pinned certificate serves the whole cluster.
    assert await can_log_in(second, "dora", "pw-dora", ctx=first.ssl_context()) is True


async def test_op_from_a_client_on_node1_reaches_an_agent_on_node2(
        cluster: tuple[PrivateEjabberd, PrivateEjabberd], tmp_path: Path) -> None:
    first, second = cluster
    first.register_many({"caller": "pw-caller", "remote": "pw-remote"})
    (tmp_path / "agent").mkdir()
    agent = SampleAgent(f"remote@{DOMAIN}", "pw-remote", _endpoint(second), resources=["/host/b"], broker=None,
                        state_dir=tmp_path / "agent", authorizer=AdminsOnly([f"caller@{DOMAIN}"]))
    client = Client(f"caller@{DOMAIN}", "pw-caller", _endpoint(first), broker="")
    await agent.start()
    try:
        await client.start()
        try:
            report = await client.call("sample.echo", {"text": "across", "mode": "upper"}, to=[str(agent.jid)],
                                       timeout=10)
        finally:
            await client.stop()
    finally:
        await agent.stop()
    assert [r.outcome for r in report.results] == [Outcome.OK], report.to_dict()
    assert report.results[0].result == {"text": "ACROSS", "caller": f"caller@{DOMAIN}",
                                        "resources": ["/host/b"]}


async def test_a_lost_node_leaves_the_other_serving_and_rejoins(tmp_path: Path) -> None:
    first, second = _cluster(tmp_path / "home")
    try:
        await asyncio.to_thread(first.start)
        await asyncio.to_thread(second.start)
        first.register_many({"caller": "pw-caller", "worker": "pw-worker"})
        endpoint = _endpoint(first)
        (tmp_path / "agent").mkdir()
        agent = SampleAgent(f"worker@{DOMAIN}", "pw-worker", endpoint, broker=None, state_dir=tmp_path / "agent",
                            authorizer=AdminsOnly([f"caller@{DOMAIN}"]))
        client = Client(f"caller@{DOMAIN}", "pw-caller", endpoint, broker="")
        pid2 = second.status()["pid"]
        assert await asyncio.to_thread(second.stop) is True
        assert not _pid_exists(pid2)
        # Node 1 alone: it knows it is alone, still takes new accounts, logins and ops.
        assert first.cluster_nodes() == ["node1@127.0.0.1"]
        first.register("late", "pw-late")
        assert await can_log_in(first, "late", "pw-late") is True
        await agent.start()
        try:
            await client.start()
            try:
                report = await client.call("sample.count", {}, to=[str(agent.jid)], timeout=10)
            finally:
                await client.stop()
        finally:
            await agent.stop()
        assert [r.outcome for r in report.results] == [Outcome.OK] and report.results[0].result == 1
        # Node 2 comes back as a member (no second join) and knows the account made while it was away.
        await asyncio.to_thread(second.start)
        assert second.cluster_nodes() == ["node1@127.0.0.1", "node2@127.0.0.1"]
        assert await can_log_in(second, "late", "pw-late") is True
        # Lose node 1 instead; then node 2, the last to stop, starts alone as a member: no join attempt.
        assert await asyncio.to_thread(first.stop) is True
        assert await asyncio.to_thread(second.stop) is True
        await asyncio.to_thread(second.start)
        assert second.cluster_nodes() == ["node2@127.0.0.1"]
        assert await can_log_in(second, "late", "pw-late") is True
    finally:
        await asyncio.to_thread(second.stop)
        await asyncio.to_thread(first.stop)
    assert first.epmd_port is not None and not _epmd_answers(first.epmd_port)
    assert not [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
                .splitlines() if re.search(rf"-mnesia dir \S*{re.escape(str(tmp_path))}", line)]
