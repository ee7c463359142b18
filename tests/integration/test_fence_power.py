"""Verified power operations over real fence agents: fence_dummy in file and fail modes, and small
fence_* wrapper scripts that count runs, lie about success, or fail one action."""

import asyncio
from pathlib import Path

from agents.fencing.devices import DeviceRegistry
from agents.fencing.power import PowerController


def dummy(status_file: Path, **extra) -> dict:
    return {"agent": "fence_dummy",
            "params": {"type": "file", "status_file": str(status_file), "power_timeout": "2"},
            **extra}


def controller(devices: dict, levels: dict) -> PowerController:
    return PowerController(DeviceRegistry.from_config({"devices": devices, "levels": levels}))


def wrapper(tmp_path: Path, name: str, body: str) -> str:
    """A fence_* script; `$input` holds its stdin; it ends by handing that to fence_dummy."""
    path = tmp_path / name
    path.write_text('#!/bin/sh\ninput=$(cat)\n' + body +
                    '\nprintf "%s\\n" "$input" | exec /usr/sbin/fence_dummy\n')
    path.chmod(0o755)
    return str(path)


async def test_off_on_reboot_status_change_the_status_file(tmp_path):
    state = tmp_path / "node1.state"
    state.write_text("on")
    power = controller({"dev": dummy(state)}, {"node1": [["dev"]]})

    outcome = await power.off("node1")
    assert outcome.ok and outcome.state == "off" and outcome.device == "dev"
    assert state.read_text() == "off"
    assert [(a.action, a.ok) for a in outcome.attempts] == [("off", True), ("status", True)]

    status = await power.status("node1")
    assert status.ok and status.state == "off"

    outcome = await power.on("node1")
    assert outcome.ok and outcome.state == "on" and state.read_text() == "on"

    outcome = await power.reboot("node1")
    assert outcome.ok and outcome.on_error is None and state.read_text() == "on"
    assert [a.action for a in outcome.attempts] == ["off", "status", "on", "status"]
    assert (await power.status("node1")).state == "on"


async def test_type_fail_is_a_failure_never_success(tmp_path):
    devices = {"bad": {"agent": "fence_dummy", "params": {"type": "fail", "power_timeout": "1"}}}
    power = controller(devices, {"node1": [["bad"]]})
    outcome = await power.off("node1")
    assert not outcome.ok and outcome.state == "unknown"
    assert "Timed out waiting to power OFF" in outcome.message
    assert "do not release its resources" in outcome.message


async def test_level_fallback_from_failing_device_to_working_one(tmp_path):
    state = tmp_path / "node1.state"
    state.write_text("on")
    devices = {"bad": {"agent": "fence_dummy", "params": {"type": "fail", "power_timeout": "1"}},
               "good": dummy(state)}
    power = controller(devices, {"node1": [["bad"], ["good"]]})
    outcome = await power.off("node1")
    assert outcome.ok and outcome.devices == ("good",)
    assert state.read_text() == "off"
    assert [(a.device, a.action, a.ok) for a in outcome.attempts] == [
        ("bad", "off", False), ("good", "off", True), ("good", "status", True)]


async def test_every_device_of_a_level_must_succeed(tmp_path):
    psu1, psu2 = tmp_path / "psu1", tmp_path / "psu2"
    psu1.write_text("on")
    psu2.write_text("on")
    devices = {"psu1": dummy(psu1),
               "psu2": {"agent": "fence_dummy", "params": {"type": "fail", "power_timeout": "1"}}}
    power = controller(devices, {"node1": [["psu1", "psu2"]]})
    outcome = await power.off("node1")
    assert not outcome.ok  # one supply still feeds the node
    assert psu1.read_text() == "off"


async def test_exit_zero_without_confirming_status_is_a_failure(tmp_path):
    # An agent that says "done" to off but whose status still says ON: the node is not fenced.
    state = tmp_path / "state"
    state.write_text("on")
    liar = wrapper(tmp_path, "fence_liar",
                   'case "$input" in *action=off*) echo "Success: Powered OFF"; exit 0;; esac')
    power = controller({"liar": {"agent": liar, "params": {"type": "file",
                                                           "status_file": str(state)}}},
                       {"node1": [["liar"]]})
    outcome = await power.off("node1")
    assert not outcome.ok
    assert "status then said ON" in outcome.message


async def test_agent_stderr_is_carried_into_the_failure(tmp_path):
    program = wrapper(tmp_path, "fence_broken",
                      'echo "Failed: PDU 10.0.0.5 refused login" >&2; exit 1')
    power = controller({"pdu": {"agent": program}}, {"node1": [["pdu"]]})
    outcome = await power.off("node1")
    assert not outcome.ok
    assert "pdu: off failed (exit 1): Failed: PDU 10.0.0.5 refused login" in outcome.message


