"""The private XMPP server of one mesh: a Prosody 0.12 instance under ``<home>/server``.

Vertebra never uses the system Prosody service.  ``PrivateServer`` writes its own config from
``deploy/prosody.cfg.lua.in``, makes a self-signed certificate naming the XMPP domain, starts and stops
``prosody -F`` as a detached process with its own pidfile, and creates accounts by writing Prosody's
``internal_hashed`` account files directly (SCRAM-SHA-1 keys computed here), which is what makes
thousands of accounts cheap.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from string import Template

from .ports import bind_error

TEMPLATE_NAME = "prosody.cfg.lua.in"
# RFC 5802's minimum; also set as Prosody's default_iteration_count in the template.
ITERATIONS = 4096
_USER_RE = re.compile(r"^[a-z0-9_][a-z0-9._-]{0,63}$")
_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
# Characters Prosody's datamanager leaves unescaped in file names (Lua's %w).
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")

# Children this process spawned, so stop() can reap them: an unreaped child stays a zombie whose
# pid still answers kill(pid, 0).
_children: dict[int, subprocess.Popen] = {}


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, mode 0600, at once: written beside it, then renamed over it, so a
    reader (Prosody, a program reading a password) sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}~")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ServerError(Exception):
    """The private server could not do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class ReadLimit:
    """How fast the server reads what accounts the mesh file does not name send.

    An account of the server that is none of the mesh's people, services or actors has no business
    sending much; if it floods an agent, its stanzas would otherwise queue ahead of everyone else's in
    that agent's one connection, where no fairness in the agent can reorder them. Read slowly, the flood
    waits in its own sender's buffers instead. The accounts in ``unlimited`` are read at full speed.
    """

    bytes_per_second: int = 10_000
    unlimited: tuple[str, ...] = ()  # bare JIDs

    def check(self, domain: str) -> None:
        """Raise ServerError unless the rate is a positive whole number and every JID an account of ``domain``."""
        if not isinstance(self.bytes_per_second, int) or self.bytes_per_second < 1000:
            raise ServerError(f"invalid read limit {self.bytes_per_second!r}: use a whole number of bytes per second,"
                              " at least 1000")
        for jid in self.unlimited:
            _check_account(jid, domain, "exempt {jid} from the read limit")


def _check_account(jid: str, domain: str, doing: str) -> None:
    """Raise ServerError unless ``jid`` is a valid account of ``domain``; ``doing`` (with ``{jid}``) says
    what the server was asked to do for it."""
    user, _, at = jid.partition("@")
    _check_user(user)
    if at != domain:
        raise ServerError(f"cannot {doing.format(jid=jid)}: it is not an account of {domain}")


def room_service(domain: str) -> str:
    """The private server's XEP-0045 room service, where the operators' ops room lives: both engines'
    templates serve it under this name, and the mesh file's checks and the chat bot know it by it."""
    return f"rooms.{domain}"


def room_creators_checked(creators: Iterable[str], domain: str) -> tuple[str, ...]:
    """The accounts alone allowed to create rooms on the server's room service (room_service()), checked:
    each an account of ``domain``. None given: every account of the server may (a test server)."""
    checked = {str(jid).lower() for jid in creators}
    for jid in checked:
        _check_account(jid, domain, "let {jid} create rooms")
    return tuple(sorted(checked))


def find_template(name: str = TEMPLATE_NAME) -> Path:
    """Locate a server config template in deploy/ (Prosody's by default).

    The repository copy wins (the project is installed with ``pip install -e``); VERTEBRA_DEPLOY_DIR
    points elsewhere for installs that do not keep the source tree.
    """
    candidates = []
    if env := os.environ.get("VERTEBRA_DEPLOY_DIR"):
        candidates.append(Path(env) / name)
    candidates.append(Path(__file__).resolve().parents[1] / "deploy" / name)
    candidates.append(Path("/usr/share/vertebra/deploy") / name)
    for path in candidates:
        if path.is_file():
            return path
    raise ServerError(
        f"cannot find the config template {name}; looked in "
        + ", ".join(str(p.parent) for p in candidates)
        + ". Run from a source checkout or set VERTEBRA_DEPLOY_DIR to the deploy/ directory."
    )


