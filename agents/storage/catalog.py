"""The metadata every driver keeps the same way, written once: which volumes, clones and replicas exist,
their snapshots and guids, who depends on whom, and the rules that follow (names are checked, nothing is
created twice, destroy refuses while dependants exist and names them, a replica has no writable tree).

A driver subclasses CatalogDriver and supplies only what touches its data: how a tree is made, captured,
replaced and removed, and how its space is measured. Both tables live in the driver's own SQLite file; the
snapshots table may carry driver columns (the embedded store keys its manifests by the snapshot's rowid).
"""

from __future__ import annotations

import abc
import sqlite3
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from agents.db import open_db
from agents.storage.driver import BytesProgress, SnapshotInfo, StorageDriver, StorageError, VolumeInfo
from agents.storage.names import validate_name

VOLUMES_SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes(
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, origin_volume TEXT, origin_snap TEXT, created REAL NOT NULL);
-- Snapshots a successful masking hook produced (storage.mask): only these may be cloned with masked_only.
-- A row goes with its snapshot; a snapshot without one was never masked, whatever its name says.
CREATE TABLE IF NOT EXISTS masked_snapshots(
    volume TEXT NOT NULL, snap TEXT NOT NULL, hook TEXT NOT NULL, masked_from TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (volume, snap));
-- Who a clone belongs to and until when (self-service: storage.report, quotas, expiry). A row goes with its
-- clone; last_activity is the last op that changed the clone (create, refresh, rollback, snapshot).
CREATE TABLE IF NOT EXISTS clone_leases(
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL, warned INTEGER NOT NULL DEFAULT 0,
    last_activity REAL NOT NULL);
