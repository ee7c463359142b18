"""Shared fixtures: one real private Prosody for the whole session, and actors on it.

Every test that exercises messaging talks to this server over real sockets. Accounts are created
per test with fresh names, so tests do not see each other's agents.

With VERTEBRA_TEST_ENGINE=ejabberd (``make test-ejabberd``) the session runs a two-node ejabberd
cluster on loopback instead: ``server`` is the first node (accounts registered through it are known
to both), and the ``mesh`` fixture's actors take turns on which node they connect to first, each
with the other node as its alternate, so ops, discovery and pushes cross the cluster. Only the tests
that use the session's servers run then (pytest_collection_modifyitems).
"""

from __future__ import annotations

import asyncio
import inspect
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
import yaml
from slixmpp.exceptions import IqError, IqTimeout

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from agents.actor import Actor, Endpoint  # noqa: E402
from agents.authz import AdminsOnly  # noqa: E402
from agents.client import Client  # noqa: E402
from agents.ports import free_port  # noqa: E402,F401  (the tests import it from here)
from agents.server import PrivateServer  # noqa: E402
from broker.service import NO_SESSION, Broker  # noqa: E402

DOMAIN = "vertebra.test"
# pytest-xdist's test processes (make test runs two) start with SIGINT ignored, and an ignored signal
# survives exec: where agents/process.py falls back to subprocess, every program the tests start would
# ignore Ctrl-C, which an agent's never do (`vertebra serve` handles SIGINT, and exec resets a handled
# signal to its default).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
ENGINE = os.environ.get("VERTEBRA_TEST_ENGINE", "prosody").strip().lower() or "prosody"
if ENGINE not in ("prosody", "ejabberd"):
    raise RuntimeError(f"VERTEBRA_TEST_ENGINE={ENGINE!r}: use prosody (the default) or ejabberd")
ON_EJABBERD = ENGINE == "ejabberd"
_names = itertools.count(1)
START_TIMEOUT = 60.0  # seconds for an actor of a test's mesh to get its session (Mesh.start)


class Mesh:
    """The test server, plus a factory for accounts and actors that are stopped after each test."""

    def __init__(self, server: PrivateServer, home: Path) -> None:
        self.server = server
        self.home = home
        self.endpoint = Endpoint(server.host, server.port, DOMAIN, server.ssl_context())
        self.operator = self.account("operator")
        self.admins = AdminsOnly([self.operator[0]])
        self.actors: list[Any] = []

    def account(self, prefix: str) -> tuple[str, str]:
        user = f"{prefix}{next(_names)}"
        password = f"pw-{user}"
        self.server.register(user, password)
        return f"{user}@{DOMAIN}", password

    async def broker(self, **kw: Any) -> Broker:
        jid, pw = self.account("broker")
        kw.setdefault("authorizer", self.admins)
        return await self.start(Broker(jid, pw, self.endpoint, **kw))

    async def agent(self, cls: type, broker: Broker | None, resources: list[str], **kw: Any) -> Any:
        jid, pw = self.account(cls.kind)
        kw.setdefault("authorizer", self.admins)
        kw.setdefault("state_dir", self.home / "state" / jid.split("@")[0])
        kw["state_dir"].mkdir(parents=True, exist_ok=True)
        if broker is not None:  # as the mesh file's agents: entry would (the broker lists no one else)
            broker.admit(jid, cls.kind, resources, kw.get("settings"))
        return await self.start(cls(jid, pw, self.endpoint, resources=resources,
                                    broker=broker.jid.bare if broker else None, **kw))

    async def client(self, broker: Broker | None = None, account: tuple[str, str] | None = None) -> Client:
        jid, pw = account or self.operator
        return await self.start(Client(jid, pw, self.endpoint, broker=str(broker.jid) if broker else ""))

    async def start(self, actor: Any) -> Any:
        # Far beyond a login's usual second: a loaded CI machine running both suites side by side once
        # took over 15 s (the product's default) to give one of 23 agents logging in at once a session.
        if isinstance(actor, Actor):
            await actor.start(timeout=START_TIMEOUT)
        else:  # the gateway: its sessions are its callers'
            await actor.start()
        self.actors.append(actor)
        return actor

    async def stop_all(self) -> None:
        for actor in reversed(self.actors):
            await actor.stop()
        self.actors.clear()


