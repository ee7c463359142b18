"""The target side of replication: packages (one replica volume per source action) and the inboxes that
receive into them.

A source opens a transfer with `offer` (over XMPP: the storage.package.receive op) and gets an address, a
transfer id, a one-time token and, with TLS, the certificate to pin. The transfer id is derived here from
the package and snapshot, never taken from the sender, so one source cannot touch another's spool. After
the stream is whole, `commit` (storage.package.commit) hands the spool to the driver's receive, which
publishes the snapshot all or nothing. A driver that can receive a stream while it arrives (btrfs) is fed
each connection's spool as it grows, from its first byte, so its receive runs alongside the transfer
instead of after it; it still publishes only once the inbox has verified the whole stream, and a connection
that fails aborts it (nothing published, nothing left behind): the resumed connection's receive starts
again from the spool's first byte, and `commit` waits for it. Spools live in the state directory, so a
restarted target resumes from what it already holds. Nothing is left behind: a spool goes when it is
published, when the commit refuses it for good (corrupt, unsupported), when its package is destroyed, and
when nobody has written it for the resume window (a week); storage.report shows what the spools hold.

Retention: with the storage setting `keep_received: N`, each successful commit prunes the package down to
its newest N received snapshots. The newest is always kept (it is the base of the next incremental update),
and so is any snapshot that a stream already spooling here names as its base; a snapshot that clones were
made from, or that is being sent on, cannot be destroyed and stays until a later prune.
"""

from __future__ import annotations

import asyncio
import builtins  # PackageHost.list hides the type in its class: annotations there say builtins.list
import contextlib
import errno
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, NoReturn, TypeVar

import blake3

from agents.storage import driver as d
from agents.storage.driver import StorageDriver, StorageError
from agents.storage.inbox_tls import server_context
from agents.storage.replication_state import Package, ReplicationState
from agents.storage.stream import peek_header
from agents.storage.transfer import Inbox, SpoolTail

_READ = 1 << 20
_STOP_WAIT = 30.0       # seconds a stopping host waits for the receives it aborted to clean up
_T = TypeVar("_T")


NO_SPACE = "No space left on device; nothing was published"
RESUME_WINDOW = 7 * 86400.0     # an incomplete spool not written for this long is removed: a week of outage


def no_space(exc: BaseException) -> bool:
    """Whether a receive failed for want of space: the store's own OSError (ENOSPC), or a driver's tool
    that said so (`btrfs receive` reports it in its message)."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return isinstance(exc, StorageError) and ("No space left on device" in str(exc) or exc.code == "no_space")


def transfer_id(package: str, snapshot: str) -> str:
    return "t" + blake3.blake3(f"{package}/{snapshot}".encode()).hexdigest()[:40]


def _pieces(path: Path) -> Generator[bytes, None, None]:
    with open(path, "rb") as f:
        while block := f.read(_READ):
            yield block


async def _in_own_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """fn(*args) in a thread of its own: a receive following a transfer lasts as long as the transfer
    (hours, throttled), which must not take one of the few threads of the loop's default pool."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[_T] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if not outcome.done():
            if exc is not None:
                outcome.set_exception(exc)
            else:
                outcome.set_result(result)

    def run() -> None:
        try:
            result, exc = fn(*args), None
        except BaseException as caught:  # handed to the awaiting task, which decides
            result, exc = None, caught
        with contextlib.suppress(RuntimeError):     # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=run, name="vertebra-receive", daemon=True).start()
    return await outcome


@dataclass
class _Following:
    """A driver's receive fed from one connection's spool as it arrives."""
    tail: SpoolTail
    task: asyncio.Future[d.SnapshotInfo]
    ended: threading.Event      # set once the receive has returned or cleaned up after itself


