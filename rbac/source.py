"""YAML that remembers where things were: every mapping and list knows the line of each entry.

Policy errors must name the line a person has to fix, and PyYAML's plain loaders forget lines and
silently keep the last of two duplicate keys. This loader records lines and reports duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a policy, at a 1-based line (0 when the whole file is at fault)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


class LMap(dict):
    """A mapping whose ``line`` is where it starts and ``lines[key]`` where each key is."""

    line: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.lines: dict[str, int] = {}

    def at(self, key: str) -> int:
        return self.lines.get(key, self.line)


class LList(list):
    """A list whose ``line`` is where it starts and ``lines[i]`` where item ``i`` is."""

    line: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[int] = []

    def at(self, i: int) -> int:
        return self.lines[i] if i < len(self.lines) else self.line


# libyaml's parser when PyYAML has it: ten times faster on a 10,000-rule policy, same marks.
class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    problems: list[Problem]


def _mapping(loader: _Loader, node: yaml.MappingNode) -> LMap:
    out = LMap()
    out.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        # Keys are taken as written: YAML 1.1 would read the key `on:` as the boolean True.
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            loader.problems.append(Problem(line, f"key {key!r} must be a plain word"))
            continue
        if key in out:
            loader.problems.append(Problem(line, f"duplicate key {key!r} (first at line {out.lines[key]})"))
            continue
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out


def _sequence(loader: _Loader, node: yaml.SequenceNode) -> LList:
    out = LList()
    out.line = node.start_mark.line + 1
    for item in node.value:
        out.append(loader.construct_object(item, deep=True))
        out.lines.append(item.start_mark.line + 1)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


def load(text: str) -> tuple[Any, list[Problem]]:
    """Parse one YAML document; return its value (LMap/LList/scalars) and the problems found."""
    loader = _Loader(text)
    loader.problems = []
    try:
        value = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        return None, [Problem(line, f"not valid YAML: {exc.problem or exc}")]
    except yaml.YAMLError as exc:
        return None, [Problem(0, f"not valid YAML: {exc}")]
    finally:
        loader.dispose()
    return value, loader.problems