class ClusterMesh(Mesh):
    """A Mesh on a cluster: every read of ``endpoint`` gives the next node as the one to try first
    (the others as alternates), so consecutive actors land on different nodes."""

    def __init__(self, nodes: list[Any], home: Path) -> None:
        ctx = nodes[0].ssl_context()  # every node serves the first node's certificate (tls_from)
        addresses = [(n.host, n.port) for n in nodes]
        self.endpoints = [Endpoint(host, port, DOMAIN, ctx, tuple(a for a in addresses if a != (host, port)))
                          for host, port in addresses]
        self._turn = itertools.count()
        super().__init__(nodes[0], home)

    @property
    def endpoint(self) -> Endpoint:  # type: ignore[override]
        return self.endpoints[next(self._turn) % len(self.endpoints)]

    @endpoint.setter
    def endpoint(self, value: Endpoint) -> None:
        pass  # Mesh.__init__'s single endpoint: the nodes' endpoints above take its place

    async def start(self, actor: Any) -> Any:
        await super().start(actor)
        if isinstance(actor, Actor):
            await self._seen_across_nodes(actor)
        return actor

    async def _seen_across_nodes(self, new: Actor, timeout: float = 10.0) -> None:
        """Return once ``new`` and every running actor on another node have pinged each other.

        ejabberd writes a session to mnesia on the node it logged in to and copies it to the other
        nodes asynchronously (a dirty write): an IQ sent from the other node just after the login can
        find no session there and bounce as service-unavailable. A loaded CI machine once showed it: a
        client on the second node asked an agent that had just logged in to the first one and was told
        it was not connected. A test's mesh starts the way an operator would after a while of running.
        Gives up quietly after ``timeout``: the test then says what did not work."""
        others = [a for a in self.actors
                  if isinstance(a, Actor) and a is not new and a.online and a.server_address != new.server_address]
        deadline = asyncio.get_running_loop().time() + timeout
        for one, two in [(o, new) for o in others] + [(new, o) for o in others]:
            while asyncio.get_running_loop().time() < deadline:
                try:
                    await one.xmpp.plugin["xep_0199"].ping(str(two.jid), timeout=2)
                    break
                except IqError as e:  # an answer from the actor itself, whatever it says, is what we wait for
                    if e.iq["error"]["condition"] not in NO_SESSION:
                        break
                except IqTimeout:
                    pass
                await asyncio.sleep(0.02)


def ejabberd_cluster(home: Path, prefix: str = "suite") -> Iterator[list[Any]]:
    """Two private ejabberd nodes on loopback, the second joined to the first; stopped afterwards."""
    from agents.ejabberd import PrivateEjabberd, ejabberd_installed

    if not ejabberd_installed():
        pytest.exit("VERTEBRA_TEST_ENGINE=ejabberd, but ejabberd is not installed: "
                    "run `apt-get install -y ejabberd`", returncode=2)
    epmd = free_port()  # a private epmd: the machine's own (port 4369) is never touched
    first = PrivateEjabberd(home, DOMAIN, port=free_port(), node_name=f"{prefix}1@127.0.0.1", epmd_port=epmd)
    second = PrivateEjabberd(home, DOMAIN, port=free_port(), node_name=f"{prefix}2@127.0.0.1", epmd_port=epmd,
                             cluster_join=first.node_name, tls_from=first.dir)
    try:
        first.start()
        second.start()
        yield [first, second]
    finally:
        second.stop()
        first.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On ejabberd (``make test-ejabberd``) only the tests that use the session's servers run again, and
    those marked ``each_engine`` (they start a server of the engine under test themselves): the others
    start a Prosody of their own or none, so the Prosody run has already run them as they are, and
    running them twice only costs CI time."""
    if ENGINE != "ejabberd":
        return
    again = [item for item in items if "servers" in getattr(item, "fixturenames", ())
             or item.get_closest_marker("each_engine") is not None]
    if len(again) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in again])
        items[:] = again


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Every node of the session's XMPP service: one Prosody, or (VERTEBRA_TEST_ENGINE=ejabberd)
    two clustered ejabberd nodes."""
    home = tmp_path_factory.mktemp("vertebra-home")
    if ON_EJABBERD:
        yield from ejabberd_cluster(home)
        return
    srv = PrivateServer(home, domain=DOMAIN, port=free_port())
    srv.start()
    yield [srv]
    srv.stop()


@pytest.fixture(scope="session")
def server(servers: list[Any]) -> Any:
    return servers[0]


