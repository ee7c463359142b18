"""The btrfs storage driver: volumes and clones are subvolumes, snapshots are read-only subvolume snapshots
(atomic, point-in-time even with writers running), replication is `btrfs send [-p parent]` / `btrfs
receive` wrapped in the framed, checksummed stream of stream.py. Needs root and a btrfs filesystem.

Layout under the driver root: volumes/<name> (writable subvolumes: volumes and clones),
snapshots/<volume>/<snap>/tree (read-only subvolumes, each in a plain directory: a read-only subvolume
cannot be moved to another parent directory, but the plain directory around it can, which is how a received
snapshot is published in one rename), snapshots/<volume>/.recv-* and tmp/ (staging, cleared at start),
state.sqlite (what btrfs does not record: kinds, clone origins, replication guids).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import blake3

from agents.storage import driver as d
from agents.storage.catalog import CatalogDriver
from agents.storage.driver import BytesProgress, SnapshotInfo, StorageError
from agents.storage.names import validate_name
from agents.storage.stream import read_frames, write_stream

# `btrfs send` output travels in pieces of this size, each with its BLAKE3 id: a piece costs a frame, a hash
# and a write on both sides, so fewer, larger pieces move the same bytes with less work. The cuts need not
# follow the content: a resumed transfer skips by byte offset, and a regenerated stream is the same bytes.
_PIECE_BYTES = 1 << 20
_PIPE_BYTES = 1 << 20


def _widen_pipe(pipe: Any) -> None:
    """Let a pipe to or from btrfs hold a MiB instead of 64 KiB: fewer wake-ups of each side per byte. Best
    effort: a system whose fs.pipe-max-size is lower keeps the default."""
    try:
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except OSError:
        pass

# The volumes table is the catalog's.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots(
    volume TEXT NOT NULL, name TEXT NOT NULL, guid TEXT NOT NULL, created REAL NOT NULL,
    logical_bytes INTEGER NOT NULL, PRIMARY KEY(volume, name));
"""


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise StorageError(f"{argv[0]} is not installed; install btrfs-progs", code="environment") from None
    if done.returncode != 0:
        raise StorageError(f"`{' '.join(argv)}` failed (exit {done.returncode}): "
                           f"{done.stderr.strip() or done.stdout.strip()}", code="failed")
    return done.stdout


