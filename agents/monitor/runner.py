"""Run a check plugin through the Unix process API, bounded in time, output and concurrency.

A plugin is an absolute path plus an argv list, never a shell command. It starts with a clean
environment (``LC_ALL=C``, a minimal ``PATH``), no stdin, and a process group of its own, so the
deadline can TERM and then KILL everything it started. Captured output is capped, and every way a
plugin can misbehave (timeout, signal, exit code outside 0-3, silence) becomes a result with a line
saying what happened, as Nagios 4 reports it, rather than an exception.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from agents.monitor import perfdata as perfdata_grammar
from agents.monitor.output import PluginOutput, parse_output
from agents.monitor.ranges import State, format_number

__all__ = [
    "CheckResult",
    "PluginError",
    "PluginPool",
    "run_plugin",
    "clean_environment",
    "CLEAN_PATH",
    "DEFAULT_OUTPUT_CAP",
    "DEFAULT_KILL_GRACE",
]

CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_OUTPUT_CAP = 64 * 1024
DEFAULT_KILL_GRACE = 2.0
_READ_CHUNK = 64 * 1024
_HAVE_PIDFD = hasattr(os, "pidfd_open") and hasattr(os, "waitid")
_KILLED = {getattr(os, "CLD_KILLED", 2), getattr(os, "CLD_DUMPED", 3)}


class PluginError(ValueError):
    """The plugin cannot be run as asked: bad argv, relative path, not an executable file."""


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


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a plugin gets: ``LC_ALL=C`` and a minimal ``PATH``, plus ``extra``."""
    env = {"PATH": CLEAN_PATH, "LC_ALL": "C"}
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise PluginError(f"bad environment variable name {key!r}")
        if not isinstance(value, str) or "\0" in value:
            raise PluginError(f"environment variable {key} must be text without NUL bytes")
        env[key] = value
    return env


def checked_argv(argv: Sequence[str]) -> list[str]:
    """Validate a plugin argv: a list of strings whose first is an absolute path to an executable."""
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence):
        raise PluginError("argv must be a list of strings, not a command line (no shell is used)")
    if not argv:
        raise PluginError("argv is empty: the first element must be the plugin's absolute path")
    for index, arg in enumerate(argv):
        if not isinstance(arg, str):
            raise PluginError(f"argv[{index}] must be a string, got {type(arg).__name__}")
        if "\0" in arg:
            raise PluginError(f"argv[{index}] contains a NUL byte")
    path = argv[0]
    if not os.path.isabs(path):
        raise PluginError(f"plugin path must be absolute, got {path!r}")
    if not os.path.isfile(path):
        raise PluginError(f"plugin {path} does not exist or is not a regular file")
    if not os.access(path, os.X_OK):
        raise PluginError(f"plugin {path} is not executable")
    return list(argv)


def _positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


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
    return await _run_checked(checked_argv(argv), timeout=timeout, timeout_state=timeout_state,
                              output_cap=output_cap, env=env, kill_grace=kill_grace)


async def _run_checked(
    args: list[str],
    *,
    timeout: float,
    timeout_state: State = State.UNKNOWN,
    output_cap: int = DEFAULT_OUTPUT_CAP,
    env: Mapping[str, str] | None = None,
    kill_grace: float = DEFAULT_KILL_GRACE,
) -> CheckResult:
    """``run_plugin`` for an argv that ``checked_argv`` has passed."""
    timeout = _positive(timeout, "timeout")
    kill_grace = _positive(kill_grace, "kill_grace")
    timeout_state = State.parse(timeout_state)
    if isinstance(output_cap, bool) or not isinstance(output_cap, int) or output_cap < 1:
        raise ValueError(f"output_cap must be a positive number of bytes, got {output_cap!r}")
    environment = clean_environment(env)

    if not _HAVE_PIDFD:
        raise PluginError("running plugins needs pidfds (Linux 5.3 or later, as on Debian 12)")
    return await _run_watched(args, timeout, timeout_state, output_cap, environment, kill_grace)


