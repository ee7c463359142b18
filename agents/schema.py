"""One schema layer for Vertebra's YAML files: the mesh file, every agent kind's settings in it, and the
broker's workflow definitions are read with the same typed field readers and fail with the same error.

A :class:`SchemaError` names the file, the line a person has to fix, the field, and what was expected::

    mesh.yaml:14: agents[1].settings.schedule.root-disk.interval: expected a number from 0.05 to 86400, got -1

Files are read with the policy's YAML loader (:mod:`rbac.source`), which keeps each key's and item's
line and refuses duplicate keys; :class:`Fields` finds the line of a field from its dotted path. A
kind's settings parser takes a :class:`Fields` for the part of the document it reads, so the same
parser names ``monitor settings: schedule.x`` when an agent checks its own settings and
``mesh.yaml:14: agents[1].settings.schedule.x`` when the mesh file is loaded.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from rbac.source import LList, LMap
from rbac.source import load as _load_lined

__all__ = ["Fields", "SchemaError", "line_of", "read"]

_INDEX = re.compile(r"\[(\d+)\]")


class SchemaError(ValueError):
    """A file or setting that cannot be used: where (file and line, when known), which field, and what to
    write instead. Every settings error of the mesh, its kinds and the workflows is one of these."""

    def __init__(self, message: str, *, source: str | Path = "", line: int = 0, field: str | None = None) -> None:
        self.message, self.source, self.line, self.field = message, str(source), line, field
        super().__init__(self._text())

    def _text(self) -> str:
        where = f"{self.source}:{self.line}" if self.source and self.line else self.source
        return ": ".join(part for part in (where, self.field, self.message) if part)

    def __str__(self) -> str:
        return self._text()

    def located(self, fields: Fields) -> SchemaError:
        """This error (raised by a parser that read part of a document on its own) placed in the
        document ``fields`` reads: its field under the readers' prefix, that field's line, the file."""
        out = type(self).__new__(type(self))  # its own class, whatever that class's __init__ takes
        out.__dict__.update(self.__dict__)
        out.field = fields._full("" if self.field in (None, "top level") else self.field)
        out.source, out.line = str(fields.source), fields.line(out.field)
        out.args = (out._text(),)
        return out


def read(path: str | Path, error: type[SchemaError] = SchemaError, name: str | None = None) -> Any:
    """One YAML file, each mapping and list knowing its lines; unreadable or invalid YAML and duplicate
    keys raise ``error`` naming the file (as ``name``, else its path) and the line."""
    path = Path(path)
    source = name or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error("no such file", source=source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot be read: {exc}", source=source) from None
    data, problems = _load_lined(text)
    if problems:
        first = min(problems)
        raise error(first.message, source=source, line=first.line)
    return data


def line_of(document: Any, field: str) -> int:
    """The line of ``field`` (a path such as ``agents[1].settings.schedule.disk``) in a document read by
    :func:`read`: the deepest part of the path that exists there, 0 for a document without lines. Keys
    may themselves hold dots (host names, JIDs): the longest key that fits is taken."""
    node, line, rest = document, getattr(document, "line", 0), field
    while rest:
        index = _INDEX.match(rest)
        if index:
            i = int(index.group(1))
            if not isinstance(node, LList) or i >= len(node):
                break
            line, node, rest = node.at(i), node[i], rest[index.end():]
        elif isinstance(node, LMap):
            fits = [k for k in node if rest == k or rest.startswith((k + ".", k + "["))]
            if not fits:
                break
            key = max(fits, key=len)
            line, node, rest = node.at(key), node[key], rest[len(key):]
        else:
            break
        rest = rest.removeprefix(".")
    return line


class Fields:
    """Typed readers for a parsed YAML document whose errors name the document, the line and the field.

    ``source`` is what errors call the document (a file path, or e.g. ``monitor settings`` for a kind's
    settings checked on their own); ``document`` is what :func:`read` returned, for line numbers; every
    field is named under ``prefix`` (see :meth:`within`)."""

    def __init__(self, source: str | Path, error: type[SchemaError] = SchemaError, *, document: Any = None,
                 prefix: str = "") -> None:
        self.source, self.error_type, self.document, self.prefix = source, error, document, prefix

    def within(self, field: str) -> Fields:
        """The same document's readers for the part at ``field`` (a kind's settings, say)."""
        return Fields(self.source, self.error_type, document=self.document, prefix=self._full(field))

    def _full(self, field: str) -> str:
        if not self.prefix or not field:
            return self.prefix or field
        return self.prefix + (field if field.startswith("[") else "." + field)

    def line(self, field: str) -> int:
        return line_of(self.document, field) if self.document is not None else 0

    def error(self, field: str, message: str, *, at: str | None = None) -> SchemaError:
        """The error for ``field`` (its line, or the line of ``at`` when the fault is inside it)."""
        full = self._full(field)
        return self.error_type(message, source=self.source, line=self.line(self._full(at) if at else full),
                               field=full or "top level")

    def mapping(self, value: Any, f: str, allowed: set[str] | frozenset[str] | None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(f, f"expected a mapping, got {type(value).__name__}")
        if allowed is not None:
            unknown = sorted(set(map(str, value)) - set(allowed))
            if unknown:
                raise self.error(f, f"unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}",
                                 at=f"{f}.{unknown[0]}" if f else unknown[0])
        return value

    def sequence(self, value: Any, f: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.error(f, f"expected a list, got {type(value).__name__}")
        return value

    def string(self, value: Any, f: str, pattern: str, what: str) -> str:
        if not isinstance(value, str) or not re.fullmatch(pattern, value):
            raise self.error(f, f"expected {what}, got {value!r}")
        return value

    def address(self, value: Any, f: str) -> tuple[str, int]:
        host, _, port = str(value).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise self.error(f, f"expected HOST:PORT of another node serving the domain, got {value!r}")
        return host, int(port)

    def integer(self, value: Any, f: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error(f, f"expected an integer from {lo} to {hi}, got {value!r}")
        return value

    def number(self, value: Any, f: str, lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi:
            raise self.error(f, f"expected a number from {lo:g} to {hi:g}, got {value!r}")
        return float(value)

    def boolean(self, value: Any, f: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(f, f"expected true or false, got {value!r}")
        return value
