"""The directory: which live agent offers which op on which resources.

It is fed from presence (an agent is in while its presence is available, out the moment it is not)
and from disco#info, which is asked once per distinct XEP-0115 caps hash: agents with identical
ops and resources share one entry in ``caps``. ``discover`` matches a requested resource against
each agent's resources, their ancestors and their descendants, in JID order and a page at a time
(``after``, ``limit``) for a mesh whose answer would not fit one payload.

Who may be filed at all is configuration's to say, not the agent's: the broker's roster holds one
``Admission`` per bare JID (from the mesh file's ``agents:``), and an advertisement is admitted only
if its kind is the configured one and its resources are among the configured ones
(``Admission.refusal``). The same roster says who may send the ops only agents send the broker
(``sent_by_agents``, one of the broker's authorization rules). The caches here are keyed by strings
any account can invent (caps hashes), so they are bounded (``BoundedMap``).

Which agents any instance of the broker has ever listed is kept on disk (``KnownAgents``), so that a
restarted broker can greet them before they announce themselves again.
"""

from __future__ import annotations

import logging
import sqlite3
from bisect import bisect_right, insort
from collections import Counter, OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, Iterable, Iterator, Mapping, Protocol, TypeVar

from agents.authz import Decision, Request
from agents.db import Store
from agents.ops import OpSpec
from agents.resources import related

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

CAPS_CACHE = 4096  # distinct caps hashes remembered; a mesh's own agents need one per kind of agent


