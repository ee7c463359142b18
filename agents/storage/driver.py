"""The storage driver contract, in the spirit of libStorage: volumes (directory trees), read-only snapshots,
writable clones, rollback, refresh, send/receive as a framed stream, and the capabilities a driver offers.

Methods are synchronous; the storage agent runs them in a worker thread. Every failure is a StorageError
whose message says what went wrong and what to do, and a failed call changes nothing visible. The calls
that may copy data (snapshot, clone, rollback, refresh) take an optional ``progress`` callback, called
in that thread as bytes are read or written; a driver whose call copies nothing (btrfs) never calls it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

#: Called by a driver call as it goes: the bytes it has handled so far, of the bytes it will handle.
BytesProgress = Callable[[int, int], None]


class StorageError(Exception):
    """The one error every driver raises. `code` is a short machine-readable condition for the wire
    (invalid, not_found, exists, busy, has_dependants, corrupt, unsupported, environment, failed)."""

    def __init__(self, message: str, code: str = "failed", dependants: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.dependants: tuple[str, ...] = tuple(dependants)


# Capability names a driver may advertise; the agent turns them into disco features.
CAP_VOLUMES = "volumes"
CAP_SNAPSHOTS = "snapshots"
CAP_CLONES = "clones"
CAP_ROLLBACK = "rollback"
CAP_REFRESH = "refresh"
CAP_SEND = "send"
CAP_RECEIVE = "receive"
CAP_INCREMENTAL = "incremental"
CAP_ATOMIC_SNAPSHOT = "atomic-snapshot"      # point-in-time even while writers run
CAP_DIFF = "diff"                            # diff(volume, a, b) between two snapshots
CAP_REFLINK_CLONES = "reflink-clones"        # clones share extents with the store
CAP_OVERLAY_CLONES = "overlay-clones"        # clones are overlay mounts over a shared read-only base
CAP_SPACE_EXACT = "space-exact"              # used bytes are exclusive bytes, not an estimate
CAP_ROOTLESS = "rootless"


@dataclass(frozen=True)
class VolumeInfo:
    """A volume, clone or replica. `kind` is 'volume', 'clone' (writable copy of a snapshot) or 'replica'
    (holds only received snapshots; clone one of them to get a writable tree)."""
    name: str
    kind: str
    used_bytes: int
    used_method: str          # how used_bytes was measured, e.g. "du" or "qgroup-exclusive"
    origin: tuple[str, str] | None = None     # (volume, snapshot) a clone was made from
    snapshots: tuple[str, ...] = field(default_factory=tuple)
    exclusive_bytes: int = 0  # bytes only this tree holds: what destroying it would free
    shared_bytes: int = 0     # bytes it shares with a snapshot or other clones (reflinks, btrfs extents)
    sharing_method: str = ""  # how the two were measured, and why shared is 0 where nothing can be shared
    owner: str | None = None  # who asked for a clone (the caller's bare JID), None for volumes and replicas
    expires: float | None = None    # unix time a clone is destroyed at, None for never


@dataclass(frozen=True)
class SnapshotInfo:
    volume: str
    name: str
    guid: str                 # stays the same on every site the snapshot is replicated to
    created: float            # unix time
    logical_bytes: int        # sum of file sizes in the snapshot
    clones: tuple[str, ...] = field(default_factory=tuple)
    exclusive_bytes: int = 0  # stored bytes only this snapshot holds: what destroying it would free
    shared_bytes: int = 0     # stored bytes it shares with other snapshots (and, with btrfs, the live tree;
                              # embedded: whole shared segments, so a chunk repeated in two counts twice)


class StorageDriver(abc.ABC):
    """What every storage driver offers. Names are validated by agents.storage.names."""

    name: str = "abstract"
    # Whether `receive` may be fed a stream while it is still arriving (a transfer that takes hours, throttled):
    # the driver then holds no lock others need while the stream flows and leaves nothing behind if the stream
    # fails part way. A target overlaps such a receive with the transfer instead of starting it at the end.
    receives_as_it_arrives: bool = False

    @abc.abstractmethod
    def capabilities(self) -> set[str]: ...

    def clone_sharing(self) -> str:
        """How this driver's clones share space with their snapshot here, or why they cannot and what to
        do (storage.info shows it)."""
        return ""

    @abc.abstractmethod
    def create_volume(self, name: str) -> VolumeInfo: ...

    @abc.abstractmethod
    def destroy_volume(self, name: str) -> None:
        """Refuses (code has_dependants) while the volume has snapshots, naming them."""

    @abc.abstractmethod
    def list_volumes(self) -> list[VolumeInfo]: ...

    @abc.abstractmethod
    def path(self, name: str) -> Path:
        """The writable directory of a volume or clone."""

    @abc.abstractmethod
    def snapshot(self, volume: str, snap: str, *, progress: BytesProgress | None = None,
                 for_clones: bool = True) -> SnapshotInfo:
        """Capture the volume's tree as a read-only snapshot. ``for_clones=False`` says it is taken for
        replication only: a driver that prepares what clones share as it captures may skip that (a clone
        of it is still possible, and pays for it then)."""

    @abc.abstractmethod
    def list_snapshots(self, volume: str) -> list[SnapshotInfo]: ...

    @abc.abstractmethod
    def destroy_snapshot(self, volume: str, snap: str) -> None:
        """Refuses (code has_dependants) while clones were made from it, naming them."""

    @abc.abstractmethod
    def clone(self, volume: str, snap: str, clone_name: str, *, progress: BytesProgress | None = None) -> VolumeInfo:
        """A writable, independent directory tree starting from `volume@snap`."""

    @abc.abstractmethod
    def rollback(self, volume: str, snap: str, *, progress: BytesProgress | None = None) -> None:
        """Replace the volume's (or clone's) tree with one of its own snapshots."""

    @abc.abstractmethod
    def refresh_clone(self, clone: str, snap: str, *, progress: BytesProgress | None = None) -> VolumeInfo:
        """Replace a clone's tree with `snap` of the volume it was cloned from (newer or the same)."""

    @abc.abstractmethod
    def destroy_clone(self, clone: str) -> None: ...

    @abc.abstractmethod
    def send(self, volume: str, to_snap: str, from_snap: str | None = None) -> Iterator[bytes]:
        """The stream (agents.storage.stream framing) that turns a holder of `from_snap` into a holder of
        `to_snap`; a full stream when from_snap is None."""

    @abc.abstractmethod
    def receive(self, volume: str, snap: str, stream: Iterable[bytes]) -> SnapshotInfo:
        """Publish the stream as `volume@snap`, all or nothing. A full stream creates a replica volume
        if `volume` does not exist; an incremental one needs its base snapshot present."""
