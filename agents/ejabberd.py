"""A private ejabberd node for meshes that outgrow one Prosody: ``PrivateEjabberd``.

The same public API as ``agents.server.PrivateServer`` (start, stop, status, register, register_many,
ssl_context, cert_path), for the Debian ``ejabberd`` package (23.01). Everything a node owns lives
under ``home/"ejabberd-<name>"`` (``<name>`` is the node name's part before ``@``): its config
(rendered from ``deploy/ejabberd.yml.in``), Mnesia spool, Erlang cookie, logs, pidfile, certificate,
and a private copy of ``ejabberdctl`` (Debian's insists on running as user ``ejabberd``; the copy
runs as the caller). Nothing of the system's ejabberd (``/etc/ejabberd``, ``/var/lib/ejabberd``,
the service) is read or touched.

Erlang distribution, which ejabberd nodes use to talk to each other and ``ejabberdctl`` uses to talk
to a node:

- a standalone node (``epmd_port=None`` and no ``cluster_join``) needs no epmd: it listens for
  distribution on ``dist_port`` alone (``ERL_DIST_PORT``), on the node name's address;
- a node that is, or may become, part of a cluster registers with an epmd on ``epmd_port`` (4369 on a
  real multi-machine cluster; a private port for several clusters on one host). ``start`` starts that
  epmd on the node's address if none answers, and ``stop`` ends it again once no node is registered
  with it (as Debian's ``ejabberdctl stop`` does). ``cluster_join=NODE`` joins an existing node with
  ``ejabberdctl join_cluster`` on first start; every node of a cluster shares the Erlang cookie
  (``cookie``, by default the file ``home/"ejabberd.cookie"``, so the nodes of one home share it).

Accounts are shared by the nodes of a cluster (Mnesia), so they can be registered through any one.
``ejabberdctl register`` starts an Erlang VM per call (about 0.5 s each); ``register_many`` starts one
VM for the whole batch and calls ``ejabberd_auth`` on the node for each account, in parallel.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from string import Template

from .ports import bind_error, free_port
from .server import (
    ITERATIONS,
    PrivateNode,
    ServerError,
    ReadLimit,
    _check_password,
    _check_user,
    _cmdline,
    _DOMAIN_RE,
    _pid_alive,
    _raise_nofile_limit,
    find_template,
    room_creators_checked,
    room_service,
)

TEMPLATE_NAME = "ejabberd.yml.in"
# ITERATIONS (4,096, RFC 5802's minimum and ejabberd's default) is shared with the Prosody path.
INSTALL_HINT = "run `apt-get install ejabberd` as root (Debian 12 ships ejabberd 23.01)"
_NODE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}@[A-Za-z0-9.:_-]{1,253}$")
_UNSAFE_PATH = re.compile(r"[\s\"'\\$`]")
# The Popen objects of nodes this process started (keyed by node directory), to reap them.
_children: dict[str, subprocess.Popen] = {}


def _find_template() -> Path:
    return find_template(TEMPLATE_NAME)


def _yaml_quoted_body(value: object) -> str:
    """Escape a value for the inside of a double-quoted YAML string."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _scram_sha1(password: str) -> tuple[str, str, str]:
    """(StoredKey, ServerKey, salt), base64, as ejabberd stores a SCRAM-SHA-1 password."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha1", password.encode(), salt, ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha1).digest()
    stored_key = hashlib.sha1(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha1).digest()
    return tuple(base64.b64encode(v).decode() for v in (stored_key, server_key, salt))  # type: ignore[return-value]


def _erl_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def ejabberd_installed() -> bool:
    """Whether the Debian ejabberd package's ejabberdctl and Erlang are on this machine."""
    return _system_ejabberdctl() is not None and shutil.which("erl") is not None \
        and shutil.which("epmd") is not None


