"""People and services in the mesh file: how they are written, what is refused (file, line, field), and
that each gets an account with a password file and counts as named for the server's read limit."""

from __future__ import annotations

import textwrap

import pytest

from agents import config

MESH = """\
server: {domain: example.test}
agents:
  - {name: mon1, kind: monitor}
people:
  - alice
  - {name: bob, unix_user: bob}
services:
  - {name: nagios, unix_user: nagios}
  - {name: fence-c1}
"""


def load(tmp_path, text):
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent(text))
    return config.load(path, tmp_path)


def test_people_and_services_are_identities_with_their_unix_users(tmp_path):
    mesh = load(tmp_path, MESH)
    assert mesh.identities == (config.Identity("alice", "person"), config.Identity("bob", "person", "bob"),
                               config.Identity("nagios", "service", "nagios"), config.Identity("fence-c1", "service"))
    assert mesh.identity("nagios").unix_user == "nagios"
    assert mesh.identity("mon1") is None
    assert mesh.identity_of_user("bob").name == "bob"
    assert mesh.identity_of_user("root") is None


def test_each_identity_gets_an_owner_only_password_file(tmp_path):
    mesh = load(tmp_path, MESH)
    passwords = mesh.ensure_passwords()
    assert {"alice", "bob", "nagios", "fence-c1", "operator", "broker", "mon1"} == set(passwords)
    assert mesh.password_file("nagios").stat().st_mode & 0o777 == 0o600
    assert mesh.ensure_passwords(["nagios"]) == {"nagios": passwords["nagios"]}


def test_identities_are_read_at_full_speed(tmp_path):
    limit = load(tmp_path, MESH).read_limit()
    assert "nagios@example.test" in limit.unlimited and "alice@example.test" in limit.unlimited


@pytest.mark.parametrize("section, line, message", [
    ("people:\n  - Alice\n", 4, "people[0]: expected an account name"),
    ("people:\n  - {unix_user: bob}\n", 4, "people[0]: each entry of people needs a name"),
    ("services:\n  - {name: nagios, unix_user: Nagios Daemon}\n", 4,
     "services[0].unix_user: expected a local Unix user name"),
    ("services:\n  - {name: nagios, user: nagios}\n", 4, "services[0]: unknown key 'user'"),
    ("people:\n  - mon1\n", 4, "people[0]: mon1 is already an account of this mesh file"),
    ("people: [alice]\nservices:\n  - alice\n", 5, "services[0]: alice is listed twice (first at people[0])"),
    ("services:\n  - {name: nagios, unix_user: nagios}\n  - {name: icinga, unix_user: nagios}\n", 5,
     "services[1].unix_user: Unix user nagios already stands for nagios (services[0])"),
    ("people: alice\n", 3, "people: expected a list"),
])
def test_errors_name_the_line_and_field(tmp_path, section, line, message):
    with pytest.raises(config.ConfigError) as err:
        load(tmp_path, "server: {domain: example.test}\nagents: [{name: mon1, kind: monitor}]\n" + section)
    assert str(err.value).startswith(f"{tmp_path / 'mesh.yaml'}:{line}: "), str(err.value)
    assert message in str(err.value)


def _uid_of(user: str) -> int:
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        pytest.skip(f"no Unix user {user} here")


def test_the_gateway_knows_callers_by_uid(tmp_path):
    from agents.identities import CallerRefused, Callers

    mesh = load(tmp_path, MESH.replace("unix_user: bob", "unix_user: nobody"))
    passwords = mesh.ensure_passwords()
    callers = Callers(mesh)
    root = 0
    # root: the operator when it names nobody, any account it names with "as", or the JID it presents.
    assert callers.credentials(root, {}) == ("operator@example.test", passwords["operator"])
    assert callers.credentials(root, {"as": "fence-c1"}) == ("fence-c1@example.test", passwords["fence-c1"])
    assert callers.credentials(root, {"jid": "x@example.test", "password": "pw"}) == ("x@example.test", "pw")
    with pytest.raises(CallerRefused, match="'mallory' is none; add it under people: or services:"):
        callers.credentials(root, {"as": "mallory"})
    with pytest.raises(CallerRefused, match="must present its password"):
        callers.credentials(root, {"jid": "x@example.test"})
    # A mapped user is its identity, with no password of its own; it may name itself, nobody else.
    nobody = _uid_of("nobody")
    assert callers.credentials(nobody, {}) == ("bob@example.test", passwords["bob"])
    assert callers.credentials(nobody, {"as": "bob"}) == ("bob@example.test", passwords["bob"])
    with pytest.raises(CallerRefused, match="Unix user nobody calls through the gateway as bob@example.test only"):
        callers.credentials(nobody, {"jid": "operator@example.test", "password": passwords["operator"]})
    with pytest.raises(CallerRefused, match="not as alice"):
        callers.credentials(nobody, {"as": "alice"})


def test_the_gateway_refuses_an_unmapped_user_saying_how_to_map_it(tmp_path):
    from agents.identities import CallerRefused, Callers

    mesh = load(tmp_path, MESH.replace("unix_user: nagios", "unix_user: nagios-x"))
    uid = _uid_of("nobody")
    with pytest.raises(CallerRefused) as err:
        Callers(mesh).credentials(uid, {"jid": "operator@example.test", "password": "guess"})
    assert str(err.value).startswith(f"the gateway refuses Unix user nobody (uid {uid}): the mesh file")
    assert "add one under people: or services: with unix_user: nobody" in str(err.value)
