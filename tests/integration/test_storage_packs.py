"""Crash safety and space reclamation of the embedded store's pack files: a snapshot killed mid-write leaves
nothing visible, a torn or uncommitted append is cut back and never referenced, committed data that went
missing or changed is reported as corrupt on read (never served), dedupe writes nothing twice, and
destroying snapshots gives the pack space back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agents.storage.driver import StorageError
from agents.storage.embedded import BLOCK_SIZE, EmbeddedDriver
from agents.storage.packs import HEADER, MAGIC

REPO = Path(__file__).resolve().parents[2]


def packs(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted((root / "packs").glob("*.pack"))}


def committed(drv: EmbeddedDriver) -> dict[str, int]:
    return {f"{pid:08d}.pack": size for pid, size in drv.db.execute("SELECT id, size FROM packs ORDER BY id")}


@pytest.fixture
def root(tmp_path):
    return tmp_path / "store"


def test_snapshot_killed_mid_write_leaves_nothing(root, tmp_path):
    """A real process is SIGKILLed while a snapshot's chunks stream into the pack: on reopen the earlier
    snapshot is intact, the killed one never existed, and the pack is back at its committed length."""
    drv = EmbeddedDriver(root)
    drv.create_volume("db")
    first = os.urandom(BLOCK_SIZE * 64)
    (drv.path("db") / "small").write_bytes(first)
    drv.snapshot("db", "s1")
    stats, before = drv.store_stats(), packs(root)
    (drv.path("db") / "big").write_bytes(os.urandom(96 << 20))
    drv.close()

    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from agents.storage.embedded import EmbeddedDriver
        EmbeddedDriver({str(root)!r}).snapshot("db", "s2")
        print("finished", flush=True)
        """)], stdout=subprocess.PIPE)
    try:
        # Kill once the pack has grown well past its committed size: the snapshot commits only after all
        # 96 MiB are written, so this is mid-ingest.
        deadline = time.monotonic() + 60
        while sum(packs(root).values()) < sum(before.values()) + (8 << 20):
            assert child.poll() is None, "the snapshot finished before it could be interrupted"
            assert time.monotonic() < deadline, "the child never started writing"
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        out = child.communicate()[0]
    assert b"finished" not in out

    grown = packs(root)
    assert sum(grown.values()) > sum(before.values())          # the torn append is on disk ...
    again = EmbeddedDriver(root)
    try:
        assert packs(root) == before == committed(again)       # ... and is cut off on open
        assert [s.name for s in again.list_snapshots("db")] == ["s1"]
        assert again.store_stats() == stats
        again.clone("db", "s1", "dev")
        assert sorted(p.name for p in again.path("dev").iterdir()) == ["small"]
        assert (again.path("dev") / "small").read_bytes() == first
        # The store goes on working: the same snapshot now succeeds.
        again.snapshot("db", "s2")
        again.clone("db", "s2", "dev2")
        assert (again.path("dev2") / "big").read_bytes() == (again.path("db") / "big").read_bytes()
    finally:
        again.close()


def test_torn_uncommitted_append_is_cut_back_and_never_referenced(root):
    drv = EmbeddedDriver(root)
    drv.create_volume("db")
    data = os.urandom(BLOCK_SIZE * 10)
    (drv.path("db") / "f").write_bytes(data)
    drv.snapshot("db", "s1")
    before = packs(root)
    drv.close()
    # What a crash mid-append leaves: a whole record for a chunk nothing names, then a header whose data
    # was cut short.
    (pack,) = (root / "packs").glob("*.pack")
    with open(pack, "ab") as f:
        f.write(HEADER.pack(b"\1" * 32, 0, BLOCK_SIZE, BLOCK_SIZE) + os.urandom(BLOCK_SIZE))
        f.write(HEADER.pack(b"\2" * 32, 0, BLOCK_SIZE, BLOCK_SIZE) + os.urandom(100))
    again = EmbeddedDriver(root)
    try:
        assert packs(root) == before
        assert again.store.missing([b"\1" * 32, b"\2" * 32]) == {b"\1" * 32, b"\2" * 32}
        (again.path("db") / "g").write_bytes(os.urandom(BLOCK_SIZE * 3))
        again.snapshot("db", "s2")                # appends where the committed data ends
        again.clone("db", "s2", "dev")
        assert (again.path("dev") / "f").read_bytes() == data
        assert (again.path("dev") / "g").read_bytes() == (again.path("db") / "g").read_bytes()
    finally:
        again.close()


