"""The replication stream framing: round trip, and refusal of truncated, corrupted or foreign streams."""

import os

import pytest

from agents.storage.driver import StorageError
from agents.storage.stream import read_frames, write_stream


def _stream(n=50):
    frames = [{"t": "chunk", "id": i, "d": os.urandom(3000)} for i in range(n)]
    return frames, b"".join(write_stream({"driver": "test", "volume": "v"}, frames))


def _read(data: bytes, piece=777):
    return list(read_frames(data[i:i + piece] for i in range(0, len(data), piece)))


def test_round_trip_in_arbitrary_pieces():
    frames, data = _stream()
    got = _read(data)
    assert got[0]["t"] == "header" and got[0]["volume"] == "v" and got[0]["version"] == 1
    assert got[1:] == frames


@pytest.mark.parametrize("cut", [1, 5, 1000, -1, -40])
def test_truncation_refused(cut):
    _, data = _stream()
    with pytest.raises(StorageError) as err:
        _read(data[:cut])
    assert err.value.code == "corrupt"
    assert "truncated" in str(err.value) or "checksum" in str(err.value)


def test_flipped_byte_refused():
    _, data = _stream()
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x01
    with pytest.raises(StorageError) as err:
        _read(bytes(bad))
    assert err.value.code == "corrupt"


def test_trailing_garbage_refused():
    _, data = _stream(3)
    with pytest.raises(StorageError, match="after its end frame"):
        _read(data + b"x")


def test_empty_and_foreign_streams_refused():
    with pytest.raises(StorageError, match="empty"):
        _read(b"")
    with pytest.raises(StorageError, match="not a Vertebra replication stream"):
        _read(b"\x00\x00\x00\x01\xc0" + b"x" * 10)


def test_wrong_driver_refused():
    _, data = _stream(1)
    with pytest.raises(StorageError, match="sent by the 'test' driver"):
        list(read_frames([data], expect_driver="btrfs"))
