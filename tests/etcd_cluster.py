"""A private etcd cluster for tests: three members on loopback, run from a state directory.

Like the private Prosody (agents/server.py), it never touches the machine's own etcd (port 2379):
every member gets free client and peer ports, its data directory and its log under ``home``, and
runs in a process group of its own. Every member is stopped on every way out: ``stop()``, leaving
the ``with`` block, and, should the test process end without either, at exit.

With ``tls=True`` the members serve their clients over TLS only and require a client certificate,
both signed by a CA made for the cluster (Debian's openssl): ``ca``, ``client_cert`` and
``client_key`` are what a broker's mesh file names under ``broker: {tls: ...}``.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from agents.ports import free_port

# Every member this process started and has not stopped: killed at exit whatever happened.
_running: dict[int, subprocess.Popen[bytes]] = {}


def _kill_left_over() -> None:
    for proc in list(_running.values()):
        _end(proc, signal.SIGKILL, 5)


atexit.register(_kill_left_over)


# Straight to the member, whatever proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _end(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Signal the member's process group (a suspended member is woken so TERM can end it)."""
    for each in (sig, signal.SIGCONT):
        try:
            os.killpg(proc.pid, each)
        except ProcessLookupError:
            break
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    _running.pop(proc.pid, None)


class EtcdError(Exception):
    pass