def test_pack_file_left_by_an_uncommitted_transaction_is_removed(root):
    drv = EmbeddedDriver(root)
    drv.create_volume("db")
    (drv.path("db") / "f").write_bytes(os.urandom(BLOCK_SIZE * 4))
    drv.snapshot("db", "s1")
    before = packs(root)
    drv.close()
    # A pack created by an ingest (or a compaction) whose commit never happened, or an old pack whose
    # deletion a crash interrupted after the commit: no row names it.
    (root / "packs" / "00000099.pack").write_bytes(MAGIC + b"x" * 1000)
    again = EmbeddedDriver(root)
    try:
        assert packs(root) == before
        again.clone("db", "s1", "dev")
    finally:
        again.close()


def test_committed_data_that_went_missing_is_reported_not_served(root):
    drv = EmbeddedDriver(root)
    drv.create_volume("db")
    data = os.urandom(BLOCK_SIZE * 16)
    (drv.path("db") / "f").write_bytes(data)
    drv.snapshot("db", "s1")
    (drv.path("db") / "f").write_bytes(b"since")
    drv.close()
    (pack,) = (root / "packs").glob("*.pack")
    os.truncate(pack, pack.stat().st_size - BLOCK_SIZE)      # the disk lost the end of committed data
    again = EmbeddedDriver(root)
    try:
        assert packs(root)[pack.name] < committed(again)[pack.name]    # never "repaired" by cutting more
        # A rollback rebuilds the tree from the chunk store (as does a clone where the snapshot has no base).
        with pytest.raises(StorageError) as err:
            again.rollback("db", "s1")
        assert err.value.code == "corrupt" and "restore" in str(err.value)
        assert (again.path("db") / "f").read_bytes() == b"since"
        if not (again.reflinks or again.overlays):
            with pytest.raises(StorageError) as err:
                again.clone("db", "s1", "dev")
            assert err.value.code == "corrupt" and "restore" in str(err.value)
            assert "dev" not in [v.name for v in again.list_volumes()]
        else:       # a clone lies over the base the snapshot made as it was taken: the data as captured
            again.clone("db", "s1", "dev")
            assert (again.path("dev") / "f").read_bytes() == data
            again.destroy_clone("dev")
        # New data never goes into the damaged pack: it is appended to a new one and reads back.
        (again.path("db") / "f").write_bytes(b"fresh" * 5000)
        again.snapshot("db", "s2")
        assert packs(root)[pack.name] < committed(again)[pack.name] and len(packs(root)) == 2
        again.clone("db", "s2", "dev2")
        assert (again.path("dev2") / "f").read_bytes() == b"fresh" * 5000
    finally:
        again.close()


def test_a_changed_byte_in_a_pack_fails_the_read(root, tmp_path):
    drv = EmbeddedDriver(root)
    drv.create_volume("db")
    (drv.path("db") / "f").write_bytes(os.urandom(BLOCK_SIZE * 8))
    drv.snapshot("db", "s1")
    drv.close()
    (pack,) = (root / "packs").glob("*.pack")
    raw = bytearray(pack.read_bytes())
    raw[len(MAGIC) + HEADER.size + 5 * (HEADER.size + BLOCK_SIZE) + 100] ^= 0x01   # inside chunk 6's data
    pack.write_bytes(bytes(raw))
    again = EmbeddedDriver(root)
    try:
        # A rollback rebuilds the tree from the chunk store (as does a clone where the snapshot has no base).
        with pytest.raises(StorageError, match="does not match its id") as err:
            again.rollback("db", "s1")
        assert err.value.code == "corrupt"
        other = EmbeddedDriver(tmp_path / "other")
        try:
            with pytest.raises(StorageError, match="does not match its id"):
                other.receive("db", "s1", again.send("db", "s1"))     # refused at the source already
            assert other.list_volumes() == []
        finally:
            other.close()
    finally:
        again.close()


