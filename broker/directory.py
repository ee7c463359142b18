"""The directory: which live agent offers which op on which resources.

It is fed from presence (an agent is in while its presence is available, out the moment it is not)
and from disco#info, which is asked once per distinct XEP-0115 caps hash: agents with identical
ops and resources share one entry in ``caps``. ``discover`` matches a requested resource against
each agent's resources, their ancestors and their descendants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from agents.resources import related


@dataclass(frozen=True)
class Capabilities:
    """What one caps hash stands for."""

    kind: str
    ops: frozenset[str]
    resources: tuple[str, ...]


@dataclass(frozen=True)
class Entry:
    jid: str  # full JID, the address ops are sent to
    caps: Capabilities

    def to_dict(self) -> dict:
        return {"jid": self.jid, "kind": self.caps.kind, "ops": sorted(self.caps.ops),
                "resources": list(self.caps.resources)}


class Directory:
    def __init__(self) -> None:
        self.caps: dict[str, Capabilities] = {}  # caps hash -> capabilities
        self._agents: dict[str, Entry] = {}  # full JID -> entry

    def __len__(self) -> int:
        return len(self._agents)

    def add(self, jid: str, caps: Capabilities) -> bool:
        """File an agent; True when it is new or its capabilities changed."""
        entry = Entry(jid, caps)
        changed = self._agents.get(jid) != entry
        self._agents[jid] = entry
        return changed

    def clear(self) -> None:
        """Forget every agent (not the caps cache): after the broker's own session was lost, only
        fresh presence says who is still there."""
        self._agents.clear()

    def remove(self, jid: str) -> bool:
        return self._agents.pop(jid, None) is not None

    def entries(self) -> list[Entry]:
        return sorted(self._agents.values(), key=lambda e: e.jid)

    def discover(self, op: str | None, resources: Iterable[str] = ()) -> list[Entry]:
        """Agents offering ``op`` (any op if None) that hold one of ``resources`` or a relative of
        it; every agent offering the op when no resources are given."""
        wanted = list(resources)
        found = []
        for entry in self.entries():
            if op is not None and op not in entry.caps.ops:
                continue
            if wanted and not any(related(held, w) for held in entry.caps.resources for w in wanted):
                continue
            found.append(entry)
        return found
