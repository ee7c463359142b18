"""Run one fence agent program by the Fence Agent API, under our own deadline.

Parameters go as `key=value` lines on stdin with `action=` always (never the deprecated `option=`).
The agent runs through the process runner (agents.process) in a new process group, with our
environment minus `PCMK_service` (with it set, agents switch their own timeouts off), and when our
deadline passes the whole group gets SIGTERM, then SIGKILL. Values marked secret never appear in
reprs, logs or errors, and are blanked out of the agent's captured output.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agents import process
from agents.fencing.fence_api import ACTIONS, RESERVED_KEYS, FenceApiError, format_stdin

log = logging.getLogger(__name__)

# Where a bare `fence_*` name is looked up; Pacemaker finds its agents there too.
AGENT_DIRS: tuple[Path, ...] = (Path("/usr/sbin"),)
_AGENT_NAME_RE = re.compile(r"^fence_[A-Za-z0-9_.-]+$")
# After SIGTERM a well-behaved agent exits at once; this is how long it gets before SIGKILL.
KILL_GRACE = 2.0
# Output kept from one run, per stream: far more than any agent's status or plug list, so a runaway
# agent cannot fill the fencing agent's memory.
OUTPUT_CAP = 1 << 20
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
    truncated: bool = False  # the agent wrote more than OUTPUT_CAP bytes on stdout or stderr

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

    ran = await process.run([str(path)], env=agent_environment(), timeout=timeout, kill_grace=KILL_GRACE,
                            output_cap=OUTPUT_CAP, stdin=stdin_text.encode())
    stdout = _shown(ran.stdout, ran.stdout_dropped, secrets)
    stderr = _shown(ran.stderr, ran.stderr_dropped, secrets)
    exit_code = None if ran.timed_out else ran.returncode
    run = AgentRun(program=str(path), action=action, exit_code=exit_code, stdout=stdout, stderr=stderr,
                   timed_out=ran.timed_out, duration=ran.elapsed, truncated=ran.truncated)
    log.info("fence agent %s action=%s plug=%s: %s in %.2fs", path.name, action, plug,
             "timed out" if ran.timed_out else f"exit {exit_code}", ran.elapsed)
    return run


def _shown(data: bytes, dropped: int, secrets: list[str]) -> str:
    """Captured output as text with the secrets blanked; when the cap cut it, a secret cut in two at
    the end is blanked too (its start alone would still give part of it away)."""
    text = redact(data.decode("utf-8", errors="replace"), secrets)
    if dropped:
        for value in secrets:
            cut = next((n for n in range(len(value) - 1, 0, -1) if text.endswith(value[:n])), 0)
            if cut:
                text = text[:-cut] + _REDACTED
                break
    return text