def _path_encode(s: str) -> str:
    """Escape a name the way Prosody's util.datamanager does for directory and file names."""
    return "".join(c if c in _ALNUM else f"%{ord(c):02x}" for c in s)


def _scram_sha1_keys(password: str, salt: str, iterations: int) -> tuple[str, str]:
    salted = hashlib.pbkdf2_hmac("sha1", password.encode(), salt.encode(), iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha1).digest()
    stored_key = hashlib.sha1(client_key).hexdigest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha1).hexdigest()
    return stored_key, server_key


def _lua_quoted_body(value: object) -> str:
    """Escape a value for the inside of a double-quoted Lua string (paths may hold quotes)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _check_user(user: str) -> None:
    if not isinstance(user, str) or not _USER_RE.match(user):
        raise ServerError(
            f"invalid account name {user!r}: use 1-64 characters of lowercase a-z, digits, '.', '_' "
            "or '-', not starting with '.' or '-'"
        )


def _check_password(user: str, password: str) -> None:
    # Printable ASCII passes SASLprep unchanged, so the keys computed here match what Prosody derives.
    if not isinstance(password, str) or not password or not all(" " <= c <= "~" for c in password):
        raise ServerError(
            f"invalid password for {user!r}: use a non-empty string of printable ASCII characters"
        )


def _pid_alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            del _children[pid]
            return False
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A zombie is dead for our purposes; its parent just has not reaped it yet.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class PrivateNode:
    """What every private XMPP server this project runs has, Prosody here or an ejabberd node
    (``agents.ejabberd``): a self-signed certificate naming the domain, which clients pin; a lock that
    serializes start and stop between processes; a status. Subclasses set ``home``, ``domain``, ``host``,
    ``port``, ``dir``, ``cert_path``, ``key_path``, ``pidfile`` and ``_lock_path``, and define ``_is_ours``."""

    noun = "server"  # what messages call it
    home: Path
    domain: str
    host: str
    port: int
    dir: Path
    cert_path: Path
    key_path: Path
    pidfile: Path
    _lock_path: Path

    def _running_pid(self) -> int | None:
        """The pid of this instance's server as its pidfile names it, or None; removes a pidfile left
        by a dead process (or one that is not this server: the pid was reused)."""
        text = self._read_pidfile()
        if text is None:
            return None
        try:
            pid = int(text)
        except ValueError:
            pid = 0
        if pid > 0 and _pid_alive(pid) and self._is_ours(pid):
            return pid
        self.pidfile.unlink(missing_ok=True)
        return None

    def _read_pidfile(self) -> str | None:
        """The pidfile's text, or None if there is none. Prosody's mod_posix truncates the file and then
        writes its pid, so an empty file is read again for a moment before it counts as stale:
        unlinking it in that window would lose a live server's pidfile."""
        deadline = time.monotonic() + 0.5
        while True:
            try:
                text = self.pidfile.read_text().strip()
            except FileNotFoundError:
                return None
            if text or time.monotonic() > deadline:
                return text
            time.sleep(0.005)

    def _is_ours(self, pid: int) -> bool:
        """Whether process ``pid`` is this instance's server."""
        raise NotImplementedError

    def _terminate(self, pid: int, timeout: float, name: str) -> None:
        """SIGTERM (both servers stop gracefully on it), SIGKILL if still there after ``timeout``."""
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not self._wait_gone(pid, timeout):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if not self._wait_gone(pid, 5.0):
                raise ServerError(f"{name} (pid {pid}) did not exit even after SIGKILL; check `ps {pid}`")

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        raise NotImplementedError

    def status(self) -> dict:
        """Whether it runs, and where; clears a stale pidfile."""
        pid = self._running_pid() if self.dir.is_dir() else None
        return {"running": pid is not None, "pid": pid, "host": self.host, "port": self.port,
                "domain": self.domain, "home": str(self.home), **self._describe()}

    def _describe(self) -> dict:
        """What status() adds for this kind of server."""
        return {}

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts exactly this server's certificate."""
        if not self.cert_path.is_file():
            raise ServerError(f"no certificate at {self.cert_path} yet: start the {self.noun} first")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.cert_path))
        return ctx

    @staticmethod
    def _write_private(path: Path, text: str) -> None:
        write_private(path, text)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # Serializes start/stop between processes sharing one home (CLI, fixtures, make run).
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _ensure_cert(self) -> None:
        if self.cert_path.is_file() and self.key_path.is_file() and self._cert_names_domain():
            return
        openssl = shutil.which("openssl")
        if openssl is None:
            raise ServerError("the 'openssl' program is not installed: run `make install` "
                              "(or `apt-get install openssl` as root)")
        tmp_key = self.dir / "key.pem.new"
        tmp_cert = self.dir / "cert.pem.new"
        old_umask = os.umask(0o077)
        try:
            proc = subprocess.run(
                [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-days", "3650", "-subj", f"/CN={self.domain}",
                 "-keyout", str(tmp_key), "-out", str(tmp_cert),
                 "-addext", f"subjectAltName=DNS:{self.domain}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,digitalSignature,keyCertSign",
                 "-addext", "extendedKeyUsage=serverAuth"],
                capture_output=True, text=True,
            )
        finally:
            os.umask(old_umask)
        if proc.returncode != 0:
            raise ServerError(f"openssl could not make the server certificate: {proc.stderr.strip()}")
        os.chmod(tmp_key, 0o600)
        os.chmod(tmp_cert, 0o644)  # public; other local users' clients pin it
        os.replace(tmp_key, self.key_path)
        os.replace(tmp_cert, self.cert_path)

    def _cert_names_domain(self) -> bool:
        proc = subprocess.run(
            ["openssl", "x509", "-noout", "-in", str(self.cert_path), "-checkhost", self.domain],
            capture_output=True, text=True,
        )
        return proc.returncode == 0 and "does match" in proc.stdout

    def _accepts_tcp(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False


class PrivateServer(PrivateNode):
    """One private Prosody instance; everything it owns lives under ``home/"server"``."""

    def __init__(self, home: Path, domain: str = "vertebra.test", host: str = "127.0.0.1", port: int = 5322,
                 read_limit: ReadLimit | None = None, room_creators: Iterable[str] = ()):
        if not isinstance(domain, str) or not _DOMAIN_RE.match(domain):
            raise ServerError(f"invalid XMPP domain {domain!r}: use a lowercase DNS name such as 'vertebra.test'")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ServerError(f"invalid port {port!r}: use an integer between 1 and 65535")
        self.room_creators = room_creators_checked(room_creators, domain)
        self.home = Path(home).resolve()
        self.domain = domain
        self.host = host
        self.port = port
        self.read_limit = read_limit  # None: every account is read at full speed (a test server)
        self.dir = self.home / "server"
        self.config_path = self.dir / "prosody.cfg.lua"
        self.data_dir = self.dir / "data"
        self.pidfile = self.dir / "prosody.pid"
        self.log_path = self.dir / "prosody.log"
        self.cert_path = self.dir / "cert.pem"
        self.key_path = self.dir / "key.pem"
        self.admin_socket = self.dir / "prosody.sock"
        self._lock_path = self.dir / ".lock"

    def __repr__(self) -> str:
        return f"PrivateServer(home={str(self.home)!r}, domain={self.domain!r}, host={self.host!r}, port={self.port})"

    # -- life cycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        """Start the server unless it already runs with the same config; wait until it accepts TCP."""
        prosody = shutil.which("prosody")
        if prosody is None:
            raise ServerError("the 'prosody' program is not installed: run `make install` "
                              "(or `apt-get install prosody` as root)")
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            config = self._render_config()
            pid = self._running_pid() or self._adopt_orphan()
            if pid is not None:
                if self.config_path.is_file() and self.config_path.read_text() == config:
                    return
                raise ServerError(
                    f"a private Prosody (pid {pid}) already runs in {self.dir} with a different config; "
                    "stop it first (`vertebra server stop`) and start again"
                )
            self._check_port_free()
            self._ensure_cert()
            self.data_dir.mkdir(mode=0o700, exist_ok=True)
            self._write_private(self.config_path, config)
            self._spawn(prosody, timeout)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the server (TERM, then KILL after ``timeout``); True if it was running."""
        if not self.dir.is_dir():
            return False
        with self._locked():
            pid = self._running_pid() or self._adopt_orphan()
            if pid is None:
                return False
            self._terminate(pid, timeout, "Prosody")
            self.pidfile.unlink(missing_ok=True)
            return True

    # -- accounts ---------------------------------------------------------------------------------

    def _describe(self) -> dict:
        return {"engine": "prosody"}

    def register(self, user: str, password: str) -> None:
        """Create the account ``user@domain`` or change its password."""
        self.register_many({user: password})

    def register_many(self, accounts: dict[str, str]) -> None:
        """Create or update many accounts at once; works whether or not the server runs.

        Prosody reads account files on every login, so files written here take effect at once.
        """
        for user, password in accounts.items():
            _check_user(user)
            _check_password(user, password)
        if not accounts:
            return
        self._accounts_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
        items = list(accounts.items())
        if len(items) < 8:
            for user, password in items:
                self._write_account(user, password)
            return
        # hashlib.pbkdf2_hmac releases the GIL, so threads use every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for _ in pool.map(lambda item: self._write_account(*item), items):
                pass

    def _accounts_dir(self) -> Path:
        return self.data_dir / _path_encode(self.domain) / "accounts"

    def _account_file(self, user: str) -> Path:
        return self._accounts_dir() / f"{_path_encode(user)}.dat"

    def has_account(self, user: str) -> bool:
        """Whether the account ``user@domain`` exists; works whether or not the server runs."""
        _check_user(user)
        return self._account_file(user).exists()

    def unregister(self, user: str) -> bool:
        """Remove the account ``user@domain`` (False if there was none): no later login succeeds;
        a session already logged in lasts until it ends."""
        _check_user(user)
        try:
            self._account_file(user).unlink()
        except FileNotFoundError:
            return False
        return True

    # -- internals --------------------------------------------------------------------------------

    def _write_account(self, user: str, password: str) -> None:
        salt = str(uuid.uuid4())
        stored_key, server_key = _scram_sha1_keys(password, salt, ITERATIONS)
        # The same Lua table shape mod_auth_internal_hashed stores via util.datamanager.
        text = (
            "return {\n"
            f'\t["iteration_count"] = {ITERATIONS};\n'
            f'\t["salt"] = "{salt}";\n'
            f'\t["server_key"] = "{server_key}";\n'
            f'\t["stored_key"] = "{stored_key}";\n'
            "};\n"
        )
        self._write_private(self._account_file(user), text)

    def _render_config(self) -> str:
        template = Template(find_template().read_text())
        try:
            return template.substitute(
                server_dir=_lua_quoted_body(self.dir),
                pidfile=_lua_quoted_body(self.pidfile),
                data_path=_lua_quoted_body(self.data_dir),
                admin_socket=_lua_quoted_body(self.admin_socket),
                host=_lua_quoted_body(self.host),
                port=self.port,
                log_file=_lua_quoted_body(self.log_path),
                cert=_lua_quoted_body(self.cert_path),
                key=_lua_quoted_body(self.key_path),
                domain=self.domain,
                room_service=room_service(self.domain),
                room_creation=self._room_creation(),
                **self._read_limits(),
            )
        except (KeyError, ValueError) as exc:
            raise ServerError(f"the config template {find_template()} has an unknown placeholder: {exc}") from exc

    def _room_creation(self) -> str:
        """The room service's lines saying who may create rooms: the room creators alone (made the
        service's admins, which Prosody's mod_muc lets create rooms and makes owners of every room), or
        every account of this server when none is named."""
        if not self.room_creators:
            return 'restrict_room_creation = "local"'
        names = ", ".join(f'"{jid}"' for jid in self.room_creators)
        return f"admins = {{ {names} }}\n    restrict_room_creation = true"

    def _read_limits(self) -> dict[str, str]:
        """The template's mod_limits lines: nothing without a read limit."""
        limit = self.read_limit
        if limit is None:
            return {"limits_module": "", "read_limits": ""}
        limit.check(self.domain)
        names = "; ".join(f'"{jid}"' for jid in sorted(set(limit.unlimited)))
        # mod_limits on Prosody's epoll backend pauses reading a session for (bytes read / rate) after
        # each read; its burst option is not used there. Its rate parser reads "Nb/s" as N*10 bytes, so
        # the rate is given in kB/s (rounded down).
        return {"limits_module": '\n    "limits";',
                "read_limits": (
                    "\n-- Accounts the mesh file does not name are read at most this fast"
                    " (agents/server.py ReadLimit);\n"
                    "-- the mesh's own people, services and actors are read at full speed.\n"
                    f'limits = {{ c2s = {{ rate = "{limit.bytes_per_second // 1000}kb/s" }} }}\n'
                    f"unlimited_jids = {{ {names} }}\n")}

    def _adopt_orphan(self) -> int | None:
        """Find this instance's Prosody when its pidfile was lost, and write the pidfile again.

        Without this a server whose pidfile was deleted could be neither stopped nor restarted:
        its port would look taken by a stranger.
        """
        if not self.config_path.is_file():
            return None
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and entry.name != str(os.getpid()):
                pid = int(entry.name)
                argv = _cmdline(pid)
                if argv and str(self.config_path) in argv and any("prosody" in a for a in argv) \
                        and _pid_alive(pid):
                    self._write_private(self.pidfile, f"{pid}\n")
                    return pid
        return None

    def _is_ours(self, pid: int) -> bool:
        # A recycled pid could belong to anything; only a prosody on our config file counts.
        argv = _cmdline(pid)
        if not argv:
            return True  # /proc unreadable: trust the pidfile rather than lose a live server
        return any("prosody" in a for a in argv) and str(self.config_path) in argv

    def _check_port_free(self) -> None:
        # Prosody only logs a failed bind and keeps running, so find out before starting it.
        exc = bind_error(self.host, self.port)
        if exc is None:
            return
        if exc.errno == errno.EADDRINUSE:
            raise ServerError(
                f"port {self.port} on {self.host} is already in use by another program; "
                "stop it or choose another port for the private server"
            ) from exc
        raise ServerError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}; "
                          "choose a local address and a free port") from exc

    def _spawn(self, prosody: str, timeout: float) -> None:
        self.pidfile.unlink(missing_ok=True)
        env = dict(os.environ, HOME=str(self.dir))
        # The log names every account that logs in, and from where: not for other local users.
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        _raise_nofile_limit()       # here, inherited: see there why not in the child
        with open(fd, "ab") as log:
            start_offset = log.tell()
            proc = subprocess.Popen(
                [prosody, "--config", str(self.config_path), "-F"],
                cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )
        _children[proc.pid] = proc
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                _children.pop(proc.pid, None)
                raise ServerError(
                    f"Prosody exited with status {code} while starting; last lines of {self.log_path}:\n"
                    + self._log_tail(start_offset)
                )
            if self._accepts_tcp():
                break
            if time.monotonic() > deadline:
                self._kill_failed(proc)
                raise ServerError(
                    f"Prosody did not accept connections on {self.host}:{self.port} within {timeout:g} s; "
                    f"last lines of {self.log_path}:\n" + self._log_tail(start_offset)
                )
            time.sleep(0.02)
        # mod_posix writes the pidfile during start-up, possibly after the port accepts. Wait for it,
        # so that it does not truncate the file under a status() later; write it ourselves only if it
        # never comes, so status() and stop() work from the moment start() returns.
        while self._read_pidfile() != str(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._read_pidfile() != str(proc.pid):
            self._write_private(self.pidfile, f"{proc.pid}\n")

    def _kill_failed(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        _children.pop(proc.pid, None)

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            child = _children.get(pid)
            if child is not None:
                try:
                    child.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    return False
                _children.pop(pid, None)
                return True
            if not _pid_alive(pid):
                return True
            time.sleep(0.02)
        return not _pid_alive(pid)

    def _log_tail(self, offset: int, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        tail = text.strip().splitlines()[-lines:]
        return "\n".join(tail) if tail else "(log is empty)"


def _raise_nofile_limit() -> None:
    """Raise this process's soft limit of open files to its hard limit, before a server is spawned: each
    client is a file descriptor, and the usual soft limit of 1024 stops the 1000-agent benchmark. Raised
    here for the child to inherit, not in a preexec_fn: with one, the forked child runs the at-fork
    handlers Python libraries registered before it execs, and gRPC's (the etcd client's) restarts its
    poller there, which close_fds then breaks: the child aborts (seen as a Prosody that "exited with status
    -6 while starting"). Without one, subprocess forks (vfork) and execs with no Python run in between."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