@pytest.fixture(scope="session", autouse=True)
def _no_mounts_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Storage agents keep their overlay clones mounted when they stop (a restart must not pull a clone
    from under the program using it); the session takes down what its tests left under its temporary
    directory, so no mount outlives it and no later cleanup removes files through one."""
    yield
    from agents.storage.overlay import unmount_all_under
    unmount_all_under(tmp_path_factory.getbasetemp().resolve())


@pytest.fixture
async def mesh(servers: list[Any], tmp_path: Path) -> AsyncIterator[Mesh]:
    m = ClusterMesh(servers, tmp_path) if len(servers) > 1 else Mesh(servers[0], tmp_path)
    yield m
    await m.stop_all()


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy (awaiting what it returns when that is awaitable); fail the
    test (never hang) after ``timeout``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def server_acknowledged(sm: Any, timeout: float = 10.0) -> None:
    """Wait until the server's XEP-0198 count of our stanzas matches ours, asking for it at every poll:
    an answer counts only what was sent before its request, and slixmpp asks again only every fifth
    stanza, so one request can leave the count behind a stanza sent just after it for good. A server
    that failed to count a stanza never catches up."""
    def caught_up() -> bool:
        if sm.last_ack == sm.seq and not sm.unacked_queue:
            return True
        sm.request_ack()
        return False
    await until(caught_up, timeout=timeout, what=f"the server to acknowledge all {sm.seq} stanzas sent "
                f"(it had {sm.last_ack} when the wait began)")


@pytest.fixture
def mesh_home(server: PrivateServer, servers: list[Any], tmp_path: Path) -> Callable[..., Path]:
    """A state directory with a mesh file for this server, for CLI and subprocess tests."""

    def make(agents: list[dict[str, Any]], admins: list[str] | None = None, operator: str = "operator") -> Path:
        home = tmp_path / f"home{next(_names)}"
        (home / "server").mkdir(parents=True)
        (home / "server" / "cert.pem").write_bytes(server.cert_path.read_bytes())
        suffix = next(_names)
        names = {"broker": f"broker{suffix}", "operator": f"{operator}{suffix}"}
        mesh = {"server": {"domain": DOMAIN, "host": server.host, "port": server.port},
                "broker": names["broker"], "operator": names["operator"],
                "admins": admins if admins is not None else [names["operator"]],
                "agents": [dict(a, name=f"{a['name']}{suffix}") for a in agents]}
        if len(servers) > 1:  # a cluster: the mesh's programs may use any node (server.nodes)
            mesh["server"]["nodes"] = [f"{n.host}:{n.port}" for n in servers[1:]]
        (home / "mesh.yaml").write_text(yaml.safe_dump(mesh))
        from agents import config
        cfg = config.load(home / "mesh.yaml", home)
        server.register_many(cfg.ensure_passwords())
        return home

    return make


def vertebra(home: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the real `vertebra` command line against a state directory."""
    return subprocess.run([sys.executable, "-m", "agents.cli", "--home", str(home), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@contextlib.contextmanager
def vertebra_up(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """`vertebra up` on the example mesh file (on a free port), as a new user runs it: yields the state
    directory and what `up` printed until it was ready; then Ctrl-C, which must stop everything (exit 0).
    A run that fails is killed and its server stopped, so no test leaves a mesh behind."""
    home = tmp_path / "up-home"
    home.mkdir()
    mesh = yaml.safe_load((ROOT / "deploy" / "mesh.example.yaml").read_text())
    mesh["server"]["port"] = free_port()
    (home / "mesh.yaml").write_text(yaml.safe_dump(mesh))
    proc = subprocess.Popen([sys.executable, "-m", "agents.cli", "--home", str(home), "up"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        yield home, "".join(lines)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()  # its agents die with it (PR_SET_PDEATHSIG); the server is stopped here
            proc.wait()
            vertebra(home, "server", "stop", timeout=30)


@contextlib.contextmanager
def running(home: Path, expect_agents: int = 1) -> Iterator[dict[str, Any]]:
    """Start the broker and every agent of HOME/mesh.yaml as processes; stop them afterwards."""
    cfg = yaml.safe_load((home / "mesh.yaml").read_text())
    gateway = any(a.get("gateway") for a in cfg["agents"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "agents.cli", "--home", str(home)]
    # One broker instance per server node, as `vertebra up` starts them.
    instances = range(1, len(cfg["server"].get("nodes", [])) + 2)
    procs = [subprocess.Popen(base + ["broker", "--instance", str(n)], env=env, cwd=ROOT,
                              stderr=open(home / f"broker-{n}.log", "w")) for n in instances]
    procs += [subprocess.Popen(base + ["-v", "agent", a["name"]], env=env, cwd=ROOT,
                               stderr=open(home / f"{a['name']}.log", "w")) for a in cfg["agents"]]
    try:
        out = None
        broker = f"{cfg['broker']}@{cfg['server']['domain']}"
        for _ in range(150):
            # Every instance must list them: a test's next call may be answered by any.
            outs = [vertebra(home, "call", "mesh.agents", "--to", f"{broker}/{'broker' if n == 1 else f'broker-{n}'}",
                             "--json") for n in instances]
            out = outs[-1]
            if all(o.returncode == 0 and len(json.loads(o.stdout)["results"][0]["result"]) == expect_agents
                   for o in outs) and (home / "run" / "gateway.sock").exists() == gateway:
                break
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"agents did not come up: {out and out.stdout} {out and out.stderr}")
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            logs = "\n".join(f.read_text() for f in home.glob("*.log"))
            raise AssertionError(f"{dead} exited early:\n{logs}")
        yield cfg
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