def _make_certificates(directory: Path, addresses: Sequence[str]) -> None:
    """A CA, a server certificate for ``addresses`` (and localhost) and a client certificate it signed,
    in ``directory``. The client certificate's name is no etcd user: with authentication on, a request
    is only allowed by the user and password the client logs in with."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise EtcdError("the 'openssl' program is not installed: `apt-get install openssl` as root")
    directory.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], cwd=directory, capture_output=True, text=True)
        if done.returncode != 0:
            raise EtcdError(f"openssl {args[0]} failed: {done.stderr.strip()}")

    run("req", "-x509", *key, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=vertebra test etcd CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    names = ",".join(["DNS:localhost", *(f"IP:{a}" for a in dict.fromkeys(addresses))])
    for name, usage, extra in (("server", "serverAuth", f"subjectAltName={names}"),
                               ("client", "clientAuth", "subjectAltName=DNS:vertebra-test-client")):
        run("req", *key, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN=vertebra-test-{name}",
            "-addext", extra, "-addext", f"extendedKeyUsage={usage}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-copy_extensions", "copy")


class Member:
    """One etcd member: its name, ports, data directory and, while it runs, its process. ``wrap``
    runs it another way (``ip netns exec NS``: on a simulated host, whose ports are all its own)."""

    def __init__(self, name: str, host: str, home: Path, wrap: Sequence[str] = (),
                 tls: ssl.SSLContext | None = None) -> None:
        self.name, self.host, self.wrap, self.tls = name, host, list(wrap), tls
        self.client_port, self.peer_port = (2379, 2380) if wrap else (free_port(host), free_port(host))
        self.data_dir, self.log_path = home / f"{name}.data", home / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def healthy(self) -> bool:
        """Whether the member answers and its cluster has a leader (etcd's /health). Not when another
        server answers on its port instead (one that took the port first, and speaks no HTTP): the member
        then exits, and start() moves the cluster to other ports."""
        try:
            opener = _DIRECT if self.tls is None else urllib.request.build_opener(
                urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self.tls))
            with opener.open(f"{self.client_url}/health", timeout=2) as reply:
                return json.load(reply).get("health") == "true"
        except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError):
            return False


class PrivateEtcd:
    """A three-member (or ``size``-member) etcd cluster on loopback, its state in ``home``; or one
    member on each of ``hosts``, each started through its ``wraps`` entry (simulated hosts)."""

    def __init__(self, home: Path, size: int = 3, host: str = "127.0.0.1", hosts: Sequence[str] = (),
                 wraps: Sequence[Sequence[str]] = (), tls: bool = False) -> None:
        self.home = home
        tls_dir = home / "tls"
        self.ca, self.client_cert, self.client_key = (tls_dir / "ca.pem", tls_dir / "client.pem",
                                                      tls_dir / "client-key.pem")
        self.tls = tls
        context = None
        if tls:
            _make_certificates(tls_dir, [host, *hosts])
            context = ssl.create_default_context(cafile=str(self.ca))
            context.load_cert_chain(self.client_cert, self.client_key)
        if hosts:
            self.members = [Member(f"m{n}", h, home, w, context) for n, (h, w) in enumerate(zip(hosts, wraps), 1)]
        else:
            self.members = [Member(f"m{n}", host, home, tls=context) for n in range(1, size + 1)]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """What the mesh file's ``broker: {state: ...}`` names for this cluster."""
        return "etcd://" + ",".join(self.endpoints)

    def start(self, timeout: float = 30.0, attempts: int = 3) -> None:
        """Start every member and wait for a leader. A loopback port chosen free can be taken before etcd
        binds it (by the other suite's servers, or as the local end of any connection on the machine):
        a member that exits saying so makes the whole cluster start again on new ports."""
        etcd = shutil.which("etcd")
        if etcd is None:
            raise EtcdError("the 'etcd' program is not installed: run `make install` (or `apt-get install"
                            " etcd-server` as root)")
        self.home.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            outcome = self._start_once(etcd, timeout)
            if outcome is None:
                return
            failed, status, said = outcome
            taken = "address already in use" in said
            if not taken or failed.wrap or attempt == attempts:
                raise EtcdError(f"etcd member {failed.name} exited with status {status} while starting"
                                f"{' (its port was taken)' if taken else ''}; see {failed.log_path}")
            for member in self.members:
                member.client_port, member.peer_port = free_port(member.host), free_port(member.host)

    def _start_once(self, etcd: str, timeout: float) -> tuple[Member, int | None, str] | None:
        """Start the members and wait for a leader; the member that exited meanwhile (the cluster
        stopped), its exit status and what it logged this time; or None once every member is healthy."""
        logged = {m.name: m.log_path.stat().st_size if m.log_path.exists() else 0 for m in self.members}
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        token = f"vertebra-test-{os.getpid()}-{id(self)}"  # members of another test's cluster never join ours
        for member in self.members:
            self._spawn(etcd, member, initial, token)
        deadline = time.monotonic() + timeout
        while not all(m.healthy() for m in self.members):
            for member in self.members:
                if member.proc is not None and member.proc.poll() is not None:
                    status = member.proc.returncode
                    self.stop()
                    with open(member.log_path, "rb") as log:
                        log.seek(logged[member.name])
                        return member, status, log.read().decode(errors="replace")
            if time.monotonic() > deadline:
                self.stop()
                raise EtcdError(f"the etcd cluster in {self.home} had no leader within {timeout:g} s; see the"
                                " members' logs there")
            time.sleep(0.1)
        return None

    def _spawn(self, etcd: str, member: Member, initial: str, token: str) -> None:
        client = member.client_url
        args = [etcd, "--name", member.name, "--data-dir", str(member.data_dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
                "--initial-cluster", initial, "--initial-cluster-token", token,
                "--initial-cluster-state", "new", "--logger", "zap", "--log-level", "warn"]
        if self.tls:
            tls_dir = self.ca.parent
            args += ["--client-cert-auth", "--trusted-ca-file", str(self.ca),
                     "--cert-file", str(tls_dir / "server.pem"), "--key-file", str(tls_dir / "server-key.pem")]
        # A new cluster only: a member left from an earlier start would carry the old ports.
        shutil.rmtree(member.data_dir, ignore_errors=True)
        with open(member.log_path, "ab") as log:
            member.proc = subprocess.Popen([*member.wrap, *args], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                           start_new_session=True, env={"PATH": os.environ.get("PATH", "")})
        _running[member.proc.pid] = member.proc

    def kill(self, n: int) -> None:
        """Member ``n`` dies at once, as when its machine goes away."""
        proc = self.members[n].proc
        if proc is not None:
            _end(proc, signal.SIGKILL, 5)
            self.members[n].proc = None

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running member answers with a leader (after one was killed, the others
        may first have to elect a new one)."""
        deadline = time.monotonic() + timeout
        while not all(m.healthy() for m in self.members if m.proc is not None):
            if time.monotonic() > deadline:
                raise EtcdError(f"the etcd cluster in {self.home} had no leader within {timeout:g} s")
            time.sleep(0.1)

    def stop(self) -> None:
        for member in self.members:
            if member.proc is not None:
                _end(member.proc, signal.SIGTERM, 10)
                member.proc = None

    def __enter__(self) -> PrivateEtcd:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
