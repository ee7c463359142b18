"""The mesh file: one YAML document that says which server, broker, agents and admins make a mesh, and
which people and services (``people:``, ``services:``) have accounts on it.

Every error names the file, the line, the field and what was expected (agents/schema.py), e.g.
``mesh.yaml:12: agents[1].resources[0]: resource 'host' must be an absolute path such as /host/db1``.
The state directory (agents/home.py: ``--home``, else ``$VERTEBRA_HOME``, else ``./.vertebra``) holds
everything a mesh writes: the private server, generated passwords, the agents' state and the gateway socket.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .actor import Endpoint
    from .authz import Authorizer
    from .server import ReadLimit

from . import kinds
from . import resources as paths
from . import schema
from .home import UnsafePath, actor_state, check_safe, state_home
from .intake import IntakeLimits
from .schema import SchemaError

_NAME = re.compile(r"^[a-z][a-z0-9._-]{0,62}$")
EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "mesh.example.yaml"


class ConfigError(SchemaError):
    """The mesh file, or something it names, cannot be used; the message says where and what to do."""


def default_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The state directory (agents/home.py says how it is found)."""
    return state_home(home)


@dataclass(frozen=True)
class ServerConfig:
    domain: str = "vertebra.test"
    host: str = "127.0.0.1"
    port: int = 5322
    # Further nodes of a cluster serving the same domain (host, port); actors use any live one.
    nodes: tuple[tuple[str, int], ...] = ()
    engine: str = "prosody"  # or "ejabberd", whose nodes can form a cluster (deploy/ejabberd/README.md)
    node_name: str = "vertebra@127.0.0.1"  # ejabberd: this node's Erlang name
    dist_port: int | None = None  # ejabberd: Erlang distribution port
    epmd_port: int | None = None  # ejabberd: the port mapper a cluster's nodes on one host share
    cluster_join: str | None = None  # ejabberd: an existing node to join
    # Bytes a second the server reads from an account the mesh file does not name (0: no limit), and
    # further accounts read at full speed besides the mesh's own (agents/server.py ReadLimit).
    read_limit: int = 10_000
    full_speed: tuple[str, ...] = ()

    def cert_dir(self, home: Path) -> Path:
        """Where this machine's server keeps its state and certificate."""
        if self.engine == "ejabberd":
            return home / f"ejabberd-{self.node_name.split('@', 1)[0]}"
        return home / "server"


@dataclass(frozen=True)
class AgentConfig:
    name: str  # the XMPP account (node part of the JID)
    kind: str
    resources: tuple[str, ...] = ()
    gateway: bool = False  # this agent serves the local gateway socket
    settings: dict[str, Any] = field(default_factory=dict)
    password_file: Path | None = None
    requests: IntakeLimits = IntakeLimits()  # per-sender rate and queue, requests served at once (intake.py)


@dataclass(frozen=True)
class Identity:
    """A person or service the mesh file names (``people:``, ``services:``): its account is
    ``name@domain``, and ``unix_user`` is the local Unix user whose programs the gateway lets call
    as this identity without a password (agents/gateway.py)."""

    name: str
    kind: str  # "person" or "service"
    unix_user: str | None = None


@dataclass(frozen=True)
class ChatConfig:
    """The operators' chat bot: its account, the ops room it posts to, and its per-sender rate limit."""

    account: str = "bot"
    room: str | None = None  # e.g. ops@rooms.vertebra.test
    burst: int = 5
    per_second: float = 1.0


@dataclass(frozen=True)
class StateConfig:
    """Where the broker's instances keep the state they share, when that is not SQLite in the broker's
    state directory (one machine): an etcd cluster (broker/state_etcd.py), with TLS and credentials."""

    endpoints: tuple[str, ...]  # HOST:PORT of each etcd member's client URL
    prefix: str = "/vertebra"  # every key the broker writes is under it (one cluster can serve several meshes)
    ca: Path | None = None  # TLS: the CA that signed the members' certificates (TLS is on when given)
    cert: Path | None = None  # TLS client certificate and key, when the members require one
    key: Path | None = None
    user: str | None = None  # etcd user, with its password in password_file
    password_file: Path | None = None


