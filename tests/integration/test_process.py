"""The process runner (agents/process.py) against real programs: small /bin/sh scripts written here and
the Debian monitoring plugins. Deadlines and cancellation must leave nothing of the group running.

Every test runs twice: with the programs started by posix_spawn (agents/spawn.py, what Debian 12's glibc
gives) and by subprocess (the fallback where the C library lacks it): the child must get the same."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from pathlib import Path

import pytest

from agents import process, spawn
from agents.process import CLEAN_PATH, CommandError, clean_environment

DUMMY = "/usr/lib/nagios/plugins/check_dummy"


@pytest.fixture(autouse=True, params=["posix_spawn", "subprocess"])
def starter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "subprocess":
        monkeypatch.setattr(spawn, "_LIBC", None)
    else:
        assert spawn._LIBC is not None, "Debian 12's glibc (2.36) has every posix_spawn action agents/spawn.py uses"
    return request.param


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie is dead, only not yet reaped by its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


async def wait_for_pids(path: Path, count: int) -> list[int]:
    """The pids a script wrote to ``path``, once it has written ``count`` of them (at most 5 s)."""
    for _ in range(500):
        if path.exists() and len(path.read_text().split()) >= count:
            return [int(x) for x in path.read_text().split()]
        await asyncio.sleep(0.01)
    raise AssertionError(f"the script did not write {count} pids to {path}")


async def all_gone(pids: list[int]) -> bool:
    """Wait (at most 3 s: SIGKILL is delivered asynchronously) until none of ``pids`` runs."""
    for _ in range(300):
        if not any(alive(pid) for pid in pids):
            return True
        await asyncio.sleep(0.01)
    return False


async def test_a_real_plugin_exit_code_and_output() -> None:
    ran = await process.run([DUMMY, "1", "from the runner"], env=clean_environment(), timeout=10)
    assert (ran.exit_code, ran.signal, ran.returncode) == (1, None, 1)
    assert ran.stdout == b"WARNING: from the runner\n"
    assert ran.stderr == b"" and not ran.truncated and not ran.timed_out
    assert ran.argv == (DUMMY, "1", "from the runner")
    assert ran.elapsed > 0


async def test_deadline_kills_the_whole_group_including_a_grandchild_that_ignores_term(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The grandchild ignores SIGTERM and holds stdout open: only the group KILL ends it.
    path = script(tmp_path, "hang",
                  f"echo $$ > {pids}\n"
                  f"sh -c 'trap \"\" TERM; echo $$ >> {pids}; exec sleep 300' &\n"
                  "echo started\n"
                  "sleep 300\n")
    ran = await process.run([path], env=clean_environment(), timeout=0.5, kill_grace=0.3)
    assert ran.timed_out
    assert ran.signal is not None and ran.exit_code is None  # the leader ended by a signal
    assert ran.stdout == b"started\n"
    leader, grandchild = [int(x) for x in pids.read_text().split()]
    assert not alive(leader) and not alive(grandchild)


async def test_output_is_capped_per_stream_and_the_dropped_bytes_counted(tmp_path: Path) -> None:
    path = script(tmp_path, "loud",
                  "head -c 100000 /dev/zero | tr '\\0' o\n"
                  "head -c 5000 /dev/zero | tr '\\0' e >&2\n")
    ran = await process.run([path], env=clean_environment(), timeout=10, output_cap=4096)
    assert ran.exit_code == 0 and not ran.timed_out
    assert ran.stdout == b"o" * 4096 and ran.stdout_dropped == 100000 - 4096
    assert ran.stderr == b"e" * 4096 and ran.stderr_dropped == 5000 - 4096
    assert ran.truncated


async def test_merged_output_keeps_the_order_written(tmp_path: Path) -> None:
    path = script(tmp_path, "both", "echo one\necho two >&2\necho three\n")
    ran = await process.run([path], env=clean_environment(), timeout=10, merge_stderr=True)
    assert ran.stdout == b"one\ntwo\nthree\n" and ran.stderr == b""


async def test_the_environment_is_exactly_the_one_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERTEBRA_SECRET", "must not leak")
    ran = await process.run(["/usr/bin/env"], env=clean_environment({"EXTRA": "yes"}), timeout=10)
    assert sorted(ran.stdout.decode().split("\n")) == ["", "EXTRA=yes", "LC_ALL=C", f"PATH={CLEAN_PATH}"]
    ran = await process.run(["/usr/bin/env"], env={}, timeout=10)
    assert ran.stdout == b""


async def test_the_program_leads_a_process_group_and_session_of_its_own(tmp_path: Path) -> None:
    path = script(tmp_path, "ids", 'echo "$$ $(ps -o pgid= -p $$) $(ps -o sid= -p $$)"\n')
    ran = await process.run([path], env=clean_environment(), timeout=10)
    pid, pgid, sid = (int(x) for x in ran.stdout.split())
    assert pid == pgid == sid != os.getpgid(0)


async def test_the_program_gets_no_descriptor_of_ours_and_default_signals() -> None:
    # An inheritable descriptor of the caller's (as a library might leave one) must not reach the program,
    # nor Python's ignored SIGPIPE and SIGXFSZ (ignored signals survive exec), nor any blocked signal.
    leaked = os.open("/etc/hostname", os.O_RDONLY)
    os.set_inheritable(leaked, True)
    try:
        fds = await process.run(["/bin/ls", "/proc/self/fd"], env=clean_environment(), timeout=10, stdin=b"x")
        status = await process.run(["/bin/grep", "^Sig", "/proc/self/status"], env=clean_environment(), timeout=10)
    finally:
        os.close(leaked)
    assert {int(x) for x in fds.stdout.split()} == {0, 1, 2, 3}, fds.stdout  # 3: the directory ls reads
    fields = dict(line.split(":") for line in status.stdout.decode().splitlines())
    assert int(fields["SigBlk"], 16) == 0
    ignored = int(fields["SigIgn"], 16)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        assert not ignored & (1 << (sig - 1)), f"{sig.name} ignored in the program"


async def test_standard_descriptors_numbered_below_three_reach_the_program(tmp_path: Path) -> None:
    # A process started with its stdio closed gets pipes numbered 0-2: each must still land where it belongs.
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    try:
        for fd in (0, 1, 2):
            os.close(fd)
        path = script(tmp_path, "echo", 'read line; echo "out $line"; echo "err $line" >&2\n')
        ran = await process.run([path], env=clean_environment(), timeout=10, stdin=b"hello\n")
    finally:
        for fd, copy in enumerate(saved):
            os.dup2(copy, fd)
            os.close(copy)
    assert (ran.exit_code, ran.stdout, ran.stderr) == (0, b"out hello\n", b"err hello\n")


async def test_cancelling_the_awaiting_task_kills_the_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    path = script(tmp_path, "hang", f"sleep 300 &\necho $$ $! > {pids}\nwait\n")
    before = set(os.listdir("/proc/self/fd"))
    # More stdin than a pipe holds, never read: the run is cancelled with its stdin writer still waiting.
    task = asyncio.ensure_future(process.run([path], env=clean_environment(), timeout=60, stdin=b"x" * 1_000_000))
    started = await wait_for_pids(pids, 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await all_gone(started), f"processes of the cancelled run survived: {started}"
    for _ in range(300):  # the leader's pidfd is closed when it is reaped, after the KILL lands
        if set(os.listdir("/proc/self/fd")) <= before:
            break
        await asyncio.sleep(0.01)
    assert set(os.listdir("/proc/self/fd")) <= before


async def test_stdin_is_delivered_whole_even_beyond_a_pipe_buffer(tmp_path: Path) -> None:
    data = b"".join(b"line %d\n" % i for i in range(100_000))  # about 1 MB: written as the program reads
    path = script(tmp_path, "count", "wc -c\n")
    ran = await process.run([path], env=clean_environment(), timeout=20, stdin=data)
    assert ran.exit_code == 0 and int(ran.stdout) == len(data)
    ran = await process.run([path], env=clean_environment(), timeout=10, stdin=b"ip=10.0.0.1\naction=status\n")
    assert int(ran.stdout) == 26
    ran = await process.run([path], env=clean_environment(), timeout=10)  # no stdin: /dev/null
    assert int(ran.stdout) == 0


async def test_a_program_that_exits_without_reading_its_stdin_is_no_error(tmp_path: Path) -> None:
    path = script(tmp_path, "deaf", "exit 4\n")
    ran = await process.run([path], env=clean_environment(), timeout=10, stdin=b"x" * 1_000_000)
    assert ran.exit_code == 4 and not ran.timed_out


async def test_a_signal_death_is_reported_as_the_signal(tmp_path: Path) -> None:
    ran = await process.run([script(tmp_path, "segv", "kill -SEGV $$\n")], env=clean_environment(), timeout=10)
    assert ran.exit_code is None and ran.signal == 11 and ran.returncode == -11


async def test_without_waiting_for_output_the_run_ends_at_exit_and_kills_what_was_left(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The child keeps the output pipe open after the leader exits.
    path = script(tmp_path, "leaves", f"sleep 300 &\necho $! > {pids}\necho done\n")
    ran = await process.run([path], env=clean_environment(), timeout=60, merge_stderr=True,
                            wait_for_output=False)
    assert ran.exit_code == 0 and not ran.timed_out and ran.stdout == b"done\n"
    assert await all_gone([int(pids.read_text())])
    # Waiting for the output instead, the same program holds the run to its deadline.
    pids.unlink()
    ran = await process.run([path], env=clean_environment(), timeout=0.5, kill_grace=0.3)
    assert ran.timed_out and ran.stdout == b"done\n"
    assert await all_gone([int(pids.read_text())])


async def test_the_program_runs_in_the_directory_given(tmp_path: Path) -> None:
    ran = await process.run(["/bin/pwd"], env=clean_environment(), timeout=10, cwd=str(tmp_path))
    assert ran.stdout.decode().strip() == str(tmp_path)
    ran = await process.run(["/bin/pwd"], env=clean_environment(), timeout=10)
    assert ran.stdout == b"/\n"


async def test_a_program_that_cannot_start_raises_oserror_and_leaks_no_descriptor(tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        await process.run(["/bin/true"], env={}, timeout=10, cwd=str(tmp_path / "missing"), stdin=b"x")
    assert set(os.listdir("/proc/self/fd")) <= before


@pytest.mark.parametrize(("argv", "env", "message"), [
    ("/bin/true --x", {}, "not a command line"),
    (["true"], {}, "absolute"),
    ([], {}, "empty"),
    (["/nonexistent/x"], {}, "does not exist"),
    (["/bin/true", 1], {}, "must be a string"),
    (["/bin/true", "a\0b"], {}, "NUL"),
    (["/bin/true"], {"A=B": "x"}, "environment variable name"),
    (["/bin/true"], {"A": "x\0"}, "without NUL"),
])
async def test_unusable_commands_are_refused_before_anything_runs(argv: object, env: dict, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        await process.run(argv, env=env, timeout=10)  # type: ignore[arg-type]


async def test_a_file_that_is_not_executable_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o644)
    with pytest.raises(CommandError, match="not executable"):
        await process.run([str(path)], env={}, timeout=10)


async def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout"):
        await process.run(["/bin/true"], env={}, timeout=0)
    with pytest.raises(ValueError, match="kill_grace"):
        await process.run(["/bin/true"], env={}, timeout=1, kill_grace=float("nan"))
    with pytest.raises(ValueError, match="output_cap"):
        await process.run(["/bin/true"], env={}, timeout=1, output_cap=0)
    with pytest.raises(CommandError, match="stdin must be bytes"):
        await process.run(["/bin/true"], env={}, timeout=1, stdin="text")  # type: ignore[arg-type]
