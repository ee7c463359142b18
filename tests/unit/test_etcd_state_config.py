"""The broker's shared state in the mesh file (``broker: {state: ...}``): SQLite by default, or etcd
with its members, key prefix, TLS and credentials; a mistake names the field and what to write."""

from __future__ import annotations

import pytest

from agents import config


def parse(data, tmp_path):
    return config.parse(data, tmp_path / "mesh.yaml", tmp_path)


def test_the_short_form_and_sqlite_keep_the_state_in_the_state_directory(tmp_path):
    assert parse({"broker": "brk"}, tmp_path).broker_state is None
    mesh = parse({"broker": {"name": "brk", "state": "sqlite"}}, tmp_path)
    assert mesh.broker == "brk" and mesh.broker_state is None and mesh.broker_jid.startswith("brk@")


def test_etcd_members_prefix_tls_and_credentials(tmp_path):
    for name in ("ca.pem", "broker.pem", "broker-key.pem", "etcd.password"):
        (tmp_path / name).write_text("x")
    mesh = parse({"broker": {"state": "etcd://10.0.0.1:2379,node2:2379,[::1]:2379/mesh-a", "user": "vertebra",
                             "password_file": "etcd.password",
                             "tls": {"ca": "ca.pem", "cert": "broker.pem", "key": "broker-key.pem"}}}, tmp_path)
    state = mesh.broker_state
    assert mesh.broker == "broker" and state is not None
    assert state.endpoints == ("10.0.0.1:2379", "node2:2379", "[::1]:2379") and state.prefix == "/mesh-a"
    assert state.ca == tmp_path / "ca.pem" and state.key == tmp_path / "broker-key.pem"
    assert state.user == "vertebra" and state.password_file == tmp_path / "etcd.password"
    assert parse({"broker": {"state": "etcd://h:2379"}}, tmp_path).broker_state.prefix == "/vertebra"


@pytest.mark.parametrize("broker, message", [
    ({"state": "postgres://db"}, "broker.state: expected sqlite or etcd://HOST:PORT"),
    ({"state": "etcd://h1:2379,h2"}, "broker.state: expected HOST:PORT"),
    ({"state": "sqlite", "user": "u"}, "broker.user: broker.user applies to state on etcd only"),
    ({"state": "etcd://h:2379", "tls": {"ca": "missing.pem"}}, "broker.tls.ca: no file at"),
    ({"state": "etcd://h:2379", "user": "u"}, "broker.user: give broker.user and broker.password_file together"),
    ({"stat": "etcd://h:2379"}, "broker: unknown key 'stat'"),
])
def test_mistakes_name_the_field(tmp_path, broker, message):
    with pytest.raises(config.ConfigError) as err:
        parse({"broker": broker}, tmp_path)
    assert message in str(err.value)
