"""Which class runs each kind of actor, and the catalogue of every op the distribution declares.

The catalogue is what `vertebra help` and client-side validation read: an op's declaration is
importable wherever the distribution is installed, so help needs no running mesh.
"""

from __future__ import annotations

import importlib

from .agent import Agent
from .ops import OpSpec, ops_of

_CLASSES = {
    "broker": "broker.service:Broker",
    "storage": "agents.storage.agent:StorageAgent",
    "fencing": "agents.fencing.agent:FencingAgent",
    "monitor": "agents.monitor.agent:MonitorAgent",
}


def distribution_kinds() -> tuple[str, ...]:
    """The kinds this distribution has a class for: the only ones a broker admits from a mesh file."""
    return tuple(_CLASSES)


def agent_class(kind: str) -> type[Agent]:
    module, _, name = _CLASSES[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def catalogue() -> dict[str, OpSpec]:
    """Every op any kind declares, by name."""
    ops: dict[str, OpSpec] = {}
    for kind in _CLASSES:
        ops.update(ops_of(agent_class(kind)))
    return dict(sorted(ops.items()))
