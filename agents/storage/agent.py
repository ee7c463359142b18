"""The storage agent: serves volumes, snapshots and writable clones from one driver.

The driver, its root, the replication inbox, masking hooks and self-service clone limits come from the
agent's ``settings:`` in the mesh file, read and checked in settings.py (its docstring shows them all).

Every op names what it acts on as /volume/NAME resources (a clone is a volume too), so a policy can give a
developer their own clone and nothing else. Driver calls block on disk, so they run in a worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, TypeVar

from ..agent import Agent, Call, info_op
from ..errors import BadArguments, Outcome
from ..ops import Arg, Field, Result, op
from .driver import SnapshotInfo, StorageError, VolumeInfo
from .faults import op_error
from .locations import VolumeLocations
from .masking import mask_clone
from .names import NAME_PATTERN
from .replication_ops import ReplicationOps
from .selfservice import owner_resources, space_report
from .settings import DRIVERS, SettingsError, StorageSettings, parse_settings

if TYPE_CHECKING:
    from .catalog import CatalogDriver

T = TypeVar("T")

__all__ = ["DRIVERS", "SettingsError", "StorageAgent", "open_driver"]
NOTICE_OP = "mesh.storage.notice"   # the broker op that posts a storage notice to the ops room
log = logging.getLogger(__name__)
_RULE = "1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit, no '..'"
_DATA_DEADLINE = 3600.0   # ops that copy or capture a whole tree: as long as the data takes
_REPORT_EVERY = 0.5       # seconds between byte counts of one op: enough to watch, few enough for XMPP

# A call that addresses nothing itself goes to the agent holding the volume it names (locations.py),
# and a volume is created on one agent, not on every agent offering the op.
_AT_VOLUME, _AT_CLONE = "/volume/{volume}", "/volume/{clone}"

# What people are shown of a volume and of a snapshot (a list of them as a table, one as a block).
_VOLUME = Result(Field("name", "volume"), Field("kind"), Field("used_bytes", "used", "bytes"),
                 Field("exclusive_bytes", "exclusive", "bytes"), Field("shared_bytes", "shared", "bytes"),
                 Field("origin"), Field("snapshots", display="list"), Field("owner"),
                 Field("expires", display="time"))
_SNAPSHOT = Result(Field("volume"), Field("name", "snapshot"), Field("created", display="time"),
                   Field("logical_bytes", "size", "bytes"), Field("exclusive_bytes", "exclusive", "bytes"),
                   Field("clones", display="list"))
_DESTROYED = Result(Field("destroyed"))
_SPACE = (Field("clones"), Field("exclusive_bytes", "exclusive", "bytes"), Field("shared_bytes", "shared", "bytes"),
          Field("last_activity", "last activity", "time"))
_REPORT = Result(
    Field("owners", "per owner", "table", columns=(Field("owner"), *_SPACE)),
    Field("sources", "per source", "table", columns=(Field("source"), *_SPACE)),
    Field("clones", "per clone", "table", columns=(
        Field("clone"), Field("owner"), Field("source"), *_SPACE[1:], Field("expires", display="time"))),
    Field("spool.transfers", "replication spool", "table", columns=(
        Field("package"), Field("snapshot"), Field("bytes", "size", "bytes"),
        Field("idle_seconds", "idle", "duration"))))

Volume = Annotated[str, Arg(f"volume name ({_RULE})", pattern=NAME_PATTERN)]
Snapshot = Annotated[str, Arg(f"snapshot name ({_RULE})", pattern=NAME_PATTERN)]
Clone = Annotated[str, Arg(f"clone name ({_RULE})", pattern=NAME_PATTERN)]


def open_driver(settings: dict[str, Any] | StorageSettings, state_dir: Path | None) -> CatalogDriver:
    """The driver the settings ask for, opened on its root. Raises SettingsError or StorageError."""
    if not isinstance(settings, StorageSettings):
        settings = parse_settings(settings)
    root = settings.root
    if root is None:
        if state_dir is None:
            raise SettingsError("the storage agent has no place for its data: set settings.root to an "
                                "absolute directory in the mesh file")
        root = Path(state_dir) / "storage"
    if settings.driver == "btrfs":
        from .btrfs import BtrfsDriver
        return BtrfsDriver(root)
    from .embedded import EmbeddedDriver
    return EmbeddedDriver(root)


class _ByteReports:
    """A driver call's byte counts (its ``progress`` callback, called in the driver's worker thread) as
    the op's progress reports: ``payload`` with bytes, total, rate (bytes a second) and eta (seconds
    left): the first at once, then at most every ``_REPORT_EVERY`` seconds, and the one that reaches
    the total always."""

    def __init__(self, call: Call, payload: dict[str, Any]) -> None:
        self.call, self.payload = call, payload
        self.loop = asyncio.get_running_loop()
        self.start, self.last = time.monotonic(), float("-inf")
        self.sent: list[concurrent.futures.Future[None]] = []

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done != total and now - self.last < _REPORT_EVERY:
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else None
        eta = max(0.0, (total - done) / rate) if rate else None
        report = dict(self.payload, bytes=done, total=total, rate=round(rate) if rate is not None else None,
                      eta=round(eta, 1) if eta is not None else None)
        self.sent.append(asyncio.run_coroutine_threadsafe(self.call.progress(report), self.loop))

    async def flushed(self) -> None:
        """Every report sent before the op answers (a report after its outcome would be dropped)."""
        await asyncio.gather(*(asyncio.wrap_future(f) for f in self.sent))


class StorageAgent(VolumeLocations, ReplicationOps, Agent):
    kind = "storage"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        parsed = parse_settings(self.settings)
        self.masking = parsed.masking
        self._masking_now: set[str] = set()     # clones a storage.mask is running on
        self.clone_rules = parsed.clones
        self.driver = open_driver(parsed, self.state_dir)
        # Owners by clone, kept in memory: authorization reads it on the event loop, where the driver's
        # lock (held by a long clone in a worker thread) must never be waited for.
        self._owners = {name: lease["owner"] for name, lease in self._leases().items()}
        self._sweeper: asyncio.Task[None] | None = None
        self._undestroyable: set[str] = set()   # expired clones whose destroy failed: told once, retried quietly
        self._open_replication(self.state_dir, self.settings)
        self._open_locations()      # its volumes, told to its brokers (locations.py)

    async def start(self, timeout: float = 15.0, *, once: bool = False) -> None:
        await super().start(timeout, once=once)
        self._start_locations()
        await self._start_replication()     # stale spools swept; actions carry on (replication_ops.py)
        self._sweeper = asyncio.create_task(self._sweep_expired(), name="storage-expiry")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self._stop_locations()
        await self._close_replication()
        await super().stop()
        close = getattr(self.driver, "close", None)
        if close is not None:
            close()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "driver": self.driver.name,
                "capabilities": sorted(self.driver.capabilities()), "clone_sharing": self.driver.clone_sharing()}

    async def _drive(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one driver call in a worker thread; a StorageError becomes the OpError that says why."""
        try:
            return await asyncio.to_thread(fn, *args)
        except StorageError as exc:
            raise op_error(exc) from None

    info = info_op("storage")

    # volumes ------------------------------------------------------------------------------------------
    @op("storage.volume.create", effect="change", resources=(_AT_VOLUME,), scope="one", result=_VOLUME,
        makes=_AT_VOLUME)
    async def volume_create(self, call: Call, volume: Volume) -> dict:
        """Create an empty volume (a directory tree, e.g. a database's data directory)."""
        return await self._drive(lambda: self._volume(self.driver.create_volume(volume)))

    @op("storage.volume.list", effect="read", result=_VOLUME)
    async def volume_list(self, call: Call) -> list:
        """List volumes, clones and replicas with the space each uses and how it was measured."""
        return await self._drive(lambda: [self._volume(v) for v in self.driver.list_volumes()])

    @op("storage.volume.destroy", effect="destructive", deadline=600, resources=("/volume/{volume}",),
        address=_AT_VOLUME, result=_DESTROYED, removes=_AT_VOLUME)
    async def volume_destroy(self, call: Call, volume: Volume) -> dict:
        """Destroy a volume and its data; refused while it has snapshots, which it names."""
        await self._drive(self.driver.destroy_volume, volume)
        return {"destroyed": volume}

    # snapshots ----------------------------------------------------------------------------------------
    @op("storage.snapshot.create", effect="change", deadline=_DATA_DEADLINE, progress=True,
        resources=("/volume/{volume}",), address=_AT_VOLUME, result=_SNAPSHOT)
    async def snapshot_create(self, call: Call, volume: Volume, snapshot: Snapshot,
                              for_clones: Annotated[bool, Arg("make what clones of it share now (the embedded "
                                                              "driver's base: on ext4 a second copy of the "
                                                              "changed files); false for a snapshot kept only to "
                                                              "roll back or send, whose first clone then pays "
                                                              "for it")] = True) -> dict:
        """Take a read-only snapshot of a volume or clone.

        With the embedded driver the tree is read file by file: stop or quiesce writers first. The btrfs
        driver's snapshot is atomic."""
        phase = {"phase": "capturing", "volume": volume}
        await call.progress(phase)
        reports = _ByteReports(call, phase)
        try:
            result = _snapshot(await self._drive(lambda: self.driver.snapshot(volume, snapshot, progress=reports,
                                                                              for_clones=for_clones)))
        finally:
            await reports.flushed()
        await self._drive(self.driver.touch_lease, volume)
        return result

    @op("storage.snapshot.list", effect="read", resources=("/volume/{volume}",), address=_AT_VOLUME,
        result=_SNAPSHOT)
    async def snapshot_list(self, call: Call, volume: Volume) -> list:
        """List a volume's snapshots, oldest first, with the clones made from each."""
        return [_snapshot(s) for s in await self._drive(self.driver.list_snapshots, volume)]

    @op("storage.snapshot.destroy", effect="destructive", deadline=600, resources=("/volume/{volume}",),
        address=_AT_VOLUME, result=_DESTROYED)
    async def snapshot_destroy(self, call: Call, volume: Volume, snapshot: Snapshot) -> dict:
        """Destroy a snapshot; refused while clones made from it exist, which it names."""
        await self._drive(self.driver.destroy_snapshot, volume, snapshot)
        return {"destroyed": f"{volume}@{snapshot}"}

    # clones -------------------------------------------------------------------------------------------
    @op("storage.clone.create", effect="change", deadline=_DATA_DEADLINE, progress=True,
        resources=("/volume/{volume}", "/volume/{clone}"), address=_AT_VOLUME, result=_VOLUME, makes=_AT_CLONE)
    async def clone_create(self, call: Call, volume: Volume, snapshot: Snapshot, clone: Clone,
                           masked_only: Annotated[bool, Arg("refuse unless a successful storage.mask produced "
                                                            "volume@snapshot (what masked copies use)")] = False,
                           expires_in: Annotated[int, Arg("seconds until the clone is destroyed (0: the "
                                                          "agent's maximum, or never if it sets none)",
                                                          min=0)] = 0) -> dict:
        """Make a writable clone of volume@snapshot under a new name.

        With masked_only=true the clone is made only from a snapshot that a successful masking hook
        produced (storage.mask records which), so a developer never gets unmasked data by mistake."""
        phase = {"phase": "cloning", "from": f"{volume}@{snapshot}", "clone": clone}
        await call.progress(phase)
        reports = _ByteReports(call, phase)

        def create() -> dict[str, Any]:
            # The clone belongs to whoever asked (the person, when a broker relays for them); its owner's
            # quota is checked first and its lease recorded with it (selfservice.py).
            expires = self.clone_rules.expiry(expires_in, time.time())
            owned = [v for v in self.driver.list_volumes() if self._owners.get(v.name) == call.caller]
            self.clone_rules.check_quota(call.caller, owned, self._clone_cost(volume, snapshot))
            info = self.driver.clone(volume, snapshot, clone, masked_only, progress=reports)
            self.driver.set_lease(clone, call.caller, expires)
            self._owners[clone] = call.caller
            return self._volume(dataclasses.replace(info, owner=call.caller, expires=expires))
        try:
            return await self._drive(create)
        finally:
            await reports.flushed()

    @op("storage.mask", effect="change", deadline=_DATA_DEADLINE, progress=True, resources=("/volume/{clone}",),
        address=_AT_CLONE)
    async def mask(self, call: Call, clone: Clone,
                   snapshot: Annotated[str, Arg("the snapshot of the masked clone to take when the hook "
                                                "succeeds", pattern=NAME_PATTERN)],
                   hook: Annotated[str, Arg("which of this agent's configured masking hooks to run (empty: "
                                            "its default)", pattern=f"({NAME_PATTERN})?")] = "") -> dict:
        """Run a configured masking hook in a clone, then snapshot it as masked.

        The hook is a program from this agent's settings (masking.hooks), never from the caller. It runs
        in the clone's directory with a clean environment, in its own process group, under its deadline
        (then TERM, then KILL) and with its output capped; the result reports its exit code, duration,
        deadline and output. Only when it exits 0 in time is clone@snapshot taken and recorded as masked,
        which is what storage.clone.create masked_only=true requires. The clone changes in place."""
        try:
            chosen = self.masking.hook(hook)
            if clone in self._masking_now:
                raise StorageError(f"a storage.mask is already running on {clone!r}; wait for it", code="busy")
        except StorageError as exc:
            raise op_error(exc) from None
        self._masking_now.add(clone)
        try:
            await call.progress({"phase": "masking", "clone": clone, "hook": chosen.name,
                                 "deadline": chosen.timeout})
            # Then the masked snapshot's byte counts (a phase of their own), once the hook succeeded.
            reports = _ByteReports(call, {"phase": "capturing", "clone": clone, "snapshot": snapshot})
            try:
                return await mask_clone(self.driver, clone, snapshot, chosen, reports)
            finally:
                await reports.flushed()
        except StorageError as exc:
            raise op_error(exc) from None
        finally:
            self._masking_now.discard(clone)

    @op("storage.clone.refresh", effect="destructive", deadline=_DATA_DEADLINE, progress=True,
        resources=("/volume/{clone}",), address=_AT_CLONE, result=_VOLUME)
    async def clone_refresh(self, call: Call, clone: Clone,
                            snapshot: Annotated[str, Arg("snapshot of the volume the clone was made from "
                                                         "(usually a newer one)", pattern=NAME_PATTERN)]) -> dict:
        """Replace a clone's contents with another snapshot of its origin volume; local changes are lost."""
        phase = {"phase": "refreshing", "clone": clone, "snapshot": snapshot}
        await call.progress(phase)
        reports = _ByteReports(call, phase)
        try:
            result = await self._drive(lambda: self._volume(self.driver.refresh_clone(clone, snapshot,
                                                                                      progress=reports)))
        finally:
            await reports.flushed()
        await self._drive(self.driver.touch_lease, clone)
        return result

    @op("storage.clone.rollback", effect="destructive", deadline=_DATA_DEADLINE, progress=True,
        resources=("/volume/{clone}",), address=_AT_CLONE, result=_VOLUME)
    async def clone_rollback(self, call: Call, clone: Clone,
                             snapshot: Annotated[str, Arg("one of the clone's own snapshots",
                                                          pattern=NAME_PATTERN)]) -> dict:
        """Rewind a clone to one of its own snapshots; changes made since are lost."""
        kind = (await self._drive(self._find, clone)).kind
        if kind != "clone":
            raise BadArguments(f"{clone!r} is a {kind}, not a clone; storage.clone.rollback rewinds clones "
                               f"only", argument="clone")
        phase = {"phase": "rolling back", "clone": clone, "snapshot": snapshot}
        await call.progress(phase)
        reports = _ByteReports(call, phase)
        try:
            await self._drive(lambda: self.driver.rollback(clone, snapshot, progress=reports))
        finally:
            await reports.flushed()
        await self._drive(self.driver.touch_lease, clone)
        return await self._drive(lambda: self._volume(self._find(clone)))

    @op("storage.clone.destroy", effect="destructive", deadline=600, resources=("/volume/{clone}",),
        address=_AT_CLONE, result=_DESTROYED, removes=_AT_CLONE)
    async def clone_destroy(self, call: Call, clone: Clone) -> dict:
        """Destroy a clone; refused while it has snapshots of its own, which it names."""
        await self._drive(self.driver.destroy_clone, clone)
        self._owners.pop(clone, None)
        return {"destroyed": clone}

    @op("storage.report", effect="read", result=_REPORT)
    async def report(self, call: Call) -> dict:
        """Space per owner, per source snapshot and per clone (exclusive and shared bytes), with each
        clone's last activity and expiry, this agent's clone limits, and what replication spools hold."""
        def build() -> dict[str, Any]:
            return space_report(self.driver.list_volumes(), self._leases())
        out = await self._drive(build)
        out["limits"] = dataclasses.asdict(self.clone_rules)
        out["spool"] = await asyncio.to_thread(self.packages.spool_usage)
        return out

    # self-service -------------------------------------------------------------------------------------
    def _resources_of(self, spec: Any, args: dict[str, Any], addressed: list[str]) -> list[str]:
        """An owned clone is decided over as /volume/NAME/owner/OWNER, so a policy can give every
        developer their own clones with one rule (``on: ["/volume/*/owner/{caller}"]``)."""
        return owner_resources(super()._resources_of(spec, args, addressed), self._owners)

    def _leases(self) -> dict[str, dict[str, Any]]:
        leases = getattr(self.driver, "leases", None)
        return leases() if leases is not None else {}

    def _clone_cost(self, volume: str, snapshot: str) -> int:
        """Bytes a new clone of volume@snapshot is expected to take: nothing where clones share extents,
        the snapshot's logical size where every clone is a full copy."""
        if "reflink-clones" in self.driver.capabilities() or self.driver.name == "btrfs":
            return 0
        found = [s for s in self.driver.list_snapshots(volume) if s.name == snapshot]
        return found[0].logical_bytes if found else 0

    async def _sweep_expired(self) -> None:
        """Warn the ops room before a clone expires, and destroy it when it has (audited)."""
        while True:
            try:
                await self.expire_clones()
            except Exception:       # one bad pass must not end the sweeping
                log.exception("clone expiry sweep failed")
            await asyncio.sleep(self.clone_rules.sweep_every)

    async def expire_clones(self, now: float | None = None) -> list[str]:
        """One expiry pass: warn about clones expiring within warn_before, destroy those past expiry
        (their own snapshots first). Returns the clones destroyed."""
        now = time.time() if now is None else now
        destroyed = []
        for name, lease in (await self._drive(self._leases)).items():
            if lease["expires"] is None:
                continue
            owner, left = lease["owner"], lease["expires"] - now
            if left > 0:
                if left <= self.clone_rules.warn_before and not lease["warned"]:
                    await self._notice(f"clone {name} of {owner} expires in {left:.0f}s and will then be "
                                       f"destroyed; its owner may snapshot what they need to keep", name, owner)
                    await self._drive(self.driver.touch_lease, name, True)
                continue
            rid = uuid.uuid4().hex
            reason = f"expired: clone {name} of {owner} passed its expiry {time.ctime(lease['expires'])}"
            if self.audit is not None:
                self.audit.decided(rid=rid, caller=self.jid.bare, op="storage.clone.destroy",
                                   resources=[f"/volume/{name}/owner/{owner}"], args={"clone": name}, secret=[],
                                   allowed=True, rule=reason, version=0, durable=True)
                await self.audit.written()  # the decision is on disk before the clone is destroyed
            started = time.monotonic()
            try:
                await self._drive(self._destroy_with_snapshots, name)
            except Exception as exc:
                outcome, text = (getattr(exc, "condition", "failed"),
                                 f"clone {name} of {owner} expired but could not be destroyed: {exc}")
            else:
                outcome, text = "ok", f"clone {name} of {owner} expired and was destroyed"
                self._owners.pop(name, None)
                destroyed.append(name)
            if self.audit is not None:   # the record first: the notice may be the last thing that happens
                self.audit.ended(rid=rid, caller=self.jid.bare, op="storage.clone.destroy",
                                 outcome=outcome, duration=time.monotonic() - started)
            if outcome == "ok" or name not in self._undestroyable:
                await self._notice(text, name, owner)
            if outcome != "ok":
                self._undestroyable.add(name)
        return destroyed

    def _destroy_with_snapshots(self, clone: str) -> None:
        """Destroy an expired clone and its own snapshots (refused, as always, while they have clones)."""
        for snap in reversed(self._find(clone).snapshots):
            self.driver.destroy_snapshot(clone, snap)
        self.driver.destroy_clone(clone)

    async def _notice(self, text: str, clone: str, owner: str) -> None:
        """Tell the brokers' ops rooms (NOTICE_OP); a broker that cannot take it is logged, not retried."""
        log.warning("%s", text)
        for broker in sorted(self._brokers) or ([self.broker_jid] if self.broker_jid else []):
            try:
                res = await self.request(broker, NOTICE_OP, {"text": text, "clone": clone, "owner": owner},
                                         timeout=10)
                if res.outcome is not Outcome.OK:
                    log.warning("storage notice not taken by %s: %s", broker, res.error)
            except Exception as exc:
                log.warning("storage notice not sent to %s: %s", broker, exc)

    def _find(self, name: str) -> VolumeInfo:
        found = [v for v in self.driver.list_volumes() if v.name == name]
        if not found:
            raise StorageError(f"no volume or clone named {name!r}; storage.volume.list shows what exists",
                               code="not_found")
        return found[0]

    def _volume(self, info: VolumeInfo) -> dict[str, Any]:
        """A volume for the wire (called in the worker thread: path() takes the driver's lock)."""
        out = dataclasses.asdict(info)
        out["origin"] = "@".join(info.origin) if info.origin else None
        out["snapshots"] = list(info.snapshots)
        if info.kind != "replica":
            out["path"] = str(self.driver.path(info.name))
        return out


def _snapshot(info: SnapshotInfo) -> dict[str, Any]:
    out = dataclasses.asdict(info)
    out["clones"] = list(info.clones)
    return out