def test_failed_receive_gives_back_its_pack_bytes(root, tmp_path):
    drv = EmbeddedDriver(root)
    try:
        drv.create_volume("db")
        (drv.path("db") / "f").write_bytes(os.urandom(12 << 20))    # more than one batch reaches the pack
        drv.snapshot("db", "s1")
        stats = drv.store_stats()
        stream = b"".join(drv.send("db", "s1"))
    finally:
        drv.close()
    other = EmbeddedDriver(tmp_path / "other")
    try:
        with pytest.raises(StorageError) as err:
            other.receive("db", "s1", [stream[:-10]])
        assert err.value.code == "corrupt"
        assert sum(packs(tmp_path / "other").values()) <= len(MAGIC)
        assert other.store_stats()["chunks"] == 0 and other.list_volumes() == []
        other.receive("db", "s1", [stream])
        assert other.store_stats() == stats
        assert packs(tmp_path / "other") == committed(other)
    finally:
        other.close()


def test_dedupe_writes_nothing_twice(root):
    drv = EmbeddedDriver(root)
    try:
        drv.create_volume("db")
        page = os.urandom(BLOCK_SIZE)
        (drv.path("db") / "f").write_bytes(page * 100 + os.urandom(BLOCK_SIZE * 20))
        drv.snapshot("db", "s1")
        after_first = packs(root)
        assert sum(after_first.values()) < 25 * (BLOCK_SIZE + HEADER.size)      # 21 distinct blocks
        drv.snapshot("db", "s2")
        drv.clone("db", "s1", "dev")
        (drv.path("dev") / "copy").write_bytes((drv.path("db") / "f").read_bytes())
        drv.snapshot("dev", "s1")
        assert packs(root) == after_first
    finally:
        drv.close()


def test_destroy_reclaims_pack_space(root):
    drv = EmbeddedDriver(root)
    try:
        drv.create_volume("db")
        live = drv.path("db")
        (live / "old").write_bytes(os.urandom(6 << 20))
        drv.snapshot("db", "s1")
        (live / "old").unlink()
        keep = os.urandom(2 << 20)
        (live / "new").write_bytes(keep)
        drv.snapshot("db", "s2")
        assert sum(packs(root).values()) > 8 << 20
        drv.destroy_snapshot("db", "s1")
        # The pack was three-quarters dead: its live records were copied out and it was deleted.
        assert (2 << 20) < sum(packs(root).values()) < (2 << 20) + (256 << 10)
        assert packs(root) == committed(drv)
        drv.clone("db", "s2", "dev")
        assert (drv.path("dev") / "new").read_bytes() == keep
        drv.destroy_clone("dev")
        drv.destroy_snapshot("db", "s2")
        assert sum(packs(root).values()) == 0
        assert drv.store_stats() == {"chunks": 0, "logical_bytes": 0, "stored_bytes": 0}
        # And the store is still usable after everything was reclaimed.
        drv.snapshot("db", "s3")
        drv.clone("db", "s3", "dev")
        assert (drv.path("dev") / "new").read_bytes() == keep
    finally:
        drv.close()


def test_state_survives_restart_after_compaction(root):
    drv = EmbeddedDriver(root)
    drv.create_volume("db")
    live = drv.path("db")
    (live / "a").write_bytes(os.urandom(3 << 20))
    drv.snapshot("db", "s1")
    b = os.urandom(1 << 20)
    (live / "a").unlink()
    (live / "b").write_bytes(b)
    drv.snapshot("db", "s2")
    drv.destroy_snapshot("db", "s1")
    drv.close()
    again = EmbeddedDriver(root)
    try:
        assert packs(root) == committed(again)
        again.clone("db", "s2", "dev")
        assert (again.path("dev") / "b").read_bytes() == b
    finally:
        again.close()
