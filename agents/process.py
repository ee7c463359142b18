"""Run a program through the Unix process API, bounded in time and output: the one way Vertebra starts
a program for an op (check plugins, fence agents, storage hooks).

A command is an argv list whose first item is an absolute path to an executable, never a shell line.
It gets exactly the environment the caller passes (``clean_environment`` builds the usual one), the
stdin bytes the caller gives or none, and a process group of its own, so that the deadline can TERM
and then KILL everything it started, and nothing in the group outlives the run. stdout and stderr
are kept up to a cap each (or together, in the order written, as one stream) and what is dropped is
counted. Cancelling the task that awaits a run kills the group. How the program ended is a
``ProcessResult``, never an exception; only a command that cannot be started raises.
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

from agents import spawn

__all__ = [
    "CLEAN_PATH",
    "DEFAULT_KILL_GRACE",
    "DEFAULT_OUTPUT_CAP",
    "CommandError",
    "ProcessResult",
    "checked_argv",
    "checked_environment",
    "clean_environment",
    "run",
    "signal_group",
]

CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_OUTPUT_CAP = 64 * 1024
DEFAULT_KILL_GRACE = 2.0
_READ_CHUNK = 64 * 1024
_HAVE_PIDFD = hasattr(os, "pidfd_open") and hasattr(os, "waitid")
_KILLED = {getattr(os, "CLD_KILLED", 2), getattr(os, "CLD_DUMPED", 3)}


class CommandError(ValueError):
    """The command cannot be run as asked: bad argv, relative path, not an executable file, bad environment."""


@dataclass(frozen=True)
class ProcessResult:
    """How one run ended. ``exit_code`` is the status the program exited with, ``signal`` the signal
    that ended it; both are None when it did not end by itself (still stuck after the KILL, or its
    status was lost). ``timed_out`` says the deadline passed and the group was signalled."""

    argv: tuple[str, ...]
    exit_code: int | None
    signal: int | None
    stdout: bytes             # with merge_stderr: both streams, in the order written
    stderr: bytes             # empty with merge_stderr
    stdout_dropped: int       # bytes written past the cap and thrown away
    stderr_dropped: int
    timed_out: bool
    elapsed: float            # seconds from the start of the spawn to the end of the run

    @property
    def truncated(self) -> bool:
        """True when either stream wrote more than the cap."""
        return bool(self.stdout_dropped or self.stderr_dropped)

    @property
    def returncode(self) -> int | None:
        """subprocess's convention in one number: the exit code, or -N when signal N ended the program."""
        return -self.signal if self.signal is not None else self.exit_code


