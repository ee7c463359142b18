"""Checking and choosing local TCP ports for the servers this project starts itself. Checking: whether a
private Prosody's or ejabberd node's port can be bound, before the server is started on it. Choosing (an
ejabberd node's Erlang distribution port here; private Prosody and ejabberd nodes, epmd and etcd in the
tests and benchmarks): a port free now that no outgoing connection can take before the server binds it.

Binding port 0 and closing the socket finds a free port in the kernel's ephemeral range, the range every
outgoing connection draws its local port from, so in the moment before the server binds it any connect()
on the machine may take it (seen in CI: an etcd member exited with "bind: address already in use" while
the other test suite ran beside it). A port below that range is never handed out that way.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LINUX_DEFAULT = (32768, 60999)
LOWEST = 10000          # below it are the ports of services people run by hand
_TRIES = 100


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default where unreadable)."""
    try:
        low, high = (int(v) for v in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return _LINUX_DEFAULT
    return low, high


def bind_error(host: str, port: int, reuse_address: bool = True) -> OSError | None:
    """Why a TCP socket cannot bind ``host:port`` now; None when it can. With ``reuse_address``, as the
    servers bind (a port whose old connections linger in TIME_WAIT counts as free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if reuse_address:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` free now, chosen at random below the ephemeral range (random, so two test runs
    side by side rarely try the same one). Falls back to the kernel's choice only on a machine whose
    ephemeral range leaves no room below it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low, _ = ephemeral_range()
    if low > LOWEST:
        for _ in range(_TRIES):
            port = random.randrange(LOWEST, low)
            if bind_error(host, port, reuse_address=False) is None:   # a port still in TIME_WAIT is passed over
                return port
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
