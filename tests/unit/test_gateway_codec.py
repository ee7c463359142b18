"""The gateway's standard-library msgpack codec (what short programs speak to the gateway with)
agrees with the msgpack package the gateway itself uses, both ways."""

from __future__ import annotations

import math
import random
import struct

import msgpack
import pytest

from agents import gateway

SAMPLES = [
    None, True, False, 0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63,
    0.0, -0.0, 1.5, -2.25e300, math.inf, "", "a", "x" * 31, "x" * 32, "é" * 200, "y" * 70000,
    b"", b"\x00\xff", b"z" * 300, b"z" * 70000, [], list(range(15)), list(range(16)), list(range(70000)),
    {}, {"a": 1}, {str(i): i for i in range(16)}, {str(i): i for i in range(70000)},
    {"report": {"op": "monitor.check", "results": [{"target": "mon@d/agent", "outcome": "ok", "error": None,
                "result": {"state": "OK", "code": 0, "metrics": [{"label": "'a b'", "value": 1.5, "warn": ""}],
                           "truncated": False, "duration": 0.00123, "exit_code": None}}],
                "summary": {"ok": 1}}},
    {"progress": ["mon@d/agent", 3, {"bytes": b"\x01\x02"}]},
]


@pytest.mark.parametrize("obj", SAMPLES, ids=lambda o: repr(o)[:40])
def test_both_ways_agree_with_msgpack(obj: object) -> None:
    ours = gateway.pack(obj)
    assert msgpack.unpackb(ours, raw=False, strict_map_key=False) == obj
    assert gateway.unpack(msgpack.packb(obj, use_bin_type=True)) == obj
    assert gateway.unpack(ours) == obj


def test_every_width_msgpack_writes_is_read() -> None:
    # msgpack.packb picks the narrowest form; these are the forms it never picks for small values.
    assert gateway.unpack(b"\xca" + struct.pack(">f", 0.5)) == 0.5
    for head, fmt in ((b"\xcc", ">B"), (b"\xcd", ">H"), (b"\xce", ">I"), (b"\xd0", ">b"), (b"\xd1", ">h"),
                      (b"\xd2", ">i")):
        assert gateway.unpack(head + struct.pack(fmt, 7)) == 7
    assert gateway.unpack(b"\xd9\x01a") == "a" and gateway.unpack(b"\xc5\x00\x01b") == b"b"
    assert gateway.unpack(b"\xdc\x00\x01\xc0") == [None] and gateway.unpack(b"\xde\x00\x01\xa1k\x01") == {"k": 1}


def test_random_reports_agree() -> None:
    rng = random.Random(4)

    def value(depth: int) -> object:
        kind = rng.randrange(8 if depth < 4 else 5)
        if kind == 0:
            return rng.choice([None, True, False])
        if kind == 1:
            return rng.randint(-2**63, 2**64 - 1) if rng.random() < 0.3 else rng.randint(-300, 70000)
        if kind == 2:
            return rng.uniform(-1e9, 1e9)
        if kind == 3:
            return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(160, 0x2FFF)]))
                           for _ in range(rng.choice([0, 5, 31, 40, 300])))
        if kind == 4:
            return rng.randbytes(rng.choice([0, 3, 300]))
        if kind == 5:
            return [value(depth + 1) for _ in range(rng.choice([0, 3, 20]))]
        return {f"k{i}": value(depth + 1) for i in range(rng.choice([0, 3, 17]))}

    for _ in range(300):
        obj = value(0)
        assert gateway.unpack(msgpack.packb(obj, use_bin_type=True)) == obj
        assert msgpack.unpackb(gateway.pack(obj), raw=False) == obj


@pytest.mark.parametrize("data", [b"", b"\x92\x01", b"\xa5abc", b"\xcd\x01", b"\xc1", b"\xd4\x01\x00",
                                  b"\x81\x90\x01", b"\x01\x02", b"\xa2\xff\xfe", b"\x91" * 100000 + b"\xc0"])
def test_malformed_frames_are_value_errors(data: bytes) -> None:
    with pytest.raises(ValueError):
        gateway.unpack(data)


def test_what_it_cannot_pack_is_refused() -> None:
    with pytest.raises(TypeError):
        gateway.pack({"x": object()})
    with pytest.raises(OverflowError):
        gateway.pack(2**64)
