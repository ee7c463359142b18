"""Run a check plugin, bounded in time, output and concurrency, and read its result as Nagios does.

A plugin runs through the process runner (``agents.process``): an absolute path plus an argv list,
never a shell command, with a clean environment (``LC_ALL=C``, a minimal ``PATH``), no stdin, and a
process group of its own, so the deadline can TERM and then KILL everything it started. Every way a
plugin can misbehave (timeout, signal, exit code outside 0-3, silence) becomes a result with a line
saying what happened, as Nagios 4 reports it, rather than an exception.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agents import process
from agents.monitor import perfdata as perfdata_grammar
from agents.monitor.output import PluginOutput, parse_output
from agents.monitor.ranges import State, format_number
from agents.process import (
    CLEAN_PATH,
    DEFAULT_KILL_GRACE,
    DEFAULT_OUTPUT_CAP,
    clean_environment,
)

__all__ = [
    "CLEAN_PATH",
    "DEFAULT_KILL_GRACE",
    "DEFAULT_OUTPUT_CAP",
    "CheckResult",
    "PluginError",
    "PluginPool",
    "clean_environment",
    "run_plugin",
]

# A plugin that cannot be run as asked (bad argv, relative path, not an executable file): the process
# runner's refusal, under the name the monitor's callers know.
PluginError = process.CommandError


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one plugin run. ``exit_code`` is None when the plugin did not exit by itself."""

    state: State
    text: str
    long_text: str
    perfdata: str
    duration: float
    exit_code: int | None
    truncated: bool = False
    timed_out: bool = False

    @property
    def metrics(self) -> perfdata_grammar.Perfdata:
        """``perfdata`` parsed into items (bad items are listed in ``.errors``)."""
        return perfdata_grammar.parse(self.perfdata)

    def render(self) -> str:
        """The result as plugin output, for relaying it to Nagios unchanged in meaning."""
        return PluginOutput(self.text, self.long_text, self.perfdata).render()

    def as_dict(self) -> dict[str, object]:
        """Plain types for the wire (msgpack): the state by name, perfdata raw and parsed."""
        return {
            "state": self.state.name,
            "code": int(self.state),
            "text": self.text,
            "long_text": self.long_text,
            "perfdata": self.perfdata,
            "metrics": [item.as_dict() for item in self.metrics],
            "duration": self.duration,
            "exit_code": self.exit_code,
            "truncated": self.truncated,
            "timed_out": self.timed_out,
        }


async def run_plugin(
    argv: Sequence[str],
    *,
    timeout: float,
    timeout_state: State = State.UNKNOWN,
    output_cap: int = DEFAULT_OUTPUT_CAP,
    env: Mapping[str, str] | None = None,
    kill_grace: float = DEFAULT_KILL_GRACE,
) -> CheckResult:
    """Run one plugin and return its result; raises PluginError only when it cannot be started.

    ``timeout`` is the plugin's deadline in seconds; past it the whole process group gets SIGTERM,
    then SIGKILL after ``kill_grace`` seconds, and the result is ``timeout_state``. At most
    ``output_cap`` bytes of stdout (and of stderr) are kept. ``env`` adds to the clean environment.
    """
    timeout_state = State.parse(timeout_state)
    started = time.monotonic()
    try:
        ran = await process.run(argv, env=clean_environment(env), timeout=timeout, kill_grace=kill_grace,
                                output_cap=output_cap)
    except OSError as exc:
        return CheckResult(State.UNKNOWN, f"Could not run plugin {argv[0]}: {exc.strerror or exc}",
                           "", "", time.monotonic() - started, None)
    return _result(
        returncode=ran.returncode,
        stdout=ran.stdout.decode("utf-8", errors="replace"),
        stderr=ran.stderr.decode("utf-8", errors="replace"),
        truncated=ran.stdout_dropped > 0,  # stdout only: stderr is only read for a silent plugin
        timed_out=ran.timed_out,
        timeout=float(timeout),
        timeout_state=timeout_state,
        output_cap=output_cap,
        duration=ran.elapsed,
    )


def _result(
    *,
    returncode: int | None,
    stdout: str,
    stderr: str,
    truncated: bool,
    timed_out: bool,
    timeout: float,
    timeout_state: State,
    output_cap: int,
    duration: float,
) -> CheckResult:
    parsed = parse_output(stdout)
    text, long_text, perf = parsed.text, parsed.long_text, parsed.perfdata

    def headline(line: str) -> str:
        return f"{line}: {text}" if text else line

    if timed_out:
        state = timeout_state
        text = headline(f"Plugin timed out after {format_number(timeout)} s")
        perf = ""  # measurements from a run that did not finish are not to be trusted
        returncode = None
    elif returncode is None:
        state, text = State.UNKNOWN, headline("Plugin did not exit")
    elif returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        state = State.UNKNOWN
        text = headline(f"Plugin was killed by {name} ({-returncode})")
        returncode = None
    elif returncode > 3:
        state = State.UNKNOWN
        text = headline(f"Plugin exited with code {returncode}, outside 0-3")
    else:
        state = State(returncode)
    if not (text or long_text or perf):
        first_err = stderr.strip().split("\n", 1)[0].strip()
        # Nagios 4's words for a silent plugin.
        text = f"(No output on stdout) stderr: {first_err}" if first_err else "(No output returned from plugin)"
    if truncated:
        if long_text and not long_text.endswith("\n"):
            long_text += "\n"
        long_text += f"(output truncated: plugin wrote more than {output_cap} bytes)"
    return CheckResult(state, text, long_text, perf, duration, returncode, truncated, timed_out)


class PluginPool:
    """Runs plugins with at most ``limit`` at a time; further runs wait their turn."""

    def __init__(self, limit: int = 8) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"plugin pool limit must be a positive integer, got {limit!r}")
        self.limit = limit
        self._semaphore = asyncio.Semaphore(limit)
        self._running = 0

    @property
    def running(self) -> int:
        """How many plugins are running now."""
        return self._running

    async def run(self, argv: Sequence[str], **options: object) -> CheckResult:
        """``run_plugin(argv, **options)`` once a slot is free; bad argv fails before queueing."""
        args = process.checked_argv(argv)
        async with self._semaphore:
            self._running += 1
            try:
                return await run_plugin(args, **options)  # type: ignore[arg-type]
            finally:
                self._running -= 1
