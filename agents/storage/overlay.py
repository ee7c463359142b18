"""Overlay mounts for the embedded driver's clones where the filesystem has no reflinks (ext4): mount and
unmount through mount(2) and umount2(2) directly (no helper program to find or parse), the mount table read
from /proc/self/mountinfo, and a probe that says whether this process may mount an overlay here and, when
it may not, why in a sentence.

Mounting needs CAP_SYS_ADMIN in the mount namespace that holds the state directory, so in practice an agent
running as root; the probe is how the driver finds out instead of assuming.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

_MNT_DETACH = 2                       # linux/fs.h: umount2 flag, detach now and clean up when unused
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
# Renaming a directory that comes from the lower layer fails with EXDEV unless the overlay may record a
# redirect; most programs cope with EXDEV, but os.rename and some databases do not.
_PREFERRED_OPTIONS = ("redirect_dir=on",)
# Overlay option values are split on commas and colons (and backslash escapes them): a path holding one
# cannot be passed as a layer.
_UNSAFE_IN_OPTIONS = re.compile(r"[,:\\\n]")


@dataclass(frozen=True)
class Mount:
    """One line of the mount table."""
    mountpoint: Path
    fstype: str
    options: dict[str, str]           # the filesystem's own options (for an overlay: lowerdir, upperdir...)


def mount_overlay(lower: Path, upper: Path, work: Path, target: Path, extra: tuple[str, ...] = ()) -> None:
    """Mount an overlay at target: lower read-only underneath, writes going to upper (work is the overlay's
    scratch directory, on the same filesystem as upper). Raises OSError with the kernel's errno."""
    for path in (lower, upper, work):
        if _UNSAFE_IN_OPTIONS.search(str(path)):
            raise OSError(errno.EINVAL, f"the path {path} holds a comma, colon or backslash, which overlay "
                                        f"mount options cannot carry; use a state directory without them")
    options = ",".join((f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}", *extra))
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def unmount(target: Path) -> bool:
    """Unmount target; returns True when it was busy (a program has a file open or its working directory
    there) and had to be detached lazily: it leaves the namespace now and the kernel drops it once the last
    user lets go. Not mounted is not an error."""
    if _libc.umount2(os.fsencode(target), 0) == 0:
        return False
    err = ctypes.get_errno()
    if err == errno.EINVAL and not os.path.ismount(target):
        return False
    if err != errno.EBUSY:
        raise OSError(err, os.strerror(err), str(target))
    if _libc.umount2(os.fsencode(target), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))
    return True


def mounts_under(top: Path) -> list[Mount]:
    """Every mount at or below top, deepest first (the order to unmount them in)."""
    found = []
    top_text = str(top)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            # id parent dev root mountpoint options [optional fields...] - fstype source super-options
            sep = fields.index("-")
            point = _unescape(fields[4])
            if point != top_text and not point.startswith(top_text + "/"):
                continue
            options = {}
            for opt in fields[sep + 3].split(","):
                key, _, value = opt.partition("=")
                options[key] = _unescape(value)
            found.append(Mount(Path(point), fields[sep + 1], options))
    return sorted(found, key=lambda m: len(m.mountpoint.parts), reverse=True)


def unmount_all_under(top: Path) -> None:
    """Unmount everything mounted at or below top (busy ones lazily): before a tree is removed, so that the
    removal never reaches through a mount into what lies under it."""
    for m in mounts_under(top):
        unmount(m.mountpoint)


def probe(scratch_dir: Path) -> tuple[str | None, tuple[str, ...]]:
    """(None, the mount options to use) when this process can mount an overlay with its upper layer under
    scratch_dir, else (why not, as a sentence fragment, ())."""
    where = scratch_dir / f"overlay-probe-{uuid.uuid4().hex}"
    layers = {name: where / name for name in ("lower", "upper", "work", "merged")}
    try:
        for path in layers.values():
            path.mkdir(parents=True)
        (layers["lower"] / "probe").write_bytes(b"x")
        failure: OSError | None = None
        for extra in (_PREFERRED_OPTIONS, ()):
            try:
                mount_overlay(layers["lower"], layers["upper"], layers["work"], layers["merged"], extra)
            except OSError as exc:
                failure = failure or exc
                continue
            try:
                (layers["merged"] / "probe").write_bytes(b"y")      # a write lands in upper, not lower
                if (layers["lower"] / "probe").read_bytes() != b"x":
                    return "an overlay write reached its lower layer", ()
            finally:
                unmount(layers["merged"])
            return None, extra
        assert failure is not None
        return _why(failure), ()
    finally:
        if layers["merged"].exists() and os.path.ismount(layers["merged"]):
            unmount(layers["merged"])
        shutil.rmtree(where, ignore_errors=True)


def _why(exc: OSError) -> str:
    if exc.errno == errno.EPERM:
        return "mounting an overlay was refused: the agent needs CAP_SYS_ADMIN, that is, to run as root"
    if exc.errno == errno.ENODEV:
        return "this kernel has no overlay filesystem (modprobe overlay)"
    return f"mounting an overlay failed: {exc.strerror or exc}"


def _unescape(text: str) -> str:
    """The mount table writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)
