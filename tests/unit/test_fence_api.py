"""The Fence Agent API rules in agents.fencing.fence_api: parsing, aliases, option=, exit codes."""

import pytest

from agents.fencing.fence_api import (
    ExitCode, FenceApiError, Parameter, build_request, check_values, format_stdin, parse_argv,
    parse_stdin, read_request, state_from_status_exit, status_exit_for,
)

PARAMS = (
    Parameter("action", "Fencing action", required=True, short="o", value_hint="action"),
    Parameter("plug", "Plug", short="n", obsoletes="port"),
    Parameter("port", "Plug", deprecated=True, alias_of="plug"),
    Parameter("nodename", "Node name"),
    Parameter("timeout", "Timeout", type="second", default="50"),
    Parameter("verbose", "Verbose", type="boolean", short="v"),
    Parameter("mode", "Mode", type="select", choices=("a", "b")),
)


def test_stdin_comments_quotes_and_dash_keys():
    pairs = parse_stdin('# comment\n\naction="off"\nstatus-file=/tmp/x\n  nodename=node1  \n')
    assert pairs == {"action": "off", "status_file": "/tmp/x", "nodename": "node1"}


@pytest.mark.parametrize("line", ["action = off", "action =off", "action= off"])
def test_spaces_around_equals_are_refused(line):
    with pytest.raises(FenceApiError, match="no spaces"):
        parse_stdin(line + "\n")


def test_line_without_equals_is_refused():
    with pytest.raises(FenceApiError, match="line 2: expected key=value"):
        parse_stdin("action=off\nreboot\n")


def test_conflicting_duplicate_key_is_refused_but_secret_not_echoed():
    with pytest.raises(FenceApiError, match="twice") as info:
        parse_stdin("passwd=hunter22\npasswd=other\n")
    assert "hunter22" not in str(info.value)


def test_action_is_case_insensitive():
    assert build_request({"action": "STATUS"}).action == "status"


def test_unknown_action_is_refused():
    with pytest.raises(FenceApiError, match="unknown action 'destroy'"):
        build_request({"action": "destroy"})


def test_missing_action_is_an_error_not_a_reboot():
    with pytest.raises(FenceApiError, match="no action given"):
        build_request({"port": "node1"})


def test_deprecated_option_key_is_read_as_action_with_warning():
    request = build_request(parse_stdin("option=status\nport=node1\n"))
    assert request.action == "status"
    assert request.node == "node1"
    assert any("deprecated" in w for w in request.warnings)


def test_option_conflicting_with_action_is_refused():
    with pytest.raises(FenceApiError, match="conflicting"):
        build_request({"action": "status", "option": "reboot"})


def test_option_agreeing_with_action_is_accepted():
    assert build_request({"action": "off", "option": "OFF"}).action == "off"


@pytest.mark.parametrize("pairs, node", [
    ({"nodename": "n1"}, "n1"),
    ({"port": "p1", "nodename": "n1"}, "p1"),
    ({"plug": "p1", "nodename": "n1"}, "p1"),
    ({"plug": "p1", "port": "p1"}, "p1"),
    ({}, None),
])
def test_node_aliases_and_precedence(pairs, node):
    assert build_request({"action": "status", **pairs}).node == node


def test_plug_and_port_disagreeing_is_refused():
    with pytest.raises(FenceApiError, match="different targets"):
        build_request({"action": "off", "plug": "a", "port": "b"})


def test_unknown_keys_are_separated_from_options():
    request = build_request({"action": "off", "timeout": "5", "bogus": "1"}, PARAMS)
    assert request.options == {"timeout": "5"}
    assert request.unknown == ("bogus",)


def test_argv_parsing_short_long_and_boolean():
    pairs = parse_argv(["-o", "reboot", "--plug=n3", "-v", "--timeout", "7"], PARAMS)
    assert pairs == {"action": "reboot", "plug": "n3", "verbose": "1", "timeout": "7"}


def test_argv_unknown_option_is_refused():
    with pytest.raises(FenceApiError, match="command line"):
        parse_argv(["--frobnicate=1"], PARAMS)


def test_read_request_prefers_argv_over_stdin():
    request = read_request(["-o", "status", "-n", "a"], "action=reboot\nplug=b\n", PARAMS)
    assert (request.action, request.node) == ("status", "a")


def test_check_values_by_type():
    problems = check_values({"timeout": "abc", "verbose": "maybe", "mode": "c"}, PARAMS)
    assert len(problems) == 3
    assert check_values({"timeout": "2.5", "verbose": "yes", "mode": "a"}, PARAMS) == []


def test_format_stdin_refuses_line_injection():
    with pytest.raises(FenceApiError, match="line break") as info:
        format_stdin({"ip": "10.0.0.1\naction=reboot"})
    assert "action=reboot" not in str(info.value)
    assert format_stdin({"a": "1", "action": "off"}) == "a=1\naction=off\n"


def test_exit_code_meanings():
    assert state_from_status_exit(0) == "on"
    assert state_from_status_exit(2) == "off"
    assert state_from_status_exit(1) == "unknown"
    assert state_from_status_exit(None) == "unknown"
    assert state_from_status_exit(3) == "unknown"
    assert status_exit_for("off") == ExitCode.STATUS_OFF == 2
    assert status_exit_for("unknown") == ExitCode.UNREACHABLE == 1


def test_metadata_xml_escapes_text_and_validates_with_select(tmp_path):
    import subprocess

    from agents.fencing.fence_api import metadata_xml
    xml = metadata_xml(name="fence_x", shortdesc='A "quoted" <agent> & co',
                       longdesc="Power & <plugs>", vendor_url="http://example.com/?a=1&b=2",
                       parameters=PARAMS)
    assert '<option value="a" />' in xml and "&amp;" in xml
    assert '<action name="on" automatic="0" />' in xml
    path = tmp_path / "m.xml"
    path.write_text(xml)
    check = subprocess.run(["xmllint", "--noout", "--relaxng",
                            "/usr/share/cluster/relaxng/metadata.rng", str(path)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_parameter_declarations_are_checked():
    with pytest.raises(ValueError, match="choices"):
        Parameter("mode", "Mode", type="select")
    with pytest.raises(ValueError, match="declared twice"):
        build_request({"action": "off"}, PARAMS + (Parameter("plug", "again"),))
