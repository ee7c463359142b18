"""The local gateway: short-lived programs reach the mesh through a long-lived agent's Unix socket.

A login costs tens of milliseconds of SCRAM; `check_vertebra`, `fence_vertebra` and the CLI run for
less than that. So one agent per host listens on a Unix socket and keeps one logged-in client session
per identity that has used it; the first call logs that identity in, later calls reuse the session.
Calls go out as the caller's own identity, so authorization and audit see who asked, not the gateway.

Who the caller is, the gateway reads from the socket itself (SO_PEERCRED: the caller's uid), by the
rule of agents/identities.py: root and the gateway's own user present a JID and password, or name an
identity of the mesh file (``"as": NAME``, whose password file the gateway reads), or are the
operator when they name nobody; a Unix user the mesh file maps (``unix_user`` of a person or service)
calls as that identity with no password of its own; anyone else is refused with a sentence. The
socket is 0660 in a 0750 directory of group ``vertebra`` when that group exists (the installer makes
it; add ``nagios`` to it), else 0600 in a 0700 directory: only the gateway's user and root.

Frames on the socket are a 4-byte big-endian length and a msgpack map. Request:
``{"jid", "password", "as", "call": {"op", "args", "on", "scope", "to", "timeout", "deadline", "rid", "tally",
"jobs"}}`` (``jid`` and ``password`` together or not at all, ``as``, ``tally`` and ``jobs`` optional);
answers: zero or more ``{"progress": [target, seq, payload]}`` (and, when the call asks with ``tally``,
``{"answered": [answered, targets]}`` as a scope-all call's answers come; with ``jobs``,
``{"job": [target, job, event]}`` as a long op's job is accepted, its agent goes offline or comes back) then one
``{"report": CallReport}`` or ``{"error": sentence}``. ``deadline`` (optional) is the program's own end as Unix time in
seconds, which ``call_via_gateway`` and ``call_via_gateway_blocking`` set: a gateway that reads the
call late (it was stopped, or busy) then sends the requests with only the time the program has left,
and sends nothing once it has none, so the mesh never starts what the program gave up on.

Callers that only need the socket may use ``call_via_gateway_blocking`` (agents/gateway_client.py,
re-exported here): a plain socket, no event loop, and nothing heavy to import. This module imports
asyncio and the report types only where it uses them, so a short program (check_vertebra) that
calls through the gateway does not pay tens of milliseconds to load them.

The gateway remembers, per caller, op and resource, which agent answered a call of scope ``one`` on
one resource (``-H HOST`` of check_vertebra, fence_vertebra's target), and sends the next such call
straight to that agent: one XMPP round trip instead of two (discovery, then the call). What it
remembers is only ever a target discovery returned (a call with ``to`` is never remembered), and
the broker lists only the agents its mesh file admits, so no other account can become one. Only an
answer that says the request certainly did not run there (unreachable: the agent is gone; denied:
another holder may allow it; a refusal as bad-argument or unknown-op: it no longer holds the
resource or offers the op) sends the call through discovery again, with the same request id, so
an agent that did see it answers as the first time; any other answer but ok forgets the agent,
so the next call asks the broker again.
"""

from __future__ import annotations

import os
import struct
import time

from .errors import BadArguments, CallInterrupted, ConnectError, Outcome, UnknownOp
# The client's side of the socket, for short programs; re-exported here, where callers have found it.
from .gateway_client import MAX_ANSWER, GatewayRefused as GatewayRefused, GatewayUnavailable as GatewayUnavailable
from .gateway_client import call_via_gateway_blocking as call_via_gateway_blocking, failure, request

TYPE_CHECKING = False  # typing costs short programs milliseconds; annotations are strings here
if TYPE_CHECKING:
    import asyncio
    from pathlib import Path
    from typing import Any, Sequence

    from .actor import Endpoint
    from .client import Client
    from .config import MeshConfig
    from .report import AnsweredFn, CallReport, JobEventFn, ProgressFn


MAX_REQUEST = 256 * 1024  # a call: op, arguments, targets
IDLE_SESSION = 300.0  # seconds an unused identity's session is kept
MAX_HOLDERS = 4096  # remembered (caller, op, resource) -> agent entries; the oldest go first
GROUP = "vertebra"  # members may connect to the socket (as the identity the mesh file maps them to)
# How a target's refusal before running reads in a TargetResult ("CONDITION: text", agents.actor).
_REFUSED = tuple(f"{cls.condition}: " for cls in (BadArguments, UnknownOp))


