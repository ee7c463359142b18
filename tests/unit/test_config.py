"""Mesh file validation: every error names the file, the field and what is expected."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agents import config

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "mesh.example.yaml"


def parse(data, tmp_path):
    return config.parse(data, tmp_path / "mesh.yaml", tmp_path)


def test_example_mesh_file_is_valid(tmp_path):
    mesh = parse(yaml.safe_load(EXAMPLE.read_text()), tmp_path)
    assert [a.kind for a in mesh.agents] == ["storage", "fencing", "monitor"]
    assert mesh.admins == ("operator@vertebra.test",)
    assert mesh.broker_jid == "broker@vertebra.test/broker"
    assert [a.name for a in mesh.agents if a.gateway] == ["monitor1"]


@pytest.mark.parametrize("data, message", [
    ({"servr": {}}, "top level: unknown key 'servr'"),
    ({"server": {"port": 70000}}, "server.port: expected an integer from 1 to 65535, got 70000"),
    ({"server": {"domain": "Bad Domain"}}, "server.domain: expected a lowercase DNS name"),
    ({"agents": [{"name": "a", "kind": "toaster"}]}, "agents[0].kind: expected one of fencing, monitor, storage"),
    ({"agents": [{"name": "a", "kind": "storage", "resources": ["host"]}]},
     "agents[0].resources[0]: resource 'host' must be an absolute path"),
    ({"agents": [{"name": "A b", "kind": "storage"}]}, "agents[0].name: expected an account name"),
    ({"agents": [{"name": "a", "kind": "storage", "gateway": "yes"}]}, "agents[0].gateway: expected true or false"),
    ({"agents": [{"name": "a", "kind": "storage"}, {"name": "a", "kind": "monitor"}]}, "a used twice"),
    ({"agents": [{"kind": "storage"}]}, "agents[0]: each agent needs a name and a kind"),
    ({"admins": "operator"}, "admins: expected a list"),
])
def test_errors_name_file_field_and_expectation(tmp_path, data, message):
    with pytest.raises(config.ConfigError) as err:
        parse(data, tmp_path)
    assert str(err.value).startswith(str(tmp_path / "mesh.yaml") + ": ")
    assert message in str(err.value)


def test_passwords_are_generated_owner_only_and_kept(tmp_path):
    mesh = parse({"agents": [{"name": "a1", "kind": "storage"}]}, tmp_path)
    first = mesh.ensure_passwords()
    assert set(first) == {"broker", "operator", "a1"}
    path = mesh.password_file("a1")
    assert path.stat().st_mode & 0o777 == 0o600
    assert mesh.ensure_passwords() == first


def test_missing_home_file_is_created_from_the_example(tmp_path):
    mesh = config.load(home=tmp_path)
    assert (tmp_path / "mesh.yaml").read_text() == EXAMPLE.read_text()
    assert mesh.home == tmp_path


def test_one_broker_instance_per_cluster_node(tmp_path):
    mesh = parse({"server": {"engine": "ejabberd", "port": 5400, "nodes": ["127.0.0.1:5401", "127.0.0.1:5402"]}},
                 tmp_path)
    assert mesh.broker_resources == ["broker", "broker-2", "broker-3"]
    assert mesh.broker_jids == [f"broker@vertebra.test/{r}" for r in mesh.broker_resources]
    assert mesh.broker_jid == mesh.broker_jids[0]


def test_an_endpoint_can_start_at_any_node():
    import ssl

    from agents.actor import Endpoint

    ep = Endpoint("h1", 1, "d", ssl.create_default_context(), (("h2", 2), ("h3", 3)))
    second = ep.starting_at(1)
    assert second.addresses == [("h2", 2), ("h3", 3), ("h1", 1)] and second.first and not ep.first
    assert ep.starting_at(3).addresses == ep.addresses
