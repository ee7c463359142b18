"""Validation of volume, snapshot and clone names, so that no name can reach outside a driver's root."""

from __future__ import annotations

import re

from agents.storage.driver import StorageError

MAX_NAME_LENGTH = 64
# Conservative on purpose: these names become directory names, btrfs subvolume paths, XMPP resource path
# components and SQLite keys, so only characters that are harmless in all of them are allowed.
_ALLOWED = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
# The same rule as one regex, for op argument schemas (checked before authorization sees a resource path).
NAME_PATTERN = r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
_RULE = ("use 1 to 64 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit, "
         "without '..'")


def validate_name(name: object, what: str = "name") -> str:
    """Return `name` unchanged if it is a safe name, else raise StorageError saying what is wrong."""
    if not isinstance(name, str):
        raise StorageError(f"{what} must be a string, got {type(name).__name__}; {_RULE}", code="invalid")
    if not name:
        raise StorageError(f"{what} is empty; {_RULE}", code="invalid")
    if len(name) > MAX_NAME_LENGTH:
        raise StorageError(f"{what} {name[:20]!r}... is {len(name)} characters long, more than "
                           f"{MAX_NAME_LENGTH}; {_RULE}", code="invalid")
    for ch in name:
        if ch == "\0" or ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise StorageError(f"{what} {name!r} contains control character {ch!r}; {_RULE}", code="invalid")
    if "/" in name or "\\" in name:
        raise StorageError(f"{what} {name!r} contains a path separator; {_RULE}", code="invalid")
    if ".." in name:
        raise StorageError(f"{what} {name!r} contains '..'; {_RULE}", code="invalid")
    if name.startswith("."):
        raise StorageError(f"{what} {name!r} starts with '.'; {_RULE}", code="invalid")
    if not _ALLOWED.fullmatch(name):
        bad = sorted({ch for ch in name if not re.fullmatch(r"[A-Za-z0-9_.\-]", ch)})
        detail = f"contains {', '.join(repr(c) for c in bad)}" if bad else "must start with a letter or digit"
        raise StorageError(f"{what} {name!r} {detail}; {_RULE}", code="invalid")
    return name
