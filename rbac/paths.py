"""Canonical resource paths and the patterns policies match them with: the one place path rules live.

A path is checked, never normalized: ``..``, ``.``, empty segments (``//``), percent-escapes, NUL,
whitespace and anything outside a conservative ASCII set are refused, so no spelling of a path can
reach something another spelling would not. ``agents.resources`` re-exports :func:`check_path`.

A pattern is a path whose segments may also be ``*`` (exactly one segment), ``{caller}`` (exactly the
segment that is the requesting caller's bare JID: ``/volume/*/owner/{caller}`` grants every clone its owner
and nobody else, without one rule per clone) or, as the last segment only, ``**`` (one or more further
segments). Matching compares segment by segment; there is no regex
and no prefix matching, so ``/cluster/c1/*`` never matches ``/cluster/c10/x`` or ``/cluster/c1/../c2``.
"""

from __future__ import annotations

import re

from .segments import MAX_SEGMENTS, PATTERN

# The segment rule's pattern, compiled: faster than its character sets on long segments. ASCII only,
# matched in full (``\Z``, not ``$``, which would also accept a trailing newline).
_SEGMENT = re.compile(PATTERN + r"\Z", re.ASCII)
CALLER = "{caller}"  # the pattern segment that matches only the caller's own bare JID


class BadPath(ValueError):
    """A resource path or pattern that is not canonical; the message says why."""


def check_path(path: str) -> str:
    """Return ``path`` if it is a canonical resource path, else raise BadPath saying why."""
    if not isinstance(path, str) or not path.startswith("/") or path == "/":
        raise BadPath(f"resource {path!r} must be an absolute path such as /host/db1")
    segments = path[1:].split("/")
    if len(segments) > MAX_SEGMENTS:
        raise BadPath(f"resource {path!r} has more than {MAX_SEGMENTS} segments")
    for seg in segments:
        if seg in ("", ".", "..") or not _SEGMENT.match(seg):
            raise BadPath(f"resource {path!r}: segment {seg!r} is not allowed (letters, digits and"
                          " _ . : @ + - only; no empty, '.' or '..' segments)")
    return path


def check_pattern(pattern: str) -> tuple[str, ...]:
    """Return a resource pattern's segments, or raise BadPath saying what is wrong with it."""
    if not isinstance(pattern, str) or not pattern.startswith("/") or pattern == "/":
        raise BadPath(f"resource pattern {pattern!r} must be an absolute path such as /cluster/c1/node/*")
    segments = tuple(pattern[1:].split("/"))
    if len(segments) > MAX_SEGMENTS:
        raise BadPath(f"resource pattern {pattern!r} has more than {MAX_SEGMENTS} segments")
    for i, seg in enumerate(segments):
        if seg == "**" and i != len(segments) - 1:
            raise BadPath(f"resource pattern {pattern!r}: '**' may only be the last segment")
        if seg in ("*", "**", CALLER):
            continue
        if "*" in seg:
            raise BadPath(f"resource pattern {pattern!r}: segment {seg!r} mixes '*' with text;"
                          " a wildcard must be a whole segment")
        if seg in ("", ".", "..") or not _SEGMENT.match(seg):
            raise BadPath(f"resource pattern {pattern!r}: segment {seg!r} is not allowed")
    return segments


def match_pattern(segments: tuple[str, ...], path: str, caller: str | None = None) -> bool:
    """True when canonical ``path`` matches the pattern whose segments :func:`check_pattern` gave; a
    ``{caller}`` segment matches only ``caller`` (compared lowercased, as bare JIDs are)."""
    parts = path[1:].split("/")
    if segments and segments[-1] == "**":
        head = segments[:-1]
        if len(parts) <= len(head):
            return False
        parts = parts[:len(head)]
        segments = head
    elif len(parts) != len(segments):
        return False
    return all(s == "*" or s == p or (s == CALLER and caller is not None and p.lower() == caller.lower())
               for s, p in zip(segments, parts))


def related(held: str, wanted: str) -> bool:
    """True when ``held`` is ``wanted``, one of its ancestors, or one of its descendants."""
    if held == wanted:
        return True
    shorter, longer = sorted((held, wanted), key=len)
    return longer.startswith(shorter + "/")
