"""Self-service clones with guard rails: who owns a clone, how many clones and bytes an owner
may hold, when a clone expires, and the space report.

Settings (the storage agent's ``clones`` mapping; every key optional)::

    clones:
      per_owner: 3               # clones one owner may hold at once
      bytes_per_owner: 10737418240   # exclusive bytes one owner's clones may use (checked at create)
      max_expiry: 604800         # seconds: the longest expiry a clone create may ask for (and the default)
      warn_before: 3600          # seconds before expiry the ops room is warned
      sweep_every: 60            # seconds between looks for clones to warn about or destroy

The owner is the caller of storage.clone.create (Call.caller: the person, not a broker relaying for them).
Ownership reaches the policy as a resource: an owned clone is named /volume/NAME/owner/OWNER, so one rule
``on: ["/volume/*/owner/{caller}"]`` lets every developer manage exactly their own clones (rbac/paths.py).
Everything here is enforced by the agent; the policy decides who may ask at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from agents.schema import Fields

from .driver import StorageError, VolumeInfo
from .settings import SettingsError

# The clones settings are the storage agent's: their errors are its settings errors.
SelfServiceSettingsError = SettingsError


@dataclass(frozen=True)
class CloneRules:
    per_owner: int | None = None
    bytes_per_owner: int | None = None
    max_expiry: float | None = None
    warn_before: float = 3600.0
    sweep_every: float = 60.0

    def expiry(self, asked: float, now: float) -> float | None:
        """The unix time a new clone expires at: `asked` seconds from now (0: the maximum, if any)."""
        if asked < 0:
            raise StorageError(f"expires_in must be 0 (the default) or a number of seconds, got {asked:g}",
                               code="invalid")
        if self.max_expiry is not None and asked > self.max_expiry:
            raise StorageError(f"a clone may live at most {self.max_expiry:g}s on this agent, and "
                               f"{asked:g}s was asked; ask for less (or 0 for the maximum)", code="invalid")
        seconds = asked or self.max_expiry
        return now + seconds if seconds else None

    def check_quota(self, owner: str, owned: list[VolumeInfo], adding_bytes: int) -> None:
        """Refuse (code quota) a new clone that would take `owner` over their count or bytes."""
        if self.per_owner is not None and len(owned) >= self.per_owner:
            names = ", ".join(v.name for v in owned)
            raise StorageError(f"quota exceeded: {owner} already holds {len(owned)} clones ({names}) and may "
                               f"hold at most {self.per_owner} on this agent; destroy one first",
                               code="quota")
        used = sum(v.exclusive_bytes for v in owned)
        if self.bytes_per_owner is not None and used + adding_bytes > self.bytes_per_owner:
            raise StorageError(f"quota exceeded: {owner}'s clones use {used} bytes and this clone would add "
                               f"{adding_bytes}, over the {self.bytes_per_owner} bytes allowed per owner; "
                               f"destroy a clone first", code="quota")


def clone_rules(settings: Any, where: Fields | None = None) -> CloneRules:
    """CloneRules from the ``clones`` setting (None: no limits); ``where`` places it in the mesh file
    (agents/schema.py), else errors name ``storage settings``."""
    where = where or Fields("storage settings", SelfServiceSettingsError, prefix="clones")
    if settings is None:
        return CloneRules()
    if not isinstance(settings, dict):
        raise where.error("", f"must be a mapping, got {settings!r}")
    where.mapping(settings, "", {"per_owner", "bytes_per_owner", "max_expiry", "warn_before", "sweep_every"})
    values: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise where.error(key, f"must be a positive number, got {value!r}; leave it out for no limit")
        values[key] = int(value) if key in ("per_owner", "bytes_per_owner") else float(value)
    return CloneRules(**values)


def owner_resources(resources: list[str], owners: dict[str, str]) -> list[str]:
    """The resources a request is decided over, with each owned clone's /volume/NAME named
    /volume/NAME/owner/OWNER (a policy's ``/volume/**`` still covers both spellings)."""
    out = []
    for r in resources:
        parts = r.split("/")
        if len(parts) == 3 and parts[1] == "volume" and parts[2] in owners:
            r = f"{r}/owner/{owners[parts[2]]}"
        out.append(r)
    return out


def space_report(volumes: list[VolumeInfo], leases: dict[str, dict[str, Any]], now: float | None = None
                 ) -> dict[str, Any]:
    """Space per owner, per source and per clone, with each clone's last activity and expiry."""
    now = time.time() if now is None else now
    clones: list[dict[str, Any]] = []
    owners: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, Any]] = {}
    for v in volumes:
        if v.kind != "clone":
            continue
        lease = leases.get(v.name, {})
        owner = lease.get("owner") or "(none)"
        source = "@".join(v.origin) if v.origin else ""
        clones.append({"clone": v.name, "owner": owner, "source": source, "exclusive_bytes": v.exclusive_bytes,
                       "shared_bytes": v.shared_bytes, "last_activity": lease.get("last_activity"),
                       "expires": lease.get("expires"),
                       "expires_in": None if lease.get("expires") is None else round(lease["expires"] - now)})
        for table, key in ((owners, owner), (sources, source)):
            row = table.setdefault(key, {"clones": 0, "exclusive_bytes": 0, "shared_bytes": 0,
                                         "last_activity": None})
            row["clones"] += 1
            row["exclusive_bytes"] += v.exclusive_bytes
            row["shared_bytes"] += v.shared_bytes
            if lease.get("last_activity") is not None:
                row["last_activity"] = max(row["last_activity"] or 0, lease["last_activity"])
    return {"clones": sorted(clones, key=lambda c: c["clone"]),
            "owners": [{"owner": k, **v} for k, v in sorted(owners.items())],
            "sources": [{"source": k, **v} for k, v in sorted(sources.items())]}
