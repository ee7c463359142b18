"""Run a storage hook (the masking hooks storage.mask runs, agents/storage/masking.py) through the Unix
process API, the way check plugins run.

A hook is an absolute path plus an argv list, never a shell command. It runs in the directory it works
on (also given as VERTEBRA_VOLUME_PATH), with the plugins' clean environment, no stdin, and a process
group of its own, so its deadline can TERM and then KILL everything it started; anything it leaves
running after it exits is killed too. Its stdout and stderr are captured together, in order, up to a cap,
because a failing hook's own words are what the person reading the error needs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agents.monitor.runner import PluginError, checked_argv, clean_environment, read_capped, signal_group
from agents.storage.driver import StorageError

DEFAULT_OUTPUT_CAP = 64 * 1024
DEFAULT_KILL_GRACE = 2.0
_READ = 64 * 1024


@dataclass(frozen=True)
class HookResult:
    """How a hook run ended. exit_code is None when it did not exit by itself (deadline, signal)."""
    argv: tuple[str, ...]
    exit_code: int | None
    output: str               # stdout and stderr interleaved as written, at most the cap
    duration: float
    timed_out: bool = False
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def describe(self) -> str:
        """One sentence on how the hook ended, then its output: what goes into an error."""
        name = os.path.basename(self.argv[0])
        if self.timed_out:
            how = f"hook {name} did not finish within its deadline and was killed"
        elif self.exit_code is None:
            how = f"hook {name} was killed by a signal"
        else:
            how = f"hook {name} exited with code {self.exit_code}"
        shown = self.output.strip() or "(no output)"
        more = " [output truncated]" if self.truncated else ""
        return f"{how} after {self.duration:.1f}s; its output:\n{shown}{more}"


def check_hook(argv: Sequence[str]) -> list[str]:
    """The argv if it can be run as a hook (a list whose first item is an absolute path to an executable
    file), else StorageError (code invalid) saying what is wrong."""
    try:
        return checked_argv(argv)
    except PluginError as exc:
        raise StorageError(f"hook cannot be run: {exc}", code="invalid") from None


async def run_hook(argv: Sequence[str], directory: Path, *, timeout: float,
                   env: Mapping[str, str] | None = None, output_cap: int = DEFAULT_OUTPUT_CAP,
                   kill_grace: float = DEFAULT_KILL_GRACE) -> HookResult:
    """Run one hook in `directory` and return how it ended; raises StorageError (code invalid) only when
    it cannot be started as asked."""
    args = check_hook(argv)
    try:
        environment = clean_environment({**(env or {}), "VERTEBRA_VOLUME_PATH": str(directory)})
    except PluginError as exc:
        raise StorageError(f"hook environment refused: {exc}", code="invalid") from None
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise StorageError(f"hook timeout must be a positive number of seconds, got {timeout!r}",
                           code="invalid")
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    # One pipe for both streams keeps their order; our own pipe (not asyncio's PIPE) because waiting
    # for the process must not wait for a left-behind grandchild to close it.
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=write_fd, stderr=write_fd, env=environment,
            cwd=str(directory), start_new_session=True)
    except OSError as exc:
        os.close(read_fd)
        raise StorageError(f"hook {args[0]} could not be started: {exc.strerror or exc}",
                           code="invalid") from None
    finally:
        os.close(write_fd)
    reader = asyncio.StreamReader(limit=_READ)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(read_fd, "rb", buffering=0))
    output = asyncio.ensure_future(read_capped(reader, output_cap))
    exited = asyncio.ensure_future(proc.wait())
    timed_out = False
    try:
        done, _ = await asyncio.wait({exited}, timeout=timeout)
        if not done:
            timed_out = True
            signal_group(proc.pid, signal.SIGTERM)
            done, _ = await asyncio.wait({exited}, timeout=kill_grace)
        signal_group(proc.pid, signal.SIGKILL)      # also after a normal exit: nothing may outlive it
        await asyncio.wait({exited}, timeout=kill_grace)
        await asyncio.wait({output}, timeout=kill_grace)
    except BaseException:
        signal_group(proc.pid, signal.SIGKILL)
        raise
    finally:
        exited.cancel()
        output.cancel()
        transport.close()
    text, truncated = output.result() if output.done() and not output.cancelled() else (b"", False)
    code = proc.returncode
    return HookResult(tuple(args), None if timed_out or code is None or code < 0 else code,
                      text.decode("utf-8", errors="replace"), time.monotonic() - started, timed_out, truncated)


