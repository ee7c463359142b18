"""The check catalogue: configuration errors, typed arguments and argv building (agents.monitor.checks)."""

from typing import Any

import pytest

from agents.monitor.checks import (
    ArgSpec,
    CheckArgumentError,
    CheckConfigError,
    CheckSpec,
    checks_from_config,
    default_checks,
)
from agents.monitor.ranges import State

P = "/usr/lib/nagios/plugins"


def spec(**arguments: dict[str, Any]) -> CheckSpec:
    return CheckSpec.from_config("t", {"plugin": f"{P}/check_x", "args": ["--fixed"], "arguments": arguments})


def test_from_config_reads_every_field() -> None:
    check = CheckSpec.from_config(
        "web",
        {
            "plugin": f"{P}/check_http",
            "args": ["-H", "localhost"],
            "timeout": 3,
            "timeout_state": "critical",
            "description": "local web server",
            "arguments": {"warn": {"type": "float", "option": "-w", "min": 0, "help": "seconds"}},
        },
    )
    assert check.name == "web"
    assert check.fixed_args == ("-H", "localhost")
    assert check.timeout == 3.0
    assert check.timeout_state is State.CRITICAL
    assert check.arguments[0] == ArgSpec("warn", "float", "-w", min=0, help="seconds")
    assert check.argv() == [f"{P}/check_http", "-H", "localhost"]
    assert check.argv({"warn": "0.5"}) == [f"{P}/check_http", "-H", "localhost", "-w", "0.5"]