"""


class CatalogDriver(StorageDriver):
    """A driver whose bookkeeping lives in the catalog tables; subclasses implement the tree hooks."""

    root: Path
    db: sqlite3.Connection

    def _open_catalog(self, db_path: Path, schema: str) -> None:
        self._lock = threading.RLock()
        # Snapshots a running send reads, by (volume, snapshot): destroying one must wait for the send.
        self._holds: Counter[tuple[str, str]] = Counter()
        # Implicit transactions (committed by the methods below); used from the threads ops run driver
        # calls in, under the lock. Not made private: the directory is the driver's data root.
        self.db = open_db(db_path, [VOLUMES_SCHEMA + schema], synchronous="FULL", private=False,
                          isolation_level="DEFERRED")

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # hooks a driver implements ------------------------------------------------------------------------
    @abc.abstractmethod
    def _make_volume_tree(self, name: str) -> None:
        """Create the empty writable tree of a new volume."""

    @abc.abstractmethod
    def _make_clone_tree(self, volume: str, snap: str, clone_name: str, progress: BytesProgress | None) -> None:
        """Create the writable tree of a new clone from `volume@snap`, telling ``progress`` what it copies."""

    @abc.abstractmethod
    def _replace_tree(self, name: str, volume: str, snap: str, progress: BytesProgress | None) -> None:
        """Replace the writable tree of `name` with the contents of `volume@snap`, telling ``progress`` what
        it copies."""

    @abc.abstractmethod
    def _remove_volume_data(self, name: str) -> None:
        """Remove the writable tree (and any leftover snapshot directories) of a volume being destroyed."""

    @abc.abstractmethod
    def _capture(self, volume: str, snap: str, progress: BytesProgress | None, for_clones: bool = True) -> None:
        """Capture the volume's tree as `volume@snap` and record it (the checks are done), telling
        ``progress`` what it reads; ``for_clones`` as for snapshot()."""

    @abc.abstractmethod
    def _drop_snapshot(self, volume: str, snap: str) -> None:
        """Remove a snapshot's data; its catalog row is deleted after this returns, in the same commit."""

    @abc.abstractmethod
    def _space(self, live: Path) -> tuple[int, str]:
        """(bytes used, how they were measured) of a writable tree."""

    def _sharing(self, live: Path) -> tuple[int, int]:
        """(exclusive, shared) bytes of a writable tree; a driver that cannot tell says all is exclusive."""
        return self._space(live)[0], 0

    def _sharing_method(self) -> str:
        return "not measured: every byte counted as exclusive"

    def clone_sharing(self) -> str:
        return self._sharing_method()

    # listing ------------------------------------------------------------------------------------------
    def list_volumes(self) -> list[VolumeInfo]:
        with self._lock:
            names = [r[0] for r in self.db.execute("SELECT name FROM volumes ORDER BY name")]
            return [self._volume_info(n) for n in names]

    def list_snapshots(self, volume: str) -> list[SnapshotInfo]:
        with self._lock:
            self._volume_row(volume)
            return [self._snapshot_info(volume, n) for n in self._snapshot_names(volume)]

    def path(self, name: str) -> Path:
        with self._lock:
            if self._volume_row(name)[1] == "replica":
                raise StorageError(f"volume {name!r} is a replica that holds only received snapshots; clone "
                                   f"one of them to get a writable directory", code="invalid")
            return self.root / "volumes" / name

    # volumes and clones -------------------------------------------------------------------------------
    def create_volume(self, name: str) -> VolumeInfo:
        validate_name(name, "volume name")
        with self._lock:
            self._refuse_existing(name)
            self._make_volume_tree(name)
            self._record_volume(name, "volume")
            return self._volume_info(name)

    def clone(self, volume: str, snap: str, clone_name: str, masked_only: bool = False, *,
              progress: BytesProgress | None = None) -> VolumeInfo:
        """A writable clone of volume@snap; with masked_only, refused unless a successful masking hook
        produced that snapshot (mark_masked)."""
        validate_name(clone_name, "clone name")
        with self._lock:
            self._snapshot_row(volume, snap)
            if masked_only and self.masking_of(volume, snap) is None:
                raise StorageError(f"{volume}@{snap} was not produced by a successful masking hook, so no "
                                   f"masked clone is made from it; mask a clone with storage.mask and clone "
                                   f"the snapshot that takes", code="not_masked")
            self._refuse_existing(clone_name)
            self._make_clone_tree(volume, snap, clone_name, progress)
            self._record_volume(clone_name, "clone", (volume, snap))
            return self._volume_info(clone_name)

    def destroy_volume(self, name: str) -> None:
        with self._lock:
            if self._volume_row(name)[1] == "clone":
                raise StorageError(f"{name!r} is a clone; destroy it with destroy_clone", code="invalid")
            self._destroy(name)

    def destroy_clone(self, clone: str) -> None:
        with self._lock:
            if self._volume_row(clone)[1] != "clone":
                raise StorageError(f"{clone!r} is not a clone; destroy volumes with destroy_volume",
                                   code="invalid")
            self._destroy(clone)

    def _destroy(self, name: str) -> None:
        snaps = self._snapshot_names(name)
        if snaps:
            shown = [f"{name}@{s}" for s in snaps]
            raise StorageError(f"cannot destroy {name!r}: it still has snapshots {', '.join(shown)}; destroy "
                               f"them first", code="has_dependants", dependants=shown)
        self._remove_volume_data(name)
        self.db.execute("DELETE FROM volumes WHERE name = ?", (name,))
        self.db.execute("DELETE FROM clone_leases WHERE name = ?", (name,))
        self.db.commit()

    def rollback(self, volume: str, snap: str, *, progress: BytesProgress | None = None) -> None:
        with self._lock:
            if self._volume_row(volume)[1] == "replica":
                raise StorageError(f"{volume!r} is a replica and has no tree to roll back; clone one of its "
                                   f"snapshots instead", code="invalid")
            self._snapshot_row(volume, snap)
            self._replace_tree(volume, volume, snap, progress)

    def refresh_clone(self, clone: str, snap: str, *, progress: BytesProgress | None = None) -> VolumeInfo:
        with self._lock:
            row = self._volume_row(clone)
            if row[1] != "clone":
                raise StorageError(f"{clone!r} is not a clone; only clones can be refreshed", code="invalid")
            self._snapshot_row(row[2], snap)
            # A masked copy stays one: refreshed only to another snapshot a successful mask produced.
            if self.masking_of(row[2], row[3]) is not None and self.masking_of(row[2], snap) is None:
                raise StorageError(f"{clone!r} is a masked copy of {row[2]}@{row[3]}, and {row[2]}@{snap} was "
                                   f"not produced by a successful masking hook; refresh it to a masked "
                                   f"snapshot (storage.mask takes them)", code="not_masked")
            self._replace_tree(clone, row[2], snap, progress)
            self.db.execute("UPDATE volumes SET origin_snap = ? WHERE name = ?", (snap, clone))
            self.db.commit()
            return self._volume_info(clone)

    # snapshots ----------------------------------------------------------------------------------------
    def snapshot(self, volume: str, snap: str, *, progress: BytesProgress | None = None,
                 for_clones: bool = True) -> SnapshotInfo:
        validate_name(snap, "snapshot name")
        with self._lock:
            if self._volume_row(volume)[1] == "replica":
                raise StorageError(f"{volume!r} is a replica; its snapshots come only from receive",
                                   code="invalid")
            self._refuse_existing_snapshot(volume, snap)
            self._capture(volume, snap, progress, for_clones)
            return self._snapshot_info(volume, snap)

    def destroy_snapshot(self, volume: str, snap: str) -> None:
        with self._lock:
            self._snapshot_row(volume, snap)
            clones = self._clones_of(volume, snap)
            if clones:
                raise StorageError(f"cannot destroy {volume}@{snap}: clones {', '.join(clones)} were made "
                                   f"from it; destroy or refresh them first", code="has_dependants",
                                   dependants=clones)
            if self._holds[(volume, snap)]:
                raise StorageError(f"cannot destroy {volume}@{snap}: a send of it is running; wait for it "
                                   f"to finish or cancel it", code="busy")
            self._drop_snapshot(volume, snap)
            self.db.execute("DELETE FROM snapshots WHERE volume = ? AND name = ?", (volume, snap))
            self.db.execute("DELETE FROM masked_snapshots WHERE volume = ? AND snap = ?", (volume, snap))
            self.db.commit()

    # masking ------------------------------------------------------------------------------------------
    def mark_masked(self, volume: str, snap: str, hook: str) -> None:
        """Record that a successful run of the masking hook `hook` produced volume@snap (a snapshot of a
        clone, taken right after the hook succeeded); what the clone was made from is kept with it."""
        with self._lock:
            row = self._volume_row(volume)
            self._snapshot_row(volume, snap)
            origin = f"{row[2]}@{row[3]}" if row[2] else ""
            self.db.execute("INSERT OR REPLACE INTO masked_snapshots(volume, snap, hook, masked_from, at) "
                            "VALUES (?, ?, ?, ?, ?)", (volume, snap, hook, origin, time.time()))
            self.db.commit()

    def masking_of(self, volume: str, snap: str) -> dict[str, Any] | None:
        """How volume@snap was masked ({hook, masked_from, at}), or None if no masking hook produced it."""
        with self._lock:
            row = self.db.execute("SELECT hook, masked_from, at FROM masked_snapshots WHERE volume = ? AND snap = ?",
                                  (volume, snap)).fetchone()
        return None if row is None else {"hook": row[0], "masked_from": row[1], "at": row[2]}

    def volume_names(self) -> set[str]:
        """The names of every volume, clone and replica, without measuring anything (cheap)."""
        with self._lock:
            return {r[0] for r in self.db.execute("SELECT name FROM volumes")}

    @contextmanager
    def _holding(self, snaps: Iterable[tuple[str, str]]) -> Iterator[None]:
        """Keep these snapshots from being destroyed while a send reads them."""
        held = list(snaps)
        with self._lock:
            self._holds.update(held)
        try:
            yield
        finally:
            with self._lock:
                self._holds.subtract(held)

    # receive ------------------------------------------------------------------------------------------
    def _receive_base(self, volume: str, header: dict[str, Any]) -> int | None:
        """Check that a stream with this header may be received into `volume`; return the rowid of the
        base snapshot an incremental stream applies to, or None for a full stream."""
        if not isinstance(header.get("to_guid"), str):
            raise StorageError("replication stream header lacks the snapshot guid; nothing was published",
                               code="corrupt")
        row = self.db.execute("SELECT kind FROM volumes WHERE name = ?", (volume,)).fetchone()
        if header.get("from_guid") is None:
            if row is not None and row[0] != "replica":
                raise StorageError(f"{volume!r} exists and is not a replica; a full stream can only be "
                                   f"received into a new volume name or an existing replica", code="exists")
            return None
        found = self.db.execute("SELECT rowid FROM snapshots WHERE volume = ? AND guid = ?",
                                (volume, header["from_guid"])).fetchone()
        if found is None:
            raise StorageError(f"this incremental stream needs base snapshot {header.get('from_snap')!r} "
                               f"(guid {header['from_guid']}) in volume {volume!r}, which this store does not "
                               f"hold; send a full stream or from a snapshot both sides hold", code="not_found")
        return found[0]

    def _ensure_replica(self, volume: str) -> None:
        """Record `volume` as a replica if a first full stream is creating it (committed by the caller)."""
        if self.db.execute("SELECT 1 FROM volumes WHERE name = ?", (volume,)).fetchone() is None:
            self.db.execute("INSERT INTO volumes(name, kind, created) VALUES (?, 'replica', ?)",
                            (volume, time.time()))

    # rows and infos -----------------------------------------------------------------------------------
    def _record_volume(self, name: str, kind: str, origin: tuple[str, str] | None = None) -> None:
        self.db.execute("INSERT INTO volumes(name, kind, origin_volume, origin_snap, created) "
                        "VALUES (?, ?, ?, ?, ?)", (name, kind, *(origin or (None, None)), time.time()))
        self.db.commit()

    def _volume_row(self, name: str) -> tuple[Any, ...]:
        """(name, kind, origin_volume, origin_snap) of an existing volume, clone or replica."""
        validate_name(name, "volume name")
        row = self.db.execute("SELECT name, kind, origin_volume, origin_snap FROM volumes WHERE name = ?",
                              (name,)).fetchone()
        if row is None:
            raise StorageError(f"no volume or clone named {name!r}; list_volumes shows what exists",
                               code="not_found")
        return row

    def _snapshot_row(self, volume: str, snap: str) -> tuple[Any, ...]:
        """(rowid, name, guid) of an existing snapshot."""
        self._volume_row(volume)
        validate_name(snap, "snapshot name")
        row = self.db.execute("SELECT rowid, name, guid FROM snapshots WHERE volume = ? AND name = ?",
                              (volume, snap)).fetchone()
        if row is None:
            raise StorageError(f"volume {volume!r} has no snapshot {snap!r}; list_snapshots shows its "
                               f"snapshots", code="not_found")
        return row

    def _snapshot_names(self, volume: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM snapshots WHERE volume = ? ORDER BY rowid",
                                              (volume,))]

    def _clones_of(self, volume: str, snap: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT name FROM volumes WHERE origin_volume = ? AND origin_snap = ? ORDER BY name", (volume, snap))]

    def _refuse_existing(self, name: str) -> None:
        if self.db.execute("SELECT 1 FROM volumes WHERE name = ?", (name,)).fetchone() \
                or (self.root / "volumes" / name).exists():
            raise StorageError(f"a volume or clone named {name!r} already exists; pick another name",
                               code="exists")

    def _refuse_existing_snapshot(self, volume: str, snap: str) -> None:
        if self.db.execute("SELECT 1 FROM snapshots WHERE volume = ? AND name = ?", (volume, snap)).fetchone():
            raise StorageError(f"volume {volume!r} already has a snapshot {snap!r}; pick another name",
                               code="exists")

    def _volume_info(self, name: str) -> VolumeInfo:
        row = self._volume_row(name)
        live = self.root / "volumes" / name
        used, method = self._space(live) if live.exists() else (0, "replica: no writable tree")
        exclusive, shared = self._sharing(live) if live.exists() else (0, 0)
        lease = self.lease(name)
        return VolumeInfo(name=name, kind=row[1], used_bytes=used, used_method=method,
                          origin=(row[2], row[3]) if row[2] else None,
                          snapshots=tuple(self._snapshot_names(name)), exclusive_bytes=exclusive,
                          shared_bytes=shared, sharing_method=self._sharing_method(),
                          owner=lease["owner"] if lease else None, expires=lease["expires"] if lease else None)

    # clone leases: owner, expiry, last activity (self-service) ----------------------------------------
    def set_lease(self, clone: str, owner: str, expires: float | None) -> None:
        """Record who owns a clone and when it expires (the agent calls this right after creating it)."""
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO clone_leases(name, owner, expires, warned, last_activity) "
                            "VALUES (?, ?, ?, 0, ?)", (clone, owner, expires, time.time()))
            self.db.commit()

    def lease(self, name: str) -> dict[str, Any] | None:
        """{owner, expires, warned, last_activity} of a clone that has an owner, else None."""
        with self._lock:
            row = self.db.execute("SELECT owner, expires, warned, last_activity FROM clone_leases WHERE name = ?",
                                  (name,)).fetchone()
        return None if row is None else {"owner": row[0], "expires": row[1], "warned": bool(row[2]),
                                         "last_activity": row[3]}

    def leases(self) -> dict[str, dict[str, Any]]:
        """Every clone lease by clone name."""
        with self._lock:
            rows = self.db.execute("SELECT name, owner, expires, warned, last_activity FROM clone_leases").fetchall()
        return {r[0]: {"owner": r[1], "expires": r[2], "warned": bool(r[3]), "last_activity": r[4]} for r in rows}

    def touch_lease(self, name: str, warned: bool | None = None) -> None:
        """Note activity on a clone now (or only mark its expiry warning as sent, with warned=True)."""
        with self._lock:
            if warned is None:
                self.db.execute("UPDATE clone_leases SET last_activity = ? WHERE name = ?", (time.time(), name))
            else:
                self.db.execute("UPDATE clone_leases SET warned = ? WHERE name = ?", (int(warned), name))
            self.db.commit()

    def _snapshot_info(self, volume: str, snap: str) -> SnapshotInfo:
        guid, created, logical = self.db.execute(
            "SELECT guid, created, logical_bytes FROM snapshots WHERE volume = ? AND name = ?",
            (volume, snap)).fetchone()
        exclusive, shared = self._snapshot_sharing(volume, snap)
        return SnapshotInfo(volume=volume, name=snap, guid=guid, created=created, logical_bytes=logical,
                            clones=tuple(self._clones_of(volume, snap)), exclusive_bytes=exclusive,
                            shared_bytes=shared)

    def _snapshot_sharing(self, volume: str, snap: str) -> tuple[int, int]:
        """(exclusive, shared) bytes of a snapshot; a driver that cannot tell reports (0, 0)."""
        return 0, 0