async def test_unexpected_exit_code_is_a_failure(tmp_path):
    program = wrapper(tmp_path, "fence_odd", 'exit 2')  # 2 means OFF only for status
    power = controller({"odd": {"agent": program}}, {"node1": [["odd"]]})
    outcome = await power.off("node1")
    assert not outcome.ok and "exit 2" in outcome.message


async def test_hanging_device_times_out_as_a_failure(tmp_path):
    program = wrapper(tmp_path, "fence_hang", "sleep 300")
    power = controller({"hang": {"agent": program, "timeout": 0.5}}, {"node1": [["hang"]]})
    outcome = await power.off("node1")
    assert not outcome.ok
    assert outcome.attempts[0].timed_out
    assert "timed out" in outcome.message


async def test_request_budget_bounds_the_whole_request(tmp_path):
    program = wrapper(tmp_path, "fence_hang", "sleep 300")
    power = controller({"a": {"agent": program, "timeout": 30}}, {"node1": [["a"], ["a"]]})
    outcome = await power.off("node1", budget=0.5)
    assert not outcome.ok
    assert outcome.attempts[0].timed_out
    assert "time ran out" in outcome.attempts[1].detail


async def test_reboot_with_on_failure_reports_fenced_and_on_error(tmp_path):
    state = tmp_path / "state"
    state.write_text("on")
    program = wrapper(tmp_path, "fence_no_on",
                      'case "$input" in *action=on*) echo "Failed: breaker tripped" >&2; exit 1;; esac')
    power = controller({"d": {"agent": program, "params": {"type": "file",
                                                          "status_file": str(state)}}},
                       {"node1": [["d"]]})
    outcome = await power.reboot("node1")
    assert outcome.ok  # fenced: the off part was verified
    assert outcome.on_error and "breaker tripped" in outcome.on_error
    assert state.read_text() == "off"
    assert "power it on by hand" in outcome.message


async def test_concurrent_offs_for_one_node_coalesce_into_one_device_action(tmp_path):
    state = tmp_path / "state"
    state.write_text("on")
    log = tmp_path / "runs.log"
    program = wrapper(tmp_path, "fence_counted", f'printf "%s\\n" "$input" | grep "^action=" >> {log}')
    power = controller({"d": {"agent": program, "params": {"type": "file",
                                                          "status_file": str(state)}}},
                       {"node1": [["d"]]})
    outcomes = await asyncio.gather(*(power.off("node1") for _ in range(10)))
    assert all(o.ok for o in outcomes)
    assert len({id(o) for o in outcomes}) == 1   # every caller got the one outcome
    assert log.read_text().splitlines() == ["action=off", "action=status"]
    assert power.device_runs == 2

    # Once finished, a new request acts again rather than replaying the old outcome.
    await power.off("node1")
    assert log.read_text().splitlines().count("action=off") == 2


async def test_a_cancelled_caller_does_not_abort_the_shared_fence(tmp_path):
    state = tmp_path / "state"
    state.write_text("on")
    program = wrapper(tmp_path, "fence_slow", "sleep 0.3")
    power = controller({"d": {"agent": program, "params": {"type": "file",
                                                          "status_file": str(state)}}},
                       {"node1": [["d"]]})
    first = asyncio.create_task(power.off("node1"))
    second = asyncio.create_task(power.off("node1"))
    await asyncio.sleep(0.05)
    first.cancel()
    outcome = await second
    assert outcome.ok and state.read_text() == "off"


async def test_unknown_node_fails_clearly(tmp_path):
    power = controller({"d": dummy(tmp_path / "s")}, {"node1": [["d"]]})
    outcome = await power.off("node7")
    assert not outcome.ok and "no fencing levels are configured for node 'node7'" in outcome.message
    assert power.device_runs == 0


async def test_secret_from_file_reaches_agent_but_not_the_outcome(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("hunter22-x\n")
    seen = tmp_path / "seen"
    program = wrapper(tmp_path, "fence_seen",
                      f'printf "%s\\n" "$input" >> {seen}; echo "login as passwd=hunter22-x" >&2; exit 1')
    power = controller({"d": {"agent": program, "secret_files": {"passwd": str(secret)}}},
                       {"node1": [["d"]]})
    outcome = await power.off("node1")
    assert "passwd=hunter22-x" in seen.read_text()      # the agent got it
    assert not outcome.ok
    assert "hunter22" not in repr(outcome) and "passwd=<hidden>" in outcome.message
