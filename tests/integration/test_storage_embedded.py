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