class PackageHost:
    """Packages and inboxes of one target agent."""

    def __init__(self, driver: StorageDriver, state: ReplicationState, directory: Path, *,
                 host: str = "127.0.0.1", advertise: str | None = None, keep: int | None = None,
                 resume_window: float = RESUME_WINDOW) -> None:
        if keep is not None and keep < 1:
            raise ValueError("keep must be at least 1: the newest snapshot is the next update's base")
        self.driver = driver
        self.keep = keep            # received snapshots kept per package; None: all
        self.resume_window = resume_window      # seconds an unwritten spool is kept for its sender to resume
        self.state = state
        self.directory = directory
        self.host = host
        self.advertise = advertise or host
        # One inbox per mode, started on first use: TLS is chosen per action.
        self.inboxes: dict[bool, Inbox] = {}
        self._cert_pem = ""
        self._opening = asyncio.Lock()
        self._following: dict[str, _Following] = {}      # per transfer, the newest connection's receive

    async def start(self) -> None:
        await self.sweep()      # what went stale while the agent was down

    async def stop(self) -> None:
        for inbox in self.inboxes.values():
            await inbox.stop()
        self.inboxes.clear()
        for following in self._following.values():
            following.tail.abort("the agent is stopping")
        tasks = [f.task for f in self._following.values()]
        self._following.clear()
        if tasks:       # each removes its half-received snapshot and ends its `btrfs receive`
            await asyncio.wait(tasks, timeout=_STOP_WAIT)

    async def _inbox(self, tls: bool) -> Inbox:
        async with self._opening:
            if tls not in self.inboxes:
                ctx = None
                if tls:
                    ctx, self._cert_pem = await asyncio.to_thread(server_context, self.directory)
                inbox = Inbox(self.directory / "spool", self.host, ssl_context=ctx)
                if self.driver.receives_as_it_arrives:
                    inbox.on_stream = self._follow
                await inbox.start()
                self.inboxes[tls] = inbox
            return self.inboxes[tls]

    def _find(self, transfer: str) -> Inbox | None:
        return next((i for i in self.inboxes.values() if i.is_complete(transfer)), None)

    # ops --------------------------------------------------------------------------------------------
    async def offer(self, caller: str, package: str, action: str, source_volume: str, snapshot: str,
                    tls: bool, driver: str = "") -> dict[str, Any]:
        """Open (or reopen) the transfer of `snapshot` into `package` for `caller`. A stream this store
        cannot take (`driver`: the source's driver) is refused here, before any byte is sent."""
        self.check_receivable(driver)
        owned = self.state.package(package)
        if owned is None:
            if any(v.name == package for v in await asyncio.to_thread(self.driver.list_volumes)):
                raise StorageError(f"{package!r} already exists on this agent and is not a package; choose "
                                   f"another package name", code="exists")
            await self.state.add_package(Package(package, action, caller, source_volume, time.time()))
        elif owned.source != caller or owned.action != action:
            raise StorageError(f"package {package!r} belongs to action {owned.action} of {owned.source}; "
                               f"choose another package name", code="exists")
        held = await asyncio.to_thread(self._snapshots, package)
        transfer = transfer_id(package, snapshot)
        await self.sweep()
        await self.state.add_transfer(transfer, package, snapshot, time.time())
        inbox = await self._inbox(tls)
        return {"host": self.advertise, "port": inbox.port, "transfer": transfer,
                "token": inbox.offer(transfer), "held": inbox.held(transfer), "snapshots": held,
                "cert": self._cert_pem if tls else None}

    def check_receivable(self, driver: str) -> None:
        """Refuse (code unsupported, saying what would work) a stream from `driver` that this store can
        never receive: each driver receives only its own driver's streams. An empty name is not checked."""
        mine = self.driver.name
        if d.CAP_RECEIVE not in self.driver.capabilities():
            raise StorageError(f"this agent's {mine} store cannot receive replication streams; replicate to a "
                               f"storage agent whose driver can", code="unsupported")
        if driver and driver != mine:
            raise StorageError(f"this agent's store uses the {mine} driver, which cannot receive a stream sent "
                               f"by the {driver} driver (a store receives only its own driver's streams); "
                               f"nothing was sent: replicate to a storage agent that uses the {driver} driver",
                               code="unsupported")

    async def commit(self, caller: str, package: str, snapshot: str) -> dict[str, Any]:
        """Publish the complete spool of `snapshot` as package@snapshot (idempotent)."""
        owned = self.state.package(package)
        if owned is None or owned.source != caller:
            raise StorageError(f"no package {package!r} of {caller} here", code="not_found")
        transfer = transfer_id(package, snapshot)
        info = await self._followed(package, snapshot, transfer)
        if info is None:
            held = await asyncio.to_thread(self._snapshots, package)
            done = [s for s in held if s["name"] == snapshot]
            if done:
                return done[0]
            inbox = self._find(transfer)
            if inbox is None:
                raise StorageError(f"the stream of {package}@{snapshot} is not complete here; resume the "
                                   f"transfer", code="busy")
            try:
                with contextlib.closing(_pieces(inbox.spool(transfer))) as pieces:
                    info = await asyncio.to_thread(self.driver.receive, package, snapshot, pieces)
            except (StorageError, OSError) as exc:
                await self._receive_failed(package, snapshot, transfer, exc)
        await self._drop_transfer(transfer)
        pruned = await asyncio.to_thread(self.prune, package)
        return {"name": info.name, "guid": info.guid, "logical_bytes": info.logical_bytes, "pruned": pruned}

    async def _receive_failed(self, package: str, snapshot: str, transfer: str, exc: BaseException) -> NoReturn:
        if no_space(exc):       # the spool stays: once there is room the next update publishes it
            raise StorageError(f"{NO_SPACE} (the store is full while receiving {package}@{snapshot}): "
                               f"free space or grow the filesystem, and the next update publishes the "
                               f"stream already received here", code="no_space") from None
        if isinstance(exc, StorageError) and exc.code in ("corrupt", "unsupported"):
            await self._drop_transfer(transfer)     # a whole but bad spool would fail forever: the next try is fresh
        raise exc

    # receiving while the stream arrives -----------------------------------------------------------------
    def _follow(self, transfer: str, tail: SpoolTail) -> None:
        """A connection started appending to the spool of `transfer`: receive it as it arrives."""
        known = self.state.transfers().get(transfer)
        if known is None:
            return          # not offered by this host: commit will say so
        package, snapshot = known
        before = self._following.get(transfer)
        ended = threading.Event()
        task = asyncio.ensure_future(self._receive_following(package, snapshot, tail, before, ended))
        # Its failure is the commit's to report; one nobody asks about (a cut connection) is not an error.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._following[transfer] = _Following(tail, task, ended)

    async def _receive_following(self, package: str, snapshot: str, tail: SpoolTail,
                                 before: _Following | None, ended: threading.Event) -> d.SnapshotInfo:
        def receive() -> d.SnapshotInfo:
            try:
                with contextlib.closing(tail.pieces()) as pieces:
                    return self.driver.receive(package, snapshot, pieces)
            finally:
                ended.set()

        try:
            if before is not None:
                # The cut connection's receive is being aborted; one receive of a transfer at a time.
                before.tail.abort("a new connection resumed it")
                await asyncio.wait([before.task])
        except BaseException:
            ended.set()     # it never started
            raise
        return await _in_own_thread(receive)

    def _abort_following(self, transfers: builtins.list[str], why: str) -> None:
        """Abort the receives following `transfers` and wait until each has removed what it received (from a
        worker thread: the receives clean up in threads of their own)."""
        aborted = [f for t, f in builtins.list(self._following.items()) if t in transfers]
        for following in aborted:
            following.tail.abort(why)
        for following in aborted:
            following.ended.wait(_STOP_WAIT)

    async def _followed(self, package: str, snapshot: str, transfer: str) -> d.SnapshotInfo | None:
        """The snapshot the receive following `transfer` published, once it has; None when no receive
        followed it or its connection failed (then the spool, whole or not, decides). Its own failure is
        the commit's, as a receive from the spool would have failed."""
        following = self._following.get(transfer)
        if following is None:
            return None
        try:
            return await asyncio.shield(following.task)
        except (StorageError, OSError) as exc:
            if following.tail.aborted:
                return None
            await self._receive_failed(package, snapshot, transfer, exc)
        finally:
            if following.task.done() and self._following.get(transfer) is following:
                del self._following[transfer]

    def prune(self, package: str) -> list[str]:
        """Destroy the package's received snapshots older than its newest `keep` (see the module docstring);
        return the names destroyed."""
        if self.keep is None:
            return []
        snaps = self.driver.list_snapshots(package)      # oldest first
        bases = self._spooled_bases()
        pruned = []
        for s in snaps[:-self.keep]:
            if s.guid in bases or s.clones:
                continue
            try:
                self.driver.destroy_snapshot(package, s.name)
            except StorageError:
                continue        # being sent on, or a clone was just made from it: the next prune retries
            pruned.append(s.name)
        return pruned

    def _spooled_bases(self) -> set[str]:
        """Guids of the base snapshots that streams spooling here (complete or not) are incremental from."""
        spool = self.directory / "spool"
        if not spool.is_dir():
            return set()
        bases = set()
        for part in spool.glob("*.part"):
            header = peek_header(part)
            if header is not None and isinstance(header.get("from_guid"), str):
                bases.add(header["from_guid"])
        return bases

    def list(self) -> list[dict[str, Any]]:
        out = []
        for p in self.state.packages():
            snaps = self._snapshots(p.name)
            out.append({"package": p.name, "action": p.action, "source": p.source,
                        "source_volume": p.source_volume, "created": p.created, "snapshots": snaps,
                        "latest": snaps[-1]["name"] if snaps else None})
        return out

    async def destroy(self, package: str) -> dict[str, Any]:
        """Destroy a package's snapshots and replica; refused (naming them) while clones depend on it."""
        if self.state.package(package) is None:
            raise StorageError(f"no package {package!r}; storage.package.list shows them", code="not_found")
        await asyncio.to_thread(self._destroy_replica, package)
        # Its spools could only ever be published into it: they go with it.
        for transfer, (owner, _snap) in self.state.transfers().items():
            if owner == package:
                await self._drop_transfer(transfer)
        await self.state.drop_package(package)
        return {"destroyed": package}

    def _destroy_replica(self, package: str) -> None:
        """The driver's part of destroying a package, in a worker thread (its calls take the driver's lock,
        and aborted receives are waited for)."""
        # A receive still running into it holds no lock: it is stopped, and its half snapshot gone, first.
        self._abort_following([t for t, (owner, _snap) in self.state.transfers().items() if owner == package],
                              f"its package {package} is being destroyed")
        for snap in self._snapshots(package):
            self.driver.destroy_snapshot(package, snap["name"])
        if any(v.name == package for v in self.driver.list_volumes()):
            self.driver.destroy_volume(package)

    # spools -------------------------------------------------------------------------------------------
    async def _drop_transfer(self, transfer: str) -> None:
        """Forget a transfer: cut its connections, remove its spool (whichever inbox, if any, has it open)."""
        # Removing a spool of gigabytes takes the filesystem a while: not on the event loop.
        await asyncio.to_thread(self._remove_spool, transfer)
        self._following.pop(transfer, None)     # its receive fails with the cut connection
        await self.state.drop_transfer(transfer)

    def _remove_spool(self, transfer: str) -> None:
        for inbox in builtins.list(self.inboxes.values()):
            inbox.discard(transfer)
        (self.directory / "spool" / f"{transfer}.part").unlink(missing_ok=True)

    async def sweep(self) -> builtins.list[str]:
        """Remove the spools that can no longer be resumed: those of a package that is gone, and those not
        written for longer than the resume window. Return the transfer ids removed."""
        known = self.state.transfers()
        packages = {p.name for p in self.state.packages()}
        cutoff = time.time() - self.resume_window
        removed = []
        for transfer, (package, _snap) in known.items():
            if package not in packages:
                await self._drop_transfer(transfer)
                removed.append(transfer)
        for transfer, written in await asyncio.to_thread(self._spools_written):
            if transfer in removed or self._open(transfer):
                continue
            if written < cutoff:
                await self._drop_transfer(transfer)
                removed.append(transfer)
        return removed

    def _spools_written(self) -> builtins.list[tuple[str, float]]:
        """Each spool's transfer id and when it was last written (the directory read in a worker thread)."""
        written = []
        for part in self._spool_files():
            try:
                written.append((part.name.removesuffix(".part"), part.stat().st_mtime))
            except FileNotFoundError:
                continue
        return written

    def spool_usage(self) -> dict[str, Any]:
        """What the spools hold: bytes in all, and per transfer its package, snapshot, bytes and idle time."""
        known = self.state.transfers()
        now = time.time()
        transfers = []
        for part in self._spool_files():
            try:
                st = part.stat()
            except FileNotFoundError:
                continue
            transfer = part.name.removesuffix(".part")
            package, snapshot = known.get(transfer, (None, None))
            transfers.append({"transfer": transfer, "package": package, "snapshot": snapshot,
                              "bytes": st.st_size, "idle_seconds": round(now - st.st_mtime)})
        return {"bytes": sum(t["bytes"] for t in transfers), "resume_window": self.resume_window,
                "transfers": sorted(transfers, key=lambda t: (t["package"] or "", t["transfer"]))}

    def _spool_files(self) -> builtins.list[Path]:
        spool = self.directory / "spool"
        return sorted(spool.glob("*.part")) if spool.is_dir() else []

    def _open(self, transfer: str) -> bool:
        """Whether a connection is writing this transfer's spool now."""
        return any(inbox.connected(transfer) for inbox in self.inboxes.values())

    def _snapshots(self, package: str) -> builtins.list[dict[str, Any]]:
        if not any(v.name == package for v in self.driver.list_volumes()):
            return []
        return [{"name": s.name, "guid": s.guid, "created": s.created, "logical_bytes": s.logical_bytes,
                 "clones": list(s.clones)} for s in self.driver.list_snapshots(package)]
