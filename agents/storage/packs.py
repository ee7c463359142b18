"""Append-only pack files holding the embedded store's chunk data; SQLite (chunkstore.py) holds only the
index from chunk id to (pack, offset, length).

A pack is `packs/<id>.pack`: an 8-byte magic, then records, each a 41-byte header (chunk id, zstd flag,
raw size, stored length) followed by the stored bytes. The header lets a reader check that an index entry
points at the chunk it names, and lets a pack be read without the index.

Durability is by commit, not by chunk: records are appended sequentially, with direct I/O where the filesystem
takes it (around the page cache, see _Stage; elsewhere writeback starts behind the appends and written pages
leave the page cache), and `sync()` fdatasyncs every pack written since the last sync, and the directory when
a pack was created, before the caller commits the index rows that name those records. The packs table records
each pack's committed length in the same transaction. So after a crash or an aborted ingest, `recover()` makes
the files agree with the last commit: a pack file with no row (created by an ingest that never committed, or
left behind by a compaction that did) is removed, and a pack longer than its committed length is cut back to
it (an interrupted or uncommitted append; the cut part was never referenced). A pack shorter than its
committed length has lost committed data: it is reported, never appended to, and reads of its missing records
fail as corrupt.

Space is reclaimed by compaction (chunkstore.gc): `dead` counts the record bytes of collected chunks; a
pack that is mostly dead has its live records copied to the active pack, and is deleted once the index
commit that moves them is durable.

Not thread-safe by itself: the chunk store lets only its one writer thread append, and reads, syncs and
recovery happen only when that thread is idle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sqlite3
import struct
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from agents.storage.driver import StorageError

MAGIC = b"VTBPACK1"
HEADER = struct.Struct(">32sBII")       # chunk id, zstd flag, raw size, stored length
PACK_BYTES = 256 << 20                  # a pack is closed for appends once it reaches this size
_HINT_BYTES = 32 << 20                  # writeback window of the active pack (see _writeback)
_SPAN_BYTES = 8 << 20                   # longest single read when fetching adjacent records
ALIGN = 4096                           # direct I/O: offsets, lengths and buffer addresses are multiples
_STAGE_BYTES = 8 << 20                  # direct I/O: each staging buffer of the active pack
_STAGE_BUFFERS = 3                      # direct I/O: buffers in rotation (all but one may be in flight)
DIRECT = hasattr(os, "O_DIRECT") and hasattr(os, "memfd_create")   # try direct appends (tests switch it off)

PACKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS packs(
    id INTEGER PRIMARY KEY, size INTEGER NOT NULL, dead INTEGER NOT NULL DEFAULT 0);
"""


