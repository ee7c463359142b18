"""The embedded storage driver, the default: volumes are plain directories on any filesystem, snapshots are
manifests over a content-addressed chunk store (chunkstore.py), clones share their snapshot's tree
(reflinks or an overlay mount, below), and send/receive move only the chunks the other side lacks. No root
needed (without it, clones on a filesystem without reflinks are full copies).

Files are cut into fixed 8 KiB blocks. Databases rewrite their pages in place (PostgreSQL's page is 8 KiB,
InnoDB's 16 KiB is two blocks, both multiples of the 4 KiB OS page), so an 8 KiB grid aligned to the
file start turns a rewritten page into exactly one new block; content-defined chunking would smear each
rewrite over a 16-64 KiB chunk (FIELD-NOTES: 5.4 MB stored at 8 KiB fixed vs 24.7 MB at CDC 16 KiB for the
same 1 % change). Smaller blocks would only double the id overhead (32 bytes per block).

Clones and space. A snapshot has a read-only base under bases/ (named after its guid) that every clone,
refresh and rollback from it shares. Where clones can share it (reflinks or overlays, below), the snapshot
makes its base while it captures, in the same pass that reads the volume into the chunk store, so no clone
ever pays for it:

- with reflinks, each file is first reflinked into the base (no data copied) and the chunk store reads the
  reflink, which no writer can touch: the base and the chunks hold the same bytes, and the base costs only
  what the volume later overwrites;
- without reflinks, the bytes read are also written into the base (blocks of zeros stay holes): direct
  while the device keeps up; once it falls behind, direct or through the page cache, whichever cost less
  lately (_Copier). The snapshot commits and answers once its chunks are durable; the base is synced after
  that, on a thread of the driver's, and named under bases/ once its bytes are on disk (a clone, a refresh
  or a rollback from it, and the volume's next snapshot, wait for that; a list shows it meanwhile). A slow
  device thus holds a snapshot for one copy of its bytes, not two. A crash before the base is named loses
  only the base: the first clone builds it again from the chunk store. The base is a second, uncompressed
  copy beside the chunk store, owned by the snapshot and reported as its exclusive bytes
  (storage.snapshot.list). A file that is the same as in the volume's latest snapshot that has a base, or
  in the snapshot a clone was made from (same content, mode, owner and mtime), is hard-linked to that
  base's file instead: bases never change, so sharing an inode between them is safe, and a snapshot of a
  volume or masked clone that changed a few files costs those files. Such a file shows more than one link
  inside a clone.

Snapshots taken to be sent (replication says for_clones=False), received from another agent, or taken where
clones cannot share, get their base from the chunk store when they are first cloned; a file equal to one of
an earlier base of the volume is linked (or reflinked) from it then, so a received update costs its first
clone what changed.

- Where the state directory's filesystem has reflinks (btrfs, XFS with reflink=1, bcachefs: the FICLONE
  ioctl works), a clone is a tree of reflinks to the base: files share their extents until a program writes
  them, and the filesystem copies only the written blocks.
- Without reflinks (ext4, the common default), a clone is an overlay mount at its path: the base as the
  lower layer, and a layer of its own under layers/ (upper for what is written to it, work for the overlay)
  as the upper. A clone of any size adds only its empty layer; a file is copied up whole the first time a
  program opens it for writing, so a database clone grows by the files it touches. The overlays table
  records each clone's layer and base; at start the driver mounts every clone again (after a reboot none
  is mounted) and takes down mounts no committed row explains, and it unmounts on destroy, refresh and
  rollback (lazily only when a program still has the clone open). The agent keeps clones mounted when it
  stops, so a restart never pulls a clone from under a program. Mounting needs CAP_SYS_ADMIN, so an agent
  running as root; the mounts live in the agent's mount namespace.
- Where neither works (no reflinks and overlay mounts refused, e.g. an agent not running as root), there
  is no base: a clone is a full, independent copy, and storage.volume.list says so (shared_bytes 0,
  sharing_method naming why and what to do).

A base stays while a snapshot with its guid or an overlay clone over it exists (a clone rolled back to a
snapshot that is later destroyed keeps that snapshot's base). A hard-link farm with copy-on-first-write
would not be safe instead: a program that opens a file O_RDWR (SQLite, PostgreSQL, any masking hook)
writes into the shared inode itself, changing the base and every other clone; the overlay copies the file
up at open(), before the first write. Layers and bases are created aside and renamed in, rows are
committed with the catalog change they belong to, and unreferenced layers and bases are removed only after
that commit, so a crash (kill -9) at any point leaves a state the next start recovers from.

A snapshot reads the live directory file by file; it is point-in-time only if writers are quiesced (the
database stopped or in backup mode). Use the btrfs driver when an atomic snapshot of a running writer is
needed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import shutil
import stat
import struct
import time
import uuid
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, overload

import blake3

from agents.storage import driver as d
from agents.storage import overlay
from agents.storage.chunkstore import SEGMENT_IDS, ChunkStore, Tee, split_ids
from agents.storage.catalog import CatalogDriver
from agents.storage.driver import SnapshotInfo, StorageError
from agents.storage.names import validate_name
from agents.storage.packs import ALIGN, direct_writes_work
from agents.storage.stream import read_frames, write_stream

BLOCK_SIZE = 8192
_ZEROS = bytes(BLOCK_SIZE)
_ZERO_ID = blake3.blake3(_ZEROS).digest()   # a block's id in the chunk store (ChunkStore.put_file)
_READ_BYTES = 128 * BLOCK_SIZE      # 1 MiB: one index lookup and one writer batch each (finer batches
                                    # pipeline better: measured 1 MiB > 2 MiB > 4 MiB > 8 MiB)
_PATCH_BATCH = 4096           # changed block positions per patch frame
_INDEX = struct.Struct(">I")
_FICLONE = 0x40049409                 # linux/fs.h: _IOW(0x94, 9, int)
_FS_IOC_FIEMAP = 0xC020660B           # linux/fs.h: _IOWR('f', 11, struct fiemap)
_FIEMAP_HEAD = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")
_FIEMAP_EXTENT_LAST, _FIEMAP_EXTENT_SHARED = 0x1, 0x2000
_FIEMAP_BATCH = 128

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# The volumes table is the catalog's; snapshots carry an integer id that keys their manifest entries.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots(
    id INTEGER PRIMARY KEY, volume TEXT NOT NULL, name TEXT NOT NULL, guid TEXT NOT NULL,
    created REAL NOT NULL, logical_bytes INTEGER NOT NULL, UNIQUE(volume, name));
CREATE TABLE IF NOT EXISTS entries(
    snap INTEGER NOT NULL, path TEXT NOT NULL, kind TEXT NOT NULL, mode INTEGER NOT NULL,
    uid INTEGER NOT NULL, gid INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    target TEXT, segs BLOB NOT NULL, PRIMARY KEY(snap, path)) WITHOUT ROWID;
-- Clones that are overlay mounts: the directory under layers/ holding the clone's own writes (upper) and
-- the overlay's scratch (work), and the read-only tree under bases/ it lies over. A row goes with its clone.
CREATE TABLE IF NOT EXISTS overlays(name TEXT PRIMARY KEY, layer TEXT NOT NULL, base TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Entry:
    """One manifest line. kind: 'f' file, 'd' directory, 'l' symlink, 'h' another name (hard link) of the
    file whose path is `target`. segs: concatenated segment ids."""
    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    target: str | None
    segs: bytes

    def row(self, snap: int) -> tuple[Any, ...]:
        return (snap, _name_out(self.path), self.kind, self.mode, self.uid, self.gid, self.size, self.mtime_ns,
                _name_out(self.target), self.segs)

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Entry:
        path, kind, mode, uid, gid, size, mtime_ns, target, segs = row
        return cls(_name_in(path), kind, mode, uid, gid, size, mtime_ns, _name_in(target), segs)


def _name_out(name: str | None) -> str | bytes | None:
    """A path or symlink target for SQLite or the stream: text when it is valid UTF-8, otherwise its raw
    bytes. Names come from the OS as str with undecodable bytes smuggled as surrogates (surrogateescape),
    which neither SQLite nor msgpack can encode as text."""
    if name is None:
        return None
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name)
    return name


@overload
def _name_in(name: str | bytes) -> str: ...
@overload
def _name_in(name: None) -> None: ...
def _name_in(name: str | bytes | None) -> str | None:
    """The inverse of _name_out: raw bytes back to the OS's str form (surrogateescape)."""
    return os.fsdecode(name) if isinstance(name, bytes) else name