def _system_ejabberdctl() -> Path | None:
    for candidate in (shutil.which("ejabberdctl"), "/usr/sbin/ejabberdctl"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


class PrivateEjabberd(PrivateNode):
    """One private ejabberd node; everything it owns lives under ``home/"ejabberd-<name>"``."""

    noun = "node"

    def __init__(self, home: Path, domain: str = "vertebra.test", host: str = "127.0.0.1", port: int = 5322,
                 *, node_name: str = "vertebra@127.0.0.1", dist_port: int | None = None,
                 epmd_port: int | None = None, cluster_join: str | None = None, cookie: str | None = None,
                 tls_from: Path | None = None, component_port: int | None = None,
                 components: dict[str, str] | None = None, log_level: str = "warning",
                 read_limit: ReadLimit | None = None, schedulers: int | None = None,
                 room_creators: Iterable[str] = ()):
        if not isinstance(domain, str) or not _DOMAIN_RE.match(domain):
            raise ServerError(f"invalid XMPP domain {domain!r}: use a lowercase DNS name such as 'vertebra.test'")
        for name, value in (("port", port), ("dist_port", dist_port), ("epmd_port", epmd_port),
                            ("component_port", component_port)):
            if value is not None and (not isinstance(value, int) or not 0 < value < 65536):
                raise ServerError(f"invalid {name} {value!r}: use an integer between 1 and 65535")
        for name, node in (("node_name", node_name), ("cluster_join", cluster_join)):
            if node is not None and (not isinstance(node, str) or not _NODE_RE.match(node)):
                raise ServerError(f"invalid {name} {node!r}: an Erlang node name is NAME@HOST, "
                                  "for example vertebra1@10.0.0.1")
        if cookie is not None and (not cookie or not re.fullmatch(r"[A-Za-z0-9_.-]{1,255}", cookie)):
            raise ServerError("invalid Erlang cookie: use 1-255 letters, digits, '.', '_' or '-'")
        if components and component_port is None:
            raise ServerError("components need a component_port to listen on")
        if schedulers is not None and (not isinstance(schedulers, int) or schedulers < 1):
            raise ServerError(f"invalid schedulers {schedulers!r}: use a positive integer, or None for one per core")
        self.home = Path(home).resolve()
        if _UNSAFE_PATH.search(str(self.home)):
            raise ServerError(f"ejabberdctl cannot handle spaces, quotes or '$' in paths: choose a state "
                              f"directory without them (not {str(self.home)!r})")
        self.domain = domain
        self.host = host
        self.port = port
        self.node_name = node_name
        self.node_host = node_name.split("@", 1)[1]
        self.cluster_join = cluster_join
        # A node that joins, or may be joined, registers with an epmd; a standalone one needs none.
        self.epmd_port = epmd_port if epmd_port is not None else (4369 if cluster_join else None)
        self.tls_from = Path(tls_from).resolve() if tls_from else None
        self.component_port = component_port
        self.components = dict(components or {})
        self.log_level = log_level
        self.read_limit = read_limit  # None: every account is read at full speed (a test node)
        self.room_creators = room_creators_checked(room_creators, domain)  # none: any local account
        # Erlang's schedulers (and dirty CPU schedulers) for this node; None: one per core, Erlang's
        # default, right for a node with a machine of its own. Nodes sharing one machine's cores (the
        # scale benchmark's cluster) each take their share instead of all contending for every core.
        self.schedulers = schedulers
        self.dir = self.home / f"ejabberd-{node_name.split('@', 1)[0]}"
        self.config_path = self.dir / "ejabberd.yml"
        self.ctl_config_path = self.dir / "ejabberdctl.cfg"
        self.ctl_path = self.dir / "ejabberdctl"
        self.spool_dir = self.dir / "spool"
        self.logs_dir = self.dir / "logs"
        self.pidfile = self.dir / "ejabberd.pid"
        self.console_log = self.logs_dir / "console.log"
        self.log_path = self.logs_dir / "ejabberd.log"
        self.cert_path = self.dir / "cert.pem"
        self.key_path = self.dir / "key.pem"
        self.cookie_path = self.dir / ".erlang.cookie"
        self._shared_cookie_path = self.home / "ejabberd.cookie"
        self._cookie = cookie
        self._lock_path = self.dir / ".lock"
        self.dist_port = dist_port if dist_port is not None else self._recorded_dist_port()

    def __repr__(self) -> str:
        return (f"PrivateEjabberd(home={str(self.home)!r}, domain={self.domain!r}, host={self.host!r}, "
                f"port={self.port}, node_name={self.node_name!r})")

    # -- life cycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the node unless it already runs with the same config; join ``cluster_join`` if it
        is not yet a member; return when the node accepts clients."""
        system_ctl = _system_ejabberdctl()
        if system_ctl is None or not shutil.which("erl") or not shutil.which("epmd"):
            raise ServerError(f"ejabberd is not installed: {INSTALL_HINT}")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._locked():
            config = self._render_config()
            pid = self._running_pid()
            if pid is not None:
                # Both files: the VM's options (its schedulers, say) are in ejabberdctl's, not ejabberd's.
                if (self.config_path.is_file() and self.config_path.read_text() == config
                        and self.ctl_config_path.is_file()
                        and self.ctl_config_path.read_text() == self._render_ctl_config()):
                    self._join_if_needed(timeout)
                    return
                raise ServerError(
                    f"a private ejabberd node (pid {pid}) already runs in {self.dir} with a different config; "
                    "stop it first (`vertebra server stop`) and start again"
                )
            if self.dist_port is None:
                self.dist_port = free_port(self._dist_address())
            self._check_ports_free()
            self._ensure_cert()
            self._ensure_cookie()
            self.spool_dir.mkdir(mode=0o700, exist_ok=True)
            self.logs_dir.mkdir(mode=0o700, exist_ok=True)
            self._write_private(self.config_path, config)
            self._write_private(self.ctl_config_path, self._render_ctl_config())
            self._write_ctl(system_ctl)
            # ejabberdctl points ERL_INETRC at the config dir; without the file every VM logs an error.
            self._write_private(self.dir / "inetrc", '{lookup, ["file", "native"]}.\n')
            if self.epmd_port is not None:
                self._ensure_epmd()
            fresh = not any(self.spool_dir.iterdir())  # no Mnesia schema yet: certainly not a member
            self._spawn(timeout)
            try:
                self._join_if_needed(timeout, fresh=fresh)
            except ServerError:
                self._stop_locked(10.0)
                raise

    def stop(self, timeout: float = 15.0) -> bool:
        """Stop the node (TERM, then KILL after ``timeout``); True if it was running. A node that
        was part of a cluster stays a member: it syncs again when it starts (see ``leave_cluster``)."""
        if not self.dir.is_dir():
            return False
        with self._locked():
            return self._stop_locked(timeout)

    # -- cluster ----------------------------------------------------------------------------------

    def cluster_nodes(self) -> list[str]:
        """The running nodes of this node's cluster (``ejabberdctl list_cluster``), this one included."""
        out = self.ctl("list_cluster")
        return sorted(set(re.findall(r"[A-Za-z0-9_-]+@[A-Za-z0-9.:_-]+", out)))

    def _db_nodes(self) -> list[str]:
        """Every node in this node's Mnesia schema, running or not."""
        script = (f"case rpc:call('{self.node_name}', mnesia, system_info, [db_nodes], 30000) of "
                  "L when is_list(L) -> [io:format(\"~s~n\", [N]) || N <- L], halt(0); "
                  "E -> io:format(\"ERROR ~p~n\", [E]), halt(1) end.")
        proc = subprocess.run(self._erl_client_argv("db", script), env=self._client_env(), cwd=self.dir,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise ServerError(f"cannot read the cluster membership of {self.node_name}: "
                              f"{(proc.stdout + proc.stderr).strip()[-300:]}")
        return [line for line in proc.stdout.split() if _NODE_RE.match(line)]

    def leave_cluster(self, node: str | None = None) -> None:
        """Remove ``node`` (by default this one) from the cluster: ``ejabberdctl leave_cluster``.
        A node that leaves is stopped by ejabberd and loses its copy of the shared data."""
        node = node or self.node_name
        if not _NODE_RE.match(node):
            raise ServerError(f"invalid node name {node!r}")
        self.ctl("leave_cluster", node, timeout=60.0)

    def _ctl_ok(self, *args: str) -> bool:
        try:
            self.ctl(*args, timeout=30.0)
        except ServerError:
            return False
        return True

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run the node's private ejabberdctl with ``args``; its output, or ServerError with it."""
        if not self.ctl_path.is_file():
            raise ServerError(f"the ejabberd node {self.node_name} has not been started in {self.dir} yet")
        try:
            proc = subprocess.run([str(self.ctl_path), *self._ctl_options(), *args], env=self._env(),
                                  cwd=self.dir, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ServerError(f"`ejabberdctl {' '.join(args)}` did not finish within {timeout:g} s") from exc
        out = (proc.stdout + proc.stderr).replace("WARNING: It is not recommended to run ejabberd as root\n", "")
        if proc.returncode != 0:
            raise ServerError(f"`ejabberdctl {' '.join(args)}` failed (exit {proc.returncode}) on node "
                              f"{self.node_name}: {out.strip() or '(no output)'}")
        return out

    # -- accounts ---------------------------------------------------------------------------------

    def _describe(self) -> dict:
        return {"engine": "ejabberd", "node": self.node_name, "dist_port": self.dist_port,
                "epmd_port": self.epmd_port}

    def register(self, user: str, password: str) -> None:
        """Create the account ``user@domain`` or change its password."""
        self.register_many({user: password})

    def register_many(self, accounts: dict[str, str], timeout: float = 300.0) -> None:
        """Create or update many accounts at once, through this running node (the accounts are then
        known to every node of its cluster, and on disk on each when this returns). One Erlang VM for the
        whole batch."""
        for user, password in accounts.items():
            _check_user(user)
            _check_password(user, password)
        if not accounts:
            return
        if self._running_pid() is None:
            raise ServerError(f"the ejabberd node {self.node_name} is not running: start it before "
                              "registering accounts (`vertebra server start`)")
        # SCRAM keys are computed here (hashlib's PBKDF2 in C, one thread per core) and handed to
        # ejabberd ready-made: ejabberd 23.01 derives them in an Erlang loop, about 4x slower.
        items = list(accounts.items())
        workers = min(len(items), os.cpu_count() or 2)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            keyed = list(pool.map(lambda item: (item[0], *_scram_sha1(item[1])), items))
        batch = self.dir / f"accounts.{os.getpid()}.{secrets.token_hex(4)}.terms"
        fd = os.open(batch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            for user, stored, server, salt in keyed:
                f.write(f'{{<<"{user}">>, <<"{stored}">>, <<"{server}">>, <<"{salt}">>}}.\n')
        script = _REGISTER_SCRIPT.substitute(node=self.node_name, domain=self.domain, iterations=ITERATIONS,
                                             file=_erl_string(str(batch)), sync=_SYNC)
        try:
            self._run_accounts_script("reg", script, f"registering {len(accounts)} accounts", ("registered ",),
                                      timeout)
        finally:
            batch.unlink(missing_ok=True)

    def has_account(self, user: str) -> bool:
        """Whether the account ``user@domain`` exists (asks the running node)."""
        _check_user(user)
        self._require_running("looking up accounts")
        try:
            self.ctl("check_account", user, self.domain, timeout=60.0)
        except ServerError as exc:
            if "(exit 1)" in str(exc):  # ejabberdctl's answer for an account that does not exist
                return False
            raise
        return True

    def unregister(self, user: str) -> bool:
        """Remove the account ``user@domain`` from the cluster (False if there was none); on disk on every
        node when this returns."""
        _check_user(user)
        self._require_running("removing accounts")
        script = _UNREGISTER_SCRIPT.substitute(node=self.node_name, domain=self.domain, user=user, sync=_SYNC)
        out = self._run_accounts_script("unreg", script, f"removing the account {user}", ("removed", "absent"),
                                        60.0)
        return "removed" in out.split()

    def _run_accounts_script(self, tag: str, script: str, doing: str, done: tuple[str, ...], timeout: float) -> str:
        """Run one of the account scripts below against this node; its output, or ServerError saying what
        failed (a script that ends well prints one of ``done``)."""
        try:
            proc = subprocess.run(self._erl_client_argv(tag, script), env=self._client_env(), cwd=self.dir,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ServerError(f"{doing} on {self.node_name} did not finish within {timeout:g} s") from exc
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or not any(word in out for word in done):
            failures = [line for line in out.splitlines() if line.startswith(("FAIL", "NODEDOWN", "UNSYNCED"))]
            raise ServerError(f"{doing} on ejabberd node {self.node_name} failed: "
                              + ("; ".join(failures[:5]) or out.strip()[-500:] or f"exit {proc.returncode}"))
        return out

    def _require_running(self, doing: str) -> None:
        if self._running_pid() is None:
            raise ServerError(f"the ejabberd node {self.node_name} is not running: start it before "
                              f"{doing} (`vertebra server start`)")

    # -- internals: files -------------------------------------------------------------------------

    def _render_config(self) -> str:
        component = ""
        if self.component_port is not None:
            lines = ["  -", f"    port: {self.component_port}", f'    ip: "{_yaml_quoted_body(self.host)}"',
                     "    module: ejabberd_service", "    check_from: true", "    hosts:"]
            for name, secret in sorted(self.components.items()):
                if not _DOMAIN_RE.match(name):
                    raise ServerError(f"invalid component domain {name!r}")
                lines += [f'      "{name}":', f'        password: "{_yaml_quoted_body(secret)}"']
            component = "\n".join(lines) + "\n"
        template = Template(_find_template().read_text())
        try:
            return template.substitute(
                domain=self.domain,
                room_service=room_service(self.domain),
                host=_yaml_quoted_body(self.host),
                port=self.port,
                cert=_yaml_quoted_body(self.cert_path),
                key=_yaml_quoted_body(self.key_path),
                log_level=self.log_level,
                component_listener=component,
                **self._room_creation(),
                **self._read_limits(),
            )
        except (KeyError, ValueError) as exc:
            raise ServerError(f"the config template {_find_template()} has an unknown placeholder: {exc}") from exc

    def _room_creation(self) -> dict[str, str]:
        """The template's lines saying who may create rooms on the room service: the room creators
        alone, or any local account when none is named."""
        if not self.room_creators:
            return {"room_creators_acl": "", "room_creation_rule": "    allow: local\n"}
        users = "".join(f'      - "{jid}"\n' for jid in self.room_creators)
        return {"room_creators_acl": "  room_creators:\n    user:\n" + users,
                "room_creation_rule": "    allow: room_creators\n"}

    def _read_limits(self) -> dict[str, str]:
        """The template's shaper lines: after authentication ejabberd shapes each session by the
        ``c2s_shaper`` rule, here none for the accounts the mesh names and the read limit for the rest."""
        limit = self.read_limit
        if limit is None:
            return {"read_limit_listener": "", "read_limit_acl": "", "read_limit_shaper": "", "read_limit_rule": ""}
        limit.check(self.domain)
        users = "".join(f'      - "{_yaml_quoted_body(jid)}"\n' for jid in sorted(set(limit.unlimited)))
        # The listener's shaper rule is matched before authentication (no JID yet: "unnamed") and again
        # once the JID is known; a burst of two seconds lets every login's handshake through unslowed.
        return {"read_limit_listener": "    shaper: c2s_shaper\n",
                "read_limit_acl": "  mesh_named:\n    user:\n" + users if users else "",
                "read_limit_shaper": (f"shaper:\n  unnamed:\n    rate: {limit.bytes_per_second}\n"
                                      f"    burst_size: {2 * limit.bytes_per_second}\n"),
                "read_limit_rule": "  c2s_shaper:\n" + ("    none: mesh_named\n" if users else "")
                                   + "    unnamed: all\n"}

    def _dist_address(self) -> str:
        return self.node_host if _is_ip(self.node_host) else "0.0.0.0"

    def _render_ctl_config(self) -> str:
        lines = [
            "# Generated by agents/ejabberd.py; sourced by the private ejabberdctl next to it.",
            f"ERLANG_NODE={self.node_name}",
            f"EJABBERD_CONFIG_PATH={self.config_path}",
            f"LOGS_DIR={self.logs_dir}",
            f"SPOOL_DIR={self.spool_dir}",
            f"EJABBERD_PID_PATH={self.pidfile}",
            f"CONTRIB_MODULES_PATH={self.dir / 'modules'}",
            f"CONTRIB_MODULES_CONF_DIR={self.dir / 'modules.d'}",
            "EJABBERD_BYPASS_WARNINGS=true",
            # +zdbbl: 128 MiB of distribution buffer per node pair before a send counts as busy (Erlang's
            # default is 1 MiB). ejabberd routes a stanza to a session on another node with
            # erlang:send(..., [nosuspend]), which drops it when the buffer is busy: a call to 20,000 agents
            # lost hundreds of requests to the other node's sessions without a trace (bench/README.md).
            f'ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0 +zdbbl 131072{self._scheduler_options()}"',
        ]
        if _is_ip(self.node_host):
            lines.append(f"INET_DIST_INTERFACE={self.node_host}")
        if self.epmd_port is None:
            # Standalone: the node listens for distribution on this port and needs no epmd.
            lines.append(f"ERL_DIST_PORT={self.dist_port}")
        else:
            lines += [
                f"ERL_EPMD_PORT={self.epmd_port}",
                "export ERL_EPMD_PORT",
                f"ERL_EPMD_ADDRESS={self._epmd_address()}",
                # The node itself listens on dist_port (for firewalls); ejabberdctl's short-lived
                # control nodes take any free port.
                'case "$1" in start|foreground|foreground-quiet|live)',
                f'    ERL_OPTIONS="$ERL_OPTIONS -kernel inet_dist_listen_min {self.dist_port}'
                f' inet_dist_listen_max {self.dist_port}";;',
                "esac",
            ]
        return "\n".join(lines) + "\n"

    def _scheduler_options(self) -> str:
        n = self.schedulers
        return "" if n is None else f" +S {n}:{n} +SDcpu {n}:{n}"

    def _recorded_dist_port(self) -> int | None:
        try:
            text = self.ctl_config_path.read_text()
        except OSError:
            return None
        m = re.search(r"^ERL_DIST_PORT=(\d+)$", text, re.M) or re.search(r"inet_dist_listen_min (\d+)", text)
        return int(m.group(1)) if m else None

    def _epmd_address(self) -> str:
        return self.node_host if _is_ip(self.node_host) else "0.0.0.0"

    def _write_ctl(self, system_ctl: Path) -> None:
        text = system_ctl.read_text()
        patched, n = re.subn(r"^INSTALLUSER=.*$", 'INSTALLUSER=""', text, count=1, flags=re.M)
        if n != 1:
            raise ServerError(f"{system_ctl} does not look like Debian's ejabberdctl (no INSTALLUSER line); "
                              f"reinstall it: {INSTALL_HINT}")
        self._write_private(self.ctl_path, patched)
        os.chmod(self.ctl_path, 0o700)

    def _ensure_cookie(self) -> None:
        cookie = self._cookie
        if cookie is None:
            try:
                cookie = self._shared_cookie_path.read_text().strip()
            except FileNotFoundError:
                cookie = secrets.token_hex(20)
                self.home.mkdir(parents=True, exist_ok=True)
                self._write_private(self._shared_cookie_path, cookie + "\n")
        try:
            if self.cookie_path.read_text() == cookie:
                return
        except FileNotFoundError:
            pass
        if self.cookie_path.exists():
            os.chmod(self.cookie_path, 0o600)
        self._write_private(self.cookie_path, cookie)
        os.chmod(self.cookie_path, 0o400)  # Erlang refuses a cookie file others can read

    def _ensure_cert(self) -> None:
        if self.tls_from is not None:
            src_cert, src_key = self.tls_from / "cert.pem", self.tls_from / "key.pem"
            if not (src_cert.is_file() and src_key.is_file()):
                raise ServerError(f"no cert.pem and key.pem in {self.tls_from} to share: start the first "
                                  "node before the ones that copy its certificate")
            if not (self.cert_path.is_file() and self.cert_path.read_bytes() == src_cert.read_bytes()):
                self._write_private(self.key_path, src_key.read_text())
                self._write_private(self.cert_path, src_cert.read_text())
                os.chmod(self.cert_path, 0o644)
            return
        super()._ensure_cert()

    # -- internals: processes ---------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ERL_", "EJABBERD", "ERLANG_"))}
        env["HOME"] = str(self.dir)  # the Erlang cookie is read from $HOME/.erlang.cookie
        return env

    def _ctl_options(self) -> list[str]:
        return ["--config-dir", str(self.dir), "--ctl-config", str(self.ctl_config_path),
                "--config", str(self.config_path), "--logs", str(self.logs_dir), "--spool", str(self.spool_dir),
                "--node", self.node_name]

    def _erl_client_argv(self, tag: str, script: str) -> list[str]:
        """A hidden, short-lived Erlang node that runs ``script`` against this node (as ejabberdctl's
        control nodes do)."""
        argv = ["erl", "-name", f"{tag}-{secrets.token_hex(3)}-{self.node_name}", "-hidden", "-noinput"]
        if _is_ip(self.node_host):
            argv += ["-kernel", "inet_dist_use_interface", "{" + self.node_host.replace(".", ",") + "}"]
        if self.epmd_port is None:
            argv += ["-erl_epmd_port", str(self.dist_port), "-start_epmd", "false", "-dist_listen", "false"]
        else:
            argv += ["-start_epmd", "false"]  # the epmd's port comes from ERL_EPMD_PORT (_client_env)
        return argv + ["-eval", script]

    def _client_env(self) -> dict[str, str]:
        env = self._env()
        if self.epmd_port is not None:
            env["ERL_EPMD_PORT"] = str(self.epmd_port)
        return env

    def _running_pid(self) -> int | None:
        # A node whose pidfile is lost or stale may still run: find it by its command line.
        return super()._running_pid() or self._adopt_orphan()

    def _is_ours(self, pid: int) -> bool:
        argv = _cmdline(pid)
        return any("beam" in a for a in argv[:1]) and self.node_name in argv and \
            any(str(self.spool_dir) in a for a in argv)

    def _adopt_orphan(self) -> int | None:
        """Find this node's VM when its pidfile was lost, and write the pidfile again."""
        if not self.spool_dir.is_dir():
            return None
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                pid = int(entry.name)
                if self._is_ours(pid) and _pid_alive(pid):
                    self._write_private(self.pidfile, f"{pid}\n")
                    return pid
        return None

    def _check_ports_free(self) -> None:
        assert self.dist_port is not None, "start() chooses the distribution port before it checks the ports"
        wanted = [(self.host, self.port, "client port"), (self._dist_address(), self.dist_port,
                                                          "Erlang distribution port")]
        if self.component_port is not None:
            wanted.append((self.host, self.component_port, "component port"))
        for host, port, what in wanted:
            exc = bind_error(host, port)
            if exc is None:
                continue
            if exc.errno == errno.EADDRINUSE:
                raise ServerError(f"port {port} on {host} ({what} of ejabberd node {self.node_name}) is already "
                                  "in use by another program; stop it or choose another port")
            raise ServerError(f"cannot listen on {host}:{port} ({what}): {exc.strerror}; "
                              "choose a local address and a free port")
        if self.epmd_port is not None and self.node_name.split("@")[0] in (self._epmd_names() or ()):
            raise ServerError(f"an Erlang node named {self.node_name.split('@')[0]} is already registered with "
                              f"the epmd on port {self.epmd_port}: stop it or choose another node name")

    def _epmd(self, *args: str) -> subprocess.CompletedProcess:
        env = self._env()
        env["ERL_EPMD_PORT"] = str(self.epmd_port)
        env["ERL_EPMD_ADDRESS"] = self._epmd_address()
        return subprocess.run(["epmd", *args], env=env, capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)

    def _epmd_names(self) -> list[str] | None:
        """Names registered with this node's epmd, or None if no epmd answers."""
        proc = self._epmd("-names")
        if proc.returncode != 0:
            return None
        return re.findall(r"^name (\S+) at port", proc.stdout, re.M)

    def _ensure_epmd(self) -> None:
        if self._epmd_names() is not None:
            return
        self._epmd("-daemon")
        deadline = time.monotonic() + 5
        while self._epmd_names() is None:
            if time.monotonic() > deadline:
                raise ServerError(f"epmd did not start on {self._epmd_address()}:{self.epmd_port}; is the port "
                                  "taken by another program?")
            time.sleep(0.05)

    def _stop_epmd_if_unused(self) -> None:
        """End the epmd once no node is registered with it (epmd itself refuses otherwise)."""
        if self.epmd_port is None:
            return
        me = self.node_name.split("@")[0]
        deadline = time.monotonic() + 3
        while True:
            names = self._epmd_names()
            if names is None:
                return
            if not names:
                self._epmd("-kill")
                return
            if me not in names or time.monotonic() > deadline:
                return  # other nodes still use it
            time.sleep(0.05)  # this node's name goes when its VM's connection to epmd closes

    def _spawn(self, timeout: float) -> None:
        self.pidfile.unlink(missing_ok=True)
        _raise_nofile_limit()       # inherited (agents/server.py says why not in a preexec_fn)
        with open(self.console_log, "ab") as log:
            start_offset = log.tell()
            proc = subprocess.Popen(
                [str(self.ctl_path), *self._ctl_options(), "foreground"],
                cwd=self.dir, env=self._env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )
        _children[str(self.dir)] = proc
        try:
            log_offset = self.log_path.stat().st_size
        except OSError:
            log_offset = 0
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                _children.pop(str(self.dir), None)
                raise ServerError(f"ejabberd node {self.node_name} exited with status {code} while starting; "
                                  + self._log_tails(start_offset, log_offset))
            # The client port opens before ejabberd has finished starting (its account tables may
            # not exist yet); `ejabberdctl status` exits 0 only once the node is fully started.
            if self._accepts_tcp() and self._running_pid() is not None and self._ctl_ok("status"):
                return
            if time.monotonic() > deadline:
                self._kill_group(proc)
                hint = ""
                if self.epmd_port is not None:
                    hint = ("if this node belongs to a cluster, Mnesia may be waiting for the node that "
                            "stopped last: start that node (or all of them) first; ")
                raise ServerError(f"ejabberd node {self.node_name} did not finish starting on "
                                  f"{self.host}:{self.port} within {timeout:g} s; " + hint
                                  + self._log_tails(start_offset, log_offset))
            time.sleep(0.05)

    def _join_if_needed(self, timeout: float, fresh: bool = False) -> None:
        if not self.cluster_join or self.cluster_join == self.node_name:
            return
        # Membership is in the node's own schema (db_nodes), which also lists members that are down:
        # a member whose peers are all stopped must start alone, not try to join again.
        if not fresh and self.cluster_join in self._db_nodes():
            return
        try:
            self.ctl("join_cluster", self.cluster_join, timeout=timeout + 30)
        except ServerError as exc:
            raise ServerError(f"ejabberd node {self.node_name} could not join the cluster of {self.cluster_join}"
                              f" (is that node running, reachable on its distribution port, registered with "
                              f"the epmd on port {self.epmd_port}, and does it share this node's Erlang "
                              f"cookie?): {exc}") from exc
        # Joining restarts ejabberd on this node: wait until it serves clients again.
        deadline = time.monotonic() + timeout
        while not (self._accepts_tcp() and self._ctl_ok("status")):
            if time.monotonic() > deadline:
                raise ServerError(f"ejabberd node {self.node_name} did not serve clients again after joining "
                                  f"{self.cluster_join}; " + self._log_tails(0, 0))
            time.sleep(0.05)

    def _stop_locked(self, timeout: float) -> bool:
        pid = self._running_pid()
        proc = _children.get(str(self.dir))
        if pid is None and proc is None:
            self._stop_epmd_if_unused()
            return False
        if pid is not None:
            self._terminate(pid, timeout, "ejabberd")  # the Erlang VM stops gracefully (init:stop) on SIGTERM
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._kill_group(proc)
            _children.pop(str(self.dir), None)
        self.pidfile.unlink(missing_ok=True)
        self._stop_epmd_if_unused()
        return pid is not None

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        proc = _children.get(str(self.dir))
        while time.monotonic() < deadline:
            if proc is not None:
                proc.poll()  # reap the ejabberdctl shell as soon as the VM under it exits
            if not _pid_alive(pid):
                return True
            time.sleep(0.05)
        return not _pid_alive(pid)

    def _kill_group(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        _children.pop(str(self.dir), None)

    def _log_tails(self, console_offset: int, log_offset: int, lines: int = 15) -> str:
        parts = []
        for path, offset in ((self.console_log, console_offset), (self.log_path, log_offset)):
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            tail = [line for line in text.strip().splitlines()
                    if "not recommended to run ejabberd as root" not in line][-lines:]
            if tail:
                parts.append(f"last lines of {path}:\n" + "\n".join(tail))
        return "\n".join(parts) if parts else f"no log output in {self.logs_dir}"


# Runs in a hidden Erlang node: registers (or updates) every {User, Password} in the batch file on the
# node through ejabberd_auth, in parallel chunks, and prints one FAIL line per failure.
_REGISTER_SCRIPT = Template(r"""
Node = '${node}',
Host = <<"${domain}">>,
case net_adm:ping(Node) of pong -> ok; pang -> io:format("NODEDOWN ~s~n", [Node]), halt(3) end,
{ok, Accounts} = file:consult(${file}),
Put = fun({U, Stored, Server, Salt}) ->
    P = {scram, Stored, Server, Salt, sha, ${iterations}},
    R = case rpc:call(Node, ejabberd_auth, try_register, [U, Host, P], 60000) of
        {error, exists} -> rpc:call(Node, ejabberd_auth, set_password, [U, Host, P], 60000);
        Other -> Other
    end,
    case R of ok -> ok; _ -> {U, R} end
end,
Chunks = fun Split([], Acc) -> Acc;
             Split(L, Acc) -> {H, T} = lists:split(min(50, length(L)), L), Split(T, [H | Acc]) end,
Self = self(),
Pids = [spawn_link(fun() -> Self ! {self(), [E || E <- lists:map(Put, C), E =/= ok]} end)
        || C <- Chunks(Accounts, [])],
Failed = lists:append([receive {Pid, F} -> F end || Pid <- Pids]),
[io:format("FAIL ~s ~p~n", [U, R]) || {U, R} <- Failed],
${sync}
io:format("registered ~b of ~b~n", [length(Accounts) - length(Failed), length(Accounts)]),
halt(case Failed ++ Unsynced of [] -> 0; _ -> 1 end).
""")

# Runs in a hidden Erlang node: removes the account ${user} if it exists, and prints whether it did.
_UNREGISTER_SCRIPT = Template(r"""
Node = '${node}',
Host = <<"${domain}">>,
case net_adm:ping(Node) of pong -> ok; pang -> io:format("NODEDOWN ~s~n", [Node]), halt(3) end,
Failed = case rpc:call(Node, ejabberd_auth, user_exists, [<<"${user}">>, Host], 60000) of
    false -> io:format("absent~n"), [];
    true -> case rpc:call(Node, ejabberd_auth, remove_user, [<<"${user}">>, Host], 60000) of
                ok -> io:format("removed~n"), [];
                R -> io:format("FAIL ${user} ~p~n", [R]), [R]
            end;
    R -> io:format("FAIL ${user} ~p~n", [R]), [R]
end,
${sync}
halt(case Failed ++ Unsynced of [] -> 0; _ -> 1 end).
""")

# The end of both scripts: Mnesia logs a change to its tables on disk only after a delay (its log is
# written in batches), so a node killed within seconds of a change loses it: an account just added, or
# one just removed, which would then let a revoked identity in again. Every node of the cluster (each
# keeps its own copy of the accounts) writes its log out before the script says it is done.
_SYNC = r"""Synced = case rpc:call(Node, mnesia, system_info, [running_db_nodes], 30000) of
    DbNodes when is_list(DbNodes) -> [{N, rpc:call(N, mnesia, sync_log, [], 60000)} || N <- DbNodes];
    Other -> [{Node, Other}]
end,
Unsynced = [{N, R} || {N, R} <- Synced, R =/= ok],
[io:format("UNSYNCED ~s ~p~n", [N, R]) || {N, R} <- Unsynced],"""
