"""The runner starts plugins on a spawn thread: a check cancelled at any moment of the start, before,
during or after it, leaves no plugin running and no pipe open; concurrent starts all run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
from pathlib import Path

import pytest

from agents.monitor.ranges import State
from agents.monitor.runner import PluginPool, run_plugin

DUMMY = "/usr/lib/nagios/plugins/check_dummy"

pytestmark = pytest.mark.skipif(not Path(DUMMY).exists(), reason="monitoring-plugins-basic is not installed")


def running_with(token: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line contains ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if token.encode() in cmdline and state not in ("Z", "X"):
            found.append(int(entry))
    return found


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize("delay", [None, 0.0, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.02, 0.1])
async def test_a_check_cancelled_while_its_plugin_starts_leaves_nothing_behind(tmp_path: Path,
                                                                              delay: float | None) -> None:
    token = f"vertebra-spawn-{os.getpid()}-{delay}"
    path = tmp_path / token
    # A leader and a child that both linger: shells whose command line is the script's path.
    path.write_text("#!/bin/sh\nwhile :; do sleep 1; done &\nwhile :; do sleep 1; done\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    before = open_fds()
    task = asyncio.ensure_future(run_plugin([str(path)], timeout=60))
    if delay is not None:  # None: cancelled before the task ever ran
        await asyncio.sleep(delay)
    if delay == 0.1:  # long after the start: what this test looks for is there to be found
        for _ in range(500):
            if len(running_with(token)) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(running_with(token)) == 2
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    for _ in range(300):  # SIGKILL, and the reaping of an abandoned start, are asynchronous
        if not running_with(token) and open_fds() <= before:
            break
        await asyncio.sleep(0.01)
    left = running_with(token)
    for pid in left:  # a failing run must not leave them for the next tests
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert left == []
    assert open_fds() <= before


async def test_many_concurrent_starts_all_run_and_answer_in_their_own_words() -> None:
    pool = PluginPool(16)
    results = await asyncio.gather(*(pool.run([DUMMY, str(i % 4), f"run {i}"], timeout=10) for i in range(64)))
    assert [(r.state, r.text) for r in results] == [
        (State(i % 4), f"{State(i % 4).name}: run {i}") for i in range(64)]
    assert pool.running == 0