@dataclass(frozen=True)
class MeshConfig:
    path: Path
    home: Path
    server: ServerConfig
    broker: str
    operator: str  # the account `vertebra` commands use
    admins: tuple[str, ...]  # bare JIDs
    agents: tuple[AgentConfig, ...]
    password_files: dict[str, Path] = field(default_factory=dict)
    policy: Path | None = None  # an RBAC policy file; without one only the admins may run ops
    site: str | None = None  # this mesh's site, for site-scoped policy rules
    policy_max_age: int | None = None  # seconds after which destructive ops need a fresher policy
    workflows: Path = Path("workflows")  # the broker's workflow definitions, one YAML file each
    chat: ChatConfig | None = None  # the operators' chat bot, run in the broker's process
    identities: tuple[Identity, ...] = ()  # the people and services besides the actors (people:, services:)
    broker_state: StateConfig | None = None  # the broker's state: on etcd; None: SQLite (one machine)
    document: Any = field(default=None, repr=False, compare=False)  # the file as read, for its lines

    def check_settings(self, names: Collection[str] | None = None) -> None:
        """Check the ``settings:`` of the agents named (default: every agent, and the broker's workflow
        files) with their kind's check (agents/kinds.py ``settings_check``), as each actor will at its
        start; the error names the file, the line and the field. The checks look at this machine too
        (hook programs, fence agents, secret files): check only the actors that run here."""
        where = Fields(self.path, document=self.document)
        if names is None or self.broker in names:
            check_broker = kinds.settings_check(kinds.BROKER)
            if check_broker is not None:
                try:
                    check_broker(self.broker_settings(), where)
                except SchemaError as exc:  # it names the file it read (a workflow file), line and field
                    raise ConfigError(str(exc)) from None
        for i, agent in enumerate(self.agents):
            parse_settings = kinds.settings_check(agent.kind) if names is None or agent.name in names else None
            if parse_settings is not None:
                try:
                    parse_settings(agent.settings, where.within(f"agents[{i}].settings"))
                except SchemaError as exc:  # raised on its own, not through `where`: place it in the file
                    if isinstance(exc, ConfigError) and exc.source == str(self.path):
                        raise
                    raise exc.located(where.within(f"agents[{i}].settings")) from None

    def broker_settings(self) -> dict[str, Any]:
        """The broker's settings, which the mesh file gives at its top level (``workflows:``)."""
        return {"workflows": str(self.workflows)}

    def authorizer(self) -> "Authorizer":
        """The authorization hook every actor of this mesh enforces with."""
        from .authz import AdminsOnly, PolicyAuthorizer

        if self.policy is None:
            return AdminsOnly(self.admins)
        try:
            return PolicyAuthorizer.from_file(self.policy, site=self.site, max_age=self.policy_max_age)
        except ValueError as exc:
            raise ConfigError(str(exc), source=self.path, field="policy") from None

    def jid(self, account: str) -> str:
        return f"{account}@{self.server.domain}"

    @property
    def broker_resources(self) -> list[str]:
        """One broker instance per server node (broker/leadership.py): ``broker`` runs by the first
        node, ``broker-2`` by the second, and so on."""
        return ["broker"] + [f"broker-{n}" for n in range(2, len(self.server.nodes) + 2)]

    @property
    def broker_jids(self) -> list[str]:
        """The broker's instances, the one by the first node first."""
        return [f"{self.jid(self.broker)}/{r}" for r in self.broker_resources]

    @property
    def broker_jid(self) -> str:
        return self.broker_jids[0]

    @property
    def accounts(self) -> list[str]:
        """Every account the mesh file names: its actors, the operator and its people and services."""
        return ([self.broker, self.operator] + [a.name for a in self.agents]
                + ([self.chat.account] if self.chat else []) + [i.name for i in self.identities])

    def identity(self, name: str) -> Identity | None:
        """The person or service named ``name`` in the mesh file, or None."""
        return next((i for i in self.identities if i.name == name), None)

    def identity_of_user(self, unix_user: str) -> Identity | None:
        """The identity the mesh file maps the local Unix user ``unix_user`` to, or None."""
        return next((i for i in self.identities if i.unix_user == unix_user), None)

    def read_limit(self) -> "ReadLimit | None":
        """How fast the server reads accounts this file does not name: everyone it names (the mesh's
        actors, the operator, the admins and ``server.full_speed``) is read at full speed."""
        from .server import ReadLimit

        if not self.server.read_limit:
            return None
        named = [self.jid(a) for a in self.accounts] + list(self.admins) + list(self.server.full_speed)
        here = "@" + self.server.domain  # an account of another server never logs in to this one
        return ReadLimit(self.server.read_limit, tuple(sorted({j.lower() for j in named if j.lower().endswith(here)})))

    @property
    def room_creators(self) -> tuple[str, ...]:
        """Who alone may create rooms on the private server's room service: the chat bot, when its ops
        room is there (an account that created that room first would own it and keep the bot out of it).
        None named: any account of the server may."""
        if self.chat is None or self.chat.room is None:
            return ()
        from .server import room_service

        if self.chat.room.partition("@")[2].lower() != room_service(self.server.domain):
            return ()
        return (self.jid(self.chat.account).lower(),)

    @property
    def delegates(self) -> list[str]:
        """Who may send requests on a person's behalf besides the broker: the chat bot."""
        return [self.jid(self.chat.account)] if self.chat else []

    def state_dir(self, name: str) -> Path:
        """Where the actor running as account ``name`` keeps its state (not created here)."""
        return actor_state(self.home, name)

    @property
    def gateway_socket(self) -> Path:
        return self.home / "run" / "gateway.sock"

    def agent(self, name: str) -> AgentConfig:
        for a in self.agents:
            if a.name == name:
                return a
        raise ConfigError(f"{self.path}: no agent named {name!r}; the mesh has"
                          f" {', '.join(a.name for a in self.agents) or 'no agents'}")

    def roster(self) -> dict[str, AgentConfig]:
        """The agents the broker admits to its directory, by lowercased bare JID: only these, each
        under its configured kind and for (some of) its configured resources."""
        return {self.jid(a.name).lower(): a for a in self.agents}

    def password_file(self, account: str) -> Path:
        return self.password_files.get(account) or self.home / "secrets" / f"{account}.password"

    def password(self, account: str) -> str:
        path = self.password_file(account)
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            raise ConfigError(f"no password for {account} at {path}: run `vertebra server start` to create"
                              " the mesh's accounts") from None

    def ensure_passwords(self, accounts: Collection[str] | None = None) -> dict[str, str]:
        """Create a random password file (0600) for every account (default: every account of the mesh
        file) that has none; return them all."""
        out = {}
        for account in self.accounts if accounts is None else accounts:
            path = self.password_file(account)
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(new_password())
            out[account] = self.password(account)
        return out

    def endpoint(self) -> "Endpoint":
        from .actor import Endpoint  # XMPP loads only for programs that log in themselves

        cert = self.server.cert_dir(self.home) / "cert.pem"
        if not cert.exists():
            raise ConfigError(f"no server certificate at {cert}: start the server first (`vertebra server start`)")
        return Endpoint.pinned(self.server.host, self.server.port, self.server.domain, str(cert),
                               alternates=self.server.nodes)