class BoundedMap(Generic[K, V]):
    """A mapping that keeps at most ``limit`` items, forgetting the least recently used first: for
    caches keyed by what peers send, which must not grow with what they invent."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, default: Any = None) -> Any:
        try:
            self._items.move_to_end(key)
        except KeyError:
            return default
        return self._items[key]

    def __setitem__(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def __getitem__(self, key: K) -> V:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._items))

    def pop(self, key: K, default: Any = None) -> Any:
        return self._items.pop(key, default)

    def clear(self) -> None:
        self._items.clear()


_MISSING = object()


@dataclass(frozen=True)
class Admission:
    """What configuration lets one account (bare JID) be listed as: its kind, the resources it may
    claim (it may claim fewer), and its configured settings (the fencing agent's nodes and
    identities are read from here, never from what the agent sends)."""

    kind: str
    resources: tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resources", tuple(self.resources))
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings or {})))

    def refusal(self, caps: "Capabilities", known_kinds: Iterable[str]) -> str | None:
        """Why an advertisement of ``caps`` may not be listed under this admission, or None."""
        known = set(known_kinds)
        if caps.kind not in known:
            return (f"it claims kind {caps.kind!r}, which this broker does not know"
                    f" (it knows {', '.join(sorted(known))})")
        if caps.kind != self.kind:
            return f"it claims kind {caps.kind!r}, but the mesh file configures it as kind {self.kind!r}"
        extra = [r for r in caps.resources if r not in self.resources]
        if extra:
            return (f"it claims resources {' '.join(caps.resources)}, beyond its configured"
                    f" {' '.join(self.resources) or '(none)'}: {' '.join(extra)} not configured for it")
        return None


@dataclass(frozen=True)
class Capabilities:
    """What one caps hash stands for."""

    kind: str
    ops: frozenset[str]
    resources: tuple[str, ...]
    features: frozenset[str] = frozenset()  # its other disco features (agents.fenced.ORDERED)


@dataclass(frozen=True)
class Entry:
    jid: str  # full JID, the address ops are sent to
    caps: Capabilities

    def to_dict(self) -> dict:
        return {"jid": self.jid, "kind": self.caps.kind, "ops": sorted(self.caps.ops),
                "resources": list(self.caps.resources)}


class Directory:
    def __init__(self, caps_limit: int = CAPS_CACHE) -> None:
        # caps hash -> capabilities; bounded, since any account may announce hashes it invents
        self.caps: BoundedMap[str, Capabilities] = BoundedMap(caps_limit)
        self._agents: dict[str, Entry] = {}  # full JID -> entry
        # The same JIDs, sorted: answers are in JID order, and a page starts after a JID by bisection
        # instead of sorting 50,000 entries for every page.
        self._order: list[str] = []
        # Lowercased bare JID -> how many of its full JIDs are listed: whether an account is listed is
        # asked for every op a live agent sends the broker, which a scan would make O(agents) each.
        self._accounts: Counter[str] = Counter()
        # Op -> how many listed agents offer it: discovery of an op nobody offers answers at once
        # instead of scanning every entry (25 ms at 50,000 agents).
        self._offering: Counter[str] = Counter()
        # full JID -> where it holds volumes (/volume/NAME), as a listed storage agent reports them
        # (broker/volumes.py): routing only, never part of what admission checks
        self._located: dict[str, frozenset[str]] = {}

    def __len__(self) -> int:
        return len(self._agents)

    def add(self, jid: str, caps: Capabilities) -> bool:
        """File an agent; True when it is new or its capabilities changed."""
        entry = Entry(jid, caps)
        old = self._agents.get(jid)
        if old is None:
            insort(self._order, jid)
            self._accounts[_account(jid)] += 1
        else:
            self._offering.subtract(old.caps.ops)
        self._offering.update(caps.ops)
        self._agents[jid] = entry
        return old != entry

    def clear(self) -> None:
        """Forget every agent (not the caps cache): after the broker's own session was lost, only
        fresh presence says who is still there."""
        self._agents.clear()
        self._order.clear()
        self._accounts.clear()
        self._offering.clear()
        self._located.clear()

    def remove(self, jid: str) -> bool:
        self._located.pop(jid, None)
        entry = self._agents.pop(jid, None)
        if entry is None:
            return False
        self._offering.subtract(entry.caps.ops)
        del self._order[bisect_right(self._order, jid) - 1]
        account = _account(jid)
        self._accounts[account] -= 1
        if not self._accounts[account]:
            del self._accounts[account]
        return True

    def locate(self, jid: str, resources: frozenset[str]) -> None:
        """Record where a listed agent holds things that come and go (its volumes); ignored for an
        agent not listed, and forgotten when it leaves."""
        if jid in self._agents:
            self._located[jid] = frozenset(resources)

    def held(self, entry: Entry, wanted: Iterable[str] = ()) -> list[str]:
        """What an entry holds as far as a caller addressing ``wanted`` needs to know: its advertised
        resources, and those of its located ones related to ``wanted`` (a storage agent may hold
        thousands of volumes; an answer about a thousand agents must stay small)."""
        wanted = list(wanted)
        located = sorted(r for r in self._located.get(entry.jid, ()) if any(related(r, w) for w in wanted))
        return list(entry.caps.resources) + located

    def entries(self) -> list[Entry]:
        return [self._agents[jid] for jid in self._order]

    def offers(self, jid: str, op: str) -> bool:
        """Whether the agent listed under the full JID ``jid`` offers ``op``: a look-up, for what runs
        at every agent's listing (a scan of the entries there costs a login storm O(agents²))."""
        entry = self._agents.get(jid)
        return entry is not None and op in entry.caps.ops

    def has_feature(self, jid: str, feature: str) -> bool:
        """Whether the agent listed under the full JID ``jid`` advertises ``feature``."""
        entry = self._agents.get(jid)
        return entry is not None and feature in entry.caps.features

    def lists(self, bare: str) -> bool:
        """Whether an agent of the account ``bare`` (a bare JID) is listed now."""
        return self._accounts.get(bare.lower(), 0) > 0

    def discover(self, op: str | None, resources: Iterable[str] = (), *, after: str = "",
                 limit: int = 0) -> list[Entry]:
        """Agents offering ``op`` (any op if None) that hold one of ``resources`` or a relative of
        it; every agent offering the op when no resources are given. In JID order: only those whose
        JID sorts after ``after``, and at most ``limit`` of them when ``limit`` is positive (a page)."""
        wanted = list(resources)
        found: list[Entry] = []
        if op is not None and self._offering[op] <= 0:
            return found
        start = bisect_right(self._order, after) if after else 0
        for jid in self._order[start:] if start else self._order:
            entry = self._agents[jid]
            if op is not None and op not in entry.caps.ops:
                continue
            if wanted and not any(related(held, w) for held in entry.caps.resources for w in wanted) \
                    and not any(related(r, w) for r in self._located.get(jid, ()) for w in wanted):
                continue
            found.append(entry)
            if len(found) == limit:
                break
        return found


