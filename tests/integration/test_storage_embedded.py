"""What only the embedded driver does: diffs as set operations, garbage collection, holds during a send,
per-chunk verification on receive, and surviving a restart."""

from __future__ import annotations

import os

import pytest

from agents.storage.driver import StorageError
from agents.storage.embedded import BLOCK_SIZE, EmbeddedDriver
from agents.storage.stream import write_stream


@pytest.fixture
def store(tmp_path):
    drv = EmbeddedDriver(tmp_path / "store")
    yield drv
    drv.close()


def test_diff_and_dedupe(store):
    store.create_volume("db")
    live = store.path("db")
    page = os.urandom(BLOCK_SIZE)
    (live / "a").write_bytes(page * 64)          # 64 identical pages: one chunk
    (live / "b").write_bytes(os.urandom(BLOCK_SIZE * 4))
    store.snapshot("db", "s1")
    assert store.store_stats()["chunks"] == 5
    (live / "b").unlink()
    (live / "c").write_bytes(page)
    with open(live / "a", "r+b") as f:
        f.seek(BLOCK_SIZE * 10)
        f.write(os.urandom(BLOCK_SIZE))
    store.snapshot("db", "s2")
    diff = store.diff("db", "s1", "s2")
    assert diff.added == {"c"} and diff.removed == {"b"} and diff.modified == {"a"}
    assert diff.new_chunks == 1


def test_destroy_collects_unreferenced_chunks(store):
    store.create_volume("db")
    (store.path("db") / "f").write_bytes(os.urandom(BLOCK_SIZE * 8))
    store.snapshot("db", "s1")
    (store.path("db") / "f").write_bytes(os.urandom(BLOCK_SIZE * 8))
    store.snapshot("db", "s2")
    assert store.store_stats()["chunks"] == 16
    store.destroy_snapshot("db", "s1")
    assert store.store_stats()["chunks"] == 8
    store.destroy_snapshot("db", "s2")
    assert store.store_stats() == {"chunks": 0, "logical_bytes": 0, "stored_bytes": 0}


def test_snapshot_being_sent_cannot_be_destroyed(store):
    store.create_volume("db")
    (store.path("db") / "f").write_bytes(os.urandom(BLOCK_SIZE * 100))
    store.snapshot("db", "s1")
    stream = store.send("db", "s1")
    first = next(stream)
    with pytest.raises(StorageError) as err:
        store.destroy_snapshot("db", "s1")
    assert err.value.code == "busy"
    rest = b"".join(stream)
    assert len(first) + len(rest) > BLOCK_SIZE * 100
    store.destroy_snapshot("db", "s1")
    assert store.list_snapshots("db") == []


def test_chunk_that_does_not_match_its_id_is_refused(store, tmp_path):
    # The framing is intact (the end checksum matches), but a chunk lies about its content.
    header = {"driver": "embedded", "volume": "db", "to_snap": "s1", "to_guid": "g1", "from_snap": None,
              "from_guid": None}
    frames = [{"t": "chunk", "id": b"\0" * 32, "z": 0, "d": b"not what the id says"}]
    with pytest.raises(StorageError) as err:
        store.receive("db", "s1", write_stream(header, frames))
    assert err.value.code == "corrupt" and "does not match its id" in str(err.value)
    assert store.list_volumes() == [] and store.store_stats()["chunks"] == 0


def test_state_survives_a_restart(tmp_path):
    drv = EmbeddedDriver(tmp_path / "store")
    drv.create_volume("db")
    (drv.path("db") / "f").write_bytes(b"hello" * 5000)
    drv.snapshot("db", "s1")
    drv.close()
    again = EmbeddedDriver(tmp_path / "store")
    try:
        assert [s.name for s in again.list_snapshots("db")] == ["s1"]
        again.clone("db", "s1", "dev")
        assert (again.path("dev") / "f").read_bytes() == b"hello" * 5000
    finally:
        again.close()


def test_replica_has_no_writable_tree(store, tmp_path):
    store.create_volume("db")
    store.snapshot("db", "s1")
    other = EmbeddedDriver(tmp_path / "other")
    try:
        other.receive("db", "s1", store.send("db", "s1"))
        assert other.list_volumes()[0].kind == "replica"
        with pytest.raises(StorageError, match="clone one of them"):
            other.path("db")
        with pytest.raises(StorageError, match="replica"):
            other.snapshot("db", "s2")
    finally:
        other.close()


def test_names_that_are_not_utf8(store, tmp_path):
    """File names and symlink targets are bytes on POSIX: one that is not valid UTF-8 is snapshotted,
    cloned, replicated (full and incremental), deleted and restarted over with its bytes intact."""
    store.create_volume("db")
    top = os.fsencode(store.path("db"))
    odd = b"caf\xe9-latin1.dat"                       # Latin-1, invalid as UTF-8
    odd_dir = b"dir-\xff\xfe"
    os.mkdir(os.path.join(top, odd_dir))
    with open(os.path.join(top, odd_dir, odd), "wb") as f:
        f.write(os.urandom(BLOCK_SIZE * 3))
    with open(os.path.join(top, b"plain"), "wb") as f:
        f.write(b"plain")
    os.symlink(b"target-\x80", os.path.join(top, b"link-\x81"))
    store.snapshot("db", "s1")

    def tree(root: bytes) -> dict[bytes, bytes]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                out[rel] = (b"->" + os.readlink(full) if os.path.islink(full) else
                            b"<dir>" if os.path.isdir(full) else open(full, "rb").read())
        return out

    expected = tree(top)
    assert os.path.join(odd_dir, odd) in expected and expected[b"link-\x81"] == b"->target-\x80"
    store.clone("db", "s1", "c1")
    assert tree(os.fsencode(store.path("c1"))) == expected

    other = EmbeddedDriver(tmp_path / "other")
    try:
        other.receive("db", "s1", store.send("db", "s1"))
        other.clone("db", "s1", "r1")
        assert tree(os.fsencode(other.path("r1"))) == expected
        # Incremental: the odd file changes, the odd link goes away.
        with open(os.path.join(top, odd_dir, odd), "r+b") as f:
            f.write(os.urandom(BLOCK_SIZE))
        os.unlink(os.path.join(top, b"link-\x81"))
        store.snapshot("db", "s2")
        expected2 = tree(top)
        other.receive("db", "s2", store.send("db", "s2", from_snap="s1"))
        other.clone("db", "s2", "r2")
        assert tree(os.fsencode(other.path("r2"))) == expected2
        assert other.diff("db", "s1", "s2").removed == {os.fsdecode(b"link-\x81")}
    finally:
        other.close()
    store.close()
    reopened = EmbeddedDriver(tmp_path / "store")
    try:
        reopened.clone("db", "s2", "c2")
        assert tree(os.fsencode(reopened.path("c2"))) == expected2
    finally:
        reopened.close()
