"""The embedded driver's content-addressed store: chunks named by BLAKE3 of their content, zstd-compressed
(or raw when that is not smaller), their bytes in append-only pack files (packs.py) and their index in
SQLite; and segments (runs of up to SEGMENT_IDS chunk ids) that manifests point to. Chunks and segments
are reference-counted: garbage collection deletes what fell to zero and compaction rewrites packs that
became mostly dead.

Two levels keep snapshots of large files cheap: a file's chunk list is cut into segments, and a segment
whose pages did not change is shared by every snapshot that contains it.

Ingest is a two-stage pipeline. The caller's thread reads, hashes and records segments; one writer thread
looks each batch's ids up in the index (one statement per batch), compresses the new blocks (zstd releases
the GIL), appends them to the active pack and inserts their index rows, all in the caller's open
transaction. SQLite, zstd and the pack writes run without the GIL, so the writer's work overlaps the
caller's hashing; a lock serializes the two threads' use of the connection, and the caller needs it only
once per segment (a lookup in the caller's thread waited for the writer's inserts on every batch).
`commit()` drains the writer, fdatasyncs the packs and only then commits, so no index row ever names bytes
that are not durable;
`abort()` rolls the transaction back and cuts the packs back to their committed length, so an interrupted
snapshot or receive leaves nothing.

Compression tries a fast zstd level first when the previous block did not compress, and compresses at
ZSTD_LEVEL only if that probe shrank the block (the early abort ZFS uses for zstd): incompressible data
(already-compressed or encrypted pages) costs a cheap probe instead of a full compression attempt. After a
batch that did not compress, only a sample of the next (every 16th block) is probed first, and the batch is
kept raw unless a sampled block shrinks (the sampling btrfs does before compressing an extent).

Stores written before packs existed (chunk bytes inside SQLite) are not migrated: opening one fails with a
message saying so.
"""

from __future__ import annotations

import io
import mmap
import os
import sqlite3
import struct
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import chain, repeat
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import blake3
import zstandard

from agents.storage.driver import StorageError
from agents.storage.packs import HEADER, MAGIC, PackFiles

ID_BYTES = 32
SEGMENT_IDS = 1024          # one segment covers 8 MiB of file at 8 KiB blocks and is a 32 KiB blob
ZSTD_LEVEL = 3
PROBE_LEVEL = -1            # the early-abort probe: ~3x faster than level 3 on data that does not compress
_SAMPLE_STRIDE = 16         # after a batch that did not compress, probe every 16th block of the next first
_SAMPLE_MIN = 64            # batches smaller than this are probed whole
_QUERY_BATCH = 500          # stays under SQLite's host-parameter limit on every version


def _each_id(count: str) -> str:
    """The walk every statement over many ids starts with: k.i from 0 to the parameter ``count`` (the number of
    ids), the ids passed as one blob of concatenated ids in ?1 (substr of a blob is O(1)). CROSS JOIN after it
    keeps the id list the outer loop: one index probe per id, never a scan of the chunks."""
    return f"WITH RECURSIVE k(i) AS (VALUES(0) UNION ALL SELECT i + 1 FROM k WHERE i + 1 < {count}) "


_ID = "substr(?1, k.i * 32 + 1, 32)"
# Many ids looked up in one statement.
_LOOKUP = _each_id("?2") + f"SELECT c.id, c.pack, c.off FROM k CROSS JOIN chunks c ON c.id = {_ID}"
# The same walk over distinct ids that the given segment references reach ?3 times each: the stored bytes of
# those whose every reference is among them (exclusive) and of the rest (shared), summed inside SQLite.
_SPLIT = (_each_id("?2") + "SELECT coalesce(sum(CASE WHEN c.refs <= ?3 THEN c.len ELSE 0 END), 0), "
          "coalesce(sum(CASE WHEN c.refs > ?3 THEN c.len ELSE 0 END), 0) "
          f"FROM k CROSS JOIN chunks c ON c.id = {_ID}")
# Index rows inserted by one statement, which runs without the GIL from start to end (executemany gives it up
# and takes it back for every row, and each time the caller's hashing thread has to wait to get it again).
# The numbers come as fixed-width decimals in a second blob: SQLite has no function that reads an integer out
# of a blob, and substr of text scans it from the start.
_ROW_FORMAT = "%010d" * 6
_INSERT = (_each_id("?3") + f"INSERT INTO chunks(id, pack, off, len, z, size, refs) SELECT {_ID}, "
           + ", ".join(f"CAST(substr(?2, i * 60 + {1 + 10 * k}, 10) AS INTEGER)" for k in range(6)) + " FROM k")
