"""msgpack for short programs: the part of the format the gateway's frames use, without the library's
import.

``import msgpack`` costs a program ~5 ms of its start (its ``ext`` module loads datetime and collections
for the timestamp type), about a tenth of what check_vertebra costs Nagios per check. The frames a
short program writes and reads are small maps of strings, numbers, lists, bytes and maps, so it packs
and unpacks those here, byte for byte as ``msgpack.packb(obj, use_bin_type=True)`` and
``msgpack.unpackb(data, raw=False)`` do (tests/unit/test_lean_msgpack.py holds the two to agreement).
Extension types (timestamps among them) are refused, as is anything malformed: ValueError, as the
library raises. Long-lived processes (the gateway itself) use the library.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs a short program milliseconds; annotations are strings here
if TYPE_CHECKING:
    from typing import Any

MAX_DEPTH = 256  # nesting beyond this is refused rather than run into the interpreter's recursion limit


def packb(obj: Any) -> bytes:
    """``obj`` (None, bool, int, float, str, bytes, list, tuple, dict of those) as msgpack."""
    out = bytearray()
    _pack(obj, out, 0)
    return bytes(out)


def _pack(obj: Any, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("object nested too deeply to pack")
    if obj is None:
        out.append(0xC0)
    elif obj is True or obj is False:
        out.append(0xC3 if obj else 0xC2)
    elif isinstance(obj, int):
        _pack_int(obj, out)
    elif isinstance(obj, float):
        import struct

        out += b"\xcb" + struct.pack(">d", obj)
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        _head(out, len(data), 0xA0, 32, b"\xd9\xda\xdb")
        out += data
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        _head(out, len(data), None, 0, b"\xc4\xc5\xc6")
        out += data
    elif isinstance(obj, (list, tuple)):
        _head(out, len(obj), 0x90, 16, b"\x00\xdc\xdd")
        for item in obj:
            _pack(item, out, depth + 1)
    elif isinstance(obj, dict):
        _head(out, len(obj), 0x80, 16, b"\x00\xde\xdf")
        for key, value in obj.items():
            _pack(key, out, depth + 1)
            _pack(value, out, depth + 1)
    else:
        raise TypeError(f"cannot serialize {type(obj).__name__} object")


def _head(out: bytearray, n: int, fix: int | None, fix_limit: int, codes: bytes) -> None:
    """A str, bin, array or map header: the fix form below ``fix_limit``, else 8-, 16- or 32-bit length
    (``codes``; arrays and maps have no 8-bit form, and msgpack writes none)."""
    if fix is not None and n < fix_limit:
        out.append(fix | n)
    elif n < 0x100 and codes[0]:
        out += bytes((codes[0], n))
    elif n < 0x10000:
        out.append(codes[1])
        out += n.to_bytes(2, "big")
    elif n < 0x100000000:
        out.append(codes[2])
        out += n.to_bytes(4, "big")
    else:
        raise ValueError(f"object of length {n} is too large to pack")


def _pack_int(n: int, out: bytearray) -> None:
    if 0 <= n < 0x80:
        out.append(n)
    elif -32 <= n < 0:
        out.append(n & 0xFF)
    elif n >= 0:
        for code, size in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
            if n < 1 << (8 * size):
                out.append(code)
                out += n.to_bytes(size, "big")
                return
        raise OverflowError("integer out of range for msgpack")
    else:
        for code, size in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
            if n >= -(1 << (8 * size - 1)):
                out.append(code)
                out += n.to_bytes(size, "big", signed=True)
                return
        raise OverflowError("integer out of range for msgpack")


def unpackb(data: bytes) -> Any:
    """The one object ``data`` holds; ValueError if it holds anything else, more, or less."""
    obj, end = _Reader(data).read(0, 0)
    if end != len(data):
        raise ValueError(f"{len(data) - end} bytes of extra data after the object")
    return obj


# First byte -> (kind, length bytes) for the forms whose length follows the type byte.
_SIZED = {0xC4: ("bin", 1), 0xC5: ("bin", 2), 0xC6: ("bin", 4), 0xD9: ("str", 1), 0xDA: ("str", 2),
          0xDB: ("str", 4), 0xDC: ("array", 2), 0xDD: ("array", 4), 0xDE: ("map", 2), 0xDF: ("map", 4)}
_UINT = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_INT = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)

    def take(self, at: int, n: int) -> tuple[memoryview, int]:
        if at + n > len(self.data):
            raise ValueError("msgpack data ends inside an object")
        return self.data[at:at + n], at + n

    def read(self, at: int, depth: int) -> tuple[Any, int]:
        if depth > MAX_DEPTH:
            raise ValueError("msgpack data nested too deeply")
        if at >= len(self.data):
            raise ValueError("msgpack data ends inside an object")
        b = self.data[at]
        at += 1
        if b < 0x80:
            return b, at
        if b >= 0xE0:
            return b - 0x100, at
        if 0xA0 <= b < 0xC0:
            return self.text(at, b & 0x1F)
        if 0x90 <= b < 0xA0:
            return self.array(at, b & 0x0F, depth)
        if 0x80 <= b < 0x90:
            return self.map(at, b & 0x0F, depth)
        if b == 0xC0:
            return None, at
        if b in (0xC2, 0xC3):
            return b == 0xC3, at
        if b in _UINT or b in _INT:
            raw, at = self.take(at, _UINT.get(b) or _INT[b])
            return int.from_bytes(raw, "big", signed=b in _INT), at
        if b in (0xCA, 0xCB):
            import struct

            raw, at = self.take(at, 4 if b == 0xCA else 8)
            return struct.unpack(">f" if b == 0xCA else ">d", raw)[0], at
        if b in _SIZED:
            kind, size = _SIZED[b]
            raw, at = self.take(at, size)
            n = int.from_bytes(raw, "big")
            if kind == "str":
                return self.text(at, n)
            if kind == "bin":
                raw, at = self.take(at, n)
                return bytes(raw), at
            return (self.array if kind == "array" else self.map)(at, n, depth)
        raise ValueError(f"msgpack type 0x{b:02x} is not read here (an extension type, or reserved)")

    def text(self, at: int, n: int) -> tuple[str, int]:
        raw, at = self.take(at, n)
        try:
            return str(raw, "utf-8"), at
        except UnicodeDecodeError as exc:
            raise ValueError(f"msgpack string is not UTF-8: {exc}") from None

    def array(self, at: int, n: int, depth: int) -> tuple[list[Any], int]:
        if n > len(self.data) - at:  # each item takes at least a byte: refuse a length the data cannot hold
            raise ValueError("msgpack data ends inside an array")
        items = []
        for _ in range(n):
            item, at = self.read(at, depth + 1)
            items.append(item)
        return items, at

    def map(self, at: int, n: int, depth: int) -> tuple[dict[Any, Any], int]:
        if 2 * n > len(self.data) - at:
            raise ValueError("msgpack data ends inside a map")
        out: dict[Any, Any] = {}
        for _ in range(n):
            key, at = self.read(at, depth + 1)
            if type(key) not in (str, bytes):  # the library's strict_map_key
                raise ValueError(f"{type(key).__name__} is not allowed for map key")
            out[key], at = self.read(at, depth + 1)
        return out, at
