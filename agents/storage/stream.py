"""The replication stream format: length-prefixed msgpack frames, checksummed end to end with BLAKE3.

A stream is: a header frame (format, version, driver, volume, snapshot names and guids), any number of
payload frames (driver-specific: content-addressed chunks and manifest entries for the embedded driver,
`btrfs send` bytes for btrfs), then an end frame carrying the frame count, byte count and the BLAKE3 digest
of every byte before it. Each frame on the wire is a 4-byte big-endian length followed by one msgpack map
whose "t" key names the frame type. A receiver must publish nothing until `read_frames` has returned
normally: only then is the whole stream known to be complete and intact.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Iterable, Iterator

import blake3
import msgpack

from agents.storage.driver import StorageError

FORMAT = "vertebra-stream"
VERSION = 1
MAX_FRAME_BYTES = 16 * 1024 * 1024
# Frames are small (8 KiB chunks); handing the transport one bytes object per frame would cost a
# syscall each, so the writer coalesces them into pieces of about this size.
PIECE_BYTES = 256 * 1024
_LEN = struct.Struct(">I")


def _corrupt(message: str) -> StorageError:
    return StorageError(message + "; nothing was published, send the stream again", code="corrupt")


def encode_frame(frame: dict[str, Any]) -> bytes:
    return b"".join(_frame_parts(frame))


def _frame_parts(frame: dict[str, Any]) -> tuple[bytes, bytes]:
    """The frame's length prefix and body, apart: joining them would copy the body once more."""
    body = msgpack.packb(frame, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise StorageError(f"stream frame of type {frame.get('t')!r} is {len(body)} bytes, more than "
                           f"{MAX_FRAME_BYTES}; this is a bug in the sender", code="failed")
    return _LEN.pack(len(body)), body


def write_stream(header: dict[str, Any], frames: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    """Frame `header`, then `frames`, then the end frame; yield the bytes in pieces of ~PIECE_BYTES."""
    digest = blake3.blake3()
    count = 0
    total = 0
    pending: list[bytes] = []
    pending_len = 0
    head = dict(header, t="header", format=FORMAT, version=VERSION)
    for frame in _chain([head], frames):
        prefix, body = _frame_parts(frame)
        count += 1
        total += len(prefix) + len(body)
        pending += (prefix, body)
        pending_len += len(prefix) + len(body)
        if pending_len >= PIECE_BYTES:
            piece = b"".join(pending)
            digest.update(piece)            # one call per piece: the same bytes, far fewer calls
            yield piece
            pending, pending_len = [], 0
    piece = b"".join(pending)
    digest.update(piece)
    yield piece + encode_frame({"t": "end", "frames": count, "bytes": total, "blake3": digest.digest()})


def _chain(first: Iterable[dict[str, Any]], rest: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from first
    yield from rest


def read_frames(data: Iterable[bytes], expect_driver: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield the header, then each payload frame, validating as it goes; return normally only after the
    end frame matched. Raises StorageError(code='corrupt') on truncation, corruption or trailing bytes."""
    digest = blake3.blake3()
    buf = bytearray()
    pos = 0
    count = 0
    consumed = 0
    source = iter(data)
    exhausted = False

    def fill(need: int) -> bool:
        nonlocal buf, pos, exhausted
        while len(buf) - pos < need and not exhausted:
            try:
                piece = next(source)
            except StopIteration:
                exhausted = True
                break
            if pos > 1 << 20:
                del buf[:pos]
                pos = 0
            buf += piece
        return len(buf) - pos >= need

    while True:
        if not fill(_LEN.size):
            what = "it is empty" if consumed == 0 and len(buf) == pos else f"it ended after {consumed} bytes"
            raise _corrupt(f"replication stream truncated: {what}, before its end frame")
        (length,) = _LEN.unpack_from(buf, pos)
        if length > MAX_FRAME_BYTES:
            raise _corrupt(f"replication stream corrupt: frame {count} claims {length} bytes, "
                           f"more than the {MAX_FRAME_BYTES} limit")
        if not fill(_LEN.size + length):
            raise _corrupt(f"replication stream truncated inside frame {count} at byte {consumed}")
        size = _LEN.size + length
        # A view of the frame in the buffer, not a copy (msgpack copies what it returns anyway), let go
        # before the buffer next changes: a bytearray with a live view cannot be resized.
        with memoryview(buf)[pos:pos + size] as raw:
            try:
                frame = msgpack.unpackb(raw[_LEN.size:], raw=False)
            except Exception as exc:  # msgpack raises several unrelated types for garbage
                raise _corrupt(f"replication stream corrupt: frame {count} at byte {consumed} is not "
                               f"msgpack ({exc})") from None
            if not (isinstance(frame, dict) and frame.get("t") == "end"):
                digest.update(raw)          # every byte before the end frame
        pos += size
        if count == 0:
            _check_header(frame, expect_driver)
        if not isinstance(frame, dict) or not isinstance(frame.get("t"), str):
            raise _corrupt(f"replication stream corrupt: frame {count} has no type")
        if frame["t"] == "end":
            if count == 0:
                raise _corrupt("replication stream has no header")
            if frame.get("frames") != count or frame.get("bytes") != consumed \
                    or frame.get("blake3") != digest.digest():
                raise _corrupt(f"replication stream corrupt: checksum or length mismatch over {count} "
                               f"frames and {consumed} bytes")
            if fill(1):
                raise _corrupt("replication stream has data after its end frame")
            return
        consumed += size
        count += 1
        yield frame


def peek_header(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The header frame at the start of a (possibly partial) stream file, or None if it has not fully
    arrived or is not a header. Nothing after it is checked."""
    try:
        with open(path, "rb") as f:
            head = f.read(_LEN.size)
            if len(head) < _LEN.size:
                return None
            (length,) = _LEN.unpack(head)
            if length > MAX_FRAME_BYTES:
                return None
            body = f.read(length)
    except OSError:
        return None
    if len(body) < length:
        return None
    try:
        frame = msgpack.unpackb(body, raw=False)
    except Exception:  # msgpack raises several unrelated types for garbage
        return None
    if not isinstance(frame, dict) or frame.get("t") != "header" or frame.get("format") != FORMAT:
        return None
    return frame


def _check_header(frame: Any, expect_driver: str | None) -> None:
    if not isinstance(frame, dict) or frame.get("t") != "header" or frame.get("format") != FORMAT:
        raise _corrupt("this is not a Vertebra replication stream (no header frame)")
    if frame.get("version") != VERSION:
        raise StorageError(f"replication stream format version {frame.get('version')!r} is not supported "
                           f"(this side reads version {VERSION}); upgrade the older agent", code="unsupported")
    if expect_driver is not None and frame.get("driver") != expect_driver:
        raise StorageError(f"this stream was sent by the {frame.get('driver')!r} driver and can only be "
                           f"received by the same driver, not {expect_driver!r}", code="unsupported")
