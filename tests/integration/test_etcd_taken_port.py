"""The test etcd cluster (tests/etcd_cluster.py) starts even when a port it chose as free is taken before
etcd binds it, as happens while the Prosody and ejabberd suites run side by side (CI)."""

from __future__ import annotations

import socket

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