@pytest.mark.parametrize(
    ("name", "config", "words"),
    [
        ("Bad Name", {"plugin": f"{P}/check_x"}, ["'Bad Name'", "name"]),
        ("x", {"plugin": "check_x"}, ["'x'", "plugin", "absolute"]),
        ("x", {}, ["'x'", "plugin"]),
        ("x", {"plugin": f"{P}/check_x", "args": "-w 1"}, ["'x'", "args"]),
        ("x", {"plugin": f"{P}/check_x", "timeout": 0}, ["'x'", "timeout"]),
        ("x", {"plugin": f"{P}/check_x", "timeout_state": "bad"}, ["'x'", "timeout_state"]),
        ("x", {"plugin": f"{P}/check_x", "comand": "rm"}, ["'x'", "comand"]),
        ("x", {"plugin": f"{P}/check_x", "arguments": {"w": {"type": "rnage"}}}, ["'x'", "arguments.w.type", "rnage"]),
        ("x", {"plugin": f"{P}/check_x", "arguments": {"w": {"type": "str"}}}, ["arguments.w.pattern"]),
        ("x", {"plugin": f"{P}/check_x", "arguments": {"w": {"type": "str", "pattern": "("}}}, ["arguments.w.pattern"]),
        ("x", {"plugin": f"{P}/check_x", "arguments": {"w": {"type": "flag"}}}, ["arguments.w.option"]),
        ("x", {"plugin": f"{P}/check_x", "arguments": {"w": {"type": "int", "option": "w"}}}, ["arguments.w.option"]),
        ("x", {"plugin": f"{P}/check_x", "arguments": {"w": {"type": "choice"}}}, ["arguments.w.choices"]),
        ("x", {"plugin": f"{P}/check_x", "arguments": {"w": {"type": "range", "default": "10:x"}}},
         ["arguments.w.default", "Range format incorrect"]),
        ("x", {"plugin": f"{P}/check_x", "arguments": {"w": {"type": "int", "defualt": 1}}}, ["defualt"]),
        ("x", {"plugin": f"{P}/check_x", "arguments": {"W-1": {"type": "int"}}}, ["'W-1'"]),
        ("x", {"plugin": f"{P}/check_x", "arguments": {"w": {"type": "range", "min": 1}}}, ["arguments.w.min"]),
        ("x", {"plugin": f"{P}/check_x", "arguments": {"w": {"type": "int", "required": "yes"}}},
         ["arguments.w.required"]),
    ],
)
def test_config_errors_name_the_check_and_field(name: str, config: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(CheckConfigError) as caught:
        CheckSpec.from_config(name, config)
    for word in words:
        assert word in str(caught.value)


def test_undeclared_argument_is_refused() -> None:
    check = spec(warn={"type": "range", "option": "-w"})
    with pytest.raises(CheckArgumentError, match="does not take argument.*'command'.*it takes: warn"):
        check.argv({"command": "rm -rf /"})


def test_range_arguments_are_validated() -> None:
    check = spec(warn={"type": "range", "option": "-w"}, crit={"type": "range", "option": "-c"})
    assert check.argv({"warn": "@10:20", "crit": "~:5"}) == [f"{P}/check_x", "--fixed", "-w", "@10:20", "-c", "~:5"]
    assert check.argv({"warn": 10}) == [f"{P}/check_x", "--fixed", "-w", "10"]
    with pytest.raises(CheckArgumentError, match="'warn'.*Range format incorrect"):
        check.argv({"warn": "10:x"})


def test_int_arguments() -> None:
    check = spec(n={"type": "int", "option": "-n", "min": 1, "max": 5})
    assert check.argv({"n": "3"})[-2:] == ["-n", "3"]
    assert check.argv({"n": 5})[-1] == "5"
    for bad, why in [(0, "minimum"), (6, "maximum"), ("2.5", "integer"), (True, "expected int"), ("1e3", "integer")]:
        with pytest.raises(CheckArgumentError, match=why):
            check.argv({"n": bad})


def test_str_arguments_must_match_the_whole_pattern() -> None:
    check = spec(name={"type": "str", "option": "-C", "pattern": "[a-z]+"})
    assert check.argv({"name": "sshd"})[-1] == "sshd"
    for bad in ("sshd; rm", "SSHD", "", "a\nb"):
        with pytest.raises(CheckArgumentError, match="does not match"):
            check.argv({"name": bad})


def test_choice_and_flag_arguments() -> None:
    check = spec(
        mode={"type": "choice", "option": "-m", "choices": ["fast", "slow"]},
        verbose={"type": "flag", "option": "-v"},
    )
    assert check.argv({"mode": "fast", "verbose": True})[2:] == ["-m", "fast", "-v"]
    assert check.argv({"verbose": "false"})[2:] == []
    with pytest.raises(CheckArgumentError, match="not one of fast, slow"):
        check.argv({"mode": "medium"})
    with pytest.raises(CheckArgumentError, match="true or false"):
        check.argv({"verbose": "maybe"})


def test_leading_dash_is_refused_unless_declared() -> None:
    check = spec(
        text={"type": "str", "pattern": ".*"},
        low={"type": "range", "option": "-l"},
        offset={"type": "int", "option": "-o", "allow_dash": True},
    )
    with pytest.raises(CheckArgumentError, match="may not start with '-'"):
        check.argv({"text": "--help"})
    with pytest.raises(CheckArgumentError, match="may not start with '-'"):
        check.argv({"low": "-5:5"})
    assert check.argv({"offset": -3})[-2:] == ["-o", "-3"]


def test_required_defaults_and_positional_order() -> None:
    check = spec(
        state={"type": "int", "required": True},
        text={"type": "str", "pattern": "[a-z ]*"},
        extra={"type": "str", "pattern": "[a-z]*"},
    )
    with pytest.raises(CheckArgumentError, match="needs argument 'state'"):
        check.argv({})
    assert check.argv({"state": 2, "text": "hot now"})[2:] == ["2", "hot now"]
    with pytest.raises(CheckArgumentError, match="'extra' needs 'text'"):
        check.argv({"state": 1, "extra": "x"})


def test_metacharacters_stay_one_argv_element() -> None:
    check = default_checks()["dummy"]
    value = "$(reboot); `id` && echo > /etc/passwd *"
    assert check.argv({"state": 0, "text": value}) == [f"{P}/check_dummy", "0", value]


def test_default_catalogue() -> None:
    checks = default_checks()
    assert set(checks) == {"load", "disk", "procs", "users", "dummy"}
    assert checks["disk"].argv() == [f"{P}/check_disk", "-w", "20%", "-c", "10%", "-p", "/"]
    assert checks["disk"].argv({"path": "/var", "warn": "5"}) == [f"{P}/check_disk", "-w", "5", "-c", "10%", "-p",
                                                                  "/var"]
    assert checks["load"].argv({"per_cpu": True})[-1] == "-r"
    assert checks["procs"].argv({"crit": "1:1", "command": "init"}) == [f"{P}/check_procs", "-c", "1:1", "-C", "init"]
    assert checks["users"].argv() == [f"{P}/check_users", "-w", "5", "-c", "10"]
    with pytest.raises(CheckArgumentError):
        checks["disk"].argv({"path": "relative/dir"})
    for check in checks.values():
        assert check.plugin.startswith("/") and check.timeout > 0


def test_describe_lists_arguments_for_monitor_list() -> None:
    info = default_checks()["procs"].describe()
    assert info["name"] == "procs"
    names = [a["name"] for a in info["arguments"]]
    assert names == ["warn", "crit", "command", "user"]
    assert info["arguments"][0]["type"] == "range"
    assert "pattern" in info["arguments"][2]


def test_checks_from_config_section() -> None:
    checks = checks_from_config({"ping": {"plugin": f"{P}/check_ping"}})
    assert list(checks) == ["ping"]
    with pytest.raises(CheckConfigError, match="mapping"):
        checks_from_config(["ping"])  # type: ignore[arg-type]


def test_argspec_refuses_inconsistent_declarations() -> None:
    with pytest.raises(ValueError, match="pattern"):
        ArgSpec("x", "str")
    with pytest.raises(ValueError, match="type"):
        ArgSpec("x", "bytes")
