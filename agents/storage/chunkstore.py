"""The embedded driver's content-addressed store in SQLite: zstd-compressed chunks named by BLAKE3, and
segments (runs of up to SEGMENT_IDS chunk ids) that manifests point to, both reference-counted so that
garbage collection is a delete of everything whose count fell to zero.

Two levels keep snapshots of large files cheap: a file's chunk list is cut into segments, and a segment
whose pages did not change is shared by every snapshot that contains it.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import blake3
import zstandard

from agents.storage.driver import StorageError

ID_BYTES = 32
SEGMENT_IDS = 1024          # one segment covers 8 MiB of file at 8 KiB blocks and is a 32 KiB blob
_QUERY_BATCH = 500          # stays under SQLite's host-parameter limit on every version
_COMMIT_BYTES = 64 << 20    # commit new chunks every so often so one big ingest does not grow the WAL

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks(
    id BLOB PRIMARY KEY, z INTEGER NOT NULL, size INTEGER NOT NULL, data BLOB NOT NULL,
    refs INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS segments(
    id BLOB PRIMARY KEY, ids BLOB NOT NULL, refs INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS chunks_unreferenced ON chunks(refs) WHERE refs <= 0;
CREATE INDEX IF NOT EXISTS segments_unreferenced ON segments(refs) WHERE refs <= 0;
"""


def split_ids(blob: bytes) -> list[bytes]:
    return [blob[i:i + ID_BYTES] for i in range(0, len(blob), ID_BYTES)]


