"""The test etcd cluster (tests/etcd_cluster.py) starts even when a port it chose as free is taken before
etcd binds it, as happens while the Prosody and ejabberd suites run side by side (CI)."""

from __future__ import annotations

import socket
import threading

from etcd_cluster import PrivateEtcd


def test_a_member_whose_port_was_taken_starts_again_on_another(tmp_path):
    etcd = PrivateEtcd(tmp_path / "etcd", size=1)
    member = etcd.members[0]
    taken = member.client_port
    with socket.socket() as squatter:
        squatter.bind((member.host, taken))
        squatter.listen()
        with etcd:
            assert member.client_port != taken
            assert member.healthy()
            assert "address already in use" in member.log_path.read_text()


def test_a_member_whose_port_an_xmpp_server_took_starts_again_on_another(tmp_path):
    # What a private Prosody or ejabberd node started on the same port first answers etcd's health
    # check with: a stream error, not HTTP (seen in bench/cluster_state.py, which starts both).
    etcd = PrivateEtcd(tmp_path / "etcd", size=1)
    member = etcd.members[0]
    taken = member.client_port
    with socket.socket() as squatter:
        squatter.bind((member.host, taken))
        squatter.listen()
        stop = threading.Event()

        def answer_as_xmpp() -> None:
            squatter.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = squatter.accept()
                except OSError:
                    continue
                with conn:
                    conn.recv(4096)     # the request, which is not well-formed XML
                    conn.sendall(b"<?xml version='1.0'?><stream:stream id='' xmlns='jabber:client' xmlns:stream="
                                 b"'http://etherx.jabber.org/streams'><stream:error><not-well-formed xmlns="
                                 b"'urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>")

        answering = threading.Thread(target=answer_as_xmpp, daemon=True)
        answering.start()
        try:
            with etcd:
                assert member.client_port != taken
                assert member.healthy()
                assert "address already in use" in member.log_path.read_text()
        finally:
            stop.set()
            answering.join()