@dataclass(frozen=True)
class Diff:
    """What changed between two snapshots of one volume, as sets over their manifests."""
    added: frozenset[str]
    removed: frozenset[str]
    modified: frozenset[str]
    new_chunks: int               # chunks the newer snapshot references that the older does not


class EmbeddedDriver(CatalogDriver):
    name = "embedded"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        try:
            for sub in ("volumes", "tmp", "bases", "layers"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the embedded store at {self.root}: {exc.strerror}; "
                               f"choose a writable directory", code="environment") from None
        self._open_catalog(self.root / "store.sqlite", _SCHEMA)
        self.db.execute("PRAGMA auto_vacuum = INCREMENTAL")   # only takes effect on a new database
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.store = ChunkStore(self.db, self.root / "packs")
        self._base_sizes: dict[str, int] = {}     # bases never change once built: measured once each
        # Bases whose bytes are still going to disk (_settle_later), by name: their scratch tree and the job.
        self._settling: dict[str, tuple[Path, Future[None]]] = {}
        self._unwanted: set[str] = set()          # of those, the ones no snapshot or clone needs any more
        self._settler: ThreadPoolExecutor | None = None
        # Leftovers of a crash mid-clone or mid-receive: scratch trees and unreferenced chunks (the packs
        # were already cut back to what the index committed). A probe's mount a crash left there goes
        # first, so that removing the scratch trees never reaches through a mount.
        overlay.unmount_all_under(self.root / "tmp")
        for leftover in (self.root / "tmp").iterdir():
            _remove_tree(leftover)
        self.store.gc()
        self.reflinks = _has_reflinks(self.root / "tmp")
        # Without reflinks, clones are overlay mounts where this process may mount them; the reason it may
        # not is kept for the sharing explanation.
        self.overlay_options: tuple[str, ...] = ()
        self.overlays = False
        self.no_overlay_reason = "reflinks are used instead"
        # Without reflinks, a base's files are copies, written direct where the filesystem takes it (_Copier).
        self._direct_bases = False
        if not self.reflinks:
            reason, self.overlay_options = overlay.probe(self.root / "tmp")
            self.overlays = reason is None
            self.no_overlay_reason = reason or ""
            self._direct_bases = direct_writes_work(self.root / "tmp")
        self._restore_overlays()
        self._collect_trees()

    def close(self) -> None:
        with self._lock:
            self._settle_all()
            if self._settler is not None:
                self._settler.shutdown(wait=True)
                self._settler = None
            self.store.close()
            super().close()

    def capabilities(self) -> set[str]:
        return {d.CAP_VOLUMES, d.CAP_SNAPSHOTS, d.CAP_CLONES, d.CAP_ROLLBACK, d.CAP_REFRESH, d.CAP_SEND,
                d.CAP_RECEIVE, d.CAP_INCREMENTAL, d.CAP_DIFF, d.CAP_ROOTLESS} \
            | ({d.CAP_REFLINK_CLONES} if self.reflinks else set()) \
            | ({d.CAP_OVERLAY_CLONES} if self.overlays else set())

    def store_stats(self) -> dict[str, int]:
        """Chunks held, their logical bytes and the bytes they take after compression and dedupe."""
        with self._lock:
            return self.store.stats()

    # the catalog's tree hooks -------------------------------------------------------------------------
    def _make_volume_tree(self, name: str) -> None:
        (self.root / "volumes" / name).mkdir(mode=0o755)

    def _make_clone_tree(self, volume: str, snap: str, clone_name: str, progress: d.BytesProgress | None) -> None:
        snap_id = self._snapshot_row(volume, snap)[0]
        if self.overlays:
            self._overlay_tree(clone_name, snap_id, progress)     # its row commits with the clone's own
            return
        os.rename(self._writable_tree(snap_id, progress), self.root / "volumes" / clone_name)

    def _writable_tree(self, snap_id: int, progress: d.BytesProgress | None = None) -> Path:
        """A fresh scratch tree holding the snapshot: reflinks to its base where the filesystem can share
        extents, a full copy from the chunk store where it cannot. ``progress`` hears of the bytes copied
        (building the base, where there is none yet; the reflinks copy nothing)."""
        if not self.reflinks:
            return self._materialize(snap_id, progress=progress)
        return self._materialize(snap_id, reflink_from=self.root / "bases" / self._base_for(snap_id, progress))

    def _base_for(self, snap_id: int, progress: d.BytesProgress | None = None) -> str:
        """The name under bases/ of the snapshot's read-only tree, built from the chunk store if it is not
        there yet. Named after the snapshot's guid, which no other snapshot's tree ever has (a rowid may be
        reused once its snapshot is gone, while an overlay clone still lies over the old base)."""
        (guid,) = self.db.execute("SELECT guid FROM snapshots WHERE id = ?", (snap_id,)).fetchone()
        name = _base_name(guid)
        self._settled(name)
        base = self.root / "bases" / name
        if not base.exists():
            # Built aside and renamed in: a crash leaves a scratch tree (removed at start), never half a base.
            # A file equal to one of another base of the volume (or of the snapshot it was cloned from) is
            # linked or reflinked from there: only what changed is written.
            (volume,) = self.db.execute("SELECT volume FROM snapshots WHERE id = ?", (snap_id,)).fetchone()
            tree = self._materialize(snap_id, progress=progress, share_from=self._reusable_files(volume))
            _syncfs(tree)
            os.rename(tree, base)
        return name

    def _replace_tree(self, name: str, volume: str, snap: str, progress: d.BytesProgress | None) -> None:
        snap_id = self._snapshot_row(volume, snap)[0]
        if self._overlay_row(name) is not None or (self.overlays and self._volume_row(name)[1] == "clone"):
            self._overlay_tree(name, snap_id, progress)
            self.db.commit()
            self._collect_trees()       # the layer it had, and a base no snapshot or clone needs any more
            return
        tree = self._writable_tree(snap_id, progress)
        live = self.root / "volumes" / name
        old = self._scratch("old")
        os.rename(live, old)
        os.rename(tree, live)
        _remove_tree(old)

    def _remove_volume_data(self, name: str) -> None:
        live = self.root / "volumes" / name
        if self._overlay_row(name) is not None:
            # The layer stays until the clone's row is gone (committed by the caller, then collected): a
            # crash before that commit leaves a clone whose mount the next start re-establishes.
            self._unmount(name)
            if not os.path.ismount(live):
                _remove_tree(live)
            self.db.execute("DELETE FROM overlays WHERE name = ?", (name,))
            return
        if live.exists():
            # Move aside first so a crash never leaves a half-deleted tree under a valid name.
            scratch = self._scratch("destroy")
            os.rename(live, scratch)
            _remove_tree(scratch)

    def _destroy(self, name: str) -> None:
        super()._destroy(name)
        self._collect_trees()

    # overlay clones ------------------------------------------------------------------------------------
    def _overlay_row(self, name: str) -> tuple[str, str] | None:
        """(layer, base) of a clone that is an overlay mount, else None."""
        row = self.db.execute("SELECT layer, base FROM overlays WHERE name = ?", (name,)).fetchone()
        return None if row is None else (row[0], row[1])

    def _overlay_tree(self, name: str, snap_id: int, progress: d.BytesProgress | None = None) -> None:
        """Make `name` an overlay mount over the snapshot's base with a fresh, empty layer of its own: a new
        clone, or a clone refreshed or rolled back (its old layer, whatever was written to it, goes). The
        row is written, not committed: the caller commits it with the rest of the change."""
        if not self.overlays:
            raise StorageError(f"{name!r} is an overlay mount and this agent cannot mount overlays now "
                               f"({self.no_overlay_reason}); run the agent as it ran when the clone was made",
                               code="environment")
        base = self._base_for(snap_id, progress)
        layer = self._new_layer()
        live = self.root / "volumes" / name
        old = self._overlay_row(name)
        aside: Path | None = None
        try:
            if old is not None:
                self._unmount(name)
            elif live.exists():         # a full copy made before overlays were possible here
                aside = self._scratch("old")
                os.rename(live, aside)
            try:
                self._mount(name, layer, base)
            except OSError as exc:
                if old is not None:
                    self._mount(name, *old)
                elif aside is not None:
                    live.rmdir()
                    os.rename(aside, live)
                    aside = None
                else:
                    live.rmdir()
                raise StorageError(f"cannot mount the overlay for {name!r}: {exc.strerror or exc}; nothing "
                                   f"changed", code="environment") from None
        except BaseException:
            _remove_tree(self.root / "layers" / layer)
            raise
        self.db.execute("INSERT OR REPLACE INTO overlays(name, layer, base) VALUES (?, ?, ?)", (name, layer, base))
        if aside is not None:
            _remove_tree(aside)

    def _new_layer(self) -> str:
        """A fresh layer directory (upper for the clone's writes, work for the overlay) under layers/."""
        name = uuid.uuid4().hex
        scratch = self._scratch("layer")
        (scratch / "upper").mkdir(parents=True)
        (scratch / "work").mkdir()
        os.rename(scratch, self.root / "layers" / name)
        return name

    def _mount(self, name: str, layer: str, base: str) -> None:
        live = self.root / "volumes" / name
        live.mkdir(exist_ok=True)
        overlay.mount_overlay(self.root / "bases" / base, self.root / "layers" / layer / "upper",
                              self.root / "layers" / layer / "work", live, self.overlay_options)

    def _unmount(self, name: str) -> None:
        live = self.root / "volumes" / name
        try:
            busy = overlay.unmount(live)
        except OSError as exc:
            raise StorageError(f"cannot unmount the overlay of {name!r}: {exc.strerror or exc}; run the agent "
                               f"as root, as when the clone was made", code="environment") from None
        if busy:
            log.warning("clone %s was in use and was detached lazily: programs with files open in it keep "
                        "the old tree until they close them; stop them before destroying, refreshing or "
                        "rolling back a clone", name)

    def _restore_overlays(self) -> None:
        """At start: every overlay clone mounted as its row says (after a reboot nothing is; after a crash
        mid-refresh the new layer may be mounted while the row still names the old one), and mounts under
        volumes/ that no row explains (a crash mid-create) taken down."""
        rows = {r[0]: (r[1], r[2]) for r in self.db.execute("SELECT name, layer, base FROM overlays")}
        volumes = self.root / "volumes"
        mounted = set()
        for m in overlay.mounts_under(volumes):
            row = rows.get(m.mountpoint.name) if m.mountpoint.parent == volumes else None
            upper = str(self.root / "layers" / row[0] / "upper") if row else None
            if m.fstype == "overlay" and upper is not None and m.options.get("upperdir") == upper:
                mounted.add(m.mountpoint.name)
                continue
            overlay.unmount(m.mountpoint)
        # Empty directories no volume row names: the mountpoint (or a new volume's tree) of a creation that
        # a crash cut short before it committed.
        known = {r[0] for r in self.db.execute("SELECT name FROM volumes")}
        for tree in volumes.iterdir():
            if tree.name not in known and not os.path.ismount(tree):
                try:
                    tree.rmdir()
                except OSError:
                    pass
        for name, (layer, base) in rows.items():
            if name in mounted:
                continue
            try:
                self._mount(name, layer, base)
            except OSError as exc:
                log.error("cannot mount overlay clone %s again (%s); %s. It stays empty until the agent "
                          "restarts with the privilege to mount it", name, exc.strerror or exc,
                          self.no_overlay_reason or "check the kernel log")

    def _collect_trees(self) -> None:
        """Remove layers no clone uses and bases that neither a snapshot nor an overlay clone needs. A base
        still settling is not waited for (a slow device's sync of one volume's base holds up no other
        volume's destroy or clone): one no longer needed is removed once synced instead of named."""
        self._settle_synced()
        layers = {r[0] for r in self.db.execute("SELECT layer FROM overlays")}
        bases = {r[0] for r in self.db.execute("SELECT base FROM overlays")} \
            | {_base_name(r[0]) for r in self.db.execute("SELECT guid FROM snapshots")}
        self._unwanted = set(self._settling) - bases
        for where, keep in (("layers", layers), ("bases", bases)):
            for tree in (self.root / where).iterdir():
                if tree.name not in keep:
                    # Aside first: a crash leaves a scratch tree, never half a layer or base.
                    scratch = self._scratch(where)
                    os.rename(tree, scratch)
                    _remove_tree(scratch)
                    self._base_sizes.pop(tree.name, None)

    def _base_bytes(self, base: str) -> int:
        """The bytes a base takes (each file once, whatever its names)."""
        if base not in self._base_sizes:
            self._base_sizes[base] = sum(_inode_split(self._base_path(base)))
        return self._base_sizes[base]

    # bases settling: synced after the snapshot answered ----------------------------------------------------
    def _settle_later(self, tree: Path, name: str) -> None:
        """Have the base built at ``tree`` (a scratch tree) synced to disk on the driver's settling thread:
        its snapshot has committed, and answers without waiting for that. It is named bases/``name`` once
        synced, by the next driver call that looks (_settled, under the driver's lock, so that no walk of
        the tree ever sees it move)."""
        if self._settler is None:
            self._settler = ThreadPoolExecutor(1, thread_name_prefix="base-settle")
        self._settling[name] = (tree, self._settler.submit(_syncfs, tree))

    def _base_path(self, name: str) -> Path:
        """Where the base ``name`` is now: its scratch tree while it settles, else under bases/."""
        self._settle_synced()
        settling = self._settling.get(name)
        return settling[0] if settling is not None else self.root / "bases" / name

    def _settled(self, name: str) -> None:
        """Wait for the base ``name`` to be on disk, if it is settling, and name it. One that could not be
        made durable is removed, so that no clone is made over bytes a crash could still lose: its
        snapshot's first clone builds it again from the chunk store."""
        settling = self._settling.pop(name, None)
        if settling is None:
            return
        tree, synced = settling
        unwanted = name in self._unwanted      # its snapshot went while it settled (_collect_trees)
        self._unwanted.discard(name)
        try:
            synced.result()
        except OSError as exc:
            _remove_tree(tree)
            log.warning("the base of a snapshot could not be written to disk (%s); its first clone builds it "
                        "again from the chunk store", exc)
            return
        if unwanted:
            _remove_tree(tree)
            return
        os.rename(tree, self.root / "bases" / name)

    def _settle_synced(self) -> None:
        """Name every settling base whose sync has ended."""
        for name in [n for n, (_, synced) in self._settling.items() if synced.done()]:
            self._settled(name)

    def _settle_all(self) -> None:
        for name in list(self._settling):
            self._settled(name)

    # space ---------------------------------------------------------------------------------------------
    def _space(self, live: Path) -> tuple[int, str]:
        row = self._overlay_row(live.name)
        if row is not None:
            return _allocated_bytes(self.root / "layers" / row[0]), (
                "du of the clone's overlay layer: what it holds of its own; its snapshot's base is shared")
        return _allocated_bytes(live), ("du: blocks allocated by the writable tree; snapshots share the "
                                        "chunk store (store_stats)")

    def _sharing(self, live: Path) -> tuple[int, int]:
        """(exclusive, shared) bytes of a writable tree: for an overlay clone its own layer and the base it
        lies over; with reflinks, from the extents the filesystem reports (FIEMAP): shared extents are
        reflinked with a snapshot's base or another clone."""
        row = self._overlay_row(live.name)
        if row is not None:
            return _allocated_bytes(self.root / "layers" / row[0]), self._base_bytes(row[1])
        if not self.reflinks:
            return _allocated_bytes(live), 0
        return _extent_split(live)

    def _sharing_method(self) -> str:
        if self.reflinks:
            return ("fiemap: clones are reflinks to their snapshot's base, which the snapshot reflinked from "
                    "the volume as it was taken; shared_bytes are extents the filesystem still shares, "
                    "exclusive_bytes were written since")
        if self.overlays:
            return ("overlay: this filesystem has no reflinks, so each clone is an overlay mount over its "
                    "snapshot's read-only base; shared_bytes is the base (shared by every clone of that "
                    "snapshot), exclusive_bytes the clone's own layer (files it created, and each file it "
                    "wrote, copied whole on its first write); volumes are plain directories (du); a snapshot "
                    "writes its base as it is taken (files unchanged since the volume's previous base are "
                    "linked to it) and counts it in its own exclusive and shared bytes")
        return (f"du: this filesystem has no reflinks and overlay mounts are not possible here "
                f"({self.no_overlay_reason}), so every clone is a full copy (shared_bytes 0); run the agent "
                f"as root for overlay clones, or put the state directory on btrfs or XFS (reflink=1)")

    def _snapshot_sharing(self, volume: str, snap: str) -> tuple[int, int]:
        """Stored (compressed) bytes of the chunks only this snapshot holds, and of those it shares with
        other snapshots, plus its base's (_base_split): what destroying it would free, and what would stay."""
        snap_id = self._snapshot_row(volume, snap)[0]
        exclusive, shared = self.store.sharing(self._segment_counts(snap_id))
        base_exclusive, base_shared = self._base_split(self._snapshot_base(snap_id))
        return exclusive + base_exclusive, shared + base_shared

    def _segment_counts(self, snap_id: int) -> Counter[bytes]:
        """How many times the snapshot's files name each segment."""
        counts: Counter[bytes] = Counter()
        for (segs,) in self.db.execute("SELECT segs FROM entries WHERE snap = ?", (snap_id,)):
            counts.update(split_ids(segs))
        return counts

    def _snapshot_base(self, snap_id: int) -> str | None:
        """The name of the snapshot's base (under bases/, or still settling: _base_path says where), None
        while it has none."""
        (guid,) = self.db.execute("SELECT guid FROM snapshots WHERE id = ?", (snap_id,)).fetchone()
        base = _base_name(guid)
        return base if self._base_path(base).exists() else None

    def _base_split(self, base: str | None) -> tuple[int, int]:
        """(exclusive, shared) bytes of a base. With reflinks, extents the filesystem still shares (with the
        volume it was captured from, clones, other bases) are shared; without, a file hard-linked from
        another base is shared (counted once, here and there alike). Measured each time: the split changes
        as volumes are written and other bases come and go."""
        if base is None:
            return 0, 0
        top = self._base_path(base)
        return _extent_split(top) if self.reflinks else _inode_split(top)

    def snapshot_space(self, volume: str, snap: str) -> dict[str, int]:
        """A snapshot's bytes: logical size, and the base tree its clones share (made as the snapshot is
        taken where clones can share it; 0 where clones are full copies, or for a received snapshot until
        its first clone)."""
        with self._lock:
            snap_id, _, _ = self._snapshot_row(volume, snap)
            logical = self.db.execute("SELECT logical_bytes FROM snapshots WHERE id = ?", (snap_id,)).fetchone()[0]
            base = self._snapshot_base(snap_id)
            return {"logical_bytes": logical, "base_bytes": self._base_bytes(base) if base else 0}

    def _capture(self, volume: str, snap: str, progress: d.BytesProgress | None, for_clones: bool = True) -> None:
        top = self.root / "volumes" / volume
        # The total is counted first (a walk of the metadata alone) only for a caller who watches.
        tally = _Tally(progress, _tree_bytes(top) if progress is not None else 0)
        guid = uuid.uuid4().hex
        # The base is built aside and renamed in once its bytes are durable: before the snapshot's row
        # commits with reflinks (the reflinks are metadata, synced at once), after it without (the bytes
        # settle after the answer, _settle_later). A crash before the rename leaves a scratch tree (removed
        # at start), one after it a base no row names if the row did not commit (collected at start), and
        # no clone is ever made over a base whose snapshot did not commit.
        base = self._scratch("base") if for_clones and (self.reflinks or self.overlays) else None
        try:
            if base is not None:
                base.mkdir()
            # With reflinks the capture reflinks every file anyway: nothing to look up.
            reusable = self._reusable_files(volume) if base and not self.reflinks else {}
            entries = list(self._ingest(top, tally, base, reusable))
            if base is not None:
                _settle_tree(base, entries)
                if self.reflinks:
                    # Its bytes are durable before its name (a name a crash loses only means the first
                    # clone builds the base again from the chunk store).
                    _syncfs(base)
                    os.rename(base, self.root / "bases" / _base_name(guid))
                    base = None
            self._publish(volume, snap, guid, entries)
            if base is not None:
                self._settle_later(base, _base_name(guid))
                base = None
            self._settle_synced()
        except BaseException as exc:
            self.store.abort()      # the transaction and every pack byte written for it
            if base is not None:
                _remove_tree(base)
            self._collect_trees()   # a base renamed in for a snapshot that did not commit
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                extra = (" and the base its clones share (a second copy of the changed files here; "
                         "storage.snapshot.create for_clones=false skips it)") if for_clones and self.overlays else ""
                raise StorageError(f"the filesystem holding the store at {self.root} is full: No space left on "
                                   f"device; the snapshot needs room for its new chunks{extra}. Nothing was "
                                   f"published; free space and take it again", code="no_space") from None
            raise

    def _reusable_files(self, volume: str) -> dict[str, tuple[Entry, Path]]:
        """Files a new base may share instead of copying, by path: those of the volume's latest snapshot that
        has a base, and (for a clone) of the snapshot it was made from, with the base holding each."""
        _, kind, origin_volume, origin_snap = self._volume_row(volume)
        own = self.db.execute("SELECT id, guid FROM snapshots WHERE volume = ? ORDER BY id DESC",
                              (volume,)).fetchall()
        origin = self.db.execute("SELECT id, guid FROM snapshots WHERE volume = ? AND name = ?",
                                 (origin_volume, origin_snap)).fetchone() if kind == "clone" else None
        # The volume's latest base, or its origin's, may still be settling (its files are linked from under
        # bases/): wait for those, not for the bases of other volumes, whose syncs are none of this one's.
        for _, guid in own + ([origin] if origin else []):
            self._settled(_base_name(guid))
        latest = next((r for r in own if (self.root / "bases" / _base_name(r[1])).is_dir()), None)
        reusable: dict[str, tuple[Entry, Path]] = {}
        for row in (latest, origin):
            base = self.root / "bases" / _base_name(row[1]) if row else None
            if row is None or base is None or not base.is_dir():
                continue
            for path, e in self._entries(row[0]).items():
                if e.kind == "f":
                    reusable.setdefault(path, (e, base))
        return reusable

    def _drop_snapshot(self, volume: str, snap: str) -> None:
        snap_id = self._snapshot_row(volume, snap)[0]
        for (segs,) in self.db.execute("SELECT segs FROM entries WHERE snap = ?", (snap_id,)).fetchall():
            self.store.ref_segments(segs, -1)
        self.db.execute("DELETE FROM entries WHERE snap = ?", (snap_id,))
        # Its base goes once the row is gone and no overlay clone lies over it (destroy_snapshot collects).

    def destroy_snapshot(self, volume: str, snap: str) -> None:
        with self._lock:
            super().destroy_snapshot(volume, snap)
            self._collect_trees()
            self.store.gc()

    # snapshots ----------------------------------------------------------------------------------------
    def diff(self, volume: str, older: str, newer: str) -> Diff:
        with self._lock:
            a = self._entries(self._snapshot_row(volume, older)[0])
            b = self._entries(self._snapshot_row(volume, newer)[0])
            common = a.keys() & b.keys()
            modified = frozenset(p for p in common if a[p] != b[p])
            a_segs = set().union(*(split_ids(e.segs) for e in a.values())) if a else set()
            b_segs = set().union(*(split_ids(e.segs) for e in b.values())) if b else set()
            a_chunks: set[bytes] = set()
            for sid in a_segs - b_segs:
                a_chunks.update(self.store.chunk_ids(sid))
            b_chunks: set[bytes] = set()
            for sid in b_segs - a_segs:
                b_chunks.update(self.store.chunk_ids(sid))
            # Chunks in shared segments are in both; only chunks of B's own segments can be new.
            shared = set()
            for sid in a_segs & b_segs:
                shared.update(self.store.chunk_ids(sid))
            new = b_chunks - a_chunks - shared
            return Diff(added=frozenset(b.keys() - a.keys()), removed=frozenset(a.keys() - b.keys()),
                        modified=modified, new_chunks=len(new))

    # send and receive ---------------------------------------------------------------------------------
    def send(self, volume: str, to_snap: str, from_snap: str | None = None) -> Iterator[bytes]:
        with self._lock:
            to_row = self._snapshot_row(volume, to_snap)
            from_row = self._snapshot_row(volume, from_snap) if from_snap is not None else None
        header = {"driver": self.name, "volume": volume, "to_snap": to_snap, "to_guid": to_row[2],
                  "from_snap": from_snap, "from_guid": from_row[2] if from_row else None}
        held = [(volume, to_snap)] + ([(volume, from_snap)] if from_snap is not None else [])
        return self._send(header, held, to_row[0], from_row[0] if from_row else None)

    def _send(self, header: dict[str, Any], held: list[tuple[str, str]], to_id: int,
              from_id: int | None) -> Iterator[bytes]:
        with self._holding(held):
            # Held first, checked second: a destroy that came before the hold shows here, any later one
            # is refused as busy.
            with self._lock:
                for sid in (to_id, from_id):
                    if sid is not None and self.db.execute("SELECT 1 FROM snapshots WHERE id = ?",
                                                           (sid,)).fetchone() is None:
                        raise StorageError("a snapshot being sent was destroyed before the send started; "
                                           "start the send again", code="not_found")
            yield from write_stream(header, self._send_frames(to_id, from_id))

    def _send_frames(self, to_id: int, from_id: int | None) -> Iterator[dict[str, Any]]:
        with self._lock:
            new = self._entries(to_id)
            old = self._entries(from_id) if from_id is not None else {}
        sent: set[bytes] = set()
        deleted = sorted(old.keys() - new.keys())
        for i in range(0, len(deleted), 1000):
            yield {"t": "deleted", "paths": [_name_out(p) for p in deleted[i:i + 1000]]}
        for path in sorted(new):
            entry = new[path]
            base = old.get(path)
            if base == entry:
                continue
            use_base = base is not None and base.kind == "f" and entry.kind == "f"
            yield {"t": "entry", "p": _name_out(entry.path), "k": entry.kind, "m": entry.mode, "u": entry.uid,
                   "g": entry.gid, "s": entry.size, "mt": entry.mtime_ns, "l": _name_out(entry.target),
                   "n": _blocks(entry.size) if entry.kind == "f" else 0, "base": use_base}
            if entry.kind != "f":
                continue
            yield from self._file_frames(entry, base if use_base else None, sent)

    def _file_frames(self, entry: Entry, base: Entry | None, sent: set[bytes]) -> Iterator[dict[str, Any]]:
        """Chunk frames for blocks the base lacks, then patch frames naming every changed position."""
        new_segs = split_ids(entry.segs)
        old_segs = split_ids(base.segs) if base else []
        for k, sid in enumerate(new_segs):
            if k < len(old_segs) and old_segs[k] == sid:
                continue
            with self._lock:
                ids = self.store.chunk_ids(sid)
                old_ids = self.store.chunk_ids(old_segs[k]) if k < len(old_segs) else []
            changed = [j for j, cid in enumerate(ids) if j >= len(old_ids) or old_ids[j] != cid]
            # Only blocks absent from the base segment travel; the receiver holds the base.
            have = set(old_ids) | sent
            need = list(dict.fromkeys(ids[j] for j in changed if ids[j] not in have))
            for i in range(0, len(need), 256):
                with self._lock:
                    stored = self.store.get_stored(need[i:i + 256])
                for cid in need[i:i + 256]:
                    z, data = stored[cid]
                    yield {"t": "chunk", "id": cid, "z": z, "d": data}
            sent.update(need)
            for i in range(0, len(changed), _PATCH_BATCH):
                part = changed[i:i + _PATCH_BATCH]
                yield {"t": "patch", "idx": b"".join(_INDEX.pack(k * SEGMENT_IDS + j) for j in part),
                       "ids": b"".join(ids[j] for j in part)}

    def receive(self, volume: str, snap: str, stream: Iterable[bytes]) -> SnapshotInfo:
        validate_name(volume, "volume name")
        validate_name(snap, "snapshot name")
        with self._lock:
            self._refuse_existing_snapshot(volume, snap)
            try:
                return self._receive(volume, snap, stream)
            except BaseException:
                self.store.abort()  # drops the chunks this receive stored and the pack bytes they took
                raise

    def _receive(self, volume: str, snap: str, stream: Iterable[bytes]) -> SnapshotInfo:
        frames = read_frames(stream, expect_driver=self.name)
        header = next(frames)
        base_id = self._receive_base(volume, header)
        base = self._entries(base_id) if base_id is not None else {}
        result = dict(base)
        builder: _FileBuilder | None = None
        pending: dict[str, Any] | None = None

        def finish() -> None:
            nonlocal builder, pending
            if pending is not None:
                segs = builder.finish() if builder is not None else b""
                path = _name_in(pending["p"])
                result[path] = Entry(path, pending["k"], pending["m"], pending["u"], pending["g"], pending["s"],
                                     pending["mt"], _name_in(pending["l"]), segs)
            builder, pending = None, None

        for frame in frames:
            t = frame["t"]
            if t == "chunk":
                self.store.put_stored(frame["id"], frame["z"], frame["d"])
            elif t == "patch":
                if builder is None:
                    raise StorageError("replication stream corrupt: block patch outside a file entry; "
                                       "nothing was published, send the stream again", code="corrupt")
                builder.apply(frame["idx"], frame["ids"])
            elif t == "entry":
                finish()
                pending = frame
                if frame["k"] == "f":
                    old = base.get(_name_in(frame["p"])) if frame["base"] else None
                    if frame["base"] and (old is None or old.kind != "f"):
                        raise StorageError(f"replication stream does not match base snapshot: "
                                           f"{frame['p']!r} is not a file there", code="corrupt")
                    builder = _FileBuilder(self.store, old.segs if old else b"", frame["n"])
            elif t == "deleted":
                finish()
                for p in frame["paths"]:
                    result.pop(_name_in(p), None)
            else:
                raise StorageError(f"replication stream has unknown frame type {t!r}; upgrade this agent",
                                   code="unsupported")
        finish()
        self.store.flush()      # the writer is idle from here on: the catalog may use the connection
        self._ensure_replica(volume)
        self._publish(volume, snap, header["to_guid"], list(result.values()))
        return self._snapshot_info(volume, snap)

    # internals ----------------------------------------------------------------------------------------
    def _publish(self, volume: str, snap: str, guid: str, entries: list[Entry]) -> None:
        """Make a snapshot visible in one transaction (the chunks it needs are already stored)."""
        self.store.flush()      # the writer is idle from here on: the catalog may use the connection
        cur = self.db.execute("INSERT INTO snapshots(volume, name, guid, created, logical_bytes) "
                              "VALUES (?, ?, ?, ?, ?)",
                              (volume, snap, guid, time.time(), sum(e.size for e in entries if e.kind == "f")))
        snap_id = cur.lastrowid
        assert snap_id is not None  # an INSERT sets it
        self.db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [e.row(snap_id) for e in entries])
        for e in entries:
            if e.segs:
                self.store.ref_segments(e.segs, +1)
        self.store.commit()     # the packs are made durable before the index that names them commits

    def _ingest(self, top: Path, tally: _Tally | None = None, base: Path | None = None,
                reusable: dict[str, tuple[Entry, Path]] | None = None) -> Iterator[Entry]:
        """The manifest entries of the tree under ``top``, its files stored in the chunk store as they are
        read. With ``base`` (an empty directory), the same tree is made there too, in the same pass: files
        as reflinks (read back for the store) or as copies of the bytes read, or as hard links to the
        matching file of ``reusable`` (see _reusable_files). Modes and times are set by _settle_tree."""
        copier = _Copier(self._direct_bases) if base is not None and not self.reflinks else None
        try:
            yield from self._walk_ingest(top, tally, base, reusable or {}, copier)
        finally:
            if copier is not None:
                copier.close()

    def _walk_ingest(self, top: Path, tally: _Tally | None, base: Path | None,
                     reusable: dict[str, tuple[Entry, Path]], copier: _Copier | None) -> Iterator[Entry]:
        # A file with more than one name is stored once; its other names are 'h' entries naming the first.
        first_name: dict[tuple[int, int], str] = {}
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, top)
                copy = base / rel if base is not None else None
                st = os.lstat(full)
                if stat.S_ISDIR(st.st_mode):
                    if copy is not None:
                        copy.mkdir(mode=0o700)
                    yield Entry(rel, "d", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, 0, st.st_mtime_ns,
                                None, b"")
                elif stat.S_ISLNK(st.st_mode):
                    link = os.readlink(full)
                    if copy is not None:
                        os.symlink(link, copy)
                    yield Entry(rel, "l", 0o777, st.st_uid, st.st_gid, 0, st.st_mtime_ns, link, b"")
                elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and (st.st_dev, st.st_ino) in first_name:
                    first = first_name[(st.st_dev, st.st_ino)]
                    if base is not None and copy is not None:
                        os.link(base / first, copy)
                    yield Entry(rel, "h", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size,
                                st.st_mtime_ns, first, b"")
                elif stat.S_ISREG(st.st_mode):
                    if st.st_nlink > 1:
                        first_name[(st.st_dev, st.st_ino)] = rel
                    entry = self._ingest_entry(full, rel, st, tally, copy, copier, reusable.get(rel))
                    if copier is not None and copy is not None and entry is None:
                        # Its size and mtime said unchanged, so it was not copied, but its content changed:
                        # read it again, copying this time (the store and the copy from the same read).
                        entry = self._ingest_entry(full, rel, st, None, copy, copier, None)
                    assert entry is not None
                    yield entry
                # Sockets, fifos and device nodes are runtime state, not data: they are not captured.

    def _ingest_entry(self, full: str, rel: str, st: os.stat_result, tally: _Tally | None, copy: Path | None,
                      copier: _Copier | None, same: tuple[Entry, Path] | None) -> Entry | None:
        """Store one regular file and return its entry; with ``copier``, also make it at ``copy`` in the
        base: a copy written as it is read or, when its size, mtime, mode and owner match ``same`` (an
        earlier base's file), a hard link to that file once its content proves equal too; None when it
        does not (nothing was made at ``copy``: read it again without ``same``)."""
        mode = stat.S_IMODE(st.st_mode)
        likely_same = same is not None and (same[0].size, same[0].mtime_ns, same[0].mode, same[0].uid,
                                            same[0].gid) == (st.st_size, st.st_mtime_ns, mode, st.st_uid, st.st_gid)
        fd = copier.open(copy) if copier is not None and copy is not None and not likely_same else None
        try:
            segs, size = self._ingest_file(full, tally, copy, copier, fd)
        except BaseException:
            if copier is not None and fd is not None:
                copier.abandon(fd)
            raise
        entry = Entry(rel, "f", mode, st.st_uid, st.st_gid, size, st.st_mtime_ns, None, segs)
        if copier is None or copy is None:
            return entry
        if fd is not None:
            copier.close_file(fd, size)
            return entry
        if same is not None and same[0] == entry:
            os.link(same[1] / rel, copy)
            return entry
        return None

    def _ingest_file(self, full: str, tally: _Tally | None = None, copy: Path | None = None,
                     copier: _Copier | None = None, fd: int | None = None) -> tuple[bytes, int]:
        """Store one file's blocks and return its segment ids and size. With ``copy`` and reflinks, the file
        is first reflinked there and the reflink is read instead (so the copy and the store agree whatever a
        writer does meanwhile); with ``copier`` and ``fd`` (the copy opened by it), the bytes read are also
        written there."""
        if copy is not None and self.reflinks:
            _reflink(Path(full), copy)
            full = str(copy)
        with open(full, "rb", buffering=0) as f:
            tee = copier.tee(fd) if copier is not None and fd is not None else None
            return self.store.put_file(f, BLOCK_SIZE, _READ_BYTES, tee, tally.add if tally is not None else None)

    def _materialize(self, snap_id: int, reflink_from: Path | None = None,
                     progress: d.BytesProgress | None = None,
                     share_from: dict[str, tuple[Entry, Path]] | None = None) -> Path:
        """Write a snapshot's tree into a fresh scratch directory and return it; with reflink_from (the
        snapshot's base tree), files are reflinks to the base's files instead of copies. With share_from
        (only for a base, which nothing writes), a file equal to one there is a reflink of it, or without
        reflinks another name of it. ``progress`` hears of the file bytes written, of the snapshot's file
        bytes in all."""
        tree = self._scratch("tree")
        tree.mkdir()
        by_path = self._entries(snap_id)
        entries = sorted(by_path.values(), key=lambda e: e.path)
        tally = _Tally(progress, sum(e.size for e in entries if e.kind == "f"))
        try:
            for e in entries:
                target = tree / e.path
                if e.kind == "h":
                    continue            # linked below, once every file it may name exists
                if e.kind == "d":
                    target.mkdir(mode=0o700)
                elif e.kind == "l":
                    os.symlink(e.target or "", target)
                elif reflink_from is not None:
                    _reflink(reflink_from / e.path, target)
                    tally.add(e.size)
                elif share_from and share_from.get(e.path, (None,))[0] == e:
                    source = share_from[e.path][1] / e.path
                    if self.reflinks:
                        _reflink(source, target)
                    else:
                        os.link(source, target)
                    tally.add(e.size)
                else:
                    self._write_file(target, e, tally)
            for e in entries:
                if e.kind == "h":
                    first = by_path.get(e.target or "")
                    if first is None or first.kind != "f":
                        raise StorageError(f"snapshot entry {e.path!r} is a hard link to {e.target!r}, which is "
                                           f"not a file of the snapshot; the store is damaged", code="corrupt")
                    os.link(tree / first.path, tree / e.path)
            _settle_tree(tree, entries)
        except BaseException:
            _remove_tree(tree)
            raise
        return tree

    def _write_file(self, target: Path, e: Entry, tally: _Tally | None = None) -> None:
        ids = self.store.chunk_ids(e.segs)
        with open(target, "wb", buffering=0) as f:
            for i in range(0, len(ids), 128):
                run: list[bytes] = []       # data blocks in a row, written at once
                before = f.tell()
                for block in self.store.get_blocks(ids[i:i + 128]):
                    if block == _ZEROS[:len(block)]:
                        if run:
                            f.write(b"".join(run))
                            run = []
                        f.seek(len(block), os.SEEK_CUR)     # zeros stay a hole: a sparse file stays sparse
                    else:
                        run.append(block)
                if run:
                    f.write(b"".join(run))
                if tally is not None:
                    tally.add(f.tell() - before)
            f.truncate(f.tell())        # a file that ends in a hole gets its length
            if f.tell() != e.size:
                raise StorageError(f"snapshot file {e.path!r} rebuilt to {f.tell()} bytes, expected {e.size}; "
                                   f"the store is damaged", code="corrupt")

    def _entries(self, snap_id: int) -> dict[str, Entry]:
        rows = self.db.execute("SELECT path, kind, mode, uid, gid, size, mtime_ns, target, segs FROM entries "
                               "WHERE snap = ?", (snap_id,))
        entries = (Entry.from_row(r) for r in rows)
        return {e.path: e for e in entries}

    def _scratch(self, what: str) -> Path:
        return self.root / "tmp" / f"{what}-{uuid.uuid4().hex}"


