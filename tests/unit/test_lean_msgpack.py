"""agents.lean_msgpack against the msgpack library: the same bytes out, the same objects back, and the
same refusals (ValueError) for what it does not read."""

from __future__ import annotations

import math
import random

import msgpack
import pytest

from agents import lean_msgpack

EDGES = [None, True, False, 0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -1, -32, -33,
         -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63, 0.0, -0.0, 1.5, 1e300, math.inf, "", "a" * 31,
         "a" * 32, "a" * 255, "a" * 256, "a" * 65535, "a" * 65536, "é✓\U0001f600", b"", b"x" * 255, b"x" * 256,
         b"x" * 65536, [], list(range(15)), list(range(16)), list(range(65536)), {}, {str(i): i for i in range(15)},
         {str(i): i for i in range(16)}, {str(i): i for i in range(65536)}, {b"k": [None, {"n": -1.25}]},
         {"report": {"results": [{"target": "mon@x.test/agent", "outcome": "ok", "result": {"code": 0}}]}}]


def _random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-2**63, 2**64 - 1) >> rng.randrange(64)
    if kind == 2:
        return rng.uniform(-1e9, 1e9)
    if kind == 3:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0xD7FF)]))
                       for _ in range(rng.choice([0, 5, 40, 300])))
    if kind == 4:
        return rng.randbytes(rng.choice([0, 7, 300]))
    if kind == 5:
        return -rng.randrange(1, 40)
    if kind in (6, 7):
        return [_random_value(rng, depth + 1) for _ in range(rng.choice([0, 3, 20]))]
    return {f"k{rng.randrange(1000)}": _random_value(rng, depth + 1) for _ in range(rng.choice([0, 3, 20]))}


def _cases() -> list[object]:
    rng = random.Random(19)
    return EDGES + [_random_value(rng) for _ in range(100)]


@pytest.mark.parametrize("value", _cases(), ids=lambda v: type(v).__name__)
def test_packs_as_the_library_and_reads_back_what_it_reads(value: object) -> None:
    packed = msgpack.packb(value, use_bin_type=True)
    assert lean_msgpack.packb(value) == packed
    assert lean_msgpack.unpackb(packed) == msgpack.unpackb(packed, raw=False)


def test_tuples_and_subclasses_pack_as_the_library_packs_them() -> None:
    import enum

    class Code(enum.IntEnum):
        X = 3

    class Word(str, enum.Enum):
        OK = "ok"

    value = {"t": (1, 2), "c": Code.X, "w": Word.OK, "m": memoryview(b"ab")}
    assert lean_msgpack.packb(value) == msgpack.packb(value, use_bin_type=True)


BAD = [b"", b"\x92\x01", b"\xa5abc", b"\x01\x02", b"\xc1", b"\x81\x01\x02", b"\x81\xc0\x01", b"\xa2\xff\xfe",
       b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff\x00", b"\xcb\x00"]
# The library reads these (extension types, deeper nesting); the gateway's frames have neither.
REFUSED_HERE = [b"\xd4\x01\x02", b"\xc7\x01\x05x", b"\x91" * 300 + b"\xc0"]


@pytest.mark.parametrize("data", BAD, ids=lambda d: d[:8].hex())
def test_refuses_what_the_library_refuses(data: bytes) -> None:
    with pytest.raises(ValueError):
        lean_msgpack.unpackb(data)
    with pytest.raises(ValueError):
        msgpack.unpackb(data, raw=False)


@pytest.mark.parametrize("data", REFUSED_HERE, ids=lambda d: d[:8].hex())
def test_refuses_extension_types_and_deep_nesting(data: bytes) -> None:
    with pytest.raises(ValueError):
        lean_msgpack.unpackb(data)


def test_refuses_what_it_cannot_pack() -> None:
    with pytest.raises(TypeError):
        lean_msgpack.packb({"x": object()})
    with pytest.raises(OverflowError):
        lean_msgpack.packb(2**64)
    with pytest.raises(ValueError):
        lean_msgpack.packb("\ud800")


def test_gateway_frames_over_the_lean_size_are_read_by_the_library() -> None:
    from agents import gateway_client

    big = {"report": {"results": [{"target": f"mon{i}@x.test/agent", "outcome": "ok"} for i in range(5000)]}}
    data = msgpack.packb(big, use_bin_type=True)
    assert len(data) > gateway_client.LEAN_FRAME
    assert gateway_client.unpack(data) == big
    assert gateway_client.unpack(gateway_client.frame({"x": [1.5, None]})[4:]) == {"x": [1.5, None]}