def _account(jid: str) -> str:
    """The lowercased bare JID of a full JID."""
    return jid.split("/", 1)[0].lower()


def sent_by_agents(request: Request, spec: OpSpec, roster: Mapping[str, Admission],
                   directory: Directory) -> Decision | None:
    """The broker's rule for the ops agents send it, as their declarations say (``OpSpec.sender``,
    ``sender_kinds``): only an agent the mesh file configures (``roster``, by lowercased bare JID; of
    those kinds; listed in ``directory`` now for a "live agent"), for itself, and for an op declared
    with ``own_resources``, on resources the mesh file configures for it. An op anyone may send,
    declared with ``sender_kinds``, lets live agents of those kinds in and leaves everyone else to
    the policy.
    None for every other op."""
    exclusive = spec.sender in ("agent", "live agent")
    if not exclusive and not spec.sender_kinds:
        return None
    if exclusive and request.via:
        return Decision(False, f"{spec.name} is never sent on someone's behalf")
    caller, live = request.caller, spec.sender != "agent"
    who = " ".join(w for w in ("live" if live else "", "/".join(spec.sender_kinds)) if w)
    admission = roster.get(caller.lower())
    admitted = admission is not None and (not spec.sender_kinds or admission.kind in spec.sender_kinds) \
        and (not live or directory.lists(caller))
    if not exclusive:
        return Decision(True, f"{who} agents of the mesh may send {spec.name}") if admitted else None
    if admission is None or not admitted:
        return Decision(False, f"{caller} may not send {spec.name}: only the {who} agents the mesh file"
                               " configures do", f"{who} agents only")
    if spec.own_resources and not (request.resources and set(request.resources) <= set(admission.resources)):
        return Decision(False, f"{caller} may not send {spec.name} on {' '.join(request.resources)}: the mesh"
                               f" file does not configure it to {spec.own_resources}",
                        f"{who} agents, for their own resources")
    return Decision(True, f"a configured agent sending {spec.name} for itself", f"{who} agents")


class KnownAgentsState(Protocol):
    """The bare JIDs of agents any instance of the broker has listed, shared by the instances.
    ``add`` hands the write over and returns at once (it is called for every available presence);
    ``all`` is awaited, as a store on another backend would be."""

    errors: tuple[type[BaseException], ...]     # what ``all`` raises while the store cannot answer

    def add(self, jid: str) -> None: ...
    async def all(self) -> list[str]: ...
    async def aclose(self) -> None: ...


class KnownAgents:
    """:class:`KnownAgentsState` in SQLite, on the file's own thread (``agents.db.Store``): the
    broker's instances share the file."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)    # a shared file out of reach

    def __init__(self, path: Path | None) -> None:
        self.store = Store(path, ["CREATE TABLE IF NOT EXISTS known_agents (jid TEXT PRIMARY KEY)"],
                           name="known agents")
        self._written: set[str] = set()  # already on disk: not written again at each presence

    def add(self, jid: str) -> None:
        if jid not in self._written:
            self._written.add(jid)
            self.store.submit(_add_known, jid).add_done_callback(_log_failure)

    async def all(self) -> list[str]:
        """Read afresh: the broker's other instances add to the same table."""
        self._written = set(await self.store.run(_all_known))
        return sorted(self._written)

    async def aclose(self) -> None:
        await self.store.aclose()


def _add_known(db: sqlite3.Connection, jid: str) -> None:
    db.execute("INSERT OR IGNORE INTO known_agents VALUES (?)", (jid,))


def _all_known(db: sqlite3.Connection) -> list[str]:
    return [row[0] for row in db.execute("SELECT jid FROM known_agents")]


def _log_failure(done: Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.warning("could not remember a known agent: %s", done.exception())