class BtrfsDriver(CatalogDriver):
    name = "btrfs"
    receives_as_it_arrives = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        if os.geteuid() != 0:
            raise StorageError("the btrfs driver needs root (subvolume create/delete and send/receive); run "
                               "the storage agent as root or use the embedded driver", code="environment")
        if shutil.which("btrfs") is None:
            raise StorageError("the btrfs command is missing; install btrfs-progs (apt-get install -y "
                               "btrfs-progs) or use the embedded driver", code="environment")
        probe = self.root
        while not probe.exists():
            probe = probe.parent
        fstype = _run(["stat", "-f", "-c", "%T", str(probe)]).strip()
        if fstype != "btrfs":
            raise StorageError(f"{self.root} is on a {fstype} filesystem, not btrfs; point the btrfs driver at "
                               f"a directory on a mounted btrfs filesystem or use the embedded driver",
                               code="environment")
        for sub in ("volumes", "snapshots", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._open_catalog(self.root / "state.sqlite", _SCHEMA)
        for leftover in [*(self.root / "tmp").iterdir(), *(self.root / "snapshots").glob("*/.recv-*")]:
            self._delete_any(leftover)

    def capabilities(self) -> set[str]:
        caps = {d.CAP_VOLUMES, d.CAP_SNAPSHOTS, d.CAP_CLONES, d.CAP_ROLLBACK, d.CAP_REFRESH, d.CAP_SEND,
                d.CAP_RECEIVE, d.CAP_INCREMENTAL, d.CAP_ATOMIC_SNAPSHOT, d.CAP_REFLINK_CLONES}
        if self._quotas_enabled():
            caps.add(d.CAP_SPACE_EXACT)
        return caps

    # the catalog's tree hooks -------------------------------------------------------------------------
    def _make_volume_tree(self, name: str) -> None:
        _run(["btrfs", "subvolume", "create", str(self.root / "volumes" / name)])

    def _make_clone_tree(self, volume: str, snap: str, clone_name: str, progress: BytesProgress | None) -> None:
        _run(["btrfs", "subvolume", "snapshot", str(self._snapshot_path(volume, snap)),
              str(self.root / "volumes" / clone_name)])

    def _replace_tree(self, name: str, volume: str, snap: str, progress: BytesProgress | None) -> None:
        fresh = self.root / "tmp" / f"fresh-{uuid.uuid4().hex}"
        old = self.root / "tmp" / f"old-{uuid.uuid4().hex}"
        _run(["btrfs", "subvolume", "snapshot", str(self._snapshot_path(volume, snap)), str(fresh)])
        live = self.root / "volumes" / name
        os.rename(live, old)
        os.rename(fresh, live)
        _run(["btrfs", "subvolume", "delete", str(old)])

    def _remove_volume_data(self, name: str) -> None:
        live = self.root / "volumes" / name
        if live.exists():
            _run(["btrfs", "subvolume", "delete", str(live)])
        snapdir = self.root / "snapshots" / name
        if snapdir.exists():
            self._delete_any(snapdir)

    def _capture(self, volume: str, snap: str, progress: BytesProgress | None, for_clones: bool = True) -> None:
        target = self.root / "snapshots" / volume / snap / "tree"
        target.parent.mkdir(parents=True)
        try:
            _run(["btrfs", "subvolume", "snapshot", "-r", str(self.root / "volumes" / volume), str(target)])
        except StorageError:
            target.parent.rmdir()
            raise
        self._record_snapshot(volume, snap, self._uuids(target)[0], target)

    def _drop_snapshot(self, volume: str, snap: str) -> None:
        target = self._snapshot_path(volume, snap)
        _run(["btrfs", "subvolume", "delete", str(target)])
        target.parent.rmdir()

    # send and receive ---------------------------------------------------------------------------------
    def send(self, volume: str, to_snap: str, from_snap: str | None = None) -> Iterator[bytes]:
        with self._lock:
            to_path = self._snapshot_path(volume, to_snap)
            from_path = self._snapshot_path(volume, from_snap) if from_snap is not None else None
            to_guid = self._snapshot_row(volume, to_snap)[2]
            from_guid = self._snapshot_row(volume, from_snap)[2] if from_snap is not None else None
        header = {"driver": self.name, "volume": volume, "to_snap": to_snap, "to_guid": to_guid,
                  "from_snap": from_snap, "from_guid": from_guid}
        argv = ["btrfs", "send", "-q"] + (["-p", str(from_path)] if from_path else []) + [str(to_path)]
        held = [(volume, to_snap)] + ([(volume, from_snap)] if from_snap is not None else [])
        return self._send(header, argv, held)

    def _send(self, header: dict[str, Any], argv: list[str], held: list[tuple[str, str]]) -> Iterator[bytes]:
        with self._holding(held), tempfile.TemporaryFile() as errors:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors)
            _widen_pipe(proc.stdout)
            try:
                yield from write_stream(header, self._data_frames(proc, argv, errors))
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()

    def _data_frames(self, proc: subprocess.Popen[bytes], argv: list[str], errors: Any) -> Iterator[dict]:
        assert proc.stdout is not None
        while data := proc.stdout.read(_PIECE_BYTES):
            yield {"t": "data", "id": blake3.blake3(data).digest(), "d": data}
        if proc.wait() != 0:
            errors.seek(0)
            raise StorageError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): "
                               f"{errors.read().decode(errors='replace').strip()}", code="failed")

    def receive(self, volume: str, snap: str, stream: Iterable[bytes]) -> SnapshotInfo:
        validate_name(volume, "volume name")
        validate_name(snap, "snapshot name")
        # The driver's lock is held to check, and to publish, not while the stream flows: a receive may follow
        # a transfer as it arrives (throttled, for hours), and every other call of the driver needs the lock.
        # The stream goes into a staging directory of its own that nothing else touches.
        with self._lock:
            self._refuse_existing_snapshot(volume, snap)
            staging = self.root / "snapshots" / volume / f".recv-{uuid.uuid4().hex}"
            staging.mkdir(parents=True)
        try:
            return self._receive(volume, snap, stream, staging)
        finally:
            with self._lock:
                self._delete_any(staging)
                if not self.db.execute("SELECT 1 FROM volumes WHERE name = ?", (volume,)).fetchone():
                    # A failed first receive; only if empty: another receive into the same name may be staging
                    with contextlib.suppress(OSError):
                        staging.parent.rmdir()

    def _receive(self, volume: str, snap: str, stream: Iterable[bytes], staging: Path) -> SnapshotInfo:
        frames = read_frames(stream, expect_driver=self.name)
        header = next(frames)
        with self._lock:
            self._receive_base(volume, header)
        argv = ["btrfs", "receive", str(staging)]
        with tempfile.TemporaryFile() as errors:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=errors, stderr=errors)
            assert proc.stdin is not None
            _widen_pipe(proc.stdin)
            try:
                for frame in frames:
                    if frame["t"] != "data":
                        raise StorageError(f"replication stream has unknown frame type {frame['t']!r}; "
                                           f"upgrade this agent", code="unsupported")
                    if blake3.blake3(frame["d"]).digest() != frame["id"]:
                        raise StorageError("replication stream corrupt: a data piece does not match its id; "
                                           "nothing was published, send the stream again", code="corrupt")
                    try:
                        proc.stdin.write(frame["d"])
                    except BrokenPipeError:
                        break       # btrfs receive gave up; its exit status and message follow
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                if proc.wait() != 0:
                    errors.seek(0)
                    raise StorageError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): "
                                       f"{errors.read().decode(errors='replace').strip()}; nothing was "
                                       f"published", code="failed")
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        received = list(staging.iterdir())
        if len(received) != 1:
            raise StorageError(f"btrfs receive produced {len(received)} subvolumes instead of one; nothing "
                               f"was published", code="failed")
        if received[0].name != "tree":
            os.rename(received[0], staging / "tree")      # same parent: allowed for a read-only subvolume
        with self._lock:
            self._refuse_existing_snapshot(volume, snap)    # again: the lock was let go while receiving
            self._ensure_replica(volume)
            os.rename(staging, self.root / "snapshots" / volume / snap)    # the publish: one rename
            self._record_snapshot(volume, snap, header["to_guid"],
                                  self.root / "snapshots" / volume / snap / "tree")
            return self._snapshot_info(volume, snap)

    # internals ----------------------------------------------------------------------------------------
    def _record_snapshot(self, volume: str, snap: str, guid: str, target: Path) -> None:
        logical = sum(os.lstat(os.path.join(dp, f)).st_size for dp, _, fs in os.walk(target) for f in fs)
        self.db.execute("INSERT INTO snapshots(volume, name, guid, created, logical_bytes) "
                        "VALUES (?, ?, ?, ?, ?)", (volume, snap, guid, time.time(), logical))
        self.db.commit()

    def _uuids(self, subvol: Path) -> tuple[str, str | None]:
        """(UUID, Received UUID or None) of a subvolume."""
        fields = {}
        for line in _run(["btrfs", "subvolume", "show", str(subvol)]).splitlines():
            key, _, value = line.strip().partition(":")
            fields[key.strip()] = value.strip()
        received = fields.get("Received UUID")
        return fields["UUID"], None if received in (None, "-") else received

    def _delete_any(self, path: Path) -> None:
        """Remove a staging path, deleting any subvolumes in it (a plain rmtree cannot)."""
        if not path.exists():
            return
        for dirpath, dirnames, _ in os.walk(path, topdown=False):
            for name in dirnames:
                sub = Path(dirpath) / name
                if sub.stat().st_ino == 256:      # inode 256 is the root of a btrfs subvolume
                    subprocess.run(["btrfs", "property", "set", "-ts", str(sub), "ro", "false"],
                                   capture_output=True, check=False)
                    _run(["btrfs", "subvolume", "delete", str(sub)])
        if path.stat().st_ino == 256:
            _run(["btrfs", "subvolume", "delete", str(path)])
        else:
            shutil.rmtree(path)

    def _quotas_enabled(self) -> bool:
        done = subprocess.run(["btrfs", "qgroup", "show", "--raw", str(self.root)], capture_output=True,
                              check=False)
        return done.returncode == 0

    @staticmethod
    def _qgroup(live: Path) -> tuple[int, int] | None:
        """(referenced, exclusive) bytes of the subvolume's own qgroup, or None without quotas."""
        done = subprocess.run(["btrfs", "qgroup", "show", "--raw", "-f", str(live)], capture_output=True,
                              text=True, check=False)
        if done.returncode == 0:
            for line in done.stdout.splitlines():
                parts = line.split()
                if parts and parts[0].startswith("0/"):
                    return int(parts[1]), int(parts[2])
        return None

    def _space(self, live: Path) -> tuple[int, str]:
        if (qgroup := self._qgroup(live)) is not None:
            return qgroup[1], "qgroup-exclusive: bytes only this subvolume holds, as of the last transaction commit"
        total = sum(os.lstat(os.path.join(dp, n)).st_blocks * 512
                    for dp, dns, fns in os.walk(live) for n in dns + fns)
        return total, ("du: allocated blocks, extents shared with snapshots counted in full (enable btrfs "
                       "quotas for exclusive bytes)")

    def _sharing(self, live: Path) -> tuple[int, int]:
        """(exclusive, shared) from the subvolume's qgroup: shared = referenced - exclusive."""
        if (qgroup := self._qgroup(live)) is not None:
            referenced, exclusive = qgroup
            return exclusive, max(0, referenced - exclusive)
        return self._space(live)[0], 0

    def _snapshot_sharing(self, volume: str, snap: str) -> tuple[int, int]:
        return self._sharing(self._snapshot_path(volume, snap))

    def _sharing_method(self) -> str:
        if self._quotas_enabled():
            return "qgroup: exclusive and referenced-minus-exclusive bytes, as of the last transaction commit"
        return "du: btrfs quotas are off, so shared extents are not measured (enable quotas to see them)"

    def _snapshot_path(self, volume: str, snap: str) -> Path:
        self._snapshot_row(volume, snap)
        return self.root / "snapshots" / volume / snap / "tree"
