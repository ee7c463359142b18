"""Which class runs each kind of actor: the kinds installed distributions register.

A kind is an entry point in the group ``vertebra.kinds`` (pyproject.toml), mapping its name to the
class that runs it. Each is imported only when an actor of that kind is built or every op is listed,
so nothing in ``agents/`` names a kind's code (the broker is a kind like the others) and a command
that needs no kind, such as `vertebra help`, loads none.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agent import Agent
    from .ops import OpSpec

GROUP = "vertebra.kinds"


@functools.cache
def _registered() -> dict[str, importlib.metadata.EntryPoint]:
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}
    if not found:
        raise RuntimeError(f"no actor kinds are registered (entry point group {GROUP}): the vertebra"
                           " distribution is not installed, or its metadata is older than its pyproject.toml;"
                           " install it again (make install)")
    return found


def distribution_kinds() -> tuple[str, ...]:
    """The kinds installed: the only ones a broker admits from a mesh file."""
    return tuple(_registered())


#: The kind the mesh file's ``broker:`` runs; every other installed kind is one its ``agents:`` may name.
BROKER = "broker"


def agent_kinds() -> tuple[str, ...]:
    """The kinds a mesh file's ``agents:`` may name: every installed kind but the broker."""
    return tuple(kind for kind in _registered() if kind != BROKER)


SETTINGS = "vertebra.settings"


def settings_check(kind: str) -> Callable[..., Any] | None:
    """How loading the mesh file checks the settings of an actor of ``kind`` (an entry point in the
    group ``vertebra.settings`` named after the kind, imported now): called as ``check(settings,
    fields)``, the same parser the actor builds its settings with, raising a SchemaError that names the
    field. None when the kind has none."""
    found = [ep.load() for ep in importlib.metadata.entry_points(group=SETTINGS, name=kind)]
    return found[0] if found else None


def agent_class(kind: str) -> type[Agent]:
    """The class that runs ``kind``, imported now."""
    try:
        entry = _registered()[kind]
    except KeyError:
        raise KeyError(f"no actor kind {kind!r} is installed; the installed kinds are"
                       f" {', '.join(_registered())}") from None
    cls: type[Agent] = entry.load()
    return cls


def catalogue() -> dict[str, OpSpec]:
    """Every op any installed kind declares, by name (imports every kind)."""
    from .ops import ops_of

    ops: dict[str, OpSpec] = {}
    for kind in _registered():
        ops.update(ops_of(agent_class(kind)))
    return dict(sorted(ops.items()))


COMPANIONS = "vertebra.companions"


def companions(kind: str) -> list[Callable[..., Awaitable[Any]]]:
    """What runs beside an actor of ``kind`` in its process (entry points in the group
    ``vertebra.companions`` named after the kind): each is called as ``await start(mesh, actor,
    instance)`` once the actor is up and returns something to ``stop()`` with it, or None."""
    return [ep.load() for ep in importlib.metadata.entry_points(group=COMPANIONS, name=kind)]
