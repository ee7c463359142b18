"""Op names and op patterns, matched word by word without regex.

An op name is dotted lowercase ASCII words (``storage.snapshot.create``); anything else, including
a Unicode look-alike of a real name, is refused before matching. A pattern uses the same words, plus
``*`` for exactly one word and, as the last word only, ``**`` for one or more words: ``storage.**``
is every storage op, ``*.info`` is every kind's info op, and ``**`` alone is every op.
"""

from __future__ import annotations

import re

OP_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+\Z", re.ASCII)
_WORD = re.compile(r"[a-z][a-z0-9_]*\Z", re.ASCII)


class BadOpPattern(ValueError):
    """An op pattern that is not words, ``*`` and a trailing ``**``; the message says why."""


def is_op_name(name: object) -> bool:
    return isinstance(name, str) and OP_NAME.match(name) is not None


def check_op_pattern(pattern: str) -> tuple[str, ...]:
    """Return the pattern's words, or raise BadOpPattern naming what is wrong."""
    if not isinstance(pattern, str) or not pattern:
        raise BadOpPattern(f"op pattern {pattern!r} must be a dotted op name such as storage.info")
    words = tuple(pattern.split("."))
    for i, word in enumerate(words):
        if word == "**" and i != len(words) - 1:
            raise BadOpPattern(f"op pattern {pattern!r}: '**' may only be the last word")
        if word in ("*", "**"):
            continue
        if not _WORD.match(word):
            raise BadOpPattern(f"op pattern {pattern!r}: word {word!r} is not allowed (lowercase ASCII"
                               " letters, digits and _; '*' or '**' only as a whole word)")
    if len(words) == 1 and words[0] not in ("**",):
        raise BadOpPattern(f"op pattern {pattern!r} is a single word; op names have at least two"
                           " (e.g. sample.echo), and '**' means every op")
    return words


def match_op(words: tuple[str, ...], name: str) -> bool:
    """True when op ``name`` (already checked with :func:`is_op_name`) matches the pattern's words."""
    parts = name.split(".")
    if words[-1] == "**":
        head = words[:-1]
        if len(parts) <= len(head):
            return False
        parts = parts[:len(head)]
        words = head
    elif len(parts) != len(words):
        return False
    return all(w == "*" or w == p for w, p in zip(words, parts))