class ChunkStore:
    """Chunks and segments in one SQLite database. Not thread-safe: the driver serializes access."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(_SCHEMA)
        self._compress = zstandard.ZstdCompressor(level=3)
        self._decompress = zstandard.ZstdDecompressor()
        self._uncommitted = 0

    # chunks ---------------------------------------------------------------------------------------------
    def missing(self, ids: Iterable[bytes]) -> set[bytes]:
        wanted = set(ids)
        have: set[bytes] = set()
        todo = list(wanted)
        for i in range(0, len(todo), _QUERY_BATCH):
            part = todo[i:i + _QUERY_BATCH]
            rows = self.db.execute(f"SELECT id FROM chunks WHERE id IN ({','.join('?' * len(part))})", part)
            have.update(r[0] for r in rows)
        return wanted - have

    def put_blocks(self, blocks: Sequence[bytes | memoryview]) -> list[bytes]:
        """Store blocks not yet present (unreferenced until a segment names them); return their ids."""
        ids = [blake3.blake3(b).digest() for b in blocks]
        new = self.missing(ids)
        rows = []
        for cid, block in zip(ids, blocks):
            if cid in new:
                new.discard(cid)
                packed = self._compress.compress(block)
                # Incompressible pages (already-compressed data, encrypted tablespaces) are kept raw.
                if len(packed) < len(block):
                    rows.append((cid, 1, len(block), packed))
                else:
                    rows.append((cid, 0, len(block), bytes(block)))
        self._insert_chunks(rows)
        return ids

    def put_stored(self, cid: bytes, z: int, data: bytes) -> None:
        """Store a chunk as it came off a stream, after checking that its content matches its id."""
        try:
            raw = self._decompress.decompress(data) if z else data
        except zstandard.ZstdError as exc:
            raise StorageError(f"replication stream corrupt: chunk {cid.hex()[:16]} does not decompress "
                               f"({exc}); nothing was published, send the stream again", code="corrupt")
        if blake3.blake3(raw).digest() != cid:
            raise StorageError(f"replication stream corrupt: chunk {cid.hex()[:16]} does not match its "
                               f"id; nothing was published, send the stream again", code="corrupt")
        self._insert_chunks([(cid, z, len(raw), data)])

    def _insert_chunks(self, rows: list[tuple[bytes, int, int, bytes]]) -> None:
        if not rows:
            return
        self.db.executemany("INSERT OR IGNORE INTO chunks(id, z, size, data) VALUES (?, ?, ?, ?)", rows)
        self._uncommitted += sum(len(r[3]) for r in rows)
        if self._uncommitted >= _COMMIT_BYTES:
            self.db.commit()
            self._uncommitted = 0

    def get_stored(self, ids: Sequence[bytes]) -> dict[bytes, tuple[int, bytes]]:
        """{id: (z, stored bytes)} for the given ids; raises if any is missing."""
        out: dict[bytes, tuple[int, bytes]] = {}
        todo = list(set(ids))
        for i in range(0, len(todo), _QUERY_BATCH):
            part = todo[i:i + _QUERY_BATCH]
            rows = self.db.execute(
                f"SELECT id, z, data FROM chunks WHERE id IN ({','.join('?' * len(part))})", part)
            out.update((r[0], (r[1], r[2])) for r in rows)
        if len(out) != len(todo):
            lost = next(c for c in todo if c not in out)
            raise StorageError(f"chunk {lost.hex()[:16]} is missing from the store at "
                               f"{self.path_hint()}; the store is damaged, restore it from a replica",
                               code="corrupt")
        return out

    def get_blocks(self, ids: Sequence[bytes]) -> list[bytes]:
        stored = self.get_stored(ids)
        plain = {cid: (self._decompress.decompress(d) if z else d) for cid, (z, d) in stored.items()}
        return [plain[c] for c in ids]

    # segments -------------------------------------------------------------------------------------------
    def put_segments(self, ids: Sequence[bytes]) -> bytes:
        """Group a file's chunk ids into segments; return the concatenated segment ids."""
        seg_ids = []
        for i in range(0, len(ids), SEGMENT_IDS):
            part = ids[i:i + SEGMENT_IDS]
            blob = b"".join(part)
            sid = blake3.blake3(blob).digest()
            cur = self.db.execute("INSERT OR IGNORE INTO segments(id, ids) VALUES (?, ?)", (sid, blob))
            if cur.rowcount == 1:
                self._add_chunk_refs(Counter(part), +1)
            seg_ids.append(sid)
        return b"".join(seg_ids)

    def chunk_ids(self, segs: bytes) -> list[bytes]:
        ids: list[bytes] = []
        for sid in split_ids(segs):
            row = self.db.execute("SELECT ids FROM segments WHERE id = ?", (sid,)).fetchone()
            if row is None:
                raise StorageError(f"segment {sid.hex()[:16]} is missing from the store at "
                                   f"{self.path_hint()}; the store is damaged", code="corrupt")
            ids.extend(split_ids(row[0]))
        return ids

    def ref_segments(self, segs: bytes, delta: int) -> None:
        counts = Counter(split_ids(segs))
        self.db.executemany("UPDATE segments SET refs = refs + ? WHERE id = ?",
                            [(n * delta, sid) for sid, n in counts.items()])

    def _add_chunk_refs(self, counts: Counter[bytes], delta: int) -> None:
        self.db.executemany("UPDATE chunks SET refs = refs + ? WHERE id = ?",
                            [(n * delta, cid) for cid, n in counts.items()])

    # accounting and collection --------------------------------------------------------------------------
    def gc(self) -> int:
        """Delete unreferenced segments and chunks; return the number of chunks removed. The caller must
        hold the driver lock, so no ingest or receive has chunks in flight."""
        for sid, blob in self.db.execute("SELECT id, ids FROM segments WHERE refs <= 0").fetchall():
            self._add_chunk_refs(Counter(split_ids(blob)), -1)
        self.db.execute("DELETE FROM segments WHERE refs <= 0")
        removed = self.db.execute("DELETE FROM chunks WHERE refs <= 0").rowcount
        self.db.commit()
        self.db.execute("PRAGMA incremental_vacuum")
        return removed

    def stats(self) -> dict[str, int]:
        n, logical, stored = self.db.execute(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(length(data)), 0) FROM chunks").fetchone()
        return {"chunks": n, "logical_bytes": logical, "stored_bytes": stored}

    def path_hint(self) -> str:
        row = self.db.execute("PRAGMA database_list").fetchone()
        return str(Path(row[2])) if row and row[2] else "(memory)"
