"""The pack files and the chunk store's transaction rules, on real files and a real SQLite database: appends
are invisible and undone until commit, commit makes them durable before the index names them, recovery cuts
what no commit covers, reads check every record, and packs roll over at their size limit."""

from __future__ import annotations

import ctypes
import os
import sqlite3

import blake3
import pytest

from agents.storage import packs as packs_mod
from agents.storage.chunkstore import SEGMENT_IDS, ChunkStore
from agents.storage.driver import StorageError
from agents.storage.packs import HEADER, MAGIC, PackFiles

BLOCK = 8192


def open_store(tmp_path) -> tuple[sqlite3.Connection, ChunkStore]:
    db = sqlite3.connect(tmp_path / "index.sqlite", check_same_thread=False)
    return db, ChunkStore(db, tmp_path / "packs")


def pack_sizes(tmp_path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (tmp_path / "packs").glob("*.pack")}


def test_abort_undoes_written_chunks(tmp_path):
    db, store = open_store(tmp_path)
    try:
        kept = [os.urandom(BLOCK) for _ in range(4)]
        ids = store.put_blocks(kept)
        store.put_segments(ids)
        store.commit()
        before = pack_sizes(tmp_path)
        dropped = [os.urandom(BLOCK) for _ in range(300)]
        dropped_ids = store.put_blocks(dropped)
        store.put_segments(dropped_ids)
        store._flush()                                  # the chunks are in the pack and the open transaction
        assert store.packs.file_bytes() > sum(before.values())      # (file_bytes waits for direct writes)
        store.abort()
        assert pack_sizes(tmp_path) == before
        assert store.missing(dropped_ids) == set(dropped_ids)
        assert store.get_blocks(ids) == kept
        assert store.stats()["chunks"] == 4
    finally:
        store.close()
        db.close()


def test_uncommitted_chunks_are_not_in_the_committed_index(tmp_path):
    db, store = open_store(tmp_path)
    try:
        ids = store.put_blocks([os.urandom(BLOCK) for _ in range(10)])
        store.put_segments(ids)
        store._flush()
        reader = sqlite3.connect(tmp_path / "index.sqlite")
        assert reader.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0
        store.commit()
        assert reader.execute("SELECT count(*) FROM chunks").fetchone()[0] == 10
        # Every committed record lies within its pack's committed length.
        sizes = dict(reader.execute("SELECT id, size FROM packs"))
        for pack, off, length in reader.execute("SELECT pack, off, len FROM chunks"):
            assert off + HEADER.size + length <= sizes[pack]
        reader.close()
    finally:
        store.close()
        db.close()


def test_blocks_that_compress_and_blocks_that_do_not(tmp_path):
    db, store = open_store(tmp_path)
    try:
        text = (b"INSERT INTO t VALUES (1, 'hello');\n" * 300)[:BLOCK]
        noise = os.urandom(BLOCK)
        # Alternate so the early-abort probe is both skipped and taken.
        blocks = [noise, text, os.urandom(BLOCK), os.urandom(BLOCK), text[::-1], b"\0" * BLOCK]
        ids = store.put_blocks(blocks)
        store.put_segments(ids)
        store.commit()
        z = dict(db.execute("SELECT id, z FROM chunks"))
        assert [z[i] for i in ids] == [0, 1, 0, 0, 1, 1]
        stats = store.stats()
        assert stats["logical_bytes"] == 6 * BLOCK and stats["stored_bytes"] < 4 * BLOCK
        assert store.get_blocks(ids) == blocks
    finally:
        store.close()
        db.close()


def test_batch_after_incompressible_one_is_sampled_not_skipped(tmp_path):
    """After a batch that did not compress, a sample decides: a batch of noise is kept raw without a full
    probe, and a batch of mostly text following it is still compressed."""
    db, store = open_store(tmp_path)
    try:
        noise = [os.urandom(BLOCK) for _ in range(128)]
        text = [(b"%06d INSERT INTO t VALUES (1, 'hello');\n" % i * 250)[:BLOCK] for i in range(128)]
        mixed = [os.urandom(BLOCK) if i % 5 == 0 else t for i, t in enumerate(text)]
        batches = [noise, [os.urandom(BLOCK) for _ in range(128)], mixed]
        ids = [store.put_blocks(b) for b in batches]
        for part in ids:
            store.put_segments(part)
        store.commit()
        z = dict(db.execute("SELECT id, z FROM chunks"))
        assert all(z[i] == 0 for i in ids[1])
        assert [z[i] for i in ids[2]] == [0 if i % 5 == 0 else 1 for i in range(128)]
        assert store.get_blocks(ids[2]) == mixed
    finally:
        store.close()
        db.close()