async def _read(reader: asyncio.StreamReader, limit: int) -> Any:
    import msgpack

    (size,) = struct.unpack(">I", await reader.readexactly(4))
    if size > limit:
        raise ValueError(f"gateway frame of {size} bytes exceeds {limit}")
    return msgpack.unpackb(await reader.readexactly(size), raw=False)


def _frame(obj: Any) -> bytes:
    """A frame packed by the msgpack library: the gateway's answers may be reports from thousands of
    targets (short programs pack their small requests with ``gateway_client.frame``)."""
    import msgpack

    data = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(data)) + data


class Gateway:
    """The gateway socket at ``path``; with ``mesh`` (the mesh file it serves), callers are known by uid
    (see the module's docstring), without it only by the JID and password they present."""

    def __init__(self, path: Path, endpoint: "Endpoint", broker: str | Sequence[str],
                 mesh: "MeshConfig | None" = None) -> None:
        from .identities import Callers

        self.path, self.endpoint, self.broker = path, endpoint, broker
        self.callers = Callers(mesh) if mesh is not None else None
        self._sessions: dict[str, tuple[bytes, "Client", float]] = {}
        # (caller JID, op, resource) -> the agent that last answered ok for it, oldest first
        self._holders: dict[tuple[str, str, str], str] = {}
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
        if self.callers is not None:
            self._open_to_group()
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    def _open_to_group(self) -> None:
        """Let the ``vertebra`` group reach the socket (0660, its directory 0750), when that group exists
        and this process may give its files to it; the state directory gets the group's search bit
        when nobody else may enter it. Otherwise the socket stays the gateway's user's and root's."""
        import grp
        import logging

        log = logging.getLogger("vertebra.gateway")
        try:
            gid = grp.getgrnam(GROUP).gr_gid
        except KeyError:
            return
        run, home = self.path.parent, self.path.parent.parent
        try:
            os.chown(run, -1, gid)
            os.chown(self.path, -1, gid)
        except PermissionError:
            log.warning("the gateway cannot give %s to group %s (it runs as uid %d, not in that group): only its"
                        " own user and root may call through it", run, GROUP, os.getuid())
            return
        os.chmod(self.path, 0o660)
        os.chmod(run, 0o750)
        st = home.stat()
        if not st.st_mode & 0o001 and not (st.st_gid == gid and st.st_mode & 0o010) and st.st_uid == os.getuid():
            os.chown(home, -1, gid)  # search only: its files keep their own, private modes
            os.chmod(home, (st.st_mode & 0o7777) | 0o010)
        for folder in [home, *home.parents]:
            st = folder.stat()
            if not (st.st_mode & 0o001 or (st.st_gid == gid and st.st_mode & 0o010)):
                log.warning("members of group %s cannot reach the gateway socket %s: %s is mode %o; let them"
                            " in with `chgrp %s %s && chmod g+x %s`", GROUP, self.path, folder,
                            st.st_mode & 0o777, GROUP, folder, folder)
                break

    async def stop(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        if self._server:
            self._server.close()
        for _digest, client, _used in self._sessions.values():
            await client.stop()
        self._sessions.clear()
        self._holders.clear()
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

        from .identities import CallerRefused

        try:
            req = await _read(reader, MAX_REQUEST)
            call = req["call"]
            jid, password = self._credentials(writer, req)
            client = await self._session(jid, password)

            def progress(target: str, seq: int, payload: Any) -> None:
                writer.write(_frame({"progress": [target, seq, payload]}))

            def answered(done: int, targets: int) -> None:
                writer.write(_frame({"answered": [done, targets]}))

            def job_event(target: str, job: str, event: str) -> None:
                writer.write(_frame({"job": [target, job, event]}))

            report = await self._call(jid, client, call, progress, answered if call.get("tally") else None,
                                      job_event if call.get("jobs") else None)
            writer.write(_frame({"report": report.to_dict()}))
        except CallerRefused as exc:
            writer.write(_frame({"error": str(exc), "refused": True}))
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

    def _credentials(self, writer: asyncio.StreamWriter, req: dict[str, Any]) -> tuple[str, str]:
        """Who the request is from, by the caller's uid and what it names (agents/identities.py)."""
        import socket

        from .identities import CallerRefused

        if self.callers is None:  # no mesh file: the caller's own JID and password, as presented
            if req.get("jid") is None or req.get("password") is None:
                raise CallerRefused("this gateway knows no mesh file, so a call must present a JID and password")
            return str(req["jid"]), str(req["password"])
        sock = writer.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return self.callers.credentials(uid, req)

    async def _call(self, jid: str, client: "Client", call: dict[str, Any], progress: "ProgressFn",
                    answered: "AnsweredFn | None" = None, job_events: "JobEventFn | None" = None) -> "CallReport":
        """Make ``call`` as ``jid``: straight to the agent that last answered it, if the gateway
        remembers one (see the module's docstring), else through discovery."""
        import asyncio
        import uuid

        from .report import CallReport, TargetResult

        op, on, to = call["op"], list(call.get("on") or ()), list(call.get("to") or ())
        args, scope = call.get("args") or {}, call.get("scope", "all")
        timeout = float(call.get("timeout", 30.0))
        if call.get("deadline") is not None:  # the program's own end, however late we read its call
            timeout = min(timeout, float(call["deadline"]) - time.time())
            if timeout <= 0:
                return CallReport(op, [TargetResult(
                    "gateway", Outcome.TIMEOUT,
                    error=f"the gateway read the call of {op} after its caller's deadline; nothing was sent")])
        rid = call.get("rid") or uuid.uuid4().hex  # one id for both tries: an agent never runs it twice
        key = (jid, op, on[0]) if scope == "one" and len(on) == 1 and not to else None
        holder = self._holders.get(key) if key is not None else None
        if key is not None and holder is not None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            report = await client.call(op, args, on=on, scope="one", to=[holder], timeout=timeout, progress=progress,
                                       rid=rid, job_events=job_events)
            last = report.results[-1] if report.results else None
            if last is not None and last.outcome is Outcome.OK:
                return report
            self._holders.pop(key, None)
            # Only where it certainly did not run may the call go on to another holder, as in Client.call;
            # and refused as not its to run: an agent that no longer holds the resource or offers the op.
            if last is None or last.job or not (last.outcome in (Outcome.UNREACHABLE, Outcome.DENIED)
                                    or (last.outcome is Outcome.FAILED and (last.error or "").startswith(_REFUSED))):
                return report
            timeout -= loop.time() - started
            if timeout <= 0:
                return report
        report = await client.call(op, args, on=on, scope=scope, to=to, timeout=timeout, progress=progress, rid=rid,
                                   answered=answered, job_events=job_events)
        if key is not None and len(report.results) == 1 and report.results[0].outcome is Outcome.OK:
            self._holders.pop(key, None)
            self._holders[key] = report.results[0].target
            while len(self._holders) > MAX_HOLDERS:
                del self._holders[next(iter(self._holders))]
        return report

    async def _reap(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(IDLE_SESSION / 5)
            horizon = time.monotonic() - IDLE_SESSION
            for jid, (_digest, client, used) in list(self._sessions.items()):
                if used < horizon:
                    del self._sessions[jid]
                    await client.stop()
            # A lock per JID a caller named, kept only while that JID has a session or a login under way:
            # callers naming ever new JIDs (failed logins) do not grow it without bound.
            for jid in [j for j, lock in self._locks.items() if j not in self._sessions and not lock.locked()]:
                del self._locks[jid]


async def call_via_gateway(path: Path, jid: str | None, password: str | None, call: dict[str, Any],
                           progress: ProgressFn | None = None, *, as_identity: str | None = None,
                           answered: AnsweredFn | None = None, job_events: JobEventFn | None = None) -> CallReport:
    """Make a call through the gateway at ``path`` as ``jid`` (with its password), or, without them, as
    the gateway knows the caller's Unix user (``as_identity``: as that identity of the mesh file);
    GatewayUnavailable if none answers there, GatewayRefused if it will not call for this caller."""
    import asyncio

    from .report import CallReport

    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
        raise GatewayUnavailable(f"no gateway at {path}: {exc.strerror}") from None
    if answered is not None:
        call = {**call, "tally": True}
    if job_events is not None:
        call = {**call, "jobs": True}
    try:
        writer.write(_frame(request(jid, password, call, as_identity)))
        # The call's own budget bounds the gateway; the extra seconds cover a first login.
        async with asyncio.timeout(float(call.get("timeout", 30.0)) + 20.0):
            while True:
                msg = await _read(reader, MAX_ANSWER)
                if "progress" in msg:
                    if progress:
                        progress(*msg["progress"])
                elif "answered" in msg:
                    if answered:
                        answered(*msg["answered"])
                elif "job" in msg:
                    if job_events:
                        job_events(*msg["job"])
                elif "report" in msg:
                    return CallReport.from_dict(msg["report"])
                else:
                    raise failure(msg)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
        # Not GatewayUnavailable: the call may have gone out, and falling back would send it again.
        raise CallInterrupted(f"the gateway at {path} failed during the call ({exc.__class__.__name__});"
                              " the op may have run") from None
    finally:
        writer.close()
