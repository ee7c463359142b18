"""The replication data plane: a driver's send stream moved over a direct TCP connection, resumable.

The plan (this module is its first, tested part: the transfer between two endpoints):

1. Negotiation over XMPP. `storage.replicate` on the source asks the target storage agent for an inbox
   (`storage.package.receive`, say): the target answers with an address, a transfer id and a one-time token
   (Inbox.offer). Every (re)connection needs a fresh token: a token admits exactly one connection.
2. The stream. One TCP connection (TLS on by default per action: Inbox takes an ssl context) carries
   msgpack frames framed as stream.py frames them. The sender says hello with the token and the transfer
   id; the inbox answers how many bytes of this transfer it already holds and the BLAKE3 of those bytes;
   the sender regenerates its stream, checks that its first bytes hash the same (else the inbox starts
   over), skips them, and sends only the rest as data frames, then a done frame with the total length and
   digest. Nothing already received is sent again; the inbox confirms only a complete, matching spool.
3. Atomic publish. The inbox spools to a private file; the driver's receive publishes all or nothing (and
   verifies the stream's own end-to-end checksum) from a complete spool, or, for a driver that can, from
   a SpoolTail following the spool as it is written, which ends only once the inbox verified the stream.
4. Throttle. The sender paces data through a Throttle whose rate can be changed at any moment (the
   `storage.replication.throttle` op will call set_rate on the running action).
5. Built on this: packages.py (the target's packages and inboxes), replication.py (the source's actions,
   updates, schedules and progress) and replication_ops.py (the ops).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import msgpack

from agents.storage.driver import StorageError
from agents.storage.names import validate_name
from agents.storage.stream import encode_frame

_LEN = struct.Struct(">I")
_MAX_FRAME = 16 * 1024 * 1024
_DATA_BYTES = 1 << 20             # most bytes per data frame
# A source piece at least this long travels as it is (no copy); shorter ones are joined up to _DATA_BYTES.
_WHOLE_PIECE = 64 * 1024
_HASH_READ = 1 << 20
# Both ends buffer a few frames: the sender's socket is still being fed while its next piece is read, and
# the receiver's reader does not stop and restart the socket for every frame (asyncio's default is 64 KiB).
_STREAM_LIMIT = 4 * _DATA_BYTES
_WRITE_HIGH = 4 * _DATA_BYTES

# A data frame is the msgpack map {"t": "data", "off": <uint64>, "d": <bin32>}, written as this fixed head
# and then the data itself, so the data is never copied into a frame; any msgpack reader reads it.
_DATA_HEAD = struct.Struct(">13sQ3sI")
_DATA_KEYS = (b"\x83\xa1t\xa4data\xa3off\xcf", b"\xa1d\xc6")
_DATA_BODY_HEAD = _DATA_HEAD.size


def _data_frame_head(offset: int, nbytes: int) -> bytes:
    return _LEN.pack(_DATA_HEAD.size + nbytes) + _DATA_HEAD.pack(_DATA_KEYS[0], offset, _DATA_KEYS[1], nbytes)


def _parse_data(body: bytes) -> tuple[int, memoryview] | None:
    """(offset, data) of a data frame in the fixed layout above, the data a view of `body` (no copy); None
    for any other frame, which msgpack then reads."""
    if len(body) < _DATA_BODY_HEAD or not body.startswith(_DATA_KEYS[0]):
        return None
    _, offset, d_key, nbytes = _DATA_HEAD.unpack_from(body)
    if d_key != _DATA_KEYS[1] or nbytes != len(body) - _DATA_BODY_HEAD:
        return None
    return offset, memoryview(body)[_DATA_BODY_HEAD:]


IDLE_TIMEOUT = 60.0               # a silent peer is dropped, so a half-open connection cannot hold a transfer


async def _read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        head = await asyncio.wait_for(reader.readexactly(_LEN.size), IDLE_TIMEOUT)
        (length,) = _LEN.unpack(head)
        if length > _MAX_FRAME:
            raise StorageError(f"transfer peer sent a {length}-byte frame, over the limit", code="corrupt")
        body = await asyncio.wait_for(reader.readexactly(length), IDLE_TIMEOUT)
        data = _parse_data(body)
        if data is not None:
            return {"t": "data", "off": data[0], "d": data[1]}
        frame = msgpack.unpackb(body, raw=False)
    except asyncio.IncompleteReadError:
        raise StorageError("transfer connection closed mid-frame; resume the transfer", code="failed") from None
    except TimeoutError:
        raise StorageError(f"transfer peer silent for {IDLE_TIMEOUT:g}s; resume the transfer",
                           code="failed") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("t"), str):
        raise StorageError("transfer peer sent a frame without a type", code="corrupt")
    return frame


class Throttle:
    """Paces bytes to a rate (bytes per second; None for no limit) that may change at any time."""

    def __init__(self, rate: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._rate: float | None = None
        self._next = clock()          # when the next byte may go
        self.set_rate(rate)

    @property
    def rate(self) -> float | None:
        return self._rate

    def set_rate(self, rate: float | None) -> None:
        if rate is not None and not rate > 0:
            raise StorageError(f"throttle rate must be a positive number of bytes per second or none, got "
                               f"{rate!r}", code="invalid")
        self._rate = rate
        self._next = min(self._next, self._clock())     # a new rate applies from now, owing nothing

    def delay_for(self, nbytes: int) -> float:
        """Account for sending `nbytes` now; return how long to wait before sending them."""
        now = self._clock()
        if self._rate is None:
            self._next = now
            return 0.0
        start = max(self._next, now)
        self._next = start + nbytes / self._rate
        return start - now

    async def pace(self, nbytes: int) -> None:
        delay = self.delay_for(nbytes)
        if delay > 0:
            await asyncio.sleep(delay)


class SpoolTail:
    """One connection's spool read back from its first byte while the connection appends to it, for a
    consumer in another thread (a driver's receive overlapping the transfer). `pieces` yields the spool's
    bytes as they are written and ends normally only once the inbox has verified the whole stream (its
    length and BLAKE3); if the connection fails first, iteration raises StorageError, so a receive fed from
    it never publishes a stream that did not arrive whole. Written on the event loop, read in a thread."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self._size = size               # bytes of the spool written and flushed so far
        self._end: bool | str = False   # True: verified whole; a string: why the connection failed
        self._cond = threading.Condition()

    @property
    def aborted(self) -> bool:
        with self._cond:
            return isinstance(self._end, str)

    def grew(self, size: int) -> None:
        with self._cond:
            self._size = size
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            if self._end is False:
                self._end = True
            self._cond.notify_all()

    def abort(self, why: str) -> None:
        with self._cond:
            if self._end is False:
                self._end = why
            self._cond.notify_all()

    def pieces(self) -> Generator[bytes, None, None]:
        pos = 0
        with open(self.path, "rb") as f:
            while True:
                with self._cond:
                    while pos >= self._size and self._end is False:
                        self._cond.wait()
                    if isinstance(self._end, str):
                        raise StorageError(f"the transfer was interrupted ({self._end}); nothing was "
                                           f"published, resume the transfer", code="failed")
                    size, whole = self._size, self._end is True
                if pos >= size and whole:
                    return
                block = f.read(min(_HASH_READ, size - pos))
                if not block:       # the spool was cut short under us: only a failing connection does that
                    raise StorageError("the spool shrank while it was being received; nothing was published, "
                                       "resume the transfer", code="failed")
                pos += len(block)
                yield block


@dataclass
class _Transfer:
    spool: Path
    tokens: set[str] = field(default_factory=set)
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    # One connection at a time appends to the spool: a resumed sender waits until the cut one is done.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Open connections, so a destroyed package (or a test) can cut them; and the bytes ever appended to
    # the spool, which shows that a resumed transfer received nothing twice.
    writers: set[asyncio.StreamWriter] = field(default_factory=set)


class Inbox:
    """The receiving endpoint: a TCP listener that spools each transfer to a private file."""

    def __init__(self, spool_dir: Path, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None):
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = 0
        self._ssl = ssl_context
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transfers: dict[str, _Transfer] = {}
        self._received: dict[str, int] = {}     # bytes appended per transfer, kept after discard
        # Called on the event loop with (transfer, tail) when a connection starts appending to a spool it
        # will finish: a receive can then follow the stream as it arrives instead of after its end.
        self.on_stream: Callable[[str, SpoolTail], None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._serve, self.host, 0, ssl=self._ssl, limit=_STREAM_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def offer(self, transfer: str) -> str:
        """A one-time token admitting one connection for `transfer` (new, or resumed from its spool)."""
        validate_name(transfer, "transfer id")
        entry = self._transfers.setdefault(transfer, _Transfer(self.spool_dir / f"{transfer}.part"))
        token = secrets.token_urlsafe(24)
        entry.tokens.add(token)
        return token

    def held(self, transfer: str) -> int:
        spool = self.spool_dir / f"{transfer}.part"
        return spool.stat().st_size if spool.exists() else 0

    async def completed(self, transfer: str) -> Path:
        """Wait until the whole stream of `transfer` is spooled; return the spool file."""
        entry = self._transfers[transfer]
        await entry.complete.wait()
        return entry.spool

    def is_complete(self, transfer: str) -> bool:
        entry = self._transfers.get(transfer)
        return entry is not None and entry.complete.is_set()

    def spool(self, transfer: str) -> Path:
        return self._transfers[transfer].spool

    def received(self, transfer: str) -> int:
        """Bytes appended to the spool of `transfer` by every connection of this process."""
        return self._received.get(transfer, 0)

    def connected(self, transfer: str) -> bool:
        """Whether a connection of `transfer` is open now."""
        entry = self._transfers.get(transfer)
        return entry is not None and bool(entry.writers)

    def cut(self, transfer: str) -> int:
        """Abort the open connections of `transfer` (as a network fault would); return how many."""
        entry = self._transfers.get(transfer)
        writers = list(entry.writers) if entry is not None else []
        for writer in writers:
            writer.transport.abort()
        return len(writers)

    def discard(self, transfer: str) -> None:
        """Forget `transfer`: cut its connections and remove its spool. Callable from a worker thread (a
        package destroyed by a driver call): the connections are cut on the event loop they belong to."""
        entry = self._transfers.pop(transfer, None)
        if entry is not None:
            for writer in list(entry.writers):
                if self._loop is not None:
                    self._loop.call_soon_threadsafe(writer.transport.abort)
            entry.spool.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._receive(reader, writer)
        except (StorageError, ConnectionError, OSError) as exc:
            try:
                writer.write(encode_frame({"t": "error", "text": str(exc)}))
                await writer.drain()
            except (ConnectionError, OSError):
                pass
        finally:
            writer.close()

    async def _receive(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await _read_frame(reader)
        entry = self._transfers.get(str(hello.get("transfer")))
        if hello.get("t") != "hello" or entry is None or hello.get("token") not in entry.tokens:
            raise StorageError("transfer refused: unknown transfer or a token that is wrong or already "
                               "used; ask the target for a new one", code="invalid")
        entry.tokens.discard(hello["token"])                         # one connection per token
        entry.writers.add(writer)
        try:
            async with entry.lock:
                await self._spool(str(hello["transfer"]), entry, reader, writer)
        finally:
            entry.writers.discard(writer)

    async def _spool(self, transfer: str, entry: _Transfer, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        if entry.complete.is_set():
            writer.write(encode_frame({"t": "ok", "bytes": entry.spool.stat().st_size}))
            await writer.drain()
            return
        held, digest = await asyncio.to_thread(_hash_file, entry.spool)
        writer.write(encode_frame({"t": "have", "bytes": held, "blake3": digest.digest()}))
        await writer.drain()
        tail: SpoolTail | None = None
        try:
            with open(entry.spool, "ab") as out:
                while True:
                    frame = await _read_frame(reader)
                    if frame["t"] == "restart":       # the sender's stream does not extend what we hold
                        out.truncate(0)
                        out.seek(0)
                        digest, held = blake3.blake3(), 0
                        continue
                    if tail is None and self.on_stream is not None and frame["t"] in ("data", "done"):
                        # From here the spool only grows (a restart comes before any data).
                        tail = SpoolTail(entry.spool, held)
                        self.on_stream(transfer, tail)
                    if frame["t"] == "data":
                        if frame.get("off") != held:
                            raise StorageError(f"transfer data at offset {frame.get('off')} but {held} bytes "
                                               f"are held; resume the transfer", code="corrupt")
                        out.write(frame["d"])
                        digest.update(frame["d"])
                        held += len(frame["d"])
                        self._received[transfer] = self._received.get(transfer, 0) + len(frame["d"])
                        if tail is not None:
                            out.flush()             # a MiB frame is written through anyway: no extra copy
                            tail.grew(held)
                    elif frame["t"] == "done":
                        out.flush()
                        await asyncio.to_thread(os.fsync, out.fileno())     # seconds, for a large spool
                        if frame.get("bytes") != held or frame.get("blake3") != digest.digest():
                            if tail is not None:
                                tail.abort("its checksum did not match")
                            out.truncate(0)
                            raise StorageError("transfer checksum mismatch over the whole stream; the spool "
                                               "was dropped, send it again", code="corrupt")
                        break
                    else:
                        raise StorageError(f"transfer peer sent an unknown frame {frame['t']!r}",
                                           code="unsupported")
            entry.complete.set()
            writer.write(encode_frame({"t": "ok", "bytes": held}))
            await writer.drain()
        except BaseException as exc:
            if tail is not None:
                tail.abort(str(exc) or type(exc).__name__)
            raise
        if tail is not None:
            tail.finish()       # verified, and the sender told: a receive following the stream may publish


def _hash_file(path: Path) -> tuple[int, Any]:
    digest = blake3.blake3()
    size = 0
    if path.exists():
        with open(path, "rb") as f:
            while block := f.read(_HASH_READ):
                digest.update(block)
                size += len(block)
    return size, digest


@dataclass(frozen=True)
class SendResult:
    total_bytes: int        # length of the whole stream
    sent_bytes: int         # bytes this connection carried (the rest the inbox already held)
    resumed_from: int


async def send(host: str, port: int, transfer: str, token: str, stream: Callable[[], Iterable[bytes]], *,
               throttle: Throttle | None = None, ssl_context: ssl.SSLContext | None = None,
               on_bytes: Callable[[int], Awaitable[None] | None] | None = None) -> SendResult:
    """Send the stream `stream()` yields (a driver's send; called anew on each attempt) to an inbox,
    skipping what it already holds. Raises StorageError or OSError when the connection fails: ask the
    inbox for a new token and call again to resume.

    The connection runs on an event loop of its own in a worker thread: encrypting and writing the stream
    (OpenSSL releases the GIL) then keeps neither the caller's loop nor an inbox on it waiting, and the
    caller's loop stays free for its other traffic. `on_bytes` is still called on the caller's loop.
    Cancelling the call cancels the connection and returns once the stream is closed."""
    caller = asyncio.get_running_loop()
    report = None
    if on_bytes is not None:
        async def on_callers_loop(n: int) -> None:
            maybe = on_bytes(n)
            if maybe is not None:
                await maybe

        async def report(n: int) -> None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(on_callers_loop(n), caller))

    own: dict[str, Any] = {}

    async def connection() -> SendResult:
        own["loop"], own["task"] = asyncio.get_running_loop(), asyncio.current_task()
        if own.get("cancelled"):
            raise asyncio.CancelledError
        return await _send(host, port, transfer, token, stream, throttle or Throttle(), ssl_context, report)

    running = asyncio.ensure_future(asyncio.to_thread(asyncio.run, connection()))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        own["cancelled"] = True
        if "task" in own:
            with contextlib.suppress(RuntimeError):     # its loop closed already: nothing left to cancel
                own["loop"].call_soon_threadsafe(own["task"].cancel)
        while not running.done():       # the connection's clean-up (closing the stream) ends before this call
            try:
                await asyncio.shield(running)
            except BaseException:
                pass
        raise


async def _send(host: str, port: int, transfer: str, token: str, stream: Callable[[], Iterable[bytes]],
                throttle: Throttle, ssl_context: ssl.SSLContext | None,
                on_bytes: Callable[[int], Awaitable[None]] | None) -> SendResult:
    reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context, limit=_STREAM_LIMIT)
    writer.transport.set_write_buffer_limits(high=_WRITE_HIGH)
    pieces: _Pieces | None = None
    try:
        writer.write(encode_frame({"t": "hello", "transfer": transfer, "token": token}))
        await writer.drain()
        have = await _read_frame(reader)
        if have["t"] == "ok":
            return SendResult(have["bytes"], 0, have["bytes"])
        if have["t"] != "have":
            raise StorageError(f"inbox refused the transfer: {have.get('text', have['t'])}", code="failed")
        pieces = _Pieces(stream())
        held = int(have["bytes"])
        prefix = await asyncio.to_thread(pieces.skip, held)
        resumed = held
        if prefix.digest() != have["blake3"]:
            # The stream differs from what the inbox holds (a regenerated btrfs send, say): start over.
            writer.write(encode_frame({"t": "restart"}))
            await _close(pieces)
            pieces = None
            pieces = _Pieces(stream())
            resumed = 0
        offset, sent = resumed, 0
        while data := await asyncio.to_thread(pieces.next, _DATA_BYTES):
            await throttle.pace(len(data))
            writer.write(_data_frame_head(offset, len(data)))
            writer.write(data)
            await writer.drain()
            offset += len(data)
            sent += len(data)
            if on_bytes is not None:
                await on_bytes(len(data))
        writer.write(encode_frame({"t": "done", "bytes": offset, "blake3": pieces.digest.digest()}))
        await writer.drain()
        answer = await _read_frame(reader)
        if answer["t"] != "ok":
            raise StorageError(f"inbox did not accept the stream: {answer.get('text', answer['t'])}",
                               code="failed")
        return SendResult(offset, sent, resumed)
    finally:
        writer.close()
        if pieces is not None:
            await _close(pieces)


async def _close(pieces: _Pieces) -> None:
    """Close the stream now, on every way out (done, cut, refused, cancelled): a driver's send holds its
    snapshots and may run a child (`btrfs send`) until its generator is closed, and leaving that to the
    garbage collector kept both alive long after the connection was gone. The close runs in a thread, after
    any piece a worker thread is still reading, and is shielded so that a second cancellation cannot skip it."""
    await asyncio.shield(asyncio.to_thread(pieces.close))


class _Pieces:
    """A byte stream re-cut into pieces of at most a chosen size, hashing everything it hands out or skips.
    A source piece is handed out as a view of itself, not copied; only short ones are joined."""

    def __init__(self, source: Iterable[bytes]) -> None:
        self._source: Iterator[bytes] = iter(source)
        self._rest = memoryview(b"")          # what is left of the source piece being handed out
        self.digest = blake3.blake3()
        # Pieces are read in worker threads; a cancelled read goes on in its thread, and close waits for it
        # (a generator cannot be closed while it runs).
        self._reading = threading.Lock()

    def close(self) -> None:
        with self._reading:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def next(self, size: int) -> memoryview:
        with self._reading:
            return self._next(size)

    def _next(self, size: int) -> memoryview:
        parts: list[memoryview] = []
        have = 0
        while have < size:
            if not self._rest:
                piece = next(self._source, None)
                if piece is None:
                    break
                self._rest = memoryview(piece)
                continue
            take = self._rest[:size - have]
            self._rest = self._rest[len(take):]
            if not parts and len(take) >= _WHOLE_PIECE:
                parts.append(take)
                break
            parts.append(take)
            have += len(take)
        out = parts[0] if len(parts) == 1 else memoryview(b"".join(parts))
        self.digest.update(out)
        return out

    def skip(self, nbytes: int) -> Any:
        """Consume the first `nbytes` (fewer if the stream is shorter); return the digest so far."""
        left = nbytes
        while left > 0:
            got = self.next(min(left, _HASH_READ))
            if not got:
                break
            left -= len(got)
        return self.digest.copy()
