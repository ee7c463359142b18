"""Start a program with the C library's posix_spawn, called through ctypes, so that the interpreter's
other threads run while the child starts.

CPython 3.11 (Debian 12's) holds the GIL through subprocess's whole vfork and exec: every plugin a
monitor agent starts stops the agent's event loop until the child has closed its descriptors and
exec'd (3.12 releases it there). A ctypes call releases the GIL for as long as the C function runs, and
glibc's posix_spawn is the same clone(CLONE_VM | CLONE_VFORK) and exec, with the descriptor and signal
set-up done in the child by glibc. The child gets what ``subprocess.Popen(..., start_new_session=True,
close_fds=True)`` gives it: a session and process group of its own, stdin, stdout and stderr from the
given descriptors, every other descriptor closed, every signal at its default disposition and none
blocked (Python ignores SIGPIPE and SIGXFSZ, and ignored signals would survive the exec), in ``cwd``,
with exactly ``env``.

glibc leaves its two internal signals (32 and 33) ignored in the child, as with any posix_spawn: a
program that uses them sets its own handlers. ``spawn()`` returns None where the C library lacks what
this needs (not glibc, or older than 2.34, which has no closefrom action): the caller then uses
subprocess.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
from collections.abc import Mapping, Sequence

# <spawn.h> flags (glibc, every Linux architecture).
_SETSIGDEF = 0x04
_SETSIGMASK = 0x08
_SETSID = 0x80
_OPAQUE = 1024          # bytes for posix_spawnattr_t, posix_spawn_file_actions_t and sigset_t (glibc: 336, 80, 128)


def _load() -> tuple[ctypes.CDLL, ctypes.PyDLL, ctypes.Array[ctypes.c_char]] | None:
    """libc twice: posix_spawn through CDLL, which releases the GIL for the call, and the set-up calls
    through PyDLL, which keep it (each release is a chance for another thread to hold the GIL for up to
    a switch interval); and the spawn attributes every call shares (posix_spawn only reads them)."""
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc, setup = ctypes.CDLL(name), ctypes.PyDLL(name)
        for fn in ("posix_spawn_file_actions_addchdir_np", "posix_spawn_file_actions_addclosefrom_np"):
            getattr(setup, fn)      # glibc 2.29 and 2.34
    except (OSError, AttributeError):
        return None
    libc.posix_spawn.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p)]
    setup.posix_spawn_file_actions_addopen.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p,
                                                       ctypes.c_int, ctypes.c_uint]
    setup.posix_spawn_file_actions_addchdir_np.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    setup.posix_spawnattr_setflags.argtypes = [ctypes.c_void_p, ctypes.c_short]
    attr, signals = ctypes.create_string_buffer(_OPAQUE), ctypes.create_string_buffer(_OPAQUE)
    setup.posix_spawnattr_init(attr)
    setup.posix_spawnattr_setflags(attr, _SETSID | _SETSIGDEF | _SETSIGMASK)
    setup.sigfillset(signals)
    setup.posix_spawnattr_setsigdefault(attr, signals)
    setup.sigemptyset(signals)
    setup.posix_spawnattr_setsigmask(attr, signals)
    return libc, setup, attr


_LIBC = _load()


def spawn(argv: Sequence[str], stdin: int | None, stdout: int, stderr: int, env: Mapping[str, str],
          cwd: str) -> int | None:
    """Start ``argv`` (its first item an absolute path) and return its pid; OSError when it cannot be
    started (the errno of the exec or chdir that failed, as Popen raises it); None when this module
    cannot do it here (see above). ``stdin`` None reads /dev/null."""
    if _LIBC is None:
        return None
    libc, setup, attr = _LIBC
    # A descriptor numbered 0-2 (a process started with its stdio closed) could be overwritten by another's
    # dup2 before it is itself dup'ed: the child gets copies numbered above the closefrom limit instead.
    low = {fd: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
           for fd in {stdin, stdout, stderr} if fd is not None and fd < 3}
    stdin = low.get(stdin, stdin) if stdin is not None else None
    stdout, stderr = low.get(stdout, stdout), low.get(stderr, stderr)
    actions = ctypes.create_string_buffer(_OPAQUE)
    setup.posix_spawn_file_actions_init(actions)
    try:
        if stdin is None:
            setup.posix_spawn_file_actions_addopen(actions, 0, b"/dev/null", os.O_RDONLY, 0)
        else:
            setup.posix_spawn_file_actions_adddup2(actions, stdin, 0)
        setup.posix_spawn_file_actions_adddup2(actions, stdout, 1)
        setup.posix_spawn_file_actions_adddup2(actions, stderr, 2)
        setup.posix_spawn_file_actions_addclosefrom_np(actions, 3)
        setup.posix_spawn_file_actions_addchdir_np(actions, os.fsencode(cwd))
        args = (ctypes.c_char_p * (len(argv) + 1))(*(os.fsencode(a) for a in argv), None)
        envp = (ctypes.c_char_p * (len(env) + 1))(*(os.fsencode(f"{k}={v}") for k, v in env.items()), None)
        pid = ctypes.c_int()
        err = libc.posix_spawn(ctypes.byref(pid), args[0], actions, attr, args, envp)
    finally:
        setup.posix_spawn_file_actions_destroy(actions)
        for fd in low.values():
            os.close(fd)
    if err:
        raise OSError(err, os.strerror(err), argv[0])
    return pid.value
