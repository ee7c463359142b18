"""The storage agent's replication ops, as a mixin of StorageAgent: actions on the source
(storage.replicate, storage.replication.*) and packages on the target (storage.package.*).

Two of them are for agents rather than people: a source calls storage.package.receive on the target to
open an inbox for one snapshot, then storage.package.commit to publish it. A policy that lets a site
replicate into another grants the source agent's JID those two ops on the target (on /volume/<package>).
A package is a replica volume: its snapshots are listed with storage.snapshot.list and cloned with
storage.clone.create like any other, and have no writable tree of their own.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Awaitable

from ..agent import Call
from ..jobs import Job
from ..ops import Arg, op
from .driver import StorageError
from .faults import op_error
from .names import NAME_PATTERN
from .packages import PackageHost
from .replication import Replicator
from .replication_state import ReplicationState

if TYPE_CHECKING:
    from .catalog import CatalogDriver

_DATA_DEADLINE = 3600.0
_FOLLOWS = "replication "  # a job's work (jobs.Job.work): the update of the action named after it
_RULE = "1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit, no '..'"

Volume = Annotated[str, Arg(f"source volume name ({_RULE})", pattern=NAME_PATTERN)]
Package = Annotated[str, Arg(f"package name on the target ({_RULE})", pattern=NAME_PATTERN)]
ActionId = Annotated[str, Arg("replication action id (storage.replication.list)", pattern=r"r[0-9a-f]{8}")]
Rate = Annotated[float, Arg("bandwidth limit in bytes per second; 0 for none", min=0)]


class ReplicationOps:
    """Replication ops; the class mixing this in provides driver, state_dir, settings, request, _drive."""

    driver: "CatalogDriver"
    replicator: Replicator
    packages: PackageHost

    def _open_replication(self, state_dir: Path | None, settings: dict[str, Any]) -> None:
        directory = Path(state_dir) / "replication" if state_dir else self.driver.root / "replication"
        self.replication_state = ReplicationState(directory / "replication.sqlite")
        try:
            self.packages = PackageHost(self.driver, self.replication_state, directory,
                                        host=settings.get("inbox_host", "127.0.0.1"),
                                        advertise=settings.get("inbox_advertise"),
                                        keep=settings.get("keep_received"))
            self.replicator = Replicator(self.driver, self.replication_state, self.request,  # type: ignore[attr-defined]
                                         own_resource=self.resource)  # type: ignore[attr-defined]
        except BaseException:   # a bad setting (keep_received): no store thread outlives an agent never started
            self.replication_state.close()
            raise

    async def _start_replication(self) -> None:
        await self.packages.start()
        self.replicator.start()     # actions carry on: schedules, and updates an interruption left pending

    async def _close_replication(self) -> None:
        try:
            await self.replicator.stop()
            await self.packages.stop()
        finally:
            await self.replication_state.aclose()

    async def _guard(self, coro: Any) -> Any:
        try:
            return await coro
        except StorageError as exc:
            raise op_error(exc) from None

    async def _wait_update(self, call: Call, action_id: str) -> dict[str, Any]:
        async def report(payload: dict[str, Any]) -> None:
            await call.progress(payload)

        try:
            task = self.replicator.update(action_id, report)
        except StorageError as exc:
            raise op_error(exc) from None
        # The update is durable (the replicator resumes it at start): a restart follows it, not interrupts.
        await call.follows(f"{_FOLLOWS}{action_id}")
        try:
            return await self._guard(asyncio.shield(task))
        except asyncio.CancelledError:
            if task.cancelled():        # paused (or the agent is stopping) while this op waited
                raise op_error(StorageError(f"replication action {action_id} was paused or stopped during "
                                            f"the update; storage.replication.resume continues it",
                                            code="busy")) from None
            raise

    def follow_job(self, job: Job, call: Call) -> Awaitable[Any] | None:
        """A replication job cut off by a restart follows its action's update, which the replicator
        resumes; it cannot when the action is gone or paused (the job is then reported interrupted). An
        update that was published before the stop ends the job with the action as it is now."""
        if not job.work.startswith(_FOLLOWS):
            return None
        action_id = job.work[len(_FOLLOWS):]
        try:
            action = self.replication_state.action(action_id)
        except StorageError:
            return None
        if action.paused:
            return None
        if action.pending is None and action.last_end is not None and action.last_end >= job.accepted_at:
            return self._async(action.to_wire)
        return self._wait_update(call, action_id)

    # source -------------------------------------------------------------------------------------------
    @op("storage.replicate", effect="change", deadline=_DATA_DEADLINE, progress=True, resources=("/volume/{volume}",))
    async def replicate(self, call: Call, volume: Volume,
                        target: Annotated[str, Arg("the target storage agent: its name in the mesh file"
                                                   " (storage2, on this agent's domain) or its JID",
                                                   pattern=r"[^\s/@]+(@[^\s/@]+)?(/\S+)?")],
                        package: Annotated[str, Arg(f"package name on the target (default: "
                                                    f"<volume>.<action id>; {_RULE})",
                                                    pattern=f"|{NAME_PATTERN}")] = "",
                        interval: Annotated[float, Arg("seconds between scheduled updates; 0 for on demand "
                                                       "(storage.replication.update)", min=0)] = 0.0,
                        continuous: Annotated[bool, Arg("start each update as soon as the last one ends")] = False,
                        tls: Annotated[bool, Arg("encrypt the data stream (the target's certificate is "
                                                 "pinned through XMPP)")] = True,
                        rate: Rate = 0.0) -> dict:
        """Create a replication action from a volume to a package on another storage agent, and run its
        first (full) update, reporting bytes, rate and ETA."""
        await self._drive(self.driver.list_snapshots, volume)  # type: ignore[attr-defined]  # the volume must exist
        if "@" not in target.split("/")[0]:  # a name, as `vertebra call --to` takes one: an agent of this mesh
            target = f"{target}@{self.jid.domain}"  # type: ignore[attr-defined]  # the Actor's
        try:
            action = await self.replicator.create(volume, target, package, interval, continuous, tls, rate or None)
        except StorageError as exc:
            raise op_error(exc) from None
        self.replicator.schedule(action.id)
        return await self._wait_update(call, action.id)

    @op("storage.replication.update", effect="change", deadline=_DATA_DEADLINE, progress=True, announce="replication")
    async def replication_update(self, call: Call, action: ActionId) -> dict:
        """Run one update of an action now (or join the one running): snapshot, send incrementally, publish."""
        return await self._wait_update(call, action)

    @op("storage.replication.list", effect="read", announce="replication")
    async def replication_list(self, call: Call) -> list:
        """List replication actions: target, package, schedule, throttle, state, last update, live progress."""
        return self.replicator.list()

    @op("storage.replication.pause", effect="change", announce="replication")
    async def replication_pause(self, call: Call, action: ActionId) -> dict:
        """Pause an action: a running transfer stops where it is and resumes from there later."""
        return (await self._guard(self.replicator.pause(action))).to_wire()

    @op("storage.replication.resume", effect="change", announce="replication")
    async def replication_resume(self, call: Call, action: ActionId) -> dict:
        """Resume a paused action: an interrupted update continues, then the schedule runs again."""
        return (await self._guard(self.replicator.resume(action))).to_wire()

    @op("storage.replication.throttle", effect="change", announce="replication")
    async def replication_throttle(self, call: Call, action: ActionId, rate: Rate) -> dict:
        """Change an action's bandwidth limit; a running transfer paces to it at once."""
        return (await self._guard(self.replicator.throttle(action, rate or None))).to_wire()

    @op("storage.replication.destroy", effect="destructive", deadline=600, announce="replication")
    async def replication_destroy(self, call: Call, action: ActionId) -> dict:
        """Destroy an action and its snapshots on the source; its package on the target stays."""
        return await self._guard(self.replicator.destroy(action))

    # target -------------------------------------------------------------------------------------------
    @op("storage.package.list", effect="read")
    async def package_list(self, call: Call) -> list:
        """List the packages this agent holds: source agent and volume, action, snapshots."""
        return await self._drive(self.packages.list)  # type: ignore[attr-defined]

    @op("storage.package.receive", effect="change", resources=("/volume/{package}",), rereads="/volume",
        for_agents=True)
    async def package_receive(self, call: Call, package: Package,
                              action: ActionId, source_volume: Volume,
                              snapshot: Annotated[str, Arg("snapshot to receive", pattern=NAME_PATTERN)],
                              tls: bool = True,
                              driver: Annotated[str, Arg("the source's storage driver; a stream this agent's "
                                                         "driver cannot receive is refused at once")] = "") -> dict:
        """(For source agents.) Open an inbox for one snapshot: address, one-time token, what is held."""
        return await self._guard(self.packages.offer(call.caller, package, action, source_volume, snapshot, tls,
                                                     driver))

    @op("storage.package.commit", effect="change", deadline=_DATA_DEADLINE, resources=("/volume/{package}",),
        rereads="/volume", for_agents=True)
    async def package_commit(self, call: Call, package: Package,
                             snapshot: Annotated[str, Arg("snapshot whose stream is complete",
                                                          pattern=NAME_PATTERN)]) -> dict:
        """(For source agents.) Publish a completely received snapshot into its package, all or nothing."""
        return await self._guard(self.packages.commit(call.caller, package, snapshot))

    @op("storage.package.destroy", effect="destructive", deadline=600, resources=("/volume/{package}",),
        rereads="/volume")
    async def package_destroy(self, call: Call, package: Package) -> dict:
        """Destroy a package and its snapshots; refused while clones made from them exist, which it names."""
        return await self._guard(self.packages.destroy(package))

    @staticmethod
    async def _async(fn: Any, *args: Any) -> Any:
        """A quick synchronous call as a coroutine, so _guard turns its StorageError into an OpError."""
        return fn(*args)