def new_password() -> str:
    """A random password for a generated account."""
    return secrets.token_urlsafe(24)


def load(path: str | os.PathLike[str] | None = None, home: str | os.PathLike[str] | None = None,
         check_settings: bool | Collection[str] = False) -> MeshConfig:
    """Load and validate a mesh file (default: HOME/mesh.yaml, created from the example if missing);
    with ``check_settings``, also the settings of every agent (True) or of the agents named, which
    must be the ones that run on this machine (:meth:`MeshConfig.check_settings`). A state directory
    or mesh file that someone other than root and its owner could have written is refused
    (agents/home.py ``check_safe``, as sshd's StrictModes)."""
    home_dir = default_home(home)
    if path is None:
        path = home_dir / "mesh.yaml"
        if not path.exists():
            if not home_dir.exists():
                home_dir.mkdir(parents=True)
                os.chmod(home_dir, 0o755)  # whatever the umask: a group-writable one would be refused
            path.write_text(EXAMPLE.read_text())
            os.chmod(path, 0o644)
    path = Path(path)
    if not path.exists():
        raise ConfigError("no such mesh file", source=path)
    for checked, what in ((home_dir, "state directory"), (path, "mesh file")):
        try:
            check_safe(checked, what)
        except FileNotFoundError:
            pass  # a state directory not made yet: `vertebra server start` and `up` make it
        except UnsafePath as exc:
            raise ConfigError(str(exc)) from None
    mesh = parse(schema.read(path, ConfigError), path, home_dir)
    if check_settings:
        mesh.check_settings(None if check_settings is True else check_settings)
    return mesh