class _FileBuilder:
    """Rebuilds a received file's segment list from its base segments and block patches, one segment at a
    time, so that even a huge file never has its whole chunk list in memory."""

    def __init__(self, store: ChunkStore, base_segs: bytes, nblocks: int) -> None:
        self.store = store
        self.base = split_ids(base_segs)
        self.nblocks = nblocks
        self.out: list[bytes] = []
        self.current: list[bytes | None] | None = None   # ids of segment len(self.out), being patched

    def apply(self, idx: bytes, ids: bytes) -> None:
        positions = [p for (p,) in _INDEX.iter_unpack(idx)]
        chunk_ids = split_ids(ids)
        if len(positions) != len(chunk_ids):
            raise StorageError("replication stream corrupt: patch positions and ids disagree; nothing was "
                               "published, send the stream again", code="corrupt")
        for pos, cid in zip(positions, chunk_ids):
            if pos >= self.nblocks or pos // SEGMENT_IDS < len(self.out):
                raise StorageError("replication stream corrupt: block patch out of order or past the end "
                                   "of its file; nothing was published, send the stream again", code="corrupt")
            while pos // SEGMENT_IDS > len(self.out):
                self._close_segment()
            if self.current is None:
                self.current = self._open_segment(len(self.out))
            self.current[pos % SEGMENT_IDS] = cid

    def finish(self) -> bytes:
        while len(self.out) * SEGMENT_IDS < self.nblocks:
            self._close_segment()
        return b"".join(self.out)

    def _length(self, k: int) -> int:
        return min(SEGMENT_IDS, self.nblocks - k * SEGMENT_IDS)

    def _open_segment(self, k: int) -> list[bytes | None]:
        ids: list[bytes | None] = list(self.store.chunk_ids(self.base[k])) if k < len(self.base) else []
        length = self._length(k)
        return (ids + [None] * length)[:length]

    def _close_segment(self) -> None:
        k = len(self.out)
        if self.current is None:
            if k < len(self.base) and len(self.store.chunk_ids(self.base[k])) == self._length(k):
                self.out.append(self.base[k])     # untouched: share the base segment as it is
                return
            self.current = self._open_segment(k)
        if any(c is None for c in self.current):
            raise StorageError("replication stream corrupt: a file has blocks that neither the stream nor "
                               "the base snapshot provides; nothing was published", code="corrupt")
        ids = [c for c in self.current if c is not None]
        missing = self.store.missing(ids)
        if missing:
            raise StorageError(f"replication stream refers to chunk {next(iter(missing)).hex()[:16]} that it "
                               f"did not carry and this store lacks; nothing was published", code="corrupt")
        self.out.append(self.store.put_segments(ids))
        self.current = None


