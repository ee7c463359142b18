"""The device registry: a valid `fencing:` section loads; each mistake is named precisely."""

import pytest

from agents.fencing.devices import DeviceRegistry, FencingConfigError, UnknownNodeError
from agents.fencing.driver import Secret


def good_config(tmp_path):
    secret = tmp_path / "pdu.secret"
    secret.write_text("s3cret-pass\n")
    return {
        "devices": {
            "pdu1": {"agent": "fence_dummy", "params": {"type": "file", "power_timeout": 2},
                     "secret_files": {"passwd": str(secret)},
                     "plugs": {"node1": 3, "node2": "4"}, "timeout": 5},
            "ipmi1": {"agent": "/usr/sbin/fence_dummy", "params": {"type": "file"}},
        },
        "levels": {"node1": [["pdu1"], ["ipmi1"]], "node2": [["pdu1"]]},
    }


def problems_of(config):
    with pytest.raises(FencingConfigError) as info:
        DeviceRegistry.from_config(config)
    return info.value.problems


def test_valid_config_loads(tmp_path):
    registry = DeviceRegistry.from_config(good_config(tmp_path))
    assert registry.nodes() == ["node1", "node2"]
    levels = registry.levels_for("node1")
    assert [[d.name for d in level] for level in levels] == [["pdu1"], ["ipmi1"]]
    pdu = registry.devices["pdu1"]
    assert pdu.program == "/usr/sbin/fence_dummy"
    assert pdu.plug_for("node1") == "3"           # YAML integers become plug strings
    assert pdu.params["power_timeout"] == "2"
    assert registry.devices["ipmi1"].plug_for("node1") is None


def test_secret_is_read_at_use_time_and_never_shown(tmp_path):
    registry = DeviceRegistry.from_config(good_config(tmp_path))
    pdu = registry.devices["pdu1"]
    params = pdu.agent_params()
    assert params["passwd"] == Secret("s3cret-pass")  # trailing newline is not part of it
    assert "s3cret" not in repr(pdu) and "s3cret" not in repr(params) and "s3cret" not in str(params)
    (tmp_path / "pdu.secret").write_text("rotated\n")
    assert pdu.agent_params()["passwd"].reveal() == "rotated"


def test_secret_file_gone_at_use_time_names_device_and_file(tmp_path):
    registry = DeviceRegistry.from_config(good_config(tmp_path))
    (tmp_path / "pdu.secret").unlink()
    with pytest.raises(FencingConfigError, match=r"device pdu1: secret_files.passwd: cannot read"):
        registry.devices["pdu1"].agent_params()


def test_unknown_agent_program(tmp_path):
    config = good_config(tmp_path)
    config["devices"]["pdu1"]["agent"] = "fence_nosuchthing"
    [problem] = problems_of(config)
    assert problem.startswith("device pdu1: agent: unknown agent program")
    assert "/usr/sbin/fence_nosuchthing" in problem


@pytest.mark.parametrize("agent", ["../fence_dummy", "dummy", "/bin/sh"])
def test_agent_must_be_a_fence_program(tmp_path, agent):
    config = good_config(tmp_path)
    config["devices"]["ipmi1"]["agent"] = agent
    [problem] = problems_of(config)
    assert problem.startswith("device ipmi1: agent:")


def test_missing_plug_for_node(tmp_path):
    config = good_config(tmp_path)
    config["levels"]["node3"] = [["pdu1"]]
    [problem] = problems_of(config)
    assert problem == "device pdu1: plugs: missing plug for node node3 (used in levels.node3 level 1)"


def test_unreadable_secret_file(tmp_path):
    config = good_config(tmp_path)
    config["devices"]["pdu1"]["secret_files"]["passwd"] = str(tmp_path / "missing")
    [problem] = problems_of(config)
    assert "device pdu1: secret_files.passwd: unreadable secret file" in problem


def test_inline_password_is_refused(tmp_path):
    config = good_config(tmp_path)
    config["devices"]["ipmi1"]["params"]["passwd"] = "hunter22"
    [problem] = problems_of(config)
    assert "device ipmi1: params.passwd: secrets must not be written" in problem
    assert "hunter22" not in problem


@pytest.mark.parametrize("key", ["action", "option", "port", "plug", "nodename"])
def test_reserved_params_are_refused(tmp_path, key):
    config = good_config(tmp_path)
    config["devices"]["ipmi1"]["params"][key] = "x"
    [problem] = problems_of(config)
    assert problem.startswith(f"device ipmi1: params.{key}:")


def test_single_target_device_may_serve_only_one_node(tmp_path):
    config = good_config(tmp_path)
    config["levels"]["node2"].append(["ipmi1"])
    [problem] = problems_of(config)
    assert "device ipmi1: has no plugs" in problem and "node1, node2" in problem


def test_unknown_device_in_level_and_unknown_field_all_reported(tmp_path):
    config = good_config(tmp_path)
    config["levels"]["node1"].append(["ghost"])
    config["devices"]["pdu1"]["plugz"] = {}
    config["devices"]["ipmi1"]["timeout"] = -1
    problems = problems_of(config)
    assert len(problems) == 3
    assert any("levels.node1 level 3: unknown device 'ghost'" in p for p in problems)
    assert any("device pdu1: unknown field 'plugz'" in p for p in problems)
    assert any("device ipmi1: timeout:" in p for p in problems)


def test_empty_or_malformed_sections(tmp_path):
    assert problems_of({}) == ["fencing.devices: expected a mapping of device name to device"]
    assert problems_of([]) == ["fencing: expected a mapping with 'devices' and 'levels'"]
    config = good_config(tmp_path)
    config["levels"]["node1"] = "pdu1"
    assert problems_of(config) == [
        "levels.node1: expected a list of levels, each a list of device names"]


def test_unknown_node_lookup_names_the_configured_ones(tmp_path):
    registry = DeviceRegistry.from_config(good_config(tmp_path))
    with pytest.raises(UnknownNodeError, match="'node9'.*node1, node2"):
        registry.levels_for("node9")