def _sync_file_range() -> Any:
    """libc's sync_file_range (Linux), used only as a hint to start writeback; None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_ALL = 1 | 2 | 4       # wait for earlier writeback, start it, wait for it


class _Stage:
    """Direct (O_DIRECT) appends to one pack file: records are copied into a page-aligned buffer (by the
    kernel, with pwritev into the memory file behind it, so without the GIL) and written in whole aligned
    blocks, around the page cache (no copy into it, no writeback work, no pages to reclaim).
    Buffers rotate, and the I/O thread writes the full ones while records fill the next, so the device works
    while the caller computes. The last, partial block stays in the buffer; whenever the file must show
    every byte (a read, a sync, a close) the writes are waited for, the partial block is written padded to a
    whole block, and the file is cut back to its true length. Between syncs and the next append the buffers
    are given back (parked), keeping only that partial block."""

    def __init__(self, fd: int, size: int, tail: bytes, io: ThreadPoolExecutor) -> None:
        self.fd = fd
        self.io = io
        self.bufs: list[mmap.mmap] = []
        self.fds: list[int] = []                # the memory files behind bufs
        self.writes: list[Future[None] | None] = [None] * _STAGE_BUFFERS     # each buffer's write in flight
        self.start = size - len(tail)           # file offset of buf[0], a multiple of ALIGN
        self.used = len(tail)                   # bytes in buf
        self.tail = tail                        # buf[:used] while parked
        self.dirty = False                      # the file does not show every byte appended yet

    def unpark(self) -> None:
        if not self.bufs:
            self.fds = []
            self.bufs = [self._buffer(_STAGE_BYTES) for _ in range(_STAGE_BUFFERS)]
            self.cur = 0
            self.buf = self.bufs[0]
            self.buf[:self.used] = self.tail

    def _buffer(self, size: int) -> mmap.mmap:
        """A page-aligned buffer backed by a memory file, so records can be copied into it by the kernel
        (pwritev to the memory file) without holding the GIL."""
        fd = os.memfd_create("vertebra-stage", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self.fds.append(fd)
        return mmap.mmap(fd, size)

    def fill(self, iov: list[bytes | memoryview], n: int) -> None:
        """Append n bytes given as buffers (at most 1024) to the current buffer, which has room."""
        done = os.pwritev(self.fds[self.cur], iov, self.used)
        if done != n:                   # a memory file takes everything at once; short means broken
            raise OSError(f"staging copy wrote {done} of {n} bytes")
        self.used += n

    def park(self) -> None:
        """Give the buffers back; only after write(final=True), so nothing is in flight."""
        if self.bufs:
            self.tail = self.buf[:self.used]
            self._free()

    def room(self, n: int) -> None:
        """Make room for n more bytes: hand the whole blocks to the I/O thread, grow the buffer if still short."""
        self.unpark()
        if self.used + n <= len(self.buf):
            return
        self.write(final=False)
        if self.used + n > len(self.buf):
            size = (self.used + n + ALIGN - 1) // ALIGN * ALIGN
            bigger = self._buffer(size)
            bigger[:self.used] = self.buf[:self.used]
            self.buf.close()
            os.close(self.fds[self.cur])
            self.fds[self.cur] = self.fds.pop()
            self.buf = self.bufs[self.cur] = bigger

    def write(self, final: bool) -> None:
        """Start writing the whole blocks; final: wait for every write, then write the partial last block
        padded and cut the file back."""
        self.unpark()
        full = self.used - self.used % ALIGN
        if not final:
            if full:
                other = (self.cur + 1) % len(self.bufs)
                self._wait(other)               # its earlier write must be done before it is refilled
                tail = self.used - full
                self.bufs[other][:tail] = self.buf[full:self.used]
                self.writes[self.cur] = self.io.submit(_write_fully, self.fd, self.buf, full, self.start)
                self.cur, self.buf = other, self.bufs[other]
                self.start += full
                self.used = tail
            self.dirty = True
            return
        for k in range(len(self.writes)):
            self._wait(k)
        if self.used:
            length = full + ALIGN if self.used > full else full
            self.buf[self.used:length] = bytes(length - self.used)
            _write_fully(self.fd, self.buf, length, self.start)
            if length > self.used:
                os.ftruncate(self.fd, self.start + self.used)
            if full:
                self.buf.move(0, full, self.used - full)
                self.start += full
                self.used -= full
        self.dirty = False

    def _wait(self, k: int) -> None:
        done, self.writes[k] = self.writes[k], None
        if done is not None:
            done.result()

    def close(self) -> None:
        """Wait for the writes in flight (their errors no longer matter) and free the buffers."""
        for k in range(len(self.writes)):
            try:
                self._wait(k)
            except OSError:
                pass
        self._free()

    def _free(self) -> None:
        for buf in self.bufs:
            buf.close()
        for fd in self.fds:
            os.close(fd)
        self.bufs, self.fds = [], []


def _write_fully(fd: int, buf: mmap.mmap, length: int, offset: int) -> None:
    """Write buf[:length] at offset (the I/O thread, or the caller's; the GIL is released in the syscall)."""
    with memoryview(buf) as view:
        done = 0
        while done < length:
            done += os.pwrite(fd, view[done:length], offset + done)


class PackFiles:
    def __init__(self, directory: Path, db: sqlite3.Connection) -> None:
        self.dir = directory
        self.db = db
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db.executescript(PACKS_SCHEMA)
        self._readers: dict[int, int] = {}
        self._writer: int | None = None            # fd of the active pack
        self._active: int | None = None            # its id
        self._size = 0                              # its length, committed or not
        self._sizes: dict[int, int] = {}            # every pack written since the last sync: its length
        self._created = False                       # a pack file was created since the last sync
        self._kicked = self._dropped = 0            # active pack: writeback started / cache dropped up to
        self._stage: _Stage | None = None           # the active pack's direct appends, if direct
        self.damaged: dict[int, str] = {}
        self._direct = DIRECT and direct_writes_work(self.dir)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="pack-io") if self._direct else None
        self.recover()

    # recovery -------------------------------------------------------------------------------------------
    def recover(self) -> None:
        """Make the pack files match the committed packs table (see the module docstring)."""
        self._close_writer(flush=False)
        self._close_readers()
        self._sizes.clear()
        self._created = False
        committed = dict(self.db.execute("SELECT id, size FROM packs").fetchall())
        self.damaged.clear()
        for path in self.dir.iterdir():
            pid = _pack_id(path)
            if pid is None:
                continue
            if pid not in committed:
                path.unlink()
                continue
            have = path.stat().st_size
            if have > committed[pid]:
                os.truncate(path, committed[pid])
        for pid, size in committed.items():
            path = self._path(pid)
            have = path.stat().st_size if path.exists() else -1
            if have < size:
                self.damaged[pid] = (f"pack {path} is missing" if have < 0 else
                                     f"pack {path} holds {have} bytes of its committed {size}")
        self._fsync_dir()
        # Append to the newest pack if it is intact and has room; otherwise the next append starts one.
        self._next_id = max(committed, default=0) + 1
        newest = max(committed, default=None)
        if newest is not None and newest not in self.damaged and committed[newest] < PACK_BYTES:
            self._open_writer(newest, committed[newest])

    # appending (the writer thread) ----------------------------------------------------------------------
    def append(self, records: Sequence[tuple[bytes, int, int, bytes | memoryview]]) -> list[tuple[int, int]]:
        """Append (id, z, raw size, stored bytes) records in order; return each one's (pack, offset)."""
        out: list[tuple[int, int]] = []
        i = 0
        while i < len(records):
            if self._writer is None or self._size >= PACK_BYTES:
                self._start_pack()
            assert self._writer is not None and self._active is not None
            if self._stage is not None:
                i = self._stage_records(records, i, out)
                continue
            bufs: list[bytes | memoryview] = []
            start = off = self._size
            while i < len(records) and off < PACK_BYTES:
                cid, z, size, data = records[i]
                bufs.append(HEADER.pack(cid, z, size, len(data)))
                bufs.append(data)
                out.append((self._active, off))
                off += HEADER.size + len(data)
                i += 1
            self._write_all(bufs, start, off - start)
            self._size = off
            self._sizes[self._active] = off
        return out

    def _stage_records(self, records: Sequence[tuple[bytes, int, int, bytes | memoryview]], i: int,
                       out: list[tuple[int, int]]) -> int:
        """Direct appends of records[i:] until the pack is full; return the index of the first left."""
        stage, pid, off = self._stage, self._active, self._size
        assert stage is not None and pid is not None
        pack = HEADER.pack
        stage.unpark()
        while i < len(records) and off < PACK_BYTES:
            # Copy as many records as fit (512 per call: IOV_MAX is 1024) into the staging buffer, then
            # hand its whole blocks to the I/O thread.
            room = len(stage.buf) - stage.used
            first = off
            iov: list[bytes | memoryview] = []
            while i < len(records) and off < PACK_BYTES and len(iov) < 1024:
                cid, z, size, data = records[i]
                n = HEADER.size + len(data)
                if n > room:
                    break
                iov.append(pack(cid, z, size, len(data)))
                iov.append(data)
                out.append((pid, off))
                off += n
                room -= n
                i += 1
            if iov:
                stage.fill(iov, off - first)
            if i < len(records) and off < PACK_BYTES and len(iov) < 1024:
                stage.room(HEADER.size + len(records[i][3]))
        stage.write(final=False)
        self._size = off
        self._sizes[pid] = off
        return i

    def _write_all(self, bufs: list[bytes | memoryview], offset: int, total: int) -> None:
        assert self._writer is not None
        done = idx = 0
        while idx < len(bufs):
            n = os.pwritev(self._writer, bufs[idx:idx + 512], offset + done)   # IOV_MAX is 1024 on Linux
            done += n
            # Skip what was written, keeping the unwritten tail of a partly written buffer.
            while idx < len(bufs) and n >= len(bufs[idx]):
                n -= len(bufs[idx])
                idx += 1
            if n:
                bufs[idx] = memoryview(bufs[idx])[n:]
        assert done == total
        self._writeback(offset + total)

    def _writeback(self, end: int) -> None:
        """Stream the active pack to disk behind the appends: start writeback of every _HINT_BYTES of new
        bytes, and once the window before it has been written, drop its pages from the page cache. Pack
        bytes are rarely read soon after an ingest, so an ingest of a large volume neither evicts the
        volume's own hot data nor piles up dirty pages, and the page cache it uses stays one or two windows
        big (recycled pages are also much cheaper to fill than fresh ones). Durability is still the
        fdatasync in sync(): this is only scheduling."""
        if end - self._kicked < _HINT_BYTES or _SYNC_FILE_RANGE is None or self._writer is None:
            return
        if self._kicked > self._dropped:
            _SYNC_FILE_RANGE(self._writer, self._dropped, self._kicked - self._dropped, _SYNC_FILE_RANGE_WAIT_ALL)
            os.posix_fadvise(self._writer, self._dropped, self._kicked - self._dropped, os.POSIX_FADV_DONTNEED)
            self._dropped = self._kicked
        _SYNC_FILE_RANGE(self._writer, self._kicked, end - self._kicked, _SYNC_FILE_RANGE_WRITE)
        self._kicked = end

    def _start_pack(self) -> None:
        self._close_writer()
        pid = self._next_id
        self._next_id += 1
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        if self._direct:
            fd = os.open(self._path(pid), flags | os.O_DIRECT, 0o600)
            assert self._io is not None, "direct writes have their I/O thread"
            self._stage = _Stage(fd, len(MAGIC), MAGIC, self._io)
            self._stage.dirty = True
        else:
            fd = os.open(self._path(pid), flags, 0o600)
            os.write(fd, MAGIC)
        self._writer, self._active, self._size = fd, pid, len(MAGIC)
        self._sizes[pid] = len(MAGIC)
        self._created = True
        self._kicked = self._dropped = 0

    def position(self) -> tuple[int, int]:
        """(pack, offset) where the next append will go: every record appended from now on is at or after it."""
        return (self._active, self._size) if self._active is not None else (self._next_id, len(MAGIC))

    def seal(self) -> None:
        """Stop appending to the active pack (the next append starts a new one)."""
        self._close_writer()

    # durability (main thread, writer idle) --------------------------------------------------------------
    def sync(self) -> None:
        """Make every append since the last sync durable and record the packs' lengths in the (open)
        transaction; the caller commits it."""
        for pid, size in self._sizes.items():
            if pid == self._active and self._writer is not None:
                self._flush_stage()
                os.fdatasync(self._writer)
                if self._stage is not None:
                    self._stage.park()          # an idle store holds no staging memory
            else:
                fd = os.open(self._path(pid), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            self.db.execute("INSERT INTO packs(id, size) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET "
                            "size = excluded.size", (pid, size))
        if self._created:
            self._fsync_dir()
        self._sizes.clear()
        self._created = False

    def dirty(self) -> bool:
        return bool(self._sizes)

    # reading --------------------------------------------------------------------------------------------
    def read(self, locs: Iterable[tuple[bytes, int, int, int]]) -> dict[bytes, tuple[int, int, bytes]]:
        """{id: (z, raw size, stored bytes)} for (id, pack, offset, stored length) index entries; adjacent
        records are fetched with one read. Raises corrupt if a record is missing or names another chunk."""
        self._flush_stage()
        out: dict[bytes, tuple[int, int, bytes]] = {}
        todo = sorted(locs, key=lambda r: (r[1], r[2]))
        i = 0
        while i < len(todo):
            pack, start = todo[i][1], todo[i][2]
            j, end = i, start
            while j < len(todo) and todo[j][1] == pack and todo[j][2] == end and end - start < _SPAN_BYTES:
                end += HEADER.size + todo[j][3]
                j += 1
            span = os.pread(self._reader(pack), end - start, start)
            pos = 0
            for cid, _, off, length in todo[i:j]:
                if len(span) < pos + HEADER.size + length:
                    raise self._lost(pack, f"record at offset {off} is cut short")
                hid, z, size, hlen = HEADER.unpack_from(span, pos)
                if hid != cid or hlen != length:
                    raise self._lost(pack, f"record at offset {off} is not chunk {cid.hex()[:16]}")
                out[cid] = (z, size, span[pos + HEADER.size:pos + HEADER.size + length])
                pos += HEADER.size + length
            i = j
        return out

    def records(self, pack: int) -> Iterator[list[tuple[int, tuple[bytes, int, int, bytes]]]]:
        """The committed records of a pack in order, as (offset, (id, z, raw size, stored bytes)), in
        batches of about _SPAN_BYTES."""
        self._flush_stage()
        (committed,) = self.db.execute("SELECT size FROM packs WHERE id = ?", (pack,)).fetchone()
        try:
            f = open(self._path(pack), "rb", buffering=1 << 20)
        except FileNotFoundError:
            raise self._lost(pack, "the file is missing") from None
        with f:
            if f.read(len(MAGIC)) != MAGIC:
                raise self._lost(pack, "it does not start with the pack magic")
            pos = len(MAGIC)
            batch: list[tuple[int, tuple[bytes, int, int, bytes]]] = []
            held = 0
            while pos < committed:
                head = f.read(HEADER.size)
                if len(head) < HEADER.size:
                    raise self._lost(pack, f"record at offset {pos} is cut short")
                cid, z, size, length = HEADER.unpack(head)
                if pos + HEADER.size + length > committed:
                    raise self._lost(pack, f"record at offset {pos} runs past the committed end")
                data = f.read(length)
                if len(data) < length:
                    raise self._lost(pack, f"record at offset {pos} is cut short")
                batch.append((pos, (cid, z, size, data)))
                pos += HEADER.size + length
                held += HEADER.size + length
                if held >= _SPAN_BYTES:
                    yield batch
                    batch, held = [], 0
            if batch:
                yield batch

    def _lost(self, pack: int, what: str) -> StorageError:
        why = self.damaged.get(pack, f"pack {self._path(pack)}: {what}")
        return StorageError(f"chunk data lost: {why}; the store is damaged, restore it from a replica",
                            code="corrupt")

    def _reader(self, pack: int) -> int:
        fd = self._readers.get(pack)
        if fd is None:
            try:
                fd = os.open(self._path(pack), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise self._lost(pack, "the file is missing") from None
            self._readers[pack] = fd
        return fd

    # removal --------------------------------------------------------------------------------------------
    def remove(self, packs: Iterable[int]) -> None:
        """Delete pack files whose rows are already gone from the committed packs table."""
        for pid in packs:
            fd = self._readers.pop(pid, None)
            if fd is not None:
                os.close(fd)
            if pid == self._active:
                self._close_writer(flush=False)
            self._path(pid).unlink(missing_ok=True)
            self.damaged.pop(pid, None)
        self._fsync_dir()

    def file_bytes(self) -> int:
        self._flush_stage()
        return sum(p.stat().st_size for p in self.dir.iterdir() if _pack_id(p) is not None)

    @property
    def active(self) -> int | None:
        return self._active

    def close(self) -> None:
        self._close_writer(flush=False)     # whatever was not synced is not committed: recover() cuts it
        self._close_readers()
        if self._io is not None:
            self._io.shutdown(wait=True)

    # helpers --------------------------------------------------------------------------------------------
    def _path(self, pid: int) -> Path:
        return self.dir / f"{pid:08d}.pack"

    def _open_writer(self, pid: int, size: int) -> None:
        path = self._path(pid)
        if self._direct:
            with open(path, "rb") as f:                  # the partial last block, to stage again
                f.seek(size - size % ALIGN)
                tail = f.read(size % ALIGN)
            self._writer = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
            assert self._io is not None, "direct writes have their I/O thread"
            self._stage = _Stage(self._writer, size, tail, self._io)
        else:
            self._writer = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self._active, self._size = pid, size
        self._kicked = self._dropped = size

    def _flush_stage(self) -> None:
        """Let the active pack file show every byte appended to it (direct appends keep a partial block)."""
        if self._stage is not None and self._stage.dirty:
            self._stage.write(final=True)

    def _close_writer(self, flush: bool = True) -> None:
        if self._stage is not None:
            try:
                if flush:
                    self._flush_stage()
            finally:
                self._stage.close()
                self._stage = None
        if self._writer is not None:
            os.close(self._writer)
        self._writer, self._active, self._size = None, None, 0

    def _close_readers(self) -> None:
        for fd in self._readers.values():
            os.close(fd)
        self._readers.clear()

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pack_id(path: Path) -> int | None:
    stem, dot, ext = path.name.partition(".")
    return int(stem) if ext == "pack" and stem.isdigit() else None


def direct_writes_work(where: Path) -> bool:
    """Whether the filesystem of the directory ``where`` takes direct, ALIGN-aligned writes (tmpfs, for
    one, does not): probed with one block written to a file that is removed again."""
    probe = where / f".direct-probe-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        with mmap.mmap(-1, ALIGN) as block:
            return os.pwrite(fd, block, 0) == ALIGN
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
