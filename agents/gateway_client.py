"""The gateway's socket protocol as a short program speaks it: the frames, the request, and a call
made with a plain blocking socket (``call_via_gateway_blocking``).

check_vertebra and fence_vertebra are started once per check and per fencing action, so what they
load is most of what they cost. This module and what it imports stay small: no asyncio, no socket
module (``_socket``), no enum (agents.connect_errors), and no msgpack library for frames up to
LEAN_FRAME bytes (agents.lean_msgpack; a larger answer, such as a report from a hundred targets or
more, is read by the library, whose ~5 ms of import is then the smaller cost). The frame format
and the gateway itself are in agents/gateway.py.
"""

from __future__ import annotations

import time

from .connect_errors import CallInterrupted, ConnectError
from .lean_msgpack import packb, unpackb

TYPE_CHECKING = False  # typing costs short programs milliseconds; annotations are strings here
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

MAX_ANSWER = 256 * 1024 * 1024  # a report may carry a result from each of thousands of targets
# Frames up to this are read without the msgpack library: one -H check's report is ~300 bytes; reading
# 54 KB (400 results) in Python took ~5-9 ms, more than the library's import.
LEAN_FRAME = 16 * 1024


class GatewayUnavailable(Exception):
    """No gateway answers at the socket; the caller should log in directly."""


class GatewayRefused(ConnectError):
    """The gateway will not call for this caller (or not as the identity it named); nothing was sent."""


def frame(obj: Any) -> bytes:
    """``obj`` as one frame: a 4-byte big-endian length, then msgpack."""
    data = packb(obj)
    return len(data).to_bytes(4, "big") + data


def unpack(data: bytes) -> Any:
    """A frame's msgpack, as ``msgpack.unpackb(data, raw=False)`` reads it."""
    if len(data) <= LEAN_FRAME:
        return unpackb(data)
    import msgpack

    return msgpack.unpackb(data, raw=False)


def request(jid: str | None, password: str | None, call: dict[str, Any], as_identity: str | None) -> dict[str, Any]:
    """The request frame: the caller's JID and password when it has them, else none (the gateway knows
    the caller by uid), and the identity it asks to call as, if any."""
    request: dict[str, Any] = {"call": with_deadline(call)}
    if jid is not None and password is not None:
        request.update(jid=jid, password=password)
    if as_identity is not None:
        request["as"] = as_identity
    return request


def failure(msg: dict[str, Any]) -> ConnectError:
    """The error an answer without a report stands for: refused (nothing was sent) or failed."""
    text = str(msg.get("error", "gateway gave no answer"))
    return GatewayRefused(text) if msg.get("refused") else ConnectError(text)


def with_deadline(call: dict[str, Any]) -> dict[str, Any]:
    """The call with the caller's end as a clock time (the gateway is on this host: one clock)."""
    if call.get("deadline") is not None:
        return call
    return {**call, "deadline": time.time() + float(call.get("timeout", 30.0))}


def call_via_gateway_blocking(path: Path | str, jid: str | None, password: str | None, call: dict[str, Any], *,
                              limit: float | None = None, as_identity: str | None = None) -> dict[str, Any]:
    """``call_via_gateway`` without an event loop, for short programs: the report as the plain
    mapping ``CallReport.to_dict`` gives (progress reports are read and dropped). Without ``jid`` and
    ``password`` the gateway knows the caller by its Unix user (``as_identity``: as that identity).
    Raises GatewayUnavailable if no gateway answers at ``path``, GatewayRefused if it will not call
    for this caller, ConnectError if it fails during the call
    (the op may have run: do not fall back to a login then), TimeoutError past the same bound as
    ``call_via_gateway`` (the call's timeout plus 20 s for a first login), or past ``limit``
    seconds if that is given."""
    # _socket, the socket module's own core: the module adds enum, selectors and milliseconds of
    # import to a program that needs only connect, sendall and recv.
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
            raise GatewayUnavailable(f"no gateway at {path}: {exc.strerror}") from None
        deadline = time.monotonic() + (float(call.get("timeout", 30.0)) + 20.0 if limit is None else limit)

        def read_exactly(size: int) -> bytes:
            chunks, got = [], 0
            while got < size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the gateway at {path} gave no answer in time")
                sock.settimeout(left)
                try:
                    chunk = sock.recv(min(size - got, 1 << 20))
                except TimeoutError:  # socket.timeout
                    raise TimeoutError(f"the gateway at {path} gave no answer in time") from None
                if not chunk:
                    raise ConnectionResetError("the gateway closed the connection")
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)

        try:
            sock.sendall(frame(request(jid, password, call, as_identity)))
            while True:
                size = int.from_bytes(read_exactly(4), "big")
                if size > MAX_ANSWER:
                    raise ValueError(f"gateway frame of {size} bytes exceeds {MAX_ANSWER}")
                msg = unpack(read_exactly(size))
                if "progress" in msg:
                    continue
                if "report" in msg:
                    return msg["report"]
                raise failure(msg)
        except (ConnectionError, ValueError) as exc:
            # Not GatewayUnavailable: the call may have gone out, and falling back would send it again.
            raise CallInterrupted(f"the gateway at {path} failed during the call ({exc.__class__.__name__});"
                                  " the op may have run") from None
    finally:
        sock.close()