def test_writeback_window_drops_written_pages_and_keeps_data(tmp_path, monkeypatch):
    """Appends spanning several writeback windows (each started, waited for and dropped from the cache behind
    the writer) read back intact, and survive a reopen."""
    monkeypatch.setattr(packs_mod, "_HINT_BYTES", 64 * 1024)
    monkeypatch.setattr(packs_mod, "DIRECT", False)             # the buffered appends of filesystems like tmpfs
    db, store = open_store(tmp_path)
    try:
        assert not store.packs._direct
        blocks = [os.urandom(BLOCK) for _ in range(100)]
        ids = []
        for i in range(0, 100, 10):
            ids += store.put_blocks(blocks[i:i + 10])
        store.put_segments(ids)
        store.commit()
        assert store.get_blocks(ids) == blocks
    finally:
        store.close()
    store = ChunkStore(db, tmp_path / "packs")
    try:
        assert store.get_blocks(ids) == blocks
    finally:
        store.close()
        db.close()


@pytest.mark.parametrize("direct", [True, False])
def test_odd_sized_appends_across_syncs_reopens_and_aborts(tmp_path, monkeypatch, direct):
    """Records of odd sizes, so direct appends keep a partial block staged: after each sync the file is
    exactly its committed length, reads see staged bytes, a reopened pack continues its partial block, an
    uncommitted tail is cut, and small staging buffers (filled, swapped and grown) lose nothing."""
    monkeypatch.setattr(packs_mod, "DIRECT", direct)
    monkeypatch.setattr(packs_mod, "_STAGE_BYTES", 3 * 4096)
    db = sqlite3.connect(tmp_path / "index.sqlite")
    files = PackFiles(tmp_path / "packs", db)
    if direct and not files._direct:
        files.close()
        pytest.skip("this filesystem does not take direct I/O")
    assert files._direct == direct
    expected: dict[bytes, tuple[int, int, int, bytes]] = {}

    def put(n: int, size: int) -> None:
        records = []
        for _ in range(n):
            cid, data = os.urandom(32), os.urandom(size)
            records.append((cid, 0, size, data))
        for (cid, _, size, data), (pack, off) in zip(records, files.append(records)):
            expected[cid] = (pack, off, size, data)

    def check(pf: PackFiles) -> None:
        got = pf.read([(cid, pack, off, len(data)) for cid, (pack, off, _, data) in expected.items()])
        assert got == {cid: (0, size, data) for cid, (_, _, size, data) in expected.items()}

    put(7, 5003)
    check(files)                                       # staged bytes are readable before any sync
    put(1, 20000)                                      # bigger than the staging buffer: it grows
    files.sync()
    db.commit()
    committed = pack_sizes(tmp_path)
    (size,) = committed.values()
    assert size == len(MAGIC) + sum(HEADER.size + len(d) for *_, d in expected.values())
    put(3, 777)
    files.sync()
    db.commit()
    committed = pack_sizes(tmp_path)
    files.close()

    again = PackFiles(tmp_path / "packs", db)          # continues the committed partial block
    check(again)
    files = again
    put(5, 4097)
    files.sync()
    db.commit()
    committed = pack_sizes(tmp_path)
    put(2, 100)                                        # never committed
    files.recover()
    assert pack_sizes(tmp_path) == committed
    for cid in [c for c, (_, _, size, _) in expected.items() if size == 100]:
        del expected[cid]
    check(files)
    files.close()
    last = PackFiles(tmp_path / "packs", db)
    check(last)
    assert [rec for batch in last.records(next(iter(expected.values()))[0]) for _, rec in batch] == \
        [(cid, 0, size, data) for cid, (_, _, size, data) in sorted(expected.items(), key=lambda e: e[1][1])]
    last.close()
    db.close()


def test_recover_cuts_uncommitted_tail_and_removes_unknown_packs(tmp_path):
    db = sqlite3.connect(tmp_path / "index.sqlite")
    files = PackFiles(tmp_path / "packs", db)
    cid = b"\7" * 32
    ((pack, off),) = files.append([(cid, 0, 5, b"hello")])
    files.sync()
    db.commit()
    committed = (tmp_path / "packs" / f"{pack:08d}.pack").stat().st_size
    files.append([(b"\x08" * 32, 0, 5, b"world")])                  # never committed
    (tmp_path / "packs" / "00000042.pack").write_bytes(MAGIC)     # never committed either
    files.close()
    again = PackFiles(tmp_path / "packs", db)
    assert pack_sizes(tmp_path) == {f"{pack:08d}.pack": committed}
    assert again.read([(cid, pack, off, 5)]) == {cid: (0, 5, b"hello")}
    assert [rec for batch in again.records(pack) for rec in batch] == [(off, (cid, 0, 5, b"hello"))]
    again.close()
    db.close()


def test_read_refuses_a_record_that_names_another_chunk(tmp_path):
    db = sqlite3.connect(tmp_path / "index.sqlite")
    files = PackFiles(tmp_path / "packs", db)
    ((pack, off),) = files.append([(b"\1" * 32, 0, 3, b"abc")])
    files.sync()
    db.commit()
    with pytest.raises(StorageError) as err:
        files.read([(b"\2" * 32, pack, off, 3)])                  # an index entry pointing at the wrong record
    assert err.value.code == "corrupt"
    with pytest.raises(StorageError):
        files.read([(b"\1" * 32, pack, off + 1000, 3)])           # past the end
    files.close()
    db.close()


