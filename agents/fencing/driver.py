"""Run one fence agent program by the Fence Agent API, under our own deadline.

Parameters go as `key=value` lines on stdin with `action=` always (never the deprecated `option=`).
The agent runs in a new process group with `PCMK_service` removed from its environment (with it set,
agents switch their own timeouts off), and when our deadline passes the whole group gets SIGTERM,
then SIGKILL. Values marked secret never appear in reprs, logs or errors, and are blanked out of the
agent's captured output.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agents.fencing.fence_api import ACTIONS, RESERVED_KEYS, FenceApiError, format_stdin

log = logging.getLogger(__name__)

# Where a bare `fence_*` name is looked up; Pacemaker finds its agents there too.
AGENT_DIRS: tuple[Path, ...] = (Path("/usr/sbin"),)
_AGENT_NAME_RE = re.compile(r"^fence_[A-Za-z0-9_.-]+$")
# After SIGTERM a well-behaved agent exits at once; this is how long it gets before SIGKILL.
KILL_GRACE = 2.0
# Parameter names that carry secrets in fence-agents, hidden even if the caller forgot to mark them.
SECRET_NAMES: frozenset[str] = frozenset({"passwd", "password", "snmp_priv_passwd"})
_REDACTED = "<hidden>"


class Secret:
    """A parameter value that must never be shown; only `reveal()` gives it out."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


ParamValue = str | Secret


class AgentProgramError(ValueError):
    """The fence agent program cannot be used (bad name, missing, not executable)."""


@dataclass(frozen=True)
class AgentRun:
    """What one fence agent run did. exit_code is None when it was killed at the deadline."""

    program: str
    action: str
    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool
    duration: float

    @property
    def error_text(self) -> str:
        """The agent's stderr, trimmed, or a note that it said nothing."""
        text = self.stderr.strip()
        return text if text else "(the agent wrote nothing on stderr)"


def resolve_program(program: str) -> Path:
    """Resolve a `fence_*` name in AGENT_DIRS, or check an absolute path to a `fence_*` program."""
    path = Path(program)
    if path.is_absolute():
        candidates = [path]
    elif "/" in program:
        raise AgentProgramError(
            f"fence agent program {program!r}: give a fence_* name or an absolute path")
    else:
        candidates = [d / program for d in AGENT_DIRS]
    if not _AGENT_NAME_RE.match(path.name):
        raise AgentProgramError(
            f"fence agent program {program!r}: the program name must start with 'fence_'")
    for candidate in candidates:
        try:
            st = candidate.stat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(candidate, os.X_OK):
            return candidate
        raise AgentProgramError(f"fence agent program {candidate}: not an executable file")
    where = program if path.is_absolute() else " or ".join(str(c) for c in candidates)
    raise AgentProgramError(f"fence agent program {program!r}: not found ({where} does not exist)")


def agent_environment() -> dict[str, str]:
    """Our environment minus PCMK_service, so the agent keeps its own power timeouts."""
    return {k: v for k, v in os.environ.items() if k != "PCMK_service"}


def _secret_values(params: Mapping[str, ParamValue]) -> list[str]:
    values = [v.reveal() if isinstance(v, Secret) else v
              for k, v in params.items() if isinstance(v, Secret) or k in SECRET_NAMES]
    # Longest first, so a secret containing another is blanked whole.
    return sorted((v for v in values if v), key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    for value in secrets:
        text = text.replace(value, _REDACTED)
    return text


def build_stdin(params: Mapping[str, ParamValue], action: str, plug: str | None) -> str:
    """The stdin for one run: device parameters, then `plug=` and `action=` which we own."""
    if action not in ACTIONS:
        raise FenceApiError(f"unknown fence action {action!r}; expected one of: {', '.join(ACTIONS)}")
    reserved = sorted(k for k in params if k.replace("-", "_") in RESERVED_KEYS)
    if reserved:
        raise FenceApiError(
            f"device parameters may not set {', '.join(reserved)}: the fencing agent sets the "
            "action and the plug itself")
    pairs = {k: (v.reveal() if isinstance(v, Secret) else v) for k, v in params.items()}
    if plug is not None:
        if not plug:
            raise FenceApiError("plug is empty; name the plug or pass None for a single-target device")
        pairs["plug"] = plug
    pairs["action"] = action
    return format_stdin(pairs)  # its errors name the key, never the value


async def run_fence_agent(program: str, params: Mapping[str, ParamValue], action: str, *,
                          plug: str | None, timeout: float) -> AgentRun:
    """Run `program` with `action` on `plug`; never longer than `timeout` seconds (plus the kill).

    Raises AgentProgramError or FenceApiError before starting anything when the program or the
    parameters are unusable; otherwise always returns an AgentRun, even when the agent hung.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    path = resolve_program(program)
    stdin_text = build_stdin(params, action, plug)
    secrets = _secret_values(params)

    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=agent_environment(),
        start_new_session=True,  # its own process group, so the deadline reaches every child
        close_fds=True,
    )
    assert proc.stdin and proc.stdout and proc.stderr
    out_task = asyncio.ensure_future(proc.stdout.read())
    err_task = asyncio.ensure_future(proc.stderr.read())

    async def converse() -> None:
        try:
            proc.stdin.write(stdin_text.encode())
            await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # an agent may exit without reading stdin; its exit code tells the story
        # Wait for the output too: a child that kept the pipes open is still part of this run.
        # Shielded: a timeout cancels this wait, not the readers holding what was said so far.
        await asyncio.gather(proc.wait(), asyncio.shield(out_task), asyncio.shield(err_task))

    timed_out = False
    try:
        await asyncio.wait_for(converse(), timeout)
    except asyncio.TimeoutError:
        timed_out = True
        await _kill_group(proc)
    except BaseException:
        # Cancelled by our caller: never leave a fence agent running unsupervised.
        await _kill_group(proc)
        raise
    duration = time.monotonic() - started

    stdout = redact(await _collected(out_task), secrets)
    stderr = redact(await _collected(err_task), secrets)
    exit_code = None if timed_out else proc.returncode
    run = AgentRun(program=str(path), action=action, exit_code=exit_code, stdout=stdout,
                   stderr=stderr, timed_out=timed_out, duration=duration)
    log.info("fence agent %s action=%s plug=%s: %s in %.2fs", path.name, action, plug,
             "timed out" if timed_out else f"exit {exit_code}", duration)
    return run


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the agent's process group, then SIGKILL whatever is left after KILL_GRACE."""
    _signal_group(proc, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), KILL_GRACE)
    except asyncio.TimeoutError:
        pass
    # Children may ignore SIGTERM or outlive the leader while holding our pipes: kill what is left.
    _signal_group(proc, signal.SIGKILL)
    await proc.wait()


def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass  # the whole group is gone already


async def _collected(task: asyncio.Future[bytes]) -> str:
    """What a reader got; after a kill the pipes close, but a stray holder must not block us."""
    try:
        data = await asyncio.wait_for(asyncio.shield(task), KILL_GRACE)
    except asyncio.TimeoutError:
        task.cancel()
        return "(output unavailable: the pipe stayed open after the process group was killed)"
    return data.decode("utf-8", errors="replace")