async def _run_watched(args: list[str], timeout: float, timeout_state: State, output_cap: int,
                       environment: dict[str, str], kill_grace: float) -> CheckResult:
    """The plugin under a pidfd and two pipe readers on the event loop: no watcher thread, no
    transport or stream objects, no tasks per run (the cost of asyncio's subprocess machinery is
    most of what a check costs the agent beyond the spawn itself). Only the start itself runs on
    a spawn thread, so the loop is not stopped for the millisecond until the plugin has exec'd.

    The leader is reaped only after the final group KILL: until then it stays a zombie, so its pid,
    which is the group's id, cannot be reused by an unrelated group that the KILL would hit."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    # The spawn runs on a thread of its own: Popen waits (without the GIL) until the plugin has
    # exec'd, about a millisecond in which the loop goes on serving other requests.
    spawning = _spawner().submit(_spawn, args, out_w, err_w, environment)
    try:
        proc = await asyncio.wrap_future(spawning, loop=loop)
    except OSError as exc:
        for fd in (out_r, err_r):
            os.close(fd)
        return CheckResult(State.UNKNOWN, f"Could not run plugin {args[0]}: {exc.strerror or exc}",
                           "", "", time.monotonic() - started, None)
    except BaseException:  # cancelled while spawning: the plugin must not run on unwatched
        for fd in (out_r, err_r):
            os.close(fd)
        if spawning.cancel():  # never started: its pipe ends are still ours to close
            os.close(out_w)
            os.close(err_w)
        else:
            spawning.add_done_callback(_kill_abandoned)
        raise
    group = proc.pid  # start_new_session made the plugin the leader of a new group
    run = _Watched(loop, proc, out_r, err_r, output_cap)
    timed_out = False
    try:
        try:
            run.watch()
        except OSError:  # no pidfd to be had (fd limit): never leave the plugin running unwatched
            signal_group(group, signal.SIGKILL)
            raise
        if not await run.finished(timeout):
            timed_out = True
            signal_group(group, signal.SIGTERM)
            await run.finished(kill_grace)
        # Also after a normal exit: nothing the plugin started may outlive its check.
        signal_group(group, signal.SIGKILL)
        if not run.all_done.done():
            await run.finished(kill_grace)
        if timed_out:
            # Members killed now may still be on their way out after closing the pipes: the check
            # ends when they are gone, so a timed-out plugin leaves nothing running behind it.
            await _members_gone(loop, group, kill_grace)
    except BaseException:
        signal_group(group, signal.SIGKILL)
        raise
    finally:
        run.close()  # stops listening (a process that escaped the group may hold a pipe) and reaps
    duration = time.monotonic() - started
    return _result(
        returncode=run.returncode,
        stdout=run.out.decode("utf-8", errors="replace"),
        stderr=run.err.decode("utf-8", errors="replace"),
        truncated=run.truncated,
        timed_out=timed_out,
        timeout=timeout,
        timeout_state=timeout_state,
        output_cap=output_cap,
        duration=duration,
    )


SPAWN_THREADS = 2
_spawn_pool: ThreadPoolExecutor | None = None


def _spawner() -> ThreadPoolExecutor:
    global _spawn_pool
    if _spawn_pool is None:
        _spawn_pool = ThreadPoolExecutor(SPAWN_THREADS, thread_name_prefix="plugin-spawn")
    return _spawn_pool


def _spawn(args: list[str], out_w: int, err_w: int, environment: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start the plugin (on a spawn thread) as the leader of a new process group; the pipes' write
    ends are the child's alone afterwards."""
    try:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w, env=environment,
                                cwd="/", start_new_session=True, close_fds=True)
    finally:
        os.close(out_w)
        os.close(err_w)


def _kill_abandoned(spawning: Future[subprocess.Popen[bytes]]) -> None:
    """A plugin whose check was cancelled while it was being started: kill its group and reap it."""
    if spawning.cancelled() or spawning.exception() is not None:
        return
    proc = spawning.result()
    signal_group(proc.pid, signal.SIGKILL)
    _spawner().submit(proc.wait)  # reaped on a spawn thread, never on the event loop


async def _members_gone(loop: asyncio.AbstractEventLoop, group: int, timeout: float) -> None:
    """Wait until no process of ``group`` runs any more (zombies count as gone), at most ``timeout``."""
    waiting: list[asyncio.Future[None]] = []
    fds = []
    try:
        for pid in _group_members(group):
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # gone already, or not ours to watch
                continue
            fds.append(fd)
            gone = loop.create_future()
            loop.add_reader(fd, lambda f=gone: f.done() or f.set_result(None))
            waiting.append(gone)
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)


