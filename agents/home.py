"""The state directory: where a mesh keeps everything it writes, and the one rule that finds it.

``--home`` (fence_vertebra: ``vertebra_home=``), else ``$VERTEBRA_HOME``, else a default. The operator's
own `vertebra` defaults to ``./.vertebra`` (``make run`` keeps a mesh in the checkout). Programs that
others start, check_vertebra (Nagios runs it from /tmp) and fence_vertebra (Pacemaker), never look in
the working directory: their default is the system location (``site_paths``), the mesh file
``/etc/vertebra/mesh.yaml`` with its state in ``/var/lib/vertebra``. Every program (`vertebra` when it
loads the mesh file, these two also for the gateway socket) refuses a state directory, mesh file or
socket that someone other than root and its owner could have written (``check_safe``, as sshd's
StrictModes refuses a writable home).

Inside: ``mesh.yaml``; ``server/`` (the private server); ``secrets/`` (generated passwords);
``state/NAME/`` (each actor's databases and logs of decisions); ``logs/`` (what `vertebra up` started);
``run/`` (the gateway socket, and the lock a running `vertebra up` holds).

Only the standard library here, and not pathlib where those programs need it (it costs a start 5 ms):
the short-lived programs Nagios and Pacemaker run import it.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

ENV = "VERTEBRA_HOME"
DEFAULT = ".vertebra"
SYSTEM_HOME = "/var/lib/vertebra"
SYSTEM_MESH = "/etc/vertebra/mesh.yaml"


class UnsafePath(Exception):
    """A state directory, mesh file or socket that cannot be trusted; the message says why and what to do."""


def state_home(given: str | os.PathLike[str] | None = None, default: str = DEFAULT) -> Path:
    """The state directory, absolute: ``given``, else ``$VERTEBRA_HOME``, else ``default``."""
    from pathlib import Path

    return Path(given or os.environ.get(ENV) or default).absolute()


def actor_state(home: Path, name: str) -> Path:
    """Where the actor running as account ``name`` keeps its state."""
    return home / "state" / name


def site_paths(home: str | None = None, mesh: str | None = None) -> tuple[str, str]:
    """(state directory, mesh file) for a program others start: ``home``, else ``$VERTEBRA_HOME``, else
    /var/lib/vertebra; ``mesh``, else HOME/mesh.yaml when a state directory was named, else
    /etc/vertebra/mesh.yaml. Never the working directory: every path must be absolute (UnsafePath)."""
    named = home or os.environ.get(ENV)
    for value, what in ((named, "--home" if home else f"${ENV}"), (mesh, "--mesh")):
        if value and not os.path.isabs(value):
            raise UnsafePath(f"{what} {value} is not an absolute path: a program that others start runs from"
                             " any directory, so give the full path")
    found = named or SYSTEM_HOME
    return found, mesh or (os.path.join(found, "mesh.yaml") if named else SYSTEM_MESH)


def check_safe(path: str | os.PathLike[str], what: str) -> None:
    """Raise UnsafePath when someone other than root and the owner could have written ``path`` (a state
    directory, mesh file or gateway socket) or put it there, as sshd's StrictModes does: the path itself
    (a socket's write bit only lets callers connect, so not for a socket), and each directory above it,
    must be writable by root and its owner only (a sticky directory such as /tmp excepted), each owned by
    root or the path's owner. A path in a sticky directory that anyone may write (/tmp) must be owned by
    root or by the caller: anyone could have made it. A missing path raises FileNotFoundError."""
    real = os.path.realpath(path)
    st = os.stat(real)
    owner = st.st_uid
    if not stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o022:
        raise UnsafePath(f"refusing the {what} {real}: it is writable by {_writers(st.st_mode)} (mode"
                         f" {stat.S_IMODE(st.st_mode):04o}); only root and its owner may write it"
                         f" (chmod go-w {real})")
    child, child_owner = real, owner
    for folder in _parents(real):
        fst = os.stat(folder)
        sticky = bool(fst.st_mode & stat.S_ISVTX)
        if fst.st_mode & 0o022 and not sticky:
            raise UnsafePath(f"refusing the {what} {real}: {folder} above it is writable by"
                             f" {_writers(fst.st_mode)} (mode {stat.S_IMODE(fst.st_mode):04o}), who could replace"
                             f" it; only root and the owner may write there (chmod go-w {folder})")
        if sticky and fst.st_mode & 0o002 and child_owner not in (0, os.getuid()):
            raise UnsafePath(f"refusing the {what} {real}: {child} is owned by {_user(child_owner)} in {folder},"
                             " where anyone may create files; use a state directory owned by root or by"
                             " the user running this program, outside such a directory")
        if fst.st_uid not in (0, owner):
            raise UnsafePath(f"refusing the {what} {real}: {folder} above it is owned by {_user(fst.st_uid)},"
                             f" not by root or the {what}'s owner, {_user(owner)}, who could replace it")
        child, child_owner = folder, fst.st_uid


def _parents(real: str) -> list[str]:
    parents: list[str] = []
    while True:
        parent = os.path.dirname(real)
        if parent == real:
            return parents
        parents.append(parent)
        real = parent


def _writers(mode: int) -> str:
    return " and ".join(who for who, bit in (("its group", 0o020), ("everyone", 0o002)) if mode & bit)


def _user(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
