"""Simulated hosts for tests: network namespaces on one bridge, each with an address of its own.

Each host is a namespace with its loopback and one link (a veth pair) to a bridge in the test's own
namespace, which has the bridge's address and so reaches every host. ``partition(n)`` takes host
``n``'s link down (packets to and from it are lost, connections stay open as after a cable is
pulled), ``heal(n)`` brings it back. Programs run on a host through ``wrap(n)`` (``ip netns exec``).
Everything is removed on ``remove()``, on leaving the ``with`` block, and at exit.

Needs the right to make namespaces (root, or CAP_SYS_ADMIN and CAP_NET_ADMIN): ``permitted()`` says
whether this process has it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
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
