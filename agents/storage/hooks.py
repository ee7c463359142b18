"""Run a storage hook (the masking hooks storage.mask runs, agents/storage/masking.py) through the process
runner, the way check plugins run.

A hook is an absolute path plus an argv list, never a shell command. It runs in the directory it works
on (also given as VERTEBRA_VOLUME_PATH), with the clean environment, no stdin, and a process group of its
own, so its deadline can TERM and then KILL everything it started; anything it leaves running after it
exits is killed then, without waiting for it to close its output. Its stdout and stderr are captured
together, in order, up to a cap, because a failing hook's own words are what the person reading the
error needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agents import process
from agents.process import DEFAULT_KILL_GRACE, DEFAULT_OUTPUT_CAP
from agents.storage.driver import StorageError


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
        return process.checked_argv(argv)
    except process.CommandError as exc:
        raise StorageError(f"hook cannot be run: {exc}", code="invalid") from None


async def run_hook(argv: Sequence[str], directory: Path, *, timeout: float,
                   env: Mapping[str, str] | None = None, output_cap: int = DEFAULT_OUTPUT_CAP,
                   kill_grace: float = DEFAULT_KILL_GRACE) -> HookResult:
    """Run one hook in `directory` and return how it ended; raises StorageError (code invalid) only when
    it cannot be started as asked."""
    args = check_hook(argv)
    try:
        environment = process.clean_environment({**(env or {}), "VERTEBRA_VOLUME_PATH": str(directory)})
    except process.CommandError as exc:
        raise StorageError(f"hook environment refused: {exc}", code="invalid") from None
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise StorageError(f"hook timeout must be a positive number of seconds, got {timeout!r}",
                           code="invalid")
    try:
        # One stream for both keeps their order; the run ends when the hook exits, not when a
        # left-behind grandchild closes its output (the group KILL that follows the exit ends that one).
        ran = await process.run(args, env=environment, timeout=timeout, kill_grace=kill_grace,
                                output_cap=output_cap, cwd=str(directory), merge_stderr=True,
                                wait_for_output=False)
    except OSError as exc:
        raise StorageError(f"hook {args[0]} could not be started: {exc.strerror or exc}",
                           code="invalid") from None
    return HookResult(tuple(args), None if ran.timed_out else ran.exit_code,
                      ran.stdout.decode("utf-8", errors="replace"), ran.elapsed, ran.timed_out, ran.truncated)
