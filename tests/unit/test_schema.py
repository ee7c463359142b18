"""The schema layer: every error in the mesh file, an agent kind's settings in it, or a workflow file names
the file, the line to fix and the field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from agents import config
from agents.schema import SchemaError, line_of, read
from broker.workflow_spec import WorkflowError, load_file

MESH = """\
server:
  port: 5400
agents:
  - name: s1
    kind: storage
    settings:
      driver: embedded
      clones: {per_owner: 3}
  - name: m1
    kind: monitor
    settings:
      schedule:
        disk: {check: disk, interval: 60}
  - name: f1
    kind: fencing
"""


def mesh_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def load_error(tmp_path: Path, text: str, check: bool = True) -> str:
    with pytest.raises(config.ConfigError) as err:
        config.load(mesh_file(tmp_path, text), tmp_path, check_settings=check)
    return str(err.value)


def test_the_mesh_file_and_every_kinds_settings_load(tmp_path):
    mesh = config.load(mesh_file(tmp_path, MESH), tmp_path, check_settings=True)
    assert [a.kind for a in mesh.agents] == ["storage", "monitor", "fencing"]


@pytest.mark.parametrize("old, new, where", [
    ("  port: 5400", "  port: 70000", "mesh.yaml:2: server.port: expected an integer from 1 to 65535"),
    ("    kind: monitor", "    kind: toaster", "mesh.yaml:10: agents[1].kind: expected one of"),
    ("  - name: f1", "  - name: f1\n    colour: red", "mesh.yaml:15: agents[2]: unknown key 'colour'"),
    # each kind's settings, checked by the kind's own parser, at the line of the mistake
    ("      driver: embedded", "      driver: zfs", "mesh.yaml:7: agents[0].settings.driver: is 'zfs'"),
    ("      driver: embedded", "      drivr: embedded", "mesh.yaml:7: agents[0].settings: unknown key 'drivr'"),
    ("{per_owner: 3}", "{per_owner: 0}", "mesh.yaml:8: agents[0].settings.clones.per_owner: must be a positive"),
    ("      clones: {per_owner: 3}", "      masking: {hooks: {h: {argv: [/no/such/hook]}}}",
     "mesh.yaml:8: agents[0].settings.masking.hooks.h.argv: hook cannot be run"),
    ("interval: 60}", "intervall: 60}", "mesh.yaml:13: agents[1].settings.schedule.disk: unknown key 'intervall'"),
    ("      schedule:\n", "      checks:\n        disk: {plugin: rel/check_disk}\n      schedule:\n",
     "mesh.yaml:13: agents[1].settings.checks.disk: check 'disk': field 'plugin' must be an absolute path"),
    ("interval: 60}", "interval: -1}", "mesh.yaml:13: agents[1].settings.schedule.disk.interval: expected a number"),
    ("    kind: fencing", "    kind: fencing\n    settings:\n      clustr: c1",
     "mesh.yaml:17: agents[2].settings: settings.clustr: unknown key"),
])
def test_each_error_names_the_file_the_line_and_the_field(tmp_path, old, new, where):
    assert old in MESH
    text = load_error(tmp_path, MESH.replace(old, new))
    assert text.startswith(str(tmp_path) + "/" + where), text


def test_settings_are_checked_only_when_asked_and_only_for_the_agents_named(tmp_path):
    text = MESH.replace("driver: embedded", "driver: zfs")
    config.load(mesh_file(tmp_path, text), tmp_path)  # `vertebra call` does not check agents' settings
    config.load(mesh_file(tmp_path, text), tmp_path, check_settings=["m1"])
    assert "agents[0].settings.driver" in load_error(tmp_path, text, check=["s1"])


def test_a_fencing_device_problem_is_at_its_device(tmp_path):
    text = MESH + textwrap.indent(textwrap.dedent("""\
        settings:
          cluster: c1
          fencing:
            devices:
              d: {agent: fence_dummy, plugs: {n1: "1"}, timeout: 0}
            levels: {n1: [[d]]}
        """), "    ")
    assert load_error(tmp_path, text).startswith(f"{tmp_path}/mesh.yaml:20: agents[2].settings: device d: timeout")


def test_duplicate_keys_and_bad_yaml_name_the_line(tmp_path):
    assert load_error(tmp_path, MESH.replace("  port: 5400", "  port: 5400\n  port: 5401")).startswith(
        f"{tmp_path}/mesh.yaml:3: duplicate key 'port' (first at line 2)")
    assert load_error(tmp_path, MESH + "  - [\n").startswith(f"{tmp_path}/mesh.yaml:")


def test_a_workflow_file_error_names_its_line(tmp_path):
    (tmp_path / "wf.yaml").write_text("name: wf\nsteps:\n  - {name: a, op: x.y}\n  - {name: b, op: x.y, bound_to: c}\n")
    with pytest.raises(WorkflowError) as err:
        load_file(tmp_path / "wf.yaml")
    assert str(err.value) == "wf.yaml:4: step b.bound_to: 'c' is not an earlier step"
    assert isinstance(err.value, SchemaError)


def test_a_kind_parser_on_its_own_names_its_settings():
    from agents.monitor.settings import parse_settings

    with pytest.raises(SchemaError) as err:
        parse_settings({"max_concurrent": 0})
    assert str(err.value) == "monitor settings: max_concurrent: expected an integer from 1 to 1024, got 0"


def test_a_field_path_finds_keys_that_hold_dots(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("a:\n  hosts:\n    db1.example.net: x\n    db2.example.net:\n      - 1\n      - 2\n")
    doc = read(path)
    assert line_of(doc, "a.hosts.db2.example.net[1]") == 6
    assert line_of(doc, "a.hosts.db1.example.net") == 3
    assert line_of(doc, "a.nothing.here") == 1


def test_an_error_raised_on_its_own_is_placed_in_the_file(tmp_path):
    from agents.fencing.devices import FencingConfigError
    from agents.schema import Fields

    path = mesh_file(tmp_path, MESH)
    where = Fields(path, document=read(path)).within("agents[1].settings")
    placed = SchemaError("expected a number", field="schedule.disk.interval").located(where)
    assert str(placed) == f"{path}:13: agents[1].settings.schedule.disk.interval: expected a number"
    fencing = FencingConfigError(["settings.x: unknown key"]).located(where)
    assert isinstance(fencing, FencingConfigError) and fencing.problems == ["settings.x: unknown key"]
    assert str(fencing).startswith(f"{path}:11: agents[1].settings: invalid fencing configuration")


def test_the_brokers_workflow_files_are_checked_with_the_mesh_file(tmp_path):
    flows = tmp_path / "workflows"  # the mesh file's default workflows: directory
    flows.mkdir()
    (flows / "good.yaml").write_text("name: good\nsteps:\n  - {name: s, op: x.y}\n")
    config.load(mesh_file(tmp_path, MESH), tmp_path, check_settings=True)
    (flows / "bad.yaml").write_text("name: bad\nsteps:\n  - name: s\n    op: x.y\n    typo: 1\n")
    text = load_error(tmp_path, MESH)
    assert f"the broker's workflow files ({flows}) must all load" in text, text
    assert "bad.yaml:5: steps[0]: unknown key 'typo'" in text, text
    config.load(mesh_file(tmp_path, MESH), tmp_path, check_settings=["m1"])  # the broker does not run here
    config.load(mesh_file(tmp_path, MESH), tmp_path)  # `vertebra call` checks no settings


def test_the_kinds_and_their_settings_checks_are_the_installed_entry_points():
    from agents import kinds
    from agents.fencing.settings import parse_settings as fencing
    from agents.monitor.settings import parse_settings as monitor
    from agents.storage.settings import parse_settings as storage
    from broker.workflow_spec import check_settings as broker

    assert kinds.agent_kinds() == ("fencing", "monitor", "storage")  # every installed kind but the broker
    checks = {kind: kinds.settings_check(kind) for kind in (kinds.BROKER, *kinds.agent_kinds())}
    assert checks == {"broker": broker, "fencing": fencing, "monitor": monitor, "storage": storage}
    assert kinds.settings_check("toaster") is None
