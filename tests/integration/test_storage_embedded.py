"""What only the embedded driver does: diffs as set operations, garbage collection, holds during a send,
per-chunk verification on receive, and surviving a restart."""

from __future__ import annotations

import os
import sqlite3
from collections import Counter

import pytest

from agents.storage.chunkstore import split_ids
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


def _sharing_both_ways(drv: EmbeddedDriver, volume: str, snap: str) -> tuple[bool, tuple[int, int], tuple[int, int]]:
    """Whether the chunk store may answer a snapshot's sharing from its last commit, that answer, and the
    answer of the lookup per chunk."""
    counts = drv._segment_counts(drv._snapshot_row(volume, snap)[0])
    committed = drv.store._committed
    shortcut = committed is not None and committed.all_new(counts)
    quick = drv.store.sharing(counts)
    drv.store._committed = None
    return shortcut, quick, drv.store.sharing(counts)


def test_a_snapshot_of_new_chunks_answers_its_sharing_without_a_lookup_per_chunk(store, tmp_path):
    """A snapshot whose chunks its own commit inserted takes its exclusive bytes from that commit; the answer is
    the one the lookup per chunk gives, and the shortcut is not taken where a chunk was stored before (the same
    pages in new segments, a receive, an unchanged segment)."""
    store.create_volume("db")
    pages = [os.urandom(BLOCK_SIZE) for _ in range(5000)]
    # Repeats within one batch of index rows and across batches (4,096 rows go in at a time), and zero pages.
    layout = pages + [pages[1]] * 3 + [pages[4500]] * 2 + [bytes(BLOCK_SIZE)] * 50 + pages[:10]
    (store.path("db") / "table").write_bytes(b"".join(layout))
    (store.path("db") / "empty").write_bytes(b"")
    info = store.snapshot("db", "s1", for_clones=False)
    shortcut, quick, looked_up = _sharing_both_ways(store, "db", "s1")
    assert shortcut and quick == looked_up and looked_up[1] == 0, (quick, looked_up)
    assert (info.exclusive_bytes, info.shared_bytes) == looked_up
    assert looked_up[0] >= 5000 * BLOCK_SIZE, looked_up

    # The same pages in another order: new segments, but every chunk was stored before, so all are shared.
    store.create_volume("copy")
    (store.path("copy") / "table").write_bytes(b"".join(reversed(pages)))
    info = store.snapshot("copy", "s1", for_clones=False)
    shortcut, quick, looked_up = _sharing_both_ways(store, "copy", "s1")
    assert not shortcut and quick == looked_up == (info.exclusive_bytes, info.shared_bytes)
    assert looked_up[0] == 0 and looked_up[1] >= 5000 * BLOCK_SIZE, looked_up

    # A few pages changed: unchanged segments are the earlier snapshot's.
    with open(store.path("db") / "table", "r+b") as f:
        f.seek(BLOCK_SIZE * 7)
        f.write(os.urandom(BLOCK_SIZE))
    store.snapshot("db", "s2", for_clones=False)
    shortcut, quick, looked_up = _sharing_both_ways(store, "db", "s2")
    assert not shortcut and quick == looked_up and looked_up[1] > 0, looked_up

    # A received snapshot: its chunks came off the stream, not through the dedupe of an ingest (here the
    # receiving store holds most of them already, from another volume).
    other = EmbeddedDriver(tmp_path / "other")
    try:
        other.receive("copy", "s1", store.send("copy", "s1"))
        other.receive("db", "s1", store.send("db", "s1"))
        shortcut, quick, looked_up = _sharing_both_ways(other, "db", "s1")
        assert not shortcut and quick == looked_up and looked_up[1] >= 5000 * BLOCK_SIZE, looked_up
    finally:
        other.close()

    # Chunks off a stream in a transaction that also put blocks no segment names: the counts could match.
    store.create_volume("small")
    (store.path("small") / "f").write_bytes(os.urandom(BLOCK_SIZE * 20))
    store.snapshot("small", "s1", for_clones=False)
    third = EmbeddedDriver(tmp_path / "third")
    try:
        third.store.put_blocks([os.urandom(BLOCK_SIZE) for _ in range(20)])
        third.receive("small", "s1", store.send("small", "s1"))
        shortcut, quick, looked_up = _sharing_both_ways(third, "small", "s1")
        assert not shortcut and quick == looked_up == (20 * BLOCK_SIZE, 0), looked_up
    finally:
        third.close()

    # Anything written after the commit ends the shortcut: destroying another snapshot moves references.
    store.create_volume("fresh")
    (store.path("fresh") / "f").write_bytes(os.urandom(BLOCK_SIZE * 20))
    store.snapshot("fresh", "s1", for_clones=False)
    store.destroy_snapshot("db", "s2")
    shortcut, quick, looked_up = _sharing_both_ways(store, "fresh", "s1")
    assert not shortcut and quick == looked_up == (20 * BLOCK_SIZE, 0), looked_up

    # Segments the same transaction inserted that the snapshot does not reference (a file read again because
    # it changed while it was read): their references make the chunks they share with it shared.
    store.create_volume("reread")
    (store.path("reread") / "f").write_bytes(os.urandom(BLOCK_SIZE * 20))
    data = (store.path("reread") / "f").read_bytes()
    first_read = store.store.put_blocks([data[i:i + BLOCK_SIZE] for i in range(0, len(data), BLOCK_SIZE)])
    store.store.put_segments(first_read[:10])
    store.store.put_segments(first_read[10:])
    store.snapshot("reread", "s1", for_clones=False)
    shortcut, quick, looked_up = _sharing_both_ways(store, "reread", "s1")
    assert not shortcut and quick == looked_up == (0, 20 * BLOCK_SIZE), looked_up


