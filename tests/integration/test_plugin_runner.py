"""The plugin runner against the real Debian monitoring plugins and small misbehaving scripts."""

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest

from agents.monitor.checks import default_checks
from agents.monitor.ranges import State
from agents.monitor.runner import CLEAN_PATH, PluginError, PluginPool, run_plugin

PLUGINS = Path("/usr/lib/nagios/plugins")

pytestmark = pytest.mark.skipif(
    not (PLUGINS / "check_dummy").exists(), reason="monitoring-plugins-basic is not installed"
)


def plugin(name: str) -> str:
    return str(PLUGINS / name)


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def live_members(group: int) -> list[int]:
    """Pids in process group ``group`` that are still running (zombies count as gone)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which is in parentheses and may contain spaces.
        fields = stat_line.rsplit(")", 1)[1].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == group and state not in ("Z", "X"):
            members.append(int(entry))
    return members


@pytest.mark.parametrize("code", [0, 1, 2, 3])
async def test_check_dummy_states(code: int) -> None:
    result = await run_plugin([plugin("check_dummy"), str(code), f"said {code}"], timeout=10)
    assert result.state == State(code)
    assert result.exit_code == code
    assert result.text == f"{State(code).name}: said {code}"
    assert not result.timed_out and not result.truncated


async def test_check_dummy_out_of_range_state_is_its_own_unknown() -> None:
    result = await run_plugin([plugin("check_dummy"), "4"], timeout=10)
    assert result.state is State.UNKNOWN
    assert result.text == "UNKNOWN: Status 4 is not a supported error state"


async def test_check_load_has_perfdata() -> None:
    result = await run_plugin([plugin("check_load"), "-w", "1000,1000,1000", "-c", "2000,2000,2000"], timeout=10)
    assert result.state is State.OK
    assert result.text.startswith("LOAD OK")
    assert [m.label for m in result.metrics] == ["load1", "load5", "load15"]
    assert result.metrics[0].crit is not None and result.metrics[0].crit.end == 2000


async def test_check_disk_on_root() -> None:
    result = await run_plugin([plugin("check_disk"), "-w", "0%", "-c", "0%", "-p", "/"], timeout=10)
    assert result.state is State.OK, result.text
    (metric,) = result.metrics
    assert metric.label == "/"
    assert metric.uom == "B"
    assert metric.max and metric.max > 0


async def test_check_procs_counts_processes() -> None:
    result = await run_plugin([plugin("check_procs"), "-w", "1:", "-c", "1:"], timeout=10)
    assert result.state is State.OK, result.text
    (metric,) = result.metrics
    assert metric.label == "procs" and metric.value and metric.value >= 1


async def test_check_procs_bad_range_without_newline() -> None:
    result = await run_plugin([plugin("check_procs"), "-w", "10:x"], timeout=10)
    assert result.state is State.UNKNOWN
    assert result.text == "Range format incorrect"


async def test_negate_keeps_ok_text_but_exit_code_decides() -> None:
    result = await run_plugin([plugin("negate"), plugin("check_dummy"), "0", "fine"], timeout=10)
    assert result.text == "OK: fine"
    assert result.state is State.CRITICAL


async def test_check_users_runs() -> None:
    result = await run_plugin([plugin("check_users"), "-w", "1000", "-c", "2000"], timeout=10)
    assert result.state is State.OK
    assert result.metrics[0].label == "users"


async def test_shell_metacharacters_reach_the_plugin_literally(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f"; touch {marker} && `touch {marker}` $(touch {marker}) > {marker} * ~"
    result = await run_plugin([plugin("check_dummy"), "0", text], timeout=10)
    assert result.text == f"OK: {text}"
    assert not marker.exists()


async def test_environment_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERTEBRA_SECRET", "must not leak")
    result = await run_plugin(["/usr/bin/env"], timeout=10, env={"EXTRA": "yes"})
    lines = sorted([result.text, *result.long_text.split("\n")])
    assert [line for line in lines if line] == ["EXTRA=yes", "LC_ALL=C", f"PATH={CLEAN_PATH}"]


async def test_plugin_runs_in_its_own_process_group(tmp_path: Path) -> None:
    path = script(tmp_path, "ids", 'echo "OK $$ $(ps -o pgid= -p $$) $(ps -o sid= -p $$)"\n')
    result = await run_plugin([path], timeout=10)
    pid, pgid, sid = (int(x) for x in result.text.split()[1:])
    assert pid == pgid == sid
    assert pgid != os.getpgid(0)


async def test_deadline_kills_the_whole_group_including_a_stubborn_grandchild(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The grandchild ignores SIGTERM and keeps stdout open, so only the group KILL ends it.
    path = script(
        tmp_path,
        "hang",
        f"echo $$ > {pids}\n"
        f"sh -c 'trap \"\" TERM; echo $$ >> {pids}; exec sleep 300' &\n"
        "echo 'OK: started'\n"
        "sleep 300\n",
    )
    result = await run_plugin([path], timeout=0.5, kill_grace=0.5)
    assert result.timed_out
    assert result.state is State.UNKNOWN
    assert result.exit_code is None
    assert result.text == "Plugin timed out after 0.5 s: OK: started"
    leader, grandchild = (int(x) for x in pids.read_text().split())
    assert live_members(leader) == []
    assert grandchild not in live_members(leader)


async def test_timeout_state_is_configurable(tmp_path: Path) -> None:
    path = script(tmp_path, "slow", "sleep 300\n")
    result = await run_plugin([path], timeout=0.3, timeout_state=State.CRITICAL, kill_grace=0.5)
    assert result.timed_out
    assert result.state is State.CRITICAL
    assert result.text == "Plugin timed out after 0.3 s"


async def test_check_tcp_against_a_silent_listener_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = await run_plugin(
            [plugin("check_tcp"), "-H", "127.0.0.1", "-p", str(port), "-e", "never", "-t", "60"],
            timeout=0.5,
            kill_grace=0.5,
        )
    assert result.timed_out
    assert result.state is State.UNKNOWN
    assert "timed out after 0.5 s" in result.text


async def test_output_cap_truncates_and_says_so(tmp_path: Path) -> None:
    path = script(tmp_path, "loud", "echo 'OK: loud'\nhead -c 1048576 /dev/zero | tr '\\0' x\necho\n")
    result = await run_plugin([path], timeout=10, output_cap=4096)
    assert result.truncated
    assert result.state is State.OK  # the plugin finished: its exit code still counts
    assert result.text == "OK: loud"
    assert result.long_text.endswith("(output truncated: plugin wrote more than 4096 bytes)")
    assert len(result.long_text) < 4096 + 100


async def test_exit_code_outside_0_to_3_is_unknown_with_the_code(tmp_path: Path) -> None:
    path = script(tmp_path, "seven", "echo 'OK: all fine'\nexit 7\n")
    result = await run_plugin([path], timeout=10)
    assert result.state is State.UNKNOWN
    assert result.exit_code == 7
    assert result.text == "Plugin exited with code 7, outside 0-3: OK: all fine"


async def test_empty_output_says_so(tmp_path: Path) -> None:
    result = await run_plugin([script(tmp_path, "quiet", "exit 1\n")], timeout=10)
    assert result.state is State.WARNING
    assert result.text == "(No output returned from plugin)"


async def test_stderr_only_output_is_shown(tmp_path: Path) -> None:
    result = await run_plugin([script(tmp_path, "stderr", "echo 'broken here' >&2\nexit 2\n")], timeout=10)
    assert result.state is State.CRITICAL
    assert result.text == "(No output on stdout) stderr: broken here"


async def test_signal_death_names_the_signal(tmp_path: Path) -> None:
    result = await run_plugin([script(tmp_path, "segv", "kill -SEGV $$\n")], timeout=10)
    assert result.state is State.UNKNOWN
    assert result.exit_code is None
    assert "SIGSEGV" in result.text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check_dummy", "0"], "absolute"),
        (["./check_dummy"], "absolute"),
        ([], "empty"),
        ("/usr/lib/nagios/plugins/check_dummy 0", "not a command line"),
        (["/nonexistent/check_x"], "does not exist"),
        (["/usr/lib/nagios/plugins/check_dummy", 0], "must be a string"),
    ],
)
async def test_bad_argv_is_refused(argv: object, message: str) -> None:
    with pytest.raises(PluginError, match=message):
        await run_plugin(argv, timeout=10)  # type: ignore[arg-type]


async def test_non_executable_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "check_plain"
    path.write_text("#!/bin/sh\necho OK\n")
    path.chmod(0o644)
    with pytest.raises(PluginError, match="not executable"):
        await run_plugin([str(path)], timeout=10)


async def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout"):
        await run_plugin([plugin("check_dummy"), "0"], timeout=0)
    with pytest.raises(ValueError, match="output_cap"):
        await run_plugin([plugin("check_dummy"), "0"], timeout=1, output_cap=0)
    with pytest.raises(ValueError, match="limit"):
        PluginPool(0)


async def test_pool_limits_concurrency(tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    slots.mkdir()
    # Each run registers itself, reports how many are registered, lingers, then leaves.
    path = script(
        tmp_path,
        "busy",
        f'touch {slots}/$$\necho "OK $(ls {slots} | wc -l)"\nsleep 0.2\nrm {slots}/$$\n',
    )
    pool = PluginPool(2)
    results = await asyncio.gather(*(pool.run([path], timeout=10) for _ in range(6)))
    seen = [int(r.text.split()[1]) for r in results]
    assert all(r.state is State.OK for r in results)
    assert max(seen) <= 2
    assert pool.running == 0


async def test_cancelled_run_kills_its_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    path = script(tmp_path, "hang", f"echo $$ > {pids}\nsleep 300\n")
    task = asyncio.ensure_future(run_plugin([path], timeout=60))
    for _ in range(200):
        if pids.exists() and pids.read_text().strip():
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    leader = int(pids.read_text())
    for _ in range(200):  # SIGKILL is delivered asynchronously
        if not live_members(leader):
            break
        await asyncio.sleep(0.01)
    assert live_members(leader) == []


async def test_result_as_dict_is_plain() -> None:
    result = await run_plugin([plugin("check_procs"), "-c", "1:"], timeout=10)
    data = result.as_dict()
    assert data["state"] == "OK" and data["code"] == 0
    assert data["metrics"][0]["label"] == "procs"
    assert data["metrics"][0]["crit"] == "1:"


@pytest.mark.parametrize(
    ("name", "args", "prefix"),
    [
        ("load", {"warn": "1000", "crit": "2000"}, "LOAD OK"),
        ("disk", {"warn": "0%", "crit": "0%"}, "DISK OK"),
        ("procs", {"crit": "1:"}, "PROCS OK"),
        ("users", {"warn": 1000, "crit": 2000}, "USERS OK"),
        ("dummy", {"state": 1, "text": "from the catalogue"}, "WARNING: from the catalogue"),
    ],
)
async def test_default_catalogue_runs_real_plugins(name: str, args: dict, prefix: str) -> None:
    check = default_checks()[name]
    result = await run_plugin(check.argv(args), timeout=check.timeout, timeout_state=check.timeout_state)
    assert result.text.startswith(prefix), result.text
    assert result.state is (State.WARNING if name == "dummy" else State.OK)


async def test_catalogue_value_with_metacharacters_is_one_literal_argument() -> None:
    check = default_checks()["dummy"]
    value = "$(id) `id` ; && > /tmp/x * ~"
    result = await run_plugin(check.argv({"state": 0, "text": value}), timeout=check.timeout)
    assert result.text == f"OK: {value}"