def _group_members(group: int) -> list[int]:
    """Pids of live (not zombie) processes in process group ``group``, from /proc."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == group and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


class _Watched:
    """One running plugin: its capped stdout and stderr, and its exit, as seen from the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen[bytes], out_fd: int, err_fd: int,
                 cap: int) -> None:
        self.loop, self.proc, self.cap = loop, proc, cap
        self.fds = {out_fd: bytearray(), err_fd: bytearray()}
        self.out_fd, self.err_fd = out_fd, err_fd
        self.truncated = False  # stdout only, as before: stderr is only read for a silent plugin
        self.pidfd = -1
        self.exited = False
        self.returncode: int | None = None
        self.reaped = False
        self.open = 3  # two pipes and the exit still to come
        self.all_done: asyncio.Future[None] = loop.create_future()

    def watch(self) -> None:
        for fd in self.fds:
            os.set_blocking(fd, False)
            self.loop.add_reader(fd, self._readable, fd)
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.loop.add_reader(self.pidfd, self._exited)

    async def finished(self, timeout: float) -> bool:
        """Wait until the plugin exited and both pipes closed, at most ``timeout`` seconds."""
        if not self.all_done.done():
            await asyncio.wait((self.all_done,), timeout=timeout)
        return self.all_done.done()

    def _one_done(self) -> None:
        self.open -= 1
        if self.open == 0 and not self.all_done.done():
            self.all_done.set_result(None)

    def _readable(self, fd: int) -> None:
        try:
            chunk = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.loop.remove_reader(fd)
            self._one_done()
            return
        kept = self.fds[fd]
        room = self.cap - len(kept)
        if len(chunk) > room and fd == self.out_fd:
            self.truncated = True
        if room > 0:
            kept += chunk[:room]
        # beyond the cap the rest is drained and dropped, so the plugin never blocks on a full pipe

    def _exited(self) -> None:
        self.loop.remove_reader(self.pidfd)
        try:
            # WNOWAIT: read the status but leave the zombie, which holds the group id, until close().
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:  # reaped by someone else: the status is lost
            info = None
        if info is not None:
            self.returncode = -info.si_status if info.si_code in _KILLED else info.si_status
        self.exited = True
        self._one_done()

    @property
    def out(self) -> bytes:
        return bytes(self.fds[self.out_fd])

    @property
    def err(self) -> bytes:
        return bytes(self.fds[self.err_fd])

    def close(self) -> None:
        for fd in self.fds:
            self.loop.remove_reader(fd)
            os.close(fd)
        if self.pidfd < 0:
            self._reap(block=True)  # only after the group KILL: this wait is short
            return
        if self.exited:
            self.loop.remove_reader(self.pidfd)
            self._reap(block=False)
            os.close(self.pidfd)
        else:
            # Still running (cancelled, or stuck after KILL): reap it whenever it does go.
            self.loop.remove_reader(self.pidfd)
            self.loop.add_reader(self.pidfd, self._reap_later)

    def _reap_later(self) -> None:
        self.loop.remove_reader(self.pidfd)
        self._reap(block=False)
        os.close(self.pidfd)

    def _reap(self, *, block: bool) -> None:
        try:
            pid, status = os.waitpid(self.proc.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            pid, status = self.proc.pid, 0
        if pid:
            # Popen must not wait for (or signal) a pid that may already belong to someone else.
            self.proc.returncode = os.waitstatus_to_exitcode(status) if status else 0
            self.reaped = True


async def read_capped(reader: asyncio.StreamReader, cap: int) -> tuple[bytes, bool]:
    """Keep the first ``cap`` bytes; drain the rest so the plugin is never blocked on a full pipe."""
    kept = bytearray()
    truncated = False
    while chunk := await reader.read(_READ_CHUNK):
        room = cap - len(kept)
        if len(chunk) > room:
            truncated = True
        if room > 0:
            kept += chunk[:room]
    return bytes(kept), truncated


def signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass  # the whole group is already gone


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
        args = checked_argv(argv)
        async with self._semaphore:
            self._running += 1
            try:
                return await _run_checked(args, **options)  # type: ignore[arg-type]
            finally:
                self._running -= 1