def _blocks(size: int) -> int:
    return (size + BLOCK_SIZE - 1) // BLOCK_SIZE


def _settle_tree(tree: Path, entries: Iterable[Entry]) -> None:
    """Give a tree made from manifest entries their owners (as root), modes and times; directories last,
    deepest first: a read-only directory could not be filled, and writing into a directory bumps its mtime."""
    ordered = sorted(entries, key=lambda e: e.path)
    as_root = os.geteuid() == 0
    for e in ordered:
        if e.kind == "h":
            continue                    # the same inode as the file it names
        if as_root:
            os.lchown(tree / e.path, e.uid, e.gid)
        if e.kind == "f":
            os.chmod(tree / e.path, e.mode)     # after lchown, which clears set-user-ID bits
    for e in reversed(ordered):
        if e.kind == "d":
            os.chmod(tree / e.path, e.mode)
        os.utime(tree / e.path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


class _Copier:
    """Writes the copies of a base's files on a thread of its own, so that copying overlaps reading and
    hashing, straight from the chunk store's read buffers (put_file's tee: no copy of the bytes in between);
    at most a few batches wait. The base is synced after the snapshot has answered
    (EmbeddedDriver._settle_later); errors (a full disk) surface at the next call or at close.

    Each batch is written direct (O_DIRECT, around the page cache) while the copy keeps up. Once batches
    wait behind it, each goes the way that took less time per byte lately. Neither way is cheaper
    everywhere (bench/README.md): a direct write costs no CPU but waits for the device, so on a slow disk
    direct copies held the snapshot until the device had both copies (0.08x the bare read+hash loop, against
    0.12-0.13x buffered); a buffered write costs a copy into freshly allocated page-cache pages, which on a
    machine that hands freed memory back to its host took 2.4-3 ms a MiB against 1.1-1.3 ms direct, so that
    a copy sent to the page cache whenever it fell behind fell further behind and stayed there (snapshots of
    700-840 ms against 370-430 ms direct)."""

    _WAITING = 8            # batches queued before the reader waits
    _BEHIND = 2             # batches queued behind a write that make the copy choose by cost
    _RETRY = 16             # behind, every 16th batch goes the costlier way again (costs move)

    def __init__(self, direct: bool) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="base-copy")
        self._jobs: deque[Future[None]] = deque()
        self._direct = direct           # whether the filesystem takes direct writes at all
        self._queued = 0        # batches handed over (the reader's count) ...
        self._started = 0       # ... and begun (the copy thread's): one writer each, so no lock
        self._cost: dict[bool, float] = {}     # seconds per byte each way took lately (True: direct)
        self._choices = 0       # batches that waited behind a write, so that chose by cost

    def open(self, path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def tee(self, fd: int) -> Tee:
        """A tee for ChunkStore.put_file that writes a file's batches, one after another, to its copy open at
        fd, and lets go of each read buffer once its write is done."""
        offset = 0

        def write_next(buf: mmap.mmap, n: int, ids: list[bytes], done: Callable[[], None]) -> None:
            nonlocal offset
            at, offset = offset, offset + n

            def write_then_let_go() -> None:
                self._started += 1
                try:
                    direct = self._way(n)
                    _set_direct(fd, direct)
                    start = time.perf_counter()
                    written = _write_blocks(fd, at, memoryview(buf)[:n], ids)
                    if written:         # a batch of holes says nothing of what a way costs
                        spent = (time.perf_counter() - start) / written
                        last = self._cost.get(direct)
                        self._cost[direct] = spent if last is None else last + (spent - last) / 4
                finally:
                    done()

            self._queued += 1
            self._submit(write_then_let_go)
        return write_next

    def _way(self, n: int) -> bool:
        """Whether the next batch (n bytes) is written direct (the copy thread's)."""
        if not self._direct or n % ALIGN:
            return False        # a direct write is whole pages: a file's unaligned tail goes through the page cache
        if self._queued - self._started < self._BEHIND:
            return True
        self._choices += 1
        return _direct_when_behind(self._cost, self._choices % self._RETRY == 0)

    def close_file(self, fd: int, size: int) -> None:
        self._submit(_finish_copy, fd, size)

    def abandon(self, fd: int) -> None:
        """Close a copy that will not be finished (after the writes already queued for it)."""
        self._jobs.append(self._pool.submit(os.close, fd))

    def _submit(self, fn: Any, *args: Any) -> None:
        """Hand a job over, then raise the error of a finished one that failed (a full disk), if any. The job
        is handed over first so that what it would do (let go of a read buffer, close a copy) is done in
        any case: a job never run left a copy open, and its blocks allocated after the failed base was
        removed."""
        self._jobs.append(self._pool.submit(fn, *args))
        while self._jobs and (len(self._jobs) > self._WAITING or self._jobs[0].done()):
            self._jobs.popleft().result()

    def close(self) -> None:
        """Wait for every copy; the first error is raised once every job has ended."""
        error: BaseException | None = None
        while self._jobs:
            try:
                self._jobs.popleft().result()
            except BaseException as exc:        # noqa: BLE001 - kept for after the others are done
                error = error or exc
        self._pool.shutdown(wait=True)
        if error is not None:
            raise error


def _direct_when_behind(cost: dict[bool, float], retry: bool) -> bool:
    """With batches waiting behind the copy: direct if that took less time per byte lately (``cost``, True
    for direct), the page cache if it has not been tried yet, and with ``retry`` the other way."""
    if False not in cost or True not in cost:
        return False in cost            # try the way not measured yet
    return (cost[True] < cost[False]) != retry


def _write_blocks(fd: int, offset: int, view: memoryview, ids: list[bytes]) -> int:
    """Write one batch of blocks (with their ids) at offset, skipping whole blocks of zeros so that they
    stay holes (as in a file rebuilt from the store); return the bytes written."""
    if _ZERO_ID not in ids:
        _pwrite_all(fd, view, offset)
        return len(view)
    written = 0
    run: int | None = None          # first block of the run of data blocks being gathered
    for j, cid in enumerate([*ids, _ZERO_ID]):       # a sentinel ends the last run
        if cid != _ZERO_ID:
            run = j if run is None else run
        elif run is not None:
            data = view[run * BLOCK_SIZE:j * BLOCK_SIZE]
            _pwrite_all(fd, data, offset + run * BLOCK_SIZE)
            written += len(data)
            run = None
    return written


def _set_direct(fd: int, direct: bool) -> None:
    """Switch an open file's writes to direct I/O or back (Linux lets O_DIRECT change on an open file)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    wanted = flags | os.O_DIRECT if direct else flags & ~os.O_DIRECT
    if wanted != flags:
        fcntl.fcntl(fd, fcntl.F_SETFL, wanted)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _finish_copy(fd: int, size: int) -> None:
    """Give a copy its length (it may end in a hole) and close it."""
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _syncfs(where: Path) -> None:
    """Make everything written to the filesystem holding ``where`` durable: one call for a whole base, where
    a sync per file would cost a journal commit each (a database directory holds thousands of files)."""
    fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(where))
    finally:
        os.close(fd)


def _base_name(guid: str) -> str:
    """A base's directory name from its snapshot's guid (a received guid is the sender's text: hashed, so
    it is always a plain name)."""
    return hashlib.sha256(guid.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _allocated_bytes(top: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total + os.lstat(top).st_blocks * 512


class _Tally:
    """The bytes a driver call has read or written so far, of ``total``, told to its progress callback."""

    def __init__(self, progress: d.BytesProgress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def add(self, n: int) -> None:
        if self.progress is not None and n:
            self.done += n
            self.progress(self.done, self.total)


def _tree_bytes(top: Path) -> int:
    """The bytes of the regular files under ``top`` (a file with several names once): what a snapshot reads."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirnames, filenames in os.walk(top):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and (st.st_nlink == 1 or (st.st_dev, st.st_ino) not in seen):
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _reflink(source: Path, target: Path) -> None:
    """Make target a reflink of source: a new file sharing source's extents until either is written."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())


def _has_reflinks(scratch_dir: Path) -> bool:
    """Whether the filesystem under scratch_dir can reflink files (FICLONE); probed with two tiny files."""
    probe = scratch_dir / f"reflink-probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"x" * 4096)
        _reflink(probe, probe.with_suffix(".clone"))
        return True
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS):
            return False
        raise
    finally:
        for p in (probe, probe.with_suffix(".clone")):
            p.unlink(missing_ok=True)


def _extent_split(top: Path) -> tuple[int, int]:
    """(exclusive, shared) bytes of a tree's files by their extents (FIEMAP); directories are exclusive."""
    exclusive = shared = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            own, common = _file_extents(full)
            exclusive += own
            shared += common
        for name in dirnames:
            exclusive += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return exclusive, shared


def _inode_split(top: Path) -> tuple[int, int]:
    """(exclusive, shared) blocks of a tree, each file once: a file with names outside the tree (a hard
    link from another base) is shared."""
    names: Counter[tuple[int, int]] = Counter()
    files: dict[tuple[int, int], os.stat_result] = {}
    exclusive = os.lstat(top).st_blocks * 512
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                names[(st.st_dev, st.st_ino)] += 1
                files[(st.st_dev, st.st_ino)] = st
            else:
                exclusive += st.st_blocks * 512
    shared = 0
    for key, st in files.items():
        if st.st_nlink > names[key]:
            shared += st.st_blocks * 512
        else:
            exclusive += st.st_blocks * 512
    return exclusive, shared


def _file_extents(path: str) -> tuple[int, int]:
    """(exclusive, shared) bytes of one file's extents, from the FIEMAP ioctl."""
    exclusive = shared = 0
    start = 0
    with open(path, "rb") as f:
        while True:
            buf = bytearray(_FIEMAP_HEAD.pack(start, 0xFFFFFFFFFFFFFFFF, 0, 0, _FIEMAP_BATCH, 0)
                            + bytes(_FIEMAP_EXTENT.size * _FIEMAP_BATCH))
            fcntl.ioctl(f.fileno(), _FS_IOC_FIEMAP, buf)
            mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
            if mapped == 0:
                return exclusive, shared
            for i in range(mapped):
                logical, _, length, _, _, flags, _, _, _ = _FIEMAP_EXTENT.unpack_from(
                    buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
                if flags & _FIEMAP_EXTENT_SHARED:
                    shared += length
                else:
                    exclusive += length
                start = logical + length
                if flags & _FIEMAP_EXTENT_LAST:
                    return exclusive, shared


def _remove_tree(path: Path) -> None:
    # Trees materialized from snapshots may hold read-only directories; make them writable to delete them.
    def onerror(func: Any, p: str, exc: Any) -> None:
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=onerror)
    elif path.exists() or path.is_symlink():
        path.unlink()
