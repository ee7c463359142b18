"""The fence agent driver against real programs: fence_dummy, and small fence_* scripts that hang,
fail loudly or report what they were given."""

from pathlib import Path

import pytest

from agents.fencing import driver
from agents.fencing.driver import AgentProgramError, Secret, run_fence_agent
from agents.fencing.fence_api import FenceApiError


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def dummy_params(status_file: Path) -> dict[str, str]:
    return {"type": "file", "status_file": str(status_file), "power_timeout": "2"}


async def test_fence_dummy_off_on_and_status_change_the_file(tmp_path):
    status = tmp_path / "state"
    status.write_text("on")
    run = await run_fence_agent("fence_dummy", dummy_params(status), "off", plug=None, timeout=10)
    assert (run.exit_code, run.timed_out) == (0, False)
    assert status.read_text() == "off"
    run = await run_fence_agent("fence_dummy", dummy_params(status), "status", plug=None, timeout=10)
    assert run.exit_code == 2 and "Status: OFF" in run.stdout
    run = await run_fence_agent("fence_dummy", dummy_params(status), "on", plug=None, timeout=10)
    assert run.exit_code == 0 and status.read_text() == "on"


async def test_type_fail_reports_failure_with_its_stderr(tmp_path):
    run = await run_fence_agent("fence_dummy", {"type": "fail", "power_timeout": "1"}, "off",
                                plug=None, timeout=10)
    assert run.exit_code == 1 and not run.timed_out
    assert "Timed out waiting to power OFF" in run.stderr


async def test_stdin_carries_action_and_plug_and_environment_drops_pcmk_service(
        tmp_path, monkeypatch):
    seen = tmp_path / "seen"
    program = script(tmp_path, "fence_recorder",
                     f'cat > {seen}\necho "PCMK_service=${{PCMK_service-unset}}" >> {seen}\n')
    monkeypatch.setenv("PCMK_service", "pacemaker-fenced")
    run = await run_fence_agent(program, {"ip": "10.0.0.1"}, "status", plug="7", timeout=10)
    assert run.exit_code == 0
    assert seen.read_text().splitlines() == [
        "ip=10.0.0.1", "plug=7", "action=status", "PCMK_service=unset"]


async def test_hanging_agent_and_its_children_are_killed_at_the_deadline(tmp_path):
    pids = tmp_path / "pids"
    program = script(tmp_path, "fence_hang",
                     f"sleep 300 &\necho $$ $! > {pids}\necho about to hang >&2\nwait\n")
    run = await run_fence_agent(program, {}, "off", plug=None, timeout=0.5)
    assert run.timed_out and run.exit_code is None
    assert "about to hang" in run.stderr
    for pid in map(int, pids.read_text().split()):
        assert not _alive(pid), f"process {pid} of the agent's group survived"


async def test_agent_ignoring_sigterm_is_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "KILL_GRACE", 0.3)
    pids = tmp_path / "pids"
    program = script(tmp_path, "fence_stubborn",
                     f"trap '' TERM\nsleep 300 &\necho $$ $! > {pids}\nwait\nwait\n")
    run = await run_fence_agent(program, {}, "off", plug=None, timeout=0.5)
    assert run.timed_out and run.exit_code is None
    for pid in map(int, pids.read_text().split()):
        assert not _alive(pid)


async def test_secrets_are_blanked_from_output_and_never_in_the_run(tmp_path):
    # fence_dummy echoes unknown options on stderr, password included: the real leak we guard.
    run = await run_fence_agent("fence_dummy", {"type": "fail", "power_timeout": "1",
                                                "passwd": Secret("hunter22-x")},
                                "off", plug=None, timeout=10)
    assert run.exit_code == 1
    assert "passwd=<hidden>" in run.stderr
    assert "hunter22-x" not in repr(run)


async def test_output_past_the_cap_is_dropped_without_leaving_half_a_secret(tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "OUTPUT_CAP", 20)
    # The cap falls inside the secret: its first half must not be shown either.
    program = script(tmp_path, "fence_chatty", "printf 'aaaaaaaaaaaaaaahunter22-x and more'\n")
    run = await run_fence_agent(program, {"passwd": Secret("hunter22-x")}, "status", plug=None, timeout=10)
    assert run.exit_code == 0 and run.truncated
    assert run.stdout == "aaaaaaaaaaaaaaa<hidden>"


@pytest.mark.parametrize("program, message", [
    ("fence_does_not_exist", "not found"),
    ("/usr/bin/env", "must start with 'fence_'"),
    ("sbin/fence_dummy", "absolute path"),
])
async def test_unusable_program_is_refused_before_running(program, message):
    with pytest.raises(AgentProgramError, match=message):
        await run_fence_agent(program, {}, "status", plug=None, timeout=5)


async def test_non_executable_program_is_refused(tmp_path):
    path = tmp_path / "fence_plain"
    path.write_text("#!/bin/sh\n")
    with pytest.raises(AgentProgramError, match="not an executable file"):
        await run_fence_agent(str(path), {}, "status", plug=None, timeout=5)


@pytest.mark.parametrize("params, action", [
    ({"action": "reboot"}, "status"),
    ({"option": "reboot"}, "status"),
    ({"ip": "1.2.3.4\naction=reboot"}, "status"),
    ({}, "explode"),
])
async def test_parameters_that_could_change_the_action_are_refused(tmp_path, params, action):
    marker = tmp_path / "ran"
    program = script(tmp_path, "fence_marker", f"touch {marker}\n")
    with pytest.raises(FenceApiError):
        await run_fence_agent(program, params, action, plug=None, timeout=5)
    assert not marker.exists()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie is dead, just not yet reaped by its new parent
