"""The test etcd cluster (tests/etcd_cluster.py) starts even when a port it chose as free is taken before
etcd binds it, as happens while the Prosody and ejabberd suites run side by side (CI): by a socket that
only listens, or by a server that answers in another protocol (a private Prosody or ejabberd node)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import pytest

from etcd_cluster import PrivateEtcd

# What an XMPP server started on the port first answers etcd's health check with: a stream error, not
# HTTP (seen in bench/cluster_state.py, which starts a private Prosody beside the cluster).
XMPP_STREAM_ERROR = (b"<?xml version='1.0'?><stream:stream id='' xmlns='jabber:client' xmlns:stream="
                     b"'http://etherx.jabber.org/streams'><stream:error><not-well-formed xmlns="
                     b"'urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>")


def _answer_as_xmpp(squatter: socket.socket, stop: threading.Event) -> None:
    squatter.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = squatter.accept()
        except OSError:
            continue
        with conn:
            conn.recv(4096)     # the request, which is not well-formed XML
            conn.sendall(XMPP_STREAM_ERROR)


def _only_listen(squatter: socket.socket, stop: threading.Event) -> None:
    stop.wait()


@pytest.mark.parametrize("squat", [_only_listen, _answer_as_xmpp], ids=["listening", "answering as xmpp"])
def test_a_member_whose_port_was_taken_starts_again_on_another(
        tmp_path, squat: Callable[[socket.socket, threading.Event], None]) -> None:
    etcd = PrivateEtcd(tmp_path / "etcd", size=1)
    member = etcd.members[0]
    taken = member.client_port
    with socket.socket() as squatter:
        squatter.bind((member.host, taken))
        squatter.listen()
        stop = threading.Event()
        squatting = threading.Thread(target=squat, args=(squatter, stop), daemon=True)
        squatting.start()
        try:
            with etcd:
                assert member.client_port != taken
                assert member.healthy()
                assert "address already in use" in member.log_path.read_text()
        finally:
            stop.set()
            squatting.join()
