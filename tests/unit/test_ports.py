"""agents.ports.free_port: a port free now, below the kernel's ephemeral range, so that no outgoing
connection can take it before the server that asked for it binds it."""

from __future__ import annotations

import errno
import itertools
import socket

from agents import ports


def test_the_port_is_free_and_below_the_ephemeral_range() -> None:
    low, _ = ports.ephemeral_range()
    for _ in range(20):
        port = ports.free_port()
        assert ports.LOWEST <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_passed_over(monkeypatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            other = probe.getsockname()[1]
        picks = itertools.chain([taken, taken], itertools.repeat(other))
        monkeypatch.setattr(ports, "ephemeral_range", lambda: (65000, 65535))
        monkeypatch.setattr(ports.random, "randrange", lambda lo, hi: next(picks))
        assert ports.free_port() == other


def test_without_room_below_the_range_the_kernel_chooses(monkeypatch) -> None:
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1024, 65535))
    port = ports.free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_the_range_is_read_from_the_kernel(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "ip_local_port_range"
    fake.write_text("40000\t50000\n")
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE", fake)
    assert ports.ephemeral_range() == (40000, 50000)
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE", tmp_path / "missing")
    assert ports.ephemeral_range() == (32768, 60999)


def test_bind_error_says_why_a_port_cannot_be_bound() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        exc = ports.bind_error("127.0.0.1", taken)
        assert exc is not None and exc.errno == errno.EADDRINUSE
    assert ports.bind_error("127.0.0.1", taken) is None
