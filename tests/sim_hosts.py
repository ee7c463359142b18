"""Simulated hosts for tests: network namespaces on one bridge, each with an address of its own.

Each host is a namespace with its loopback and one link (a veth pair) to a bridge in the test's own
namespace, which has the bridge's address and so reaches every host. ``partition(n)`` takes host
``n``'s link down (packets to and from it are lost, connections stay open as after a cable is
pulled), ``heal(n)`` brings it back. Programs run on a host through ``wrap(n)`` (``ip netns exec``).
Everything is removed on ``remove()``, on leaving the ``with`` block, and at exit.

Needs the right to make namespaces (root, or CAP_SYS_ADMIN and CAP_NET_ADMIN): ``permitted()`` says
whether this process has it.

``EjabberdNode`` runs one node of an ejabberd cluster on a host: this file, run as a program inside the
host's namespace, starts the node (agents/ejabberd.py) and does what the test writes to its stdin
(``register`` accounts, ``stop``); it stops the node when its stdin closes, however the test ends.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

_made: list[SimulatedHosts] = []


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ip = shutil.which("ip") or "/usr/sbin/ip"
    return subprocess.run([ip, *args], capture_output=True, text=True, check=check)


def permitted() -> str:
    """Empty when namespaces can be made here, else why not (for the skip message)."""
    if shutil.which("ip") is None and not os.path.exists("/usr/sbin/ip"):
        return "the 'ip' program (iproute2) is not installed"
    probe = f"vprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"network namespaces are not permitted here ({made.stderr.strip() or 'ip netns add failed'})"
    _ip("netns", "del", probe, check=False)
    return ""


class SimulatedHosts:
    """``count`` hosts at 10.R.S.1, 10.R.S.2, ... on a bridge at 10.R.S.254 (R.S from the pid)."""

    def __init__(self, count: int = 3) -> None:
        tag = os.getpid() % 60000
        self.net = f"10.{200 + tag // 250 % 50}.{tag % 250}"
        self.bridge, self.bridge_address = f"vbr{tag}", f"{self.net}.254"
        self.names = [f"vh{tag}-{n}" for n in range(1, count + 1)]
        self.links = [f"vh{tag}l{n}" for n in range(1, count + 1)]
        self.addresses = [f"{self.net}.{n}" for n in range(1, count + 1)]

    def create(self) -> None:
        _made.append(self)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for name, link, address in zip(self.names, self.links, self.addresses):
                _ip("netns", "add", name)
                _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name)
                _ip("link", "set", link, "master", self.bridge)
                _ip("link", "set", link, "up")
                _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    def wrap(self, n: int) -> list[str]:
        """The command prefix that runs a program on host ``n`` (0-based)."""
        return [shutil.which("ip") or "/usr/sbin/ip", "netns", "exec", self.names[n]]

    def partition(self, n: int) -> None:
        _ip("link", "set", self.links[n], "down")

    def heal(self, n: int) -> None:
        _ip("link", "set", self.links[n], "up")

    def remove(self) -> None:
        for name in self.names:
            _ip("netns", "del", name, check=False)  # takes its end of the veth, and so both ends
        _ip("link", "del", self.bridge, check=False)
        if self in _made:
            _made.remove(self)

    def __enter__(self) -> SimulatedHosts:
        self.create()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


@atexit.register
def _remove_left_over() -> None:
    for hosts in list(_made):
        hosts.remove()


class EjabberdNode:
    """Node ``n`` (0-based) of an ejabberd cluster on ``hosts``, listening on the host's address, port
    5222; node 0 is the first, the others join it and serve its certificate. State under ``home``."""

    PORT = 5222

    def __init__(self, hosts: SimulatedHosts, n: int, home: Path) -> None:
        self.hosts, self.n, self.home = hosts, n, home
        self.address = hosts.addresses[n]
        self.proc: subprocess.Popen[str] | None = None

    @property
    def cert_path(self) -> Path:
        return self.home / "ejabberd-v1" / "cert.pem"  # the first node's: every node serves it

    def start(self) -> None:
        log = open(self.home / f"node{self.n + 1}.log", "w")
        self.proc = subprocess.Popen([*self.hosts.wrap(self.n), sys.executable, str(Path(__file__)), "ejabberd",
                                      str(self.home), str(self.n + 1), self.address, self.hosts.addresses[0]],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                     env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        self._expect("ready", f"ejabberd node {self.n + 1} did not start; see {log.name}")

    def register(self, accounts: dict[str, str]) -> None:
        self._say(f"register {json.dumps(accounts)}")
        self._expect("ok", "registering the accounts failed")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self._say("stop")
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _say(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _expect(self, word: str, error: str) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != word:
            self.stop()
            raise RuntimeError(error)


def _run_ejabberd_node(home: Path, n: int, address: str, first: str) -> None:
    from agents.ejabberd import PrivateEjabberd

    node = PrivateEjabberd(home, "vertebra.test", host=address, port=EjabberdNode.PORT, node_name=f"v{n}@{address}",
                           epmd_port=4369, dist_port=4370, cluster_join=None if n == 1 else f"v1@{first}",
                           tls_from=None if n == 1 else home / "ejabberd-v1")
    node.start(timeout=90)
    try:
        print("ready", flush=True)
        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            if command == "register":
                node.register_many(json.loads(argument))
                print("ok", flush=True)
            elif command == "stop":
                break
    finally:
        node.stop()


if __name__ == "__main__" and sys.argv[1:2] == ["ejabberd"]:
    _run_ejabberd_node(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
