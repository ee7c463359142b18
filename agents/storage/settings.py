"""A storage agent's ``settings:`` from the mesh file, read and validated in one place.

::

    settings:
      driver: embedded      # or btrfs (root and a mounted btrfs filesystem needed)
      root: /srv/vertebra   # where the driver keeps its data; default: <agent state dir>/storage
      inbox_host: 0.0.0.0   # where replication inboxes listen; default 127.0.0.1
      inbox_advertise: db2.example.net   # the address sources are told; default inbox_host
      keep_received: 7      # per package, keep the newest 7 received snapshots; default: keep all
      masking: {...}        # hooks storage.mask may run (masking.py)
      clones: {...}         # self-service limits (selfservice.py)

Errors go through the schema layer (agents/schema.py): checked on their own they name ``storage
settings`` and the field; checked when the mesh file loads, the file, its line and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.schema import Fields, SchemaError

if TYPE_CHECKING:
    from .masking import Masking
    from .selfservice import CloneRules

DRIVERS = ("embedded", "btrfs")
KEYS = frozenset({"driver", "root", "inbox_host", "inbox_advertise", "keep_received", "masking", "clones"})
_HOST = r"[0-9A-Za-z.:_-]+"


class SettingsError(SchemaError):
    """The storage agent's settings cannot work; the message says which setting and what to write instead."""


@dataclass(frozen=True)
class StorageSettings:
    driver: str
    root: Path | None          # None: under the agent's state directory
    inbox_host: str
    inbox_advertise: str | None
    keep_received: int | None  # None: keep every received snapshot
    masking: Masking
    clones: CloneRules


def parse_settings(raw: Any, where: Fields | None = None) -> StorageSettings:
    """Check a storage agent's settings (masking hooks must exist and be executable here)."""
    from .masking import masking_from_settings
    from .selfservice import clone_rules

    where = where or Fields("storage settings", SettingsError)
    settings = where.mapping(raw, "", KEYS)
    keep = settings.get("keep_received")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise where.error("keep_received", "must be a whole number of snapshots, at least 1 (the newest is the"
                                           f" next update's base), got {keep!r}; leave it out to keep all")
    driver = settings.get("driver", "embedded")
    if driver not in DRIVERS:
        raise where.error("driver", f"is {driver!r}; use one of {', '.join(DRIVERS)}")
    root = settings.get("root")
    if root is not None and (not isinstance(root, str) or not Path(root).is_absolute()):
        raise where.error("root", f"must be an absolute directory, got {root!r}")
    host = where.string(settings.get("inbox_host", "127.0.0.1"), "inbox_host", _HOST, "a host name or address")
    advertise = settings.get("inbox_advertise")
    if advertise is not None:
        where.string(advertise, "inbox_advertise", _HOST, "the host name or address sources reach the inbox at")
    return StorageSettings(driver=driver, root=None if root is None else Path(root), inbox_host=host,
                           inbox_advertise=advertise, keep_received=keep,
                           masking=masking_from_settings(settings.get("masking"), where.within("masking")),
                           clones=clone_rules(settings.get("clones"), where.within("clones")))
