"""The local gateway: short-lived programs reach the mesh through a long-lived agent's Unix socket.

A login costs tens of milliseconds of SCRAM; `check_vertebra`, `fence_vertebra` and the CLI run for
less than that. So one agent per host listens on a Unix socket (mode 0600 in a 0700 directory:
only its own user, or root, can connect) and keeps one logged-in client session per identity that
has used it. A program presents its own JID and password; the first call logs that identity in,
later calls reuse the session. Calls still go out as the caller's own JID, so authorization and
audit see who asked, not the gateway.

Frames on the socket are a 4-byte big-endian length and a msgpack map. Request:
``{"jid", "password", "call": {"op", "args", "on", "scope", "to", "timeout", "rid"}}``; answers:
zero or more ``{"progress": [target, seq, payload]}`` then one ``{"report": CallReport}`` or
``{"error": sentence}``.

Callers that only need the socket may use ``call_via_gateway_blocking``: a plain socket, no event
loop. This module imports asyncio and the report types only where it uses them, so a short program
(check_vertebra) that calls through the gateway does not pay tens of milliseconds to load them.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
import msgpack

from .errors import CallInterrupted, ConnectError

TYPE_CHECKING = False  # typing costs short programs milliseconds; annotations are strings here
if TYPE_CHECKING:
    import asyncio
    from typing import Any

    from .actor import Endpoint
    from .client import Client
    from .report import CallReport, ProgressFn


MAX_REQUEST = 256 * 1024  # a call: op, arguments, targets
MAX_ANSWER = 256 * 1024 * 1024  # a report may carry a result from each of thousands of targets
IDLE_SESSION = 300.0  # seconds an unused identity's session is kept


class GatewayUnavailable(Exception):
    """No gateway answers at the socket; the caller should log in directly."""


async def _read(reader: asyncio.StreamReader, limit: int) -> Any:
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    if size > limit:
        raise ValueError(f"gateway frame of {size} bytes exceeds {limit}")
    return msgpack.unpackb(await reader.readexactly(size), raw=False)


def _frame(obj: Any) -> bytes:
    data = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(data)) + data


class Gateway:
    def __init__(self, path: Path, endpoint: "Endpoint", broker: str) -> None:
        self.path, self.endpoint, self.broker = path, endpoint, broker
        self._sessions: dict[str, tuple[bytes, "Client", float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._server: asyncio.AbstractServer | None = None
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        import asyncio

        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        if self.path.exists():
            self.path.unlink()  # a socket left by a process that died; nothing listens on it
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def stop(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        if self._server:
            self._server.close()
        for _digest, client, _used in self._sessions.values():
            await client.stop()
        self._sessions.clear()
        if self.path.exists():
            self.path.unlink()

    async def _session(self, jid: str, password: str) -> "Client":
        import asyncio
        import hashlib
        import hmac

        from .client import Client  # only the gateway's own process logs in

        digest = hashlib.sha256(password.encode()).digest()
        async with self._locks.setdefault(jid, asyncio.Lock()):
            known = self._sessions.get(jid)
            if known and hmac.compare_digest(known[0], digest) and known[1].online:
                self._sessions[jid] = (digest, known[1], time.monotonic())
                return known[1]
            if known:
                await known[1].stop()
                del self._sessions[jid]
            client = Client(jid, password, self.endpoint, broker=self.broker)
            await client.start()  # the XMPP server checks the password
            self._sessions[jid] = (digest, client, time.monotonic())
            return client

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        try:
            req = await _read(reader, MAX_REQUEST)
            call = req["call"]
            client = await self._session(str(req["jid"]), str(req["password"]))

            def progress(target: str, seq: int, payload: Any) -> None:
                writer.write(_frame({"progress": [target, seq, payload]}))

            report = await client.call(call["op"], call.get("args") or {}, on=call.get("on") or (),
                                       scope=call.get("scope", "all"), to=call.get("to") or (),
                                       timeout=float(call.get("timeout", 30.0)), progress=progress,
                                       rid=call.get("rid"))
            writer.write(_frame({"report": report.to_dict()}))
        except ConnectError as exc:
            writer.write(_frame({"error": str(exc)}))
        except (KeyError, TypeError, ValueError) as exc:
            writer.write(_frame({"error": f"malformed gateway request: {exc}"}))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            try:
                await writer.drain()
                writer.close()
            except ConnectionError:
                pass

    async def _reap(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(IDLE_SESSION / 5)
            horizon = time.monotonic() - IDLE_SESSION
            for jid, (_digest, client, used) in list(self._sessions.items()):
                if used < horizon:
                    del self._sessions[jid]
                    await client.stop()


async def call_via_gateway(path: Path, jid: str, password: str, call: dict[str, Any],
                           progress: ProgressFn | None = None) -> CallReport:
    """Make a call through the gateway at ``path``; GatewayUnavailable if none answers there."""
    import asyncio

    from .report import CallReport

    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
        raise GatewayUnavailable(f"no gateway at {path}: {exc.strerror}") from None
    try:
        writer.write(_frame({"jid": jid, "password": password, "call": call}))
        # The call's own budget bounds the gateway; the extra seconds cover a first login.
        async with asyncio.timeout(float(call.get("timeout", 30.0)) + 20.0):
            while True:
                msg = await _read(reader, MAX_ANSWER)
                if "progress" in msg:
                    if progress:
                        progress(*msg["progress"])
                elif "report" in msg:
                    return CallReport.from_dict(msg["report"])
                else:
                    raise ConnectError(msg.get("error", "gateway gave no answer"))
    except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
        # Not GatewayUnavailable: the call may have gone out, and falling back would send it again.
        raise CallInterrupted(f"the gateway at {path} failed during the call ({exc.__class__.__name__});"
                              " the op may have run") from None
    finally:
        writer.close()


def call_via_gateway_blocking(path: Path | str, jid: str, password: str, call: dict[str, Any], *,
                              limit: float | None = None) -> dict[str, Any]:
    """``call_via_gateway`` without an event loop, for short programs: the report as the plain
    mapping ``CallReport.to_dict`` gives (progress reports are read and dropped). Raises
    GatewayUnavailable if no gateway answers at ``path``, ConnectError if it fails during the call
    (the op may have run: do not fall back to a login then), TimeoutError past the same bound as
    ``call_via_gateway`` (the call's timeout plus 20 s for a first login), or past ``limit``
    seconds if that is given."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
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
                except socket.timeout:
                    raise TimeoutError(f"the gateway at {path} gave no answer in time") from None
                if not chunk:
                    raise ConnectionResetError("the gateway closed the connection")
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)

        try:
            sock.sendall(_frame({"jid": jid, "password": password, "call": call}))
            while True:
                (size,) = struct.unpack(">I", read_exactly(4))
                if size > MAX_ANSWER:
                    raise ValueError(f"gateway frame of {size} bytes exceeds {MAX_ANSWER}")
                msg = msgpack.unpackb(read_exactly(size), raw=False)
                if "progress" in msg:
                    continue
                if "report" in msg:
                    return msg["report"]
                raise ConnectError(msg.get("error", "gateway gave no answer"))
        except (ConnectionError, ValueError) as exc:
            # Not GatewayUnavailable: the call may have gone out, and falling back would send it again.
            raise CallInterrupted(f"the gateway at {path} failed during the call ({exc.__class__.__name__});"
                                  " the op may have run") from None
    finally:
        sock.close()