def test_packs_roll_over_at_their_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(packs_mod, "PACK_BYTES", 64 << 10)      # a smaller limit, same code path
    db, store = open_store(tmp_path)
    try:
        blocks = [os.urandom(BLOCK) for _ in range(40)]
        ids = store.put_blocks(blocks)
        store.put_segments(ids)
        store.commit()
        assert len(pack_sizes(tmp_path)) >= 4
        assert all(size <= (64 << 10) + HEADER.size + BLOCK for size in pack_sizes(tmp_path).values())
        assert store.get_blocks(ids) == blocks
    finally:
        store.close()
        db.close()


def test_put_file_reads_every_batch_into_reused_buffers(tmp_path):
    """A file of several batches (one all duplicates, the last short) comes back whole, with the ids put_buffer
    gives, although its read buffers are reused as soon as the writer is done with them."""
    db, store = open_store(tmp_path)
    try:
        batch = 64 * BLOCK
        first = os.urandom(batch)
        data = first + first + os.urandom(batch) + os.urandom(3 * BLOCK + 5)   # batch 2 repeats batch 1
        path = tmp_path / "file"
        path.write_bytes(data)
        sizes: list[int] = []
        with open(path, "rb", buffering=0) as f:
            segs, size = store.put_file(f, BLOCK, batch, progress=sizes.append)
        assert sizes == [batch, batch, batch, 3 * BLOCK + 5] and size == len(data)
        got = store.chunk_ids(segs)
        assert got == [blake3.blake3(data[i:i + BLOCK]).digest() for i in range(0, len(data), BLOCK)]
        store.commit()
        assert b"".join(store.get_blocks(got)) == data
        assert len(store._buffers) >= 1
    finally:
        store.close()
        db.close()


def test_put_file_hands_each_batch_to_a_tee_that_keeps_its_buffer_until_done(tmp_path):
    """A tee sees every batch's bytes from the same read as the store, in page-aligned buffers (a base copy
    writes them with direct I/O), and no buffer is read into again while the tee still holds it."""
    db, store = open_store(tmp_path)
    try:
        batch = 16 * BLOCK
        data = os.urandom(5 * batch + BLOCK + 7)
        path = tmp_path / "file"
        path.write_bytes(data)
        seen: list[bytes] = []
        held: list = []
        buffers: set[int] = set()

        def tee(buf, n, ids, done):
            assert ctypes_address(buf) % packs_mod.ALIGN == 0
            assert id(buf) not in buffers, "a buffer the tee still holds was read into again"
            buffers.add(id(buf))
            seen.append(bytes(buf[:n]))
            held.append((buf, done))

        with open(path, "rb", buffering=0) as f:
            segs, _ = store.put_file(f, BLOCK, batch, tee)
        assert b"".join(seen) == data
        ids = store.chunk_ids(segs)
        store.commit()
        assert store._buffers == [] or all(id(b) not in buffers for b in store._buffers)
        for _, done in held:
            done()
        assert {id(b) for b in store._buffers} >= buffers     # each back in the pool once the tee let go
        assert b"".join(store.get_blocks(ids)) == data
    finally:
        store.close()
        db.close()


def test_put_file_writes_no_block_of_a_segment_the_store_holds(tmp_path):
    """Blocks go to the writer's lookup only for segments the store does not hold: a file stored again
    unchanged sends none; one changed block sends its segment and the next (read before it is known),
    not the rest. Every version reads back whole, and a tee still sees every byte."""
    db, store = open_store(tmp_path)
    try:
        batch = 64 * BLOCK
        data = bytearray(os.urandom(3 * SEGMENT_IDS * BLOCK + 5 * BLOCK))    # 3 segments and a short one
        path = tmp_path / "file"

        def put(content: bytes) -> tuple[bytes, int, bytes]:
            path.write_bytes(content)
            seen: list[bytes] = []

            def tee(buf, n, ids, done):
                seen.append(bytes(buf[:n]))
                done()
            with open(path, "rb", buffering=0) as f:
                segs, size = store.put_file(f, BLOCK, batch, tee)
            sent = store._txn.put
            store.commit()
            assert size == len(content) and b"".join(store.get_blocks(store.chunk_ids(segs))) == content
            return segs, sent, b"".join(seen)

        first, sent, seen = put(bytes(data))
        assert sent == len(data) // BLOCK and seen == data
        again, sent, seen = put(bytes(data))
        assert again == first and sent == 0 and seen == data
        data[SEGMENT_IDS * BLOCK + 7] ^= 1                                 # one byte of the second segment
        changed, sent, seen = put(bytes(data))
        assert sent == 2 * SEGMENT_IDS and seen == data
        assert [changed[i:i + 32] == first[i:i + 32] for i in range(0, len(first), 32)] == [True, False, True, True]
    finally:
        store.close()
        db.close()


def ctypes_address(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))