def parse(data: Any, path: Path, home: Path) -> MeshConfig:
    """Check a mesh file's document (lines known when it came from :func:`schema.read`)."""
    where = Fields(path, document=data)
    root = where.mapping(data, "", {"server", "broker", "operator", "admins", "agents", "passwords", "policy",
                                    "site", "policy_max_age", "workflows", "chat", "people", "services"})
    srv = where.mapping(root.get("server", {}), "server", {"domain", "host", "port", "nodes", "engine", "node_name",
                                                            "dist_port", "epmd_port", "cluster_join", "read_limit",
                                                            "full_speed"})
    engine = srv.get("engine", "prosody")
    if engine not in ("prosody", "ejabberd"):
        raise where.error("server.engine", f"expected prosody or ejabberd, got {engine!r}")
    erlang_node = r"[a-z][a-z0-9_-]*@[A-Za-z0-9.-]+"
    server = ServerConfig(
        domain=where.string(srv.get("domain", ServerConfig.domain), "server.domain",
                            r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", "a lowercase DNS name"),
        host=where.string(srv.get("host", ServerConfig.host), "server.host", r"[0-9A-Za-z.:_-]+", "a host or address"),
        port=where.integer(srv.get("port", ServerConfig.port), "server.port", 1, 65535),
        nodes=tuple(where.address(n, f"server.nodes[{i}]")
                    for i, n in enumerate(where.sequence(srv.get("nodes", []), "server.nodes"))),
        engine=engine,
        node_name=where.string(srv.get("node_name", ServerConfig.node_name), "server.node_name", erlang_node,
                               "an Erlang node name such as vertebra1@127.0.0.1"),
        dist_port=None if srv.get("dist_port") is None else where.integer(srv["dist_port"], "server.dist_port",
                                                                          1, 65535),
        epmd_port=None if srv.get("epmd_port") is None else where.integer(srv["epmd_port"], "server.epmd_port",
                                                                          1, 65535),
        cluster_join=None if srv.get("cluster_join") is None else where.string(
            srv["cluster_join"], "server.cluster_join", erlang_node, "an Erlang node name to join"),
        read_limit=where.integer(srv.get("read_limit", ServerConfig.read_limit), "server.read_limit", 0, 10**12))
    if 0 < server.read_limit < 1000:
        raise where.error("server.read_limit", f"expected 0 (no limit) or at least 1000 bytes a second, got"
                                               f" {server.read_limit}")
    full_speed = tuple(where.bare_jid(a, f"server.full_speed[{i}]", server.domain)
                       for i, a in enumerate(where.sequence(srv.get("full_speed", []), "server.full_speed")))
    for i, jid in enumerate(full_speed):
        if not jid.endswith("@" + server.domain):
            raise where.error(f"server.full_speed[{i}]", f"{jid} is not an account of {server.domain}, whose"
                                                         " server is the only one this setting configures")
    server = replace(server, full_speed=full_speed)
    broker_state = None
    if isinstance(root.get("broker"), dict):  # broker: {name:, state:, tls:, user:, password_file:}
        b = where.mapping(root["broker"], "broker", {"name", "state", "tls", "user", "password_file"})
        broker = where.name(b.get("name", "broker"), "broker.name")
        broker_state = _broker_state(where, b, path)
    else:
        broker = where.name(root.get("broker", "broker"), "broker")
    operator = where.name(root.get("operator", "operator"), "operator")
    admins = tuple(where.bare_jid(a, f"admins[{i}]", server.domain)
                   for i, a in enumerate(where.sequence(root.get("admins", [operator]), "admins")))
    agents = []
    for i, raw in enumerate(where.sequence(root.get("agents", []), "agents")):
        f = f"agents[{i}]"
        a = where.mapping(raw, f, {"name", "kind", "resources", "gateway", "settings", "password_file", "requests"})
        if "name" not in a or "kind" not in a:
            raise where.error(f, "each agent needs a name and a kind")
        kind = a["kind"]
        if kind not in kinds.agent_kinds():
            raise where.error(f"{f}.kind", f"expected one of {', '.join(kinds.agent_kinds())}, got {kind!r}")
        res = []
        for j, r in enumerate(where.sequence(a.get("resources", []), f"{f}.resources")):
            try:
                res.append(paths.check(r))
            except paths.BadResource as exc:
                raise where.error(f"{f}.resources[{j}]", str(exc)) from None
        agents.append(AgentConfig(
            name=where.name(a["name"], f"{f}.name"), kind=kind, resources=tuple(res),
            gateway=where.boolean(a.get("gateway", False), f"{f}.gateway"),
            settings=where.mapping(a.get("settings", {}), f"{f}.settings", None),
            password_file=_path(a.get("password_file"), path), requests=_requests(where, a.get("requests"), f)))
    names = [a.name for a in agents] + [broker, operator] + (
        [root["chat"].get("account", "bot")] if isinstance(root.get("chat"), dict) else [])
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise where.error("agents", f"account names must be unique; {', '.join(dupes)} used twice")
    identities = _identities(where, root, names)
    if sum(a.gateway for a in agents) > 1:
        raise where.error("agents", "at most one agent per mesh file may serve the gateway")
    pw = where.mapping(root.get("passwords", {}), "passwords", None)
    password_files: dict[str, Path] = {}
    for account, file in [(where.name(k, "passwords"), _path(v, path)) for k, v in pw.items()] + [
            (a.name, a.password_file) for a in agents]:
        if file is not None:
            password_files[account] = file
    policy = _path(root.get("policy"), path)
    if policy is not None and not policy.is_file():
        raise where.error("policy", f"no policy file at {policy}")
    site = root.get("site")
    if site is not None:
        site = where.name(site, "site")
    max_age = root.get("policy_max_age")
    if max_age is not None:
        max_age = where.integer(max_age, "policy_max_age", 1, 10 ** 9)
    chat = None
    if "chat" in root:
        c = where.mapping(root["chat"], "chat", {"account", "room", "burst", "per_second"})
        room = c.get("room")
        if room is not None:
            room = where.string(room, "chat.room", r"[a-z0-9._-]+@[a-z0-9.-]+", "a room JID such as ops@rooms."
                                + server.domain)
        chat = ChatConfig(account=where.name(c.get("account", "bot"), "chat.account"), room=room,
                          burst=where.integer(c.get("burst", 5), "chat.burst", 1, 1000),
                          per_second=float(where.integer(c.get("per_second", 1), "chat.per_second", 1, 1000)))
    return MeshConfig(path=path, home=home, server=server, broker=broker, operator=operator, admins=admins,
                      agents=tuple(agents), password_files=password_files, policy=policy, site=site,
                      policy_max_age=max_age, workflows=_path(root.get("workflows"), path) or home / "workflows",
                      chat=chat, identities=identities, broker_state=broker_state, document=data)


_UNIX_USER = r"[a-z_][a-z0-9_-]{0,31}"
IDENTITY_SECTIONS = {"people": "person", "services": "service"}


def _identities(where: "Fields", root: dict[str, Any], actors: list[str]) -> tuple[Identity, ...]:
    """The ``people:`` and ``services:`` of a mesh file: each a name, or ``{name, unix_user}``. Their
    names must differ from each other and from the actors' accounts, and no Unix user may stand for
    two identities (the gateway could not tell which one its programs call as)."""
    out: list[Identity] = []
    fields: dict[str, str] = {}  # name or unix user -> the field that named it first
    for section, kind in IDENTITY_SECTIONS.items():
        for i, raw in enumerate(where.sequence(root.get(section) or [], section)):
            f = f"{section}[{i}]"
            entry = where.mapping(raw, f, {"name", "unix_user"}) if isinstance(raw, dict) else {"name": raw}
            if "name" not in entry:
                raise where.error(f, f"each entry of {section} needs a name (an account name, or"
                                     " {name: NAME, unix_user: USER})")
            name = where.name(entry["name"], f"{f}.name" if isinstance(raw, dict) else f)
            if name in actors:
                raise where.error(f, f"{name} is already an account of this mesh file (the broker, the operator,"
                                     " an agent or the chat bot); give the identity a name of its own")
            if name in fields:
                raise where.error(f, f"{name} is listed twice (first at {fields[name]}); list each identity once")
            fields[name] = f
            user = entry.get("unix_user")
            if user is not None:
                user = where.string(user, f"{f}.unix_user", _UNIX_USER, "a local Unix user name such as nagios")
                if "user:" + user in fields:
                    raise where.error(f"{f}.unix_user", f"Unix user {user} already stands for"
                                                        f" {fields['user:' + user]}; one Unix user maps to one"
                                                        " identity")
                fields["user:" + user] = f"{name} ({f})"
            out.append(Identity(name=name, kind=kind, unix_user=user))
    return tuple(out)


def _requests(where: "Fields", value: Any, f: str) -> IntakeLimits:
    """An agent's ``requests:`` (rate and queue per sender, requests served at once); defaults for what is left out."""
    if value is None:
        return IntakeLimits()
    r, d = where.mapping(value, f"{f}.requests", {"burst", "per_second", "queued", "running"}), IntakeLimits()
    return IntakeLimits(burst=where.integer(r.get("burst", d.burst), f"{f}.requests.burst", 1, 1_000_000),
                        per_second=float(where.integer(r.get("per_second", int(d.per_second)),
                                                       f"{f}.requests.per_second", 1, 1_000_000)),
                        queued=where.integer(r.get("queued", d.queued), f"{f}.requests.queued", 1, 1_000_000),
                        running=where.integer(r.get("running", d.running), f"{f}.requests.running", 1, 10_000))


def _broker_state(where: Fields, b: dict[str, Any], path: Path) -> StateConfig | None:
    """The broker's ``state``: ``sqlite`` (the default: files in the broker's state directory, one machine)
    or ``etcd://HOST:PORT,HOST:PORT,.../PREFIX``; ``tls`` and ``user`` apply to etcd."""
    url = where.string(b.get("state", "sqlite"), "broker.state", r"sqlite|etcd://[^/\s]+(/\S*)?",
                       "sqlite or etcd://HOST:PORT,HOST:PORT,... (every etcd member's client address)")
    if url == "sqlite":
        for key in ("tls", "user", "password_file"):
            if key in b:
                raise where.error(f"broker.{key}", f"broker.{key} applies to state on etcd only; broker.state is"
                                                   " sqlite")
        return None
    members, _, prefix = url.removeprefix("etcd://").partition("/")
    endpoints = tuple(f"{h}:{p}" for h, p in (where.address(m, "broker.state") for m in members.split(",")))
    tls = where.mapping(b.get("tls", {}), "broker.tls", {"ca", "cert", "key"})
    files = {k: _path(tls.get(k), path) for k in ("ca", "cert", "key")}
    for k, file in files.items():
        if file is not None and not file.is_file():
            raise where.error(f"broker.tls.{k}", f"no file at {file}")
    if (files["cert"] is None) != (files["key"] is None) or (files["cert"] and files["ca"] is None):
        raise where.error("broker.tls", "give ca alone (server certificates only) or ca, cert and key (client"
                                        " certificates too)")
    user = None if b.get("user") is None else where.name(b["user"], "broker.user")
    password_file = _path(b.get("password_file"), path)
    if (user is None) != (password_file is None):
        raise where.error("broker.user", "give broker.user and broker.password_file together (etcd's"
                                         " authentication needs both)")
    if password_file is not None and not password_file.is_file():
        raise where.error("broker.password_file", f"no file at {password_file}")
    return StateConfig(endpoints=endpoints, prefix="/" + prefix.strip("/") if prefix.strip("/") else "/vertebra",
                       ca=files["ca"], cert=files["cert"], key=files["key"], user=user, password_file=password_file)


def _path(value: Any, mesh: Path) -> Path | None:
    return None if value is None else (mesh.parent / str(value)).absolute()


class Fields(schema.Fields):
    """The schema layer's field readers with the mesh file's names: accounts and bare JIDs."""

    def __init__(self, where: str | Path, error: type[schema.SchemaError] | None = None, *,
                 document: Any = None, prefix: str = "") -> None:
        super().__init__(where, error or ConfigError, document=document, prefix=prefix)

    def name(self, value: Any, f: str) -> str:
        return self.string(value, f, _NAME.pattern, "an account name (lowercase letters, digits, . _ -)")

    def bare_jid(self, value: Any, f: str, domain: str) -> str:
        if isinstance(value, str) and "@" not in value:
            value = f"{self.name(value, f)}@{domain}"
        return self.string(value, f, r"[a-z0-9._-]+@[a-z0-9.-]+", "an account name or a bare JID (user@domain)")
