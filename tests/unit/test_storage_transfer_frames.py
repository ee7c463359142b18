"""The transfer's data frames are written as a fixed head and the data uncopied: any msgpack reader must
read them as the map they stand for, and the inbox's reader must take the same frame written by msgpack
itself (an older sender) through its general path."""

import asyncio
import os

import blake3
import msgpack

from agents.storage.transfer import _data_frame_head, _Pieces, _read_frame


async def _frames(wire: bytes) -> list[dict]:
    reader = asyncio.StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    return [await _read_frame(reader) for _ in range(2)]


def test_a_data_frame_is_the_msgpack_map_it_stands_for():
    data = os.urandom(70_000)
    for offset in (0, 5, 1 << 40):
        wire = _data_frame_head(offset, len(data)) + data
        assert int.from_bytes(wire[:4], "big") == len(wire) - 4
        assert msgpack.unpackb(wire[4:], raw=False) == {"t": "data", "off": offset, "d": data}


def test_the_reader_takes_both_the_fixed_layout_and_plain_msgpack():
    data = os.urandom(1000)
    packed = msgpack.packb({"t": "data", "off": 7, "d": data}, use_bin_type=True)
    wire = _data_frame_head(3, len(data)) + data + len(packed).to_bytes(4, "big") + packed
    fast, plain = asyncio.run(_frames(wire))
    assert (fast["t"], fast["off"], bytes(fast["d"])) == ("data", 3, data)
    assert (plain["t"], plain["off"], bytes(plain["d"])) == ("data", 7, data)


def test_pieces_hand_out_every_byte_once_in_order_and_hash_them():

    source = [os.urandom(n) for n in (10, 300_000, 5, 6, 2_000_000, 64 * 1024, 1)]
    pieces = _Pieces(iter(source))
    prefix = pieces.skip(100_000)
    out = []
    while got := pieces.next(1 << 20):
        assert len(got) <= 1 << 20
        out.append(bytes(got))
    whole = b"".join(source)
    assert prefix.digest() == blake3.blake3(whole[:100_000]).digest()
    assert b"".join(out) == whole[100_000:]
    assert pieces.digest.digest() == blake3.blake3(whole).digest()