def _sharing_chunk_by_chunk(drv: EmbeddedDriver, volume: str, snap: str) -> tuple[int, int]:
    """A snapshot's (exclusive, shared) bytes counted chunk by chunk, as the definition reads."""
    counts = drv._segment_counts(drv._snapshot_row(volume, snap)[0])
    own: Counter[bytes] = Counter()
    reached: set[bytes] = set()
    for sid, n in counts.items():
        ids, refs = drv.db.execute("SELECT ids, refs FROM segments WHERE id = ?", (sid,)).fetchone()
        reached.update(split_ids(ids))
        if refs <= n:
            own.update(split_ids(ids))
    exclusive = shared = 0
    for cid in reached:
        length, refs = drv.db.execute("SELECT len, refs FROM chunks WHERE id = ?", (cid,)).fetchone()
        if refs <= own[cid]:
            exclusive += length
        else:
            shared += length
    return exclusive, shared


def test_segments_shared_with_other_snapshots_are_counted_once_and_kept(store, tmp_path):
    """An incremental snapshot's shared bytes come from the byte counts of the segments it shares, counted
    the first time they are needed and kept (a store from before the column gets it); the figures are the
    ones counting chunk by chunk gives."""
    store.create_volume("db")
    (store.path("db") / "table").write_bytes(os.urandom(BLOCK_SIZE * 3000))     # 3 segments
    store.snapshot("db", "s1", for_clones=False)
    with open(store.path("db") / "table", "r+b") as f:
        f.seek(BLOCK_SIZE * 5)
        f.write(os.urandom(BLOCK_SIZE))
    info = store.snapshot("db", "s2", for_clones=False)
    expected = _sharing_chunk_by_chunk(store, "db", "s2")
    assert (info.exclusive_bytes, info.shared_bytes) == expected and expected[1] >= 1900 * BLOCK_SIZE, expected
    counted = store.db.execute("SELECT count(*), sum(bytes) FROM segments WHERE bytes IS NOT NULL").fetchone()
    assert counted == (2, 3000 * BLOCK_SIZE - 1024 * BLOCK_SIZE), counted   # the two unchanged segments
    listed = {s.name: (s.exclusive_bytes, s.shared_bytes) for s in store.list_snapshots("db")}
    assert listed == {"s1": _sharing_chunk_by_chunk(store, "db", "s1"), "s2": expected}, listed
    store.close()

    # A store from before segments.bytes: the column is added, empty, and filled as figures are asked for.
    db = sqlite3.connect(tmp_path / "store" / "store.sqlite")
    db.execute("ALTER TABLE segments DROP COLUMN bytes")
    db.commit()
    db.close()
    again = EmbeddedDriver(tmp_path / "store")
    try:
        assert again.db.execute("SELECT count(*) FROM segments WHERE bytes IS NOT NULL").fetchone() == (0,)
        listed_again = {s.name: (s.exclusive_bytes, s.shared_bytes) for s in again.list_snapshots("db")}
        assert listed_again == listed, listed_again
    finally:
        again.close()