# ?3 more references for each of the ids (distinct), likewise without the GIL.
_ADD_REFS = _each_id("?2") + f"UPDATE chunks SET refs = refs + ?3 WHERE id IN (SELECT {_ID} FROM k)"
_SPLIT_BATCH = 1 << 15      # ids per _SPLIT or _ADD_REFS statement (a 1 MiB blob)
_MAX_JOBS = 4               # batches queued for the writer (each holds one read buffer, 1 MiB on ingest)
_ROW_BATCH = 4096           # index rows inserted together
_STORED_BATCH = 4 << 20     # received chunks handed to the writer together
_THREADS = min(2, os.cpu_count() or 1)    # zstd's own threads for a batch at the full level

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks(
    id BLOB PRIMARY KEY, pack INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL,
    z INTEGER NOT NULL, size INTEGER NOT NULL, refs INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS segments(
    id BLOB PRIMARY KEY, ids BLOB NOT NULL, refs INTEGER NOT NULL DEFAULT 0, bytes INTEGER);
CREATE INDEX IF NOT EXISTS chunks_unreferenced ON chunks(refs) WHERE refs <= 0;
CREATE INDEX IF NOT EXISTS segments_unreferenced ON segments(refs) WHERE refs <= 0;
"""

Row = tuple[bytes, int, int, int, int, int]     # id, pack, offset, stored length, z, raw size
Buffer = bytes | bytearray | memoryview


def _segments(buf: Buffer, spans: list[tuple[int, int]]) -> zstandard.BufferWithSegments:
    return zstandard.BufferWithSegments(buf, struct.pack(f"<{2 * len(spans)}Q", *(v for s in spans for v in s)))


# A second consumer of put_file's batches, called with the read buffer, the batch's length in it, its block
# ids, and a function to call (from any thread, perhaps after it returned) once it is done with the buffer.
Tee = Callable[[mmap.mmap, int, list[bytes], Callable[[], None]], None]


class _Lease:
    """A read buffer held by the writer and perhaps a tee: back in the pool once each has let go."""

    def __init__(self, pool: list[mmap.mmap], buf: mmap.mmap, holders: int) -> None:
        self._pool, self._buf, self._holders = pool, buf, holders
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self._pool.append(self._buf)


@dataclass
class _Tally:
    """What one transaction added to the store: enough for sharing() to answer for the snapshot it captured
    without a lookup per chunk, when every chunk that snapshot reaches is one this transaction inserted."""

    start: tuple[int, int]          # (pack, offset) of its first append: a row before it is older
    chunk_bytes: int = 0            # stored bytes of the chunk rows it inserted
    put: int = 0                    # block ids it passed through the writer's dedupe (an ingest)
    found_older: bool = False       # whether one of them was stored by an older transaction
    received: bool = False          # whether chunks came off a stream (put_stored), around the dedupe
    segment_ids: int = 0            # ids in the segments it inserted
    segments: set[bytes] = field(default_factory=set)      # the segments it inserted

    def all_new(self, segment_counts: Counter[bytes]) -> bool:
        """Whether the chunks these segment references reach are all this transaction's: it inserted each of
        the segments and nothing else, every id in them went through the dedupe in it, and none was found
        stored before. Each such chunk's references then all come from these segments."""
        return (not self.found_older and not self.received and self.put == self.segment_ids
                and len(segment_counts) == len(self.segments) and all(s in self.segments for s in segment_counts))


def _by_count(counts: Counter[bytes]) -> Iterator[tuple[int, list[bytes]]]:
    """The ids of ``counts`` grouped by their count, in batches of at most _SPLIT_BATCH: one statement each."""
    groups: dict[int, list[bytes]] = {}
    if len(counts) == counts.total():
        groups[1] = list(counts)            # each id once: the usual case, no loop in Python
    else:
        for cid, n in counts.items():
            groups.setdefault(n, []).append(cid)
    for n, ids in groups.items():
        for i in range(0, len(ids), _SPLIT_BATCH):
            yield n, ids[i:i + _SPLIT_BATCH]


def split_ids(blob: bytes) -> list[bytes]:
    return [blob[i:i + ID_BYTES] for i in range(0, len(blob), ID_BYTES)]


class ChunkStore:
    """Chunks and segments: index in SQLite, data in packs under `pack_dir`. Not thread-safe: the driver
    serializes access (the writer thread is internal)."""

    def __init__(self, db: sqlite3.Connection, pack_dir: Path) -> None:
        self.db = db
        columns = [r[1] for r in self.db.execute("PRAGMA table_info(chunks)")]
        if columns and "pack" not in columns:
            raise StorageError(f"the embedded store at {pack_dir.parent} was written by an earlier version "
                               f"that kept chunk data inside SQLite; it is not migrated. Move it aside and "
                               f"let a new store be created (replicate back what it held)", code="environment")
        self.db.executescript(_SCHEMA)
        if "bytes" not in [r[1] for r in self.db.execute("PRAGMA table_info(segments)")]:
            self.db.execute("ALTER TABLE segments ADD COLUMN bytes INTEGER")   # a store from before it (NULL: not
            self.db.commit()                                                   # known yet, counted when needed)
        row = self.db.execute("PRAGMA database_list").fetchone()
        self._path_hint = str(Path(row[2])) if row and row[2] else "(memory)"
        self.packs = PackFiles(pack_dir, db)
        self._decompress = zstandard.ZstdDecompressor()
        self._full = zstandard.ZstdCompressor(level=ZSTD_LEVEL)     # used by the writer thread only
        self._probe = zstandard.ZstdCompressor(level=PROBE_LEVEL)   # likewise
        self._last_raw = True       # likewise; a first batch is probed before it is compressed in full
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="chunkstore-writer")
        self._jobs: deque[Future[None]] = deque()
        # The writer inserts the index rows of what it wrote itself, into the caller's open transaction
        # (SQLite works without the GIL, so this overlaps the caller's hashing). _db_lock serializes the two
        # threads' use of the connection and guards _rows, _written and _refs; _inflight has a lock of its own
        # (taken after _db_lock where both are), so that queueing a batch never waits for an insert.
        self._db_lock = threading.Lock()
        self._inflight_lock = threading.Lock()
        self._inflight: set[bytes] = set()        # ids handed to the writer, neither found indexed nor inserted
        self._rows: list[Row] = []                # written, waiting to be inserted
        self._written: set[bytes] = set()         # their ids
        self._refs: Counter[bytes] = Counter()    # chunk references from new segments, not yet applied
        self._stored: dict[bytes, tuple[int, int, bytes]] = {}   # received, not yet handed to the writer
        self._stored_bytes = 0
        self._buffers: list[mmap.mmap] = []       # read buffers of put_file to reuse (list ops are atomic)
        self._span_lists: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self._txn = _Tally(self.packs.position())          # the open transaction's
        # Whether an earlier transaction left segments: in a store without, put_file holds no batch back.
        self._has_segments = self.db.execute("SELECT 1 FROM segments LIMIT 1").fetchone() is not None
        self._committed: _Tally | None = None     # the last commit's, while nothing has been written since

    def close(self) -> None:
        self._drain(raise_errors=False)
        self._writer.shutdown(wait=True)
        self.packs.close()

    # writing ----------------------------------------------------------------------------------------------
    def put_file(self, f: io.RawIOBase | io.BufferedIOBase, block_size: int, batch_bytes: int,
                 tee: Tee | None = None, progress: Callable[[int], None] | None = None) -> tuple[bytes, int]:
        """Store what is left of file `f`: read in batches of `batch_bytes`, cut into blocks of `block_size`
        (the last may be shorter), hashed, and grouped into segments of SEGMENT_IDS ids recorded as they
        fill; return the concatenated segment ids and the bytes read (`progress` hears each batch's length).
        With `tee`, each batch is also handed to it, from the same read (see Tee). The read buffers are
        page-aligned (a tee may write them with direct I/O) and reused once the writer and the tee are done
        with them (fresh buffers cost a page fault per 4 KiB). Nothing is durable or visible before commit().

        A segment the store holds already has every one of its chunks stored, so its blocks need no lookup:
        while a file's segments keep being known ones, each segment's batches wait until it is complete and
        go to the writer only if it is new. A snapshot of a volume that changed little then looks up one
        segment per 8 MiB instead of each 8 KiB block. After a new segment, and in a store that held no
        segment when the transaction began, batches go to the writer as they are read: new data usually
        goes on."""
        segs: list[bytes] = []
        filling: list[bytes] = []               # ids of the segment being filled
        held: list[tuple[memoryview, list[bytes], list[tuple[int, int]], _Lease]] = []
        hold = self._has_segments
        size = 0
        try:
            while True:
                buf = self._buffers.pop() if self._buffers else None
                if buf is None or len(buf) != batch_bytes:
                    buf = mmap.mmap(-1, batch_bytes)
                n = f.readinto(buf)
                if not n:
                    self._buffers.append(buf)
                    break
                view = memoryview(buf)[:n]
                ids = [blake3.blake3(view[i:i + block_size]).digest() for i in range(0, n, block_size)]
                lease = _Lease(self._buffers, buf, 2 if tee is not None else 1)
                if tee is not None:
                    tee(buf, n, ids, lease.release)
                if hold:
                    held.append((view, ids, self._spans(n, block_size), lease))
                else:
                    self._queue(view, ids, self._spans(n, block_size), lease)
                size += n
                if progress is not None:
                    progress(n)
                filling.extend(ids)
                while len(filling) >= SEGMENT_IDS:
                    sid, new = self._put_segment(filling[:SEGMENT_IDS])
                    segs.append(sid)
                    del filling[:SEGMENT_IDS]
                    # A held batch that runs into the next segment is sent: that segment is not known yet.
                    self._let_held_go(held, write=new or bool(filling))
                    hold = not new
        except BaseException:
            self._let_held_go(held, write=False)      # their writer's hold on the read buffers
            raise
        if filling:
            sid, new = self._put_segment(filling)
            segs.append(sid)
            self._let_held_go(held, write=new)
        return b"".join(segs), size

    def _let_held_go(self, held: list[tuple[memoryview, list[bytes], list[tuple[int, int]], _Lease]],
                     write: bool) -> None:
        """Send the held batches to the writer, or let go of them (their segment is stored already); each
        leaves `held` as it goes, so that after an error only those not handed on are let go."""
        while held:
            view, ids, spans, lease = held.pop(0)
            if write:
                self._queue(view, ids, spans, lease)
            else:
                lease.release()

    def _spans(self, n: int, block_size: int) -> list[tuple[int, int]]:
        """(offset, length) of each block of an n-byte buffer; the same list (read only) for every full batch."""
        spans = self._span_lists.get((n, block_size))
        if spans is None:
            spans = [(i, min(block_size, n - i)) for i in range(0, n, block_size)]
            if len(self._span_lists) < 4:
                self._span_lists[(n, block_size)] = spans
        return spans

    def put_blocks(self, blocks: Sequence[bytes | memoryview]) -> list[bytes]:
        """Hash blocks of any sizes and queue those not yet stored (copied into one buffer); return their
        ids."""
        ids = [blake3.blake3(b).digest() for b in blocks]
        spans, off = [], 0
        for b in blocks:
            spans.append((off, len(b)))
            off += len(b)
        self._queue(b"".join(blocks), ids, spans)
        return ids

    def _queue(self, buf: Buffer, ids: list[bytes], spans: list[tuple[int, int]],
               lease: _Lease | None = None) -> None:
        """Hand a batch to the writer, which keeps the blocks the store lacks. Its ids count as stored from
        here on (missing() and the writer's own lookups see them in flight)."""
        self._committed = None
        self._txn.put += len(ids)
        with self._inflight_lock:
            self._inflight.update(ids)
        self._submit(self._compress_and_append, buf, ids, spans, lease)

    def put_stored(self, cid: bytes, z: int, data: bytes) -> None:
        """Store a chunk as it came off a stream, after checking that its content matches its id."""
        try:
            raw = self._decompress.decompress(data) if z else data
        except zstandard.ZstdError as exc:
            raise StorageError(f"replication stream corrupt: chunk {cid.hex()[:16]} does not decompress "
                               f"({exc}); nothing was published, send the stream again", code="corrupt") from exc
        if blake3.blake3(raw).digest() != cid:
            raise StorageError(f"replication stream corrupt: chunk {cid.hex()[:16]} does not match its "
                               f"id; nothing was published, send the stream again", code="corrupt")
        self._committed = None
        self._txn.received = True
        if cid not in self._stored:
            self._stored[cid] = (z, len(raw), data)
            self._stored_bytes += len(data)
            if self._stored_bytes >= _STORED_BATCH:
                self._submit_stored()

    def _submit_stored(self) -> None:
        if not self._stored:
            return
        new = self._unknown(list(self._stored))
        todo = [(cid, z, size, data) for cid, (z, size, data) in self._stored.items() if cid in new]
        self._stored.clear()
        self._stored_bytes = 0
        if todo:
            with self._inflight_lock:
                self._inflight.update(new)
            self._submit(self._append_stored, todo)

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        while self._jobs and (self._jobs[0].done() or len(self._jobs) >= _MAX_JOBS):
            self._jobs.popleft().result()
        self._jobs.append(self._writer.submit(fn, *args))

    # the writer thread
    def _compress_and_append(self, buf: Buffer, ids: list[bytes], spans: list[tuple[int, int]],
                             lease: _Lease | None = None) -> None:
        """Keep the blocks of a batch (spans of `buf`) that are neither indexed nor written already, each
        once; compress them with zstd's multi-frame API, one call per level, so the GIL is released once per
        batch rather than once per block; then append them. The writer's hold on the read buffer behind
        `buf` ends afterwards (the packs hold copies by then)."""
        try:
            todo = self._new_blocks(ids, spans)
            if todo:
                self._compress_and_append_batch(buf, todo)
        finally:
            if lease is not None:
                lease.release()

    def _new_blocks(self, ids: list[bytes], spans: list[tuple[int, int]]) -> list[tuple[bytes, tuple[int, int]]]:
        """The writer's dedupe of one batch: (id, span) of each block to write, first occurrences only. Ids
        found indexed leave _inflight (the index answers for them now); those written but not yet inserted
        stay in it until their rows are."""
        with self._db_lock:
            written = self._written
            todo = {c for c in ids if c not in written}
            if todo:
                found = self.db.execute(_LOOKUP, (b"".join(todo), len(todo))).fetchall()
                indexed = {r[0] for r in found}
                if indexed:
                    if not self._txn.found_older:
                        start = self._txn.start
                        self._txn.found_older = any((pack, off) < start for _, pack, off in found)
                    todo -= indexed
                    with self._inflight_lock:
                        self._inflight.difference_update(indexed)
        if len(todo) == len(ids):                # all new and distinct: the usual case for new data
            return list(zip(ids, spans))
        out = []
        for cid, span in zip(ids, spans):
            if cid in todo:
                todo.discard(cid)
                out.append((cid, span))
        return out

    def _compress_and_append_batch(self, buf: bytes | bytearray | memoryview,
                                   todo: list[tuple[bytes, tuple[int, int]]]) -> None:
        view = memoryview(buf)
        probe = None
        if self._last_raw and len(todo) >= _SAMPLE_MIN and not self._sample_compresses(buf, todo):
            # The previous batch did not compress and neither does a sample of this one: keep it raw.
            self._last_raw = True
            self._append_stored([(cid, 0, n, view[off:off + n]) for cid, (off, n) in todo])
            return
        if self._last_raw:
            # Early abort: a fast probe first; only blocks it shrinks are compressed at the full level.
            probe = self._probe.multi_compress_to_buffer(_segments(buf, [s for _, s in todo]), threads=1)
            again = [k for k, (_, (_, n)) in enumerate(todo) if len(probe[k]) < n]
        else:
            again = list(range(len(todo)))
        packed: list[bytes | None] = [None] * len(todo)
        if again:
            full = self._full.multi_compress_to_buffer(_segments(buf, [todo[k][1] for k in again]),
                                                       threads=_THREADS)
            for j, k in enumerate(again):
                best = full[j] if probe is None or len(full[j]) <= len(probe[k]) else probe[k]
                packed[k] = best.tobytes()
        records: list[tuple[bytes, int, int, bytes | memoryview]] = []
        raw = 0
        for (cid, (off, n)), data in zip(todo, packed):
            # Incompressible pages (already-compressed data, encrypted tablespaces) are kept raw.
            if data is None or len(data) >= n:
                records.append((cid, 0, n, view[off:off + n]))
                raw += 1
            else:
                records.append((cid, 1, n, data))
        self._last_raw = raw * 2 > len(todo)
        self._append_stored(records)

    def _sample_compresses(self, buf: Buffer, todo: list[tuple[bytes, tuple[int, int]]]) -> bool:
        """Whether any of an evenly spread sample of the batch's blocks shrinks by at least 1/16 at the
        probe level (the sampling btrfs's compression heuristic does before it compresses an extent)."""
        # One call per sampled block: multi_compress_to_buffer sets up a compression context per call, which
        # cost as much as compressing the sample (measured: 8 of 128 random blocks, 80 us -> 50 us a batch).
        view = memoryview(buf)
        probe = self._probe.compress
        return any(len(probe(view[off:off + n])) < n - n // 16 for _, (off, n) in todo[::_SAMPLE_STRIDE])

    def _append_stored(self, records: list[tuple[bytes, int, int, bytes | memoryview]]) -> None:
        locs = self.packs.append(records)
        rows = [(cid, pack, off, len(data), z, size) for (cid, z, size, data), (pack, off) in zip(records, locs)]
        with self._db_lock:
            self._rows.extend(rows)
            self._written.update(r[0] for r in rows)
            if len(self._rows) >= _ROW_BATCH:
                self._insert_rows()

    # the caller's thread again
    def _drain(self, raise_errors: bool = True) -> None:
        error: BaseException | None = None
        while self._jobs:
            try:
                self._jobs.popleft().result()
            except BaseException as exc:  # keep draining: the writer must be idle before anyone goes on
                error = error or exc
        if error is not None and raise_errors:
            raise error

    def _insert_rows(self) -> None:
        """Insert the waiting rows with the references new segments already gave them (either thread, with
        _db_lock held). A row leaves _inflight only once inserted, so a lookup never misses a chunk."""
        if not self._rows:
            return
        # In id order: neighbouring keys land on the same B-tree pages (ids are uniformly random).
        ids, packs, offsets, lens, zs, sizes = zip(*sorted(self._rows))
        self._txn.chunk_bytes += sum(lens)
        refs = map(self._refs.pop, ids, repeat(0))
        numbers = tuple(chain.from_iterable(zip(packs, offsets, lens, zs, sizes, refs)))
        self.db.execute(_INSERT, (b"".join(ids), (_ROW_FORMAT * len(ids) % numbers).encode(), len(ids)))
        with self._inflight_lock:
            self._inflight.difference_update(self._written)
        self._rows = []
        self._written = set()

    def flush(self) -> None:
        """Everything queued in the index (inside the open transaction), with its references; afterwards the
        writer is idle and the caller may use the connection freely until it stores chunks again."""
        self._flush()

    def _flush(self) -> None:
        """Everything queued in the index (inside the open transaction), with its references."""
        self._submit_stored()
        self._drain()
        with self._db_lock:
            self._insert_rows()
        if self._refs:
            self._add_chunk_refs(self._refs, +1)
            self._refs = Counter()

    def commit(self) -> None:
        """Make the chunks written so far durable, then commit the transaction that indexes them."""
        self._flush()
        if self.packs.dirty():
            self.packs.sync()
        self.db.commit()
        self._has_segments = self._has_segments or bool(self._txn.segments)
        self._committed, self._txn = self._txn, _Tally(self.packs.position())

    def abort(self) -> None:
        """Drop everything since the last commit: the transaction, and the pack bytes written for it."""
        self._drain(raise_errors=False)
        self._rows, self._refs, self._stored, self._stored_bytes = [], Counter(), {}, 0
        self._written = set()
        self._inflight.clear()
        self.db.rollback()
        self.packs.recover()
        self._committed, self._txn = None, _Tally(self.packs.position())

    # reading ----------------------------------------------------------------------------------------------
    def _unknown(self, ids: Iterable[bytes]) -> set[bytes]:
        """The ids neither indexed nor on their way to the writer."""
        with self._db_lock:
            return self._unknown_locked(ids)

    def _unknown_locked(self, ids: Iterable[bytes]) -> set[bytes]:
        with self._inflight_lock:
            todo = {c for c in ids if c not in self._inflight}
        if not todo:
            return todo
        return todo - {r[0] for r in self.db.execute(_LOOKUP, (b"".join(todo), len(todo)))}

    def missing(self, ids: Iterable[bytes]) -> set[bytes]:
        return {c for c in self._unknown(ids) if c not in self._stored}

    def _load(self, ids: Sequence[bytes]) -> dict[bytes, tuple[int, bytes, bytes]]:
        """{id: (z, stored bytes, raw bytes)}, each checked against its id; raises if any is missing or
        damaged."""
        self._flush()
        todo = list(set(ids))
        locs: list[tuple[bytes, int, int, int]] = []
        zs: dict[bytes, int] = {}
        for i in range(0, len(todo), _QUERY_BATCH):
            part = todo[i:i + _QUERY_BATCH]
            for cid, pack, off, length, z in self.db.execute(
                    f"SELECT id, pack, off, len, z FROM chunks WHERE id IN ({','.join('?' * len(part))})", part):
                locs.append((cid, pack, off, length))
                zs[cid] = z
        if len(locs) != len(todo):
            lost = next(c for c in todo if c not in zs)
            raise StorageError(f"chunk {lost.hex()[:16]} is missing from the store at "
                               f"{self.path_hint()}; the store is damaged, restore it from a replica",
                               code="corrupt")
        out: dict[bytes, tuple[int, bytes, bytes]] = {}
        for cid, (z, size, data) in self.packs.read(locs).items():
            if z != zs[cid]:
                raise self._damaged(cid, "its record and its index entry disagree on compression")
            try:
                raw = self._decompress.decompress(data) if z else data
            except zstandard.ZstdError:
                raise self._damaged(cid, "it does not decompress") from None
            if len(raw) != size or blake3.blake3(raw).digest() != cid:
                raise self._damaged(cid, "its content does not match its id")
            out[cid] = (z, data, raw)
        return out

    def _damaged(self, cid: bytes, why: str) -> StorageError:
        return StorageError(f"chunk {cid.hex()[:16]} in the store at {self.path_hint()} is damaged ({why}); "
                            f"restore the store from a replica", code="corrupt")

    def get_stored(self, ids: Sequence[bytes]) -> dict[bytes, tuple[int, bytes]]:
        """{id: (z, stored bytes)} for the given ids, verified; raises if any is missing or damaged."""
        return {cid: (z, data) for cid, (z, data, _) in self._load(ids).items()}

    def get_blocks(self, ids: Sequence[bytes]) -> list[bytes]:
        loaded = self._load(ids)
        return [loaded[c][2] for c in ids]

    # segments -------------------------------------------------------------------------------------------
    def put_segments(self, ids: Sequence[bytes]) -> bytes:
        """Group a file's chunk ids into segments; return the concatenated segment ids. The chunks must
        have been put (they may still be on their way to the writer)."""
        return b"".join(self._put_segment(ids[i:i + SEGMENT_IDS])[0] for i in range(0, len(ids), SEGMENT_IDS))

    def _put_segment(self, ids: Sequence[bytes]) -> tuple[bytes, bool]:
        """Record one segment; return its id and whether it is new (a known one's chunks are all stored)."""
        blob = b"".join(ids)
        sid = blake3.blake3(blob).digest()
        with self._db_lock:
            self._committed = None
            new = self.db.execute("INSERT OR IGNORE INTO segments(id, ids) VALUES (?, ?)", (sid, blob)).rowcount == 1
            if new:
                self._refs.update(ids)          # applied as the chunks' rows are inserted, or at commit
                self._txn.segments.add(sid)
                self._txn.segment_ids += len(ids)
        return sid, new

    def chunk_ids(self, segs: bytes) -> list[bytes]:
        ids: list[bytes] = []
        for sid in split_ids(segs):
            with self._db_lock:
                row = self.db.execute("SELECT ids FROM segments WHERE id = ?", (sid,)).fetchone()
            if row is None:
                raise StorageError(f"segment {sid.hex()[:16]} is missing from the store at "
                                   f"{self.path_hint()}; the store is damaged", code="corrupt")
            ids.extend(split_ids(row[0]))
        return ids

    def ref_segments(self, segs: bytes, delta: int) -> None:
        self._committed = None
        counts = Counter(split_ids(segs))
        self.db.executemany("UPDATE segments SET refs = refs + ? WHERE id = ?",
                            [(n * delta, sid) for sid, n in counts.items()])

    def _add_chunk_refs(self, counts: Counter[bytes], delta: int) -> None:
        """Add ``n * delta`` to each chunk's references, n its count: one statement per batch of chunks with
        the same count (executemany gave the GIL up and took it back for every row, and took twice as long)."""
        self._committed = None
        for n, part in _by_count(counts):
            self.db.execute(_ADD_REFS, (b"".join(part), len(part), n * delta))

    def sharing(self, segment_counts: Counter[bytes]) -> tuple[int, int]:
        """(exclusive, shared) stored bytes of the chunks a set of segment references reaches. A chunk of the
        segments these references alone hold is exclusive when every reference to it comes from them, and
        shared otherwise; a segment others hold too adds its stored bytes to shared whole, from segments.bytes
        (counted once per segment, so a chunk repeated in two such segments counts twice). A snapshot's
        answer and a listing then cost a lookup per chunk only for what changed since the snapshots it
        shares segments with, not for the whole volume each time."""
        if self._committed is not None and self._committed.all_new(segment_counts):
            # The snapshot the last commit captured, nothing written since, all its chunks new in that commit:
            # each is referenced by its segments alone, so all are exclusive (what a first snapshot of a
            # volume is, whatever its size; otherwise one index lookup per chunk, below).
            return self._committed.chunk_bytes, 0
        with self._db_lock:
            own_ids: list[bytes] = []           # of the segments these references alone hold, with repeats
            shared = 0
            uncounted: list[tuple[bytes, bytes]] = []   # segments others hold too whose bytes are not known yet
            for sid, n in segment_counts.items():
                row = self.db.execute("SELECT refs, bytes FROM segments WHERE id = ?", (sid,)).fetchone()
                if row is None:
                    continue
                if row[0] > n and row[1] is not None:
                    shared += row[1]        # the usual case for most of a volume: its ids are not needed
                    continue
                (blob,) = self.db.execute("SELECT ids FROM segments WHERE id = ?", (sid,)).fetchone()
                if row[0] <= n:
                    own_ids.extend(split_ids(blob))
                else:
                    uncounted.append((sid, blob))
            if uncounted:
                shared += self._count_segments(uncounted)
            # One statement per batch of chunks with the same count of own references, not one lookup per
            # chunk: the per-chunk round trips through the sqlite3 module were most of a snapshot's answer.
            exclusive = 0
            for own, part in _by_count(Counter(own_ids)):
                mine, common = self.db.execute(_SPLIT, (b"".join(part), len(part), own)).fetchone()
                exclusive += mine
                shared += common
        return exclusive, shared

    def _count_segments(self, segments: list[tuple[bytes, bytes]]) -> int:
        """Sum the stored bytes of each (id, ids) segment's distinct chunks and keep them in segments.bytes
        (committed here unless a transaction is open, which then carries them)."""
        was_open = self.db.in_transaction
        total = 0
        for sid, blob in segments:
            distinct = set(split_ids(blob))
            n = sum(self.db.execute(_SPLIT, (b"".join(distinct), len(distinct), 0)).fetchone())   # both parts
            self.db.execute("UPDATE segments SET bytes = ? WHERE id = ?", (n, sid))
            total += n
        if not was_open:
            self.db.commit()
        return total

    # accounting and collection --------------------------------------------------------------------------
    def gc(self) -> int:
        """Delete unreferenced segments and chunks, then compact packs that became mostly dead; return the
        number of chunks removed. The caller must hold the driver lock, so no ingest or receive has chunks
        in flight (anything uncommitted is committed with it)."""
        self._flush()
        for (blob,) in self.db.execute("SELECT ids FROM segments WHERE refs <= 0").fetchall():
            self._add_chunk_refs(Counter(split_ids(blob)), -1)
        self.db.execute("DELETE FROM segments WHERE refs <= 0")
        dead = self.db.execute(f"SELECT pack, sum(len) + count(*) * {HEADER.size} FROM chunks WHERE refs <= 0 "
                               f"GROUP BY pack").fetchall()
        self.db.executemany("UPDATE packs SET dead = dead + ? WHERE id = ?", [(n, p) for p, n in dead])
        removed = self.db.execute("DELETE FROM chunks WHERE refs <= 0").rowcount
        self.commit()
        self._compact()
        self.db.execute("PRAGMA incremental_vacuum")
        return removed

    def _compact(self) -> None:
        """Rewrite packs at least half dead: copy their live records to the active pack, commit the moved
        index entries once the copies are durable, then delete the old packs."""
        victims = [pid for pid, size, dead in self.db.execute("SELECT id, size, dead FROM packs WHERE dead > 0")
                   if dead * 2 >= size - len(MAGIC) and pid not in self.packs.damaged]
        if not victims:
            return
        if self.packs.active in victims:
            self.packs.seal()
        moved: list[tuple[int, int, bytes]] = []
        for pid in victims:
            for batch in self.packs.records(pid):
                ids = list({rec[0] for _, rec in batch})
                index: dict[bytes, tuple[int, int]] = {}
                for i in range(0, len(ids), _QUERY_BATCH):
                    part = ids[i:i + _QUERY_BATCH]
                    for cid, pack, off in self.db.execute(
                            f"SELECT id, pack, off FROM chunks WHERE id IN ({','.join('?' * len(part))})", part):
                        index[cid] = (pack, off)
                # A record is live if the index points at it; the rest are chunks already collected.
                live = [rec for off, rec in batch if index.get(rec[0]) == (pid, off)]
                for (cid, *_), (pack, off) in zip(live, self.packs.append(live)):
                    moved.append((pack, off, cid))
        self.db.executemany("UPDATE chunks SET pack = ?, off = ? WHERE id = ?", moved)
        self.packs.sync()
        self.db.executemany("DELETE FROM packs WHERE id = ?", [(p,) for p in victims])
        self.db.commit()
        self.packs.remove(victims)

    def stats(self) -> dict[str, int]:
        self._flush()
        n, logical, stored = self.db.execute(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(len), 0) FROM chunks").fetchone()
        return {"chunks": n, "logical_bytes": logical, "stored_bytes": stored}

    def path_hint(self) -> str:
        return self._path_hint