def checked_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` as a dict if every name and value can be passed to a program, else CommandError."""
    checked = {}
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise CommandError(f"bad environment variable name {key!r}")
        if not isinstance(value, str) or "\0" in value:
            raise CommandError(f"environment variable {key} must be text without NUL bytes")
        checked[key] = value
    return checked


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a program gets unless its caller needs more: ``LC_ALL=C`` and a minimal
    ``PATH``, plus ``extra``."""
    return checked_environment({"PATH": CLEAN_PATH, "LC_ALL": "C", **(extra or {})})


def checked_argv(argv: Sequence[str]) -> list[str]:
    """Validate an argv: a list of strings whose first is an absolute path to an executable file."""
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence):
        raise CommandError("argv must be a list of strings, not a command line (no shell is used)")
    if not argv:
        raise CommandError("argv is empty: the first element must be the program's absolute path")
    for index, arg in enumerate(argv):
        if not isinstance(arg, str):
            raise CommandError(f"argv[{index}] must be a string, got {type(arg).__name__}")
        if "\0" in arg:
            raise CommandError(f"argv[{index}] contains a NUL byte")
    path = argv[0]
    if not os.path.isabs(path):
        raise CommandError(f"program path must be absolute, got {path!r}")
    if not os.path.isfile(path):
        raise CommandError(f"program {path} does not exist or is not a regular file")
    if not os.access(path, os.X_OK):
        raise CommandError(f"program {path} is not executable")
    return list(argv)


def _positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def signal_group(group: int, sig: signal.Signals) -> None:
    """Send ``sig`` to every process of ``group``; a group that is gone already is not an error."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


async def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    kill_grace: float = DEFAULT_KILL_GRACE,
    output_cap: int = DEFAULT_OUTPUT_CAP,
    stdin: bytes | None = None,
    cwd: str = "/",
    merge_stderr: bool = False,
    wait_for_output: bool = True,
) -> ProcessResult:
    """Run ``argv`` with exactly the environment ``env`` in ``cwd`` and return how it ended.

    ``stdin`` is written to the program's standard input (None: it reads /dev/null). The run ends when
    the program has exited and its output pipes are closed (with ``wait_for_output=False``: as soon as
    it has exited; whatever it left running is killed then). Past ``timeout`` seconds the whole process
    group gets SIGTERM, then SIGKILL after ``kill_grace`` seconds. At most ``output_cap`` bytes of
    stdout and of stderr are kept; the rest is read and counted, so the program never blocks on a full
    pipe. Raises CommandError or ValueError when the arguments are unusable, OSError when the program
    cannot be started; cancelling the awaiting task kills the group.
    """
    args = checked_argv(argv)
    environment = checked_environment(env)
    timeout = _positive(timeout, "timeout")
    kill_grace = _positive(kill_grace, "kill_grace")
    if isinstance(output_cap, bool) or not isinstance(output_cap, int) or output_cap < 1:
        raise ValueError(f"output_cap must be a positive number of bytes, got {output_cap!r}")
    if stdin is not None and not isinstance(stdin, (bytes, bytearray)):
        raise CommandError(f"stdin must be bytes or None, got {type(stdin).__name__}")
    if not _HAVE_PIDFD:
        raise CommandError("running programs needs pidfds (Linux 5.3 or later, as on Debian 12)")
    return await _run_watched(args, environment, timeout, kill_grace, output_cap, stdin, cwd, merge_stderr,
                              wait_for_output)


async def _run_watched(args: list[str], environment: dict[str, str], timeout: float, kill_grace: float,
                       output_cap: int, stdin: bytes | None, cwd: str, merge_stderr: bool,
                       wait_for_output: bool) -> ProcessResult:
    """The program under a pidfd and pipe readers on the event loop: no watcher thread, no transport
    or stream objects, no tasks per run (asyncio's subprocess machinery costs more than the spawn
    itself when checks run by the thousand). Only the start runs on a spawn thread, so the loop is not
    stopped for the millisecond until the program has exec'd.

    The leader is reaped only after the final group KILL: until then it stays a zombie, so its pid,
    which is the group's id, cannot be reused by an unrelated group that the KILL would hit."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    ends = _Pipes(stdin, merge_stderr)
    # The spawn runs on a thread of its own: it waits (without the GIL, agents/spawn.py) until the
    # program has exec'd, in which time the loop goes on serving other requests.
    spawning = _spawner().submit(_spawn, args, ends.child_ends(), environment, cwd)
    try:
        pid = await asyncio.wrap_future(spawning, loop=loop)
    except OSError:
        ends.close_ours()
        raise
    except BaseException:  # cancelled while spawning: the program must not run on unwatched
        ends.close_ours()
        if spawning.cancel():  # never started: the child's pipe ends are still ours to close
            ends.close_childs()
        else:
            spawning.add_done_callback(_kill_abandoned)
        raise
    group = pid  # the program leads a session and process group of its own
    watched = _Watched(loop, pid, ends, output_cap)
    timed_out = False
    try:
        try:
            watched.watch()
        except OSError:  # no pidfd to be had (fd limit): never leave the program running unwatched
            signal_group(group, signal.SIGKILL)
            raise
        ended = watched.all_done if wait_for_output else watched.exited
        if not await _within(ended, timeout):
            timed_out = True
            signal_group(group, signal.SIGTERM)
            await _within(ended, kill_grace)
        # Also after a normal exit: nothing the program started may outlive its run.
        signal_group(group, signal.SIGKILL)
        await _within(watched.all_done, kill_grace)
        if timed_out:
            # Members killed now may still be on their way out after closing the pipes: the run
            # ends when they are gone, so a timed-out program leaves nothing running behind it.
            await _members_gone(loop, group, kill_grace)
    except BaseException:
        signal_group(group, signal.SIGKILL)
        raise
    finally:
        watched.close()  # stops listening (a process that escaped the group may hold a pipe) and reaps
    code = watched.returncode
    return ProcessResult(
        argv=tuple(args),
        exit_code=code if code is not None and code >= 0 else None,
        signal=-code if code is not None and code < 0 else None,
        stdout=bytes(watched.kept[ends.out_r]),
        stderr=bytes(watched.kept[ends.err_r]) if ends.err_r >= 0 else b"",
        stdout_dropped=watched.dropped[ends.out_r],
        stderr_dropped=watched.dropped[ends.err_r] if ends.err_r >= 0 else 0,
        timed_out=timed_out,
        elapsed=time.monotonic() - started,
    )


async def _within(future: asyncio.Future[None], timeout: float) -> bool:
    """Wait for ``future`` at most ``timeout`` seconds; True if it is done."""
    if not future.done():
        await asyncio.wait((future,), timeout=timeout)
    return future.done()


class _Pipes:
    """The pipes of one run: the parent's ends (output read ends, the stdin write end) and the child's.

    stdin that fits in the pipe is written before the spawn, so a short input (a fence agent's options)
    needs no writer on the loop; the rest, if any, is written as the program reads."""

    def __init__(self, stdin: bytes | None, merge_stderr: bool) -> None:
        self.out_r, self.out_w = os.pipe()
        self.err_r, self.err_w = os.pipe() if not merge_stderr else (-1, self.out_w)
        self.in_r = self.in_w = -1
        self.stdin_rest = memoryview(b"")
        if stdin is not None:
            self.in_r, self.in_w = os.pipe()
            os.set_blocking(self.in_w, False)
            try:
                written = os.write(self.in_w, stdin) if stdin else 0
            except BlockingIOError:
                written = 0
            self.stdin_rest = memoryview(stdin)[written:]
            if not self.stdin_rest:
                self.close_stdin()

    def child_ends(self) -> tuple[int | None, int, int]:
        return (self.in_r if self.in_r >= 0 else None, self.out_w, self.err_w)

    def close_stdin(self) -> None:
        if self.in_w >= 0:
            os.close(self.in_w)
            self.in_w = -1

    def close_ours(self) -> None:
        for fd in (self.out_r, self.err_r):
            if fd >= 0:
                os.close(fd)
        self.close_stdin()

    def close_childs(self) -> None:
        for fd in {self.out_w, self.err_w, self.in_r} - {-1}:
            os.close(fd)


SPAWN_THREADS = 2
_spawn_pool: ThreadPoolExecutor | None = None


def _spawner() -> ThreadPoolExecutor:
    global _spawn_pool
    if _spawn_pool is None:
        _spawn_pool = ThreadPoolExecutor(SPAWN_THREADS, thread_name_prefix="process-spawn")
    return _spawn_pool


def _spawn(args: list[str], child_ends: tuple[int | None, int, int], environment: dict[str, str],
           cwd: str) -> int:
    """Start the program (on a spawn thread) as the leader of a new session and process group and return
    its pid; the child's pipe ends are the child's alone afterwards. posix_spawn where the C library has
    what it needs (agents/spawn.py), else subprocess, which gives the child the same."""
    stdin_fd, out_w, err_w = child_ends
    try:
        pid = spawn.spawn(args, stdin_fd, out_w, err_w, environment, cwd)
        if pid is not None:
            return pid
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL if stdin_fd is None else stdin_fd, stdout=out_w,
                                stderr=err_w, env=environment, cwd=cwd, start_new_session=True, close_fds=True)
        # The run waits for it (and reaps it only after the group's KILL: _Watched); Popen must not.
        proc.returncode = 0
        return proc.pid
    finally:
        for fd in {out_w, err_w} | ({stdin_fd} if stdin_fd is not None else set()):
            os.close(fd)


def _kill_abandoned(spawning: Future[int]) -> None:
    """A program whose run was cancelled while it was being started: kill its group and reap it."""
    if spawning.cancelled() or spawning.exception() is not None:
        return
    pid = spawning.result()
    signal_group(pid, signal.SIGKILL)
    _spawner().submit(os.waitpid, pid, 0)  # reaped on a spawn thread, never on the event loop


def _resolve(gone: asyncio.Future[None]) -> None:
    if not gone.done():
        gone.set_result(None)


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
            loop.add_reader(fd, _resolve, gone)
            waiting.append(gone)
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)


def _group_members(group: int) -> list[int]:
    """Pids of live (not zombie) processes in process group ``group``, from /proc."""
    members: list[int] = []
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
    """One running program: its capped output, its stdin still to write, and its exit, seen from the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pid: int, ends: _Pipes, cap: int) -> None:
        self.loop, self.pid, self.ends, self.cap = loop, pid, ends, cap
        self.kept = {fd: bytearray() for fd in (ends.out_r, ends.err_r) if fd >= 0}
        self.dropped = dict.fromkeys(self.kept, 0)
        self.pidfd = -1
        self.returncode: int | None = None
        self.open = len(self.kept) + 1  # the pipes and the exit still to come
        self.exited: asyncio.Future[None] = loop.create_future()
        self.all_done: asyncio.Future[None] = loop.create_future()

    def watch(self) -> None:
        for fd in self.kept:
            os.set_blocking(fd, False)
            self.loop.add_reader(fd, self._readable, fd)
        if self.ends.in_w >= 0:
            self.loop.add_writer(self.ends.in_w, self._writable)
        self.pidfd = os.pidfd_open(self.pid)
        self.loop.add_reader(self.pidfd, self._exited)

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
        kept = self.kept[fd]
        room = self.cap - len(kept)
        if len(chunk) > room:
            self.dropped[fd] += len(chunk) - max(room, 0)
        if room > 0:
            kept += chunk[:room]
        # beyond the cap the rest is drained and dropped, so the program never blocks on a full pipe

    def _writable(self) -> None:
        ends = self.ends
        try:
            written = os.write(ends.in_w, ends.stdin_rest)
        except BlockingIOError:
            return
        except OSError:  # the program closed its stdin or exited without reading it all: its exit says why
            written = len(ends.stdin_rest)
        ends.stdin_rest = ends.stdin_rest[written:]
        if not ends.stdin_rest:
            self.loop.remove_writer(ends.in_w)
            ends.close_stdin()

    def _exited(self) -> None:
        self.loop.remove_reader(self.pidfd)
        try:
            # WNOWAIT: read the status but leave the zombie, which holds the group id, until close().
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:  # reaped by someone else: the status is lost
            info = None
        if info is not None:
            self.returncode = -info.si_status if info.si_code in _KILLED else info.si_status
        if not self.exited.done():
            self.exited.set_result(None)
        self._one_done()

    def close(self) -> None:
        for fd in self.kept:
            self.loop.remove_reader(fd)
            os.close(fd)
        if self.ends.in_w >= 0:
            self.loop.remove_writer(self.ends.in_w)
            self.ends.close_stdin()
        if self.pidfd < 0:
            self._reap(block=True)  # only after the group KILL: this wait is short
            return
        if self.exited.done():
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
            os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            pass
