"""The source side of replication: actions, their updates, schedules, throttles and progress.

An update, in order, each step durable before the next:

1. snapshot the source volume (`<action>-<seq>`): this snapshot is what the target will hold, so the copy
   is point-in-time as the driver's snapshot is;
2. ask the target over XMPP (storage.package.receive) for an inbox: it answers with an address, a one-time
   token, the snapshots the package holds and how much of this stream it already spooled;
3. pick the base: the newest of this action's snapshots the package holds (none: a full stream), and keep
   it for the whole update so a resumed attempt regenerates the same bytes;
4. stream `driver.send(volume, snap, base)` through transfer.send (throttled, resumable: the inbox says
   what it holds and only the rest is sent);
5. ask the target to publish (storage.package.commit), which is all or nothing and idempotent;
6. record the new common snapshot, drop older ones of this action on the source.

A failed attempt is retried with a fresh token a few times; after that the update stays pending and the
next run (schedule, resume, restart) carries on from it.
"""

from __future__ import annotations

import asyncio
import builtins  # Replicator.list hides the type in its class: annotations there say builtins.list
import functools
import logging
import time
import uuid
from typing import Any, Awaitable, Callable

from agents.errors import Outcome
from agents.storage.driver import StorageDriver, StorageError
from agents.storage.inbox_tls import client_context
from agents.storage.replication_state import Action, ReplicationState
from agents.storage.transfer import Throttle, send

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], Awaitable[None]]
Requester = Callable[..., Awaitable[Any]]      # Actor.request

ATTEMPTS = 5
_REPORT_EVERY = 0.5         # seconds between progress reports: enough to watch, few enough for XMPP
_CONTROL_TIMEOUT = 30.0
_COMMIT_TIMEOUT = 3600.0    # publishing a large snapshot on the target takes as long as the data


# Refusals that another attempt at once cannot change (a full target waits for the next run); of them,
# the target's `unsupported` (it cannot take this stream at all) also pauses the action, since every later
# run would be refused the same way.
_NOT_RETRIED = ("invalid", "not_found", "exists", "denied", "unsupported", "no_space")
_PAUSES = ("unsupported",)


class Paused(StorageError):
    def __init__(self, action: str) -> None:
        super().__init__(f"replication action {action} was paused; storage.replication.resume continues it "
                         f"from where it stopped", code="busy")


class Replicator:
    """All actions of one source agent."""

    def __init__(self, driver: StorageDriver, state: ReplicationState, request: Requester,
                 own_resource: str) -> None:
        self.driver = driver
        self.state = state
        self._request = request
        self._resource = own_resource
        self._throttles: dict[str, Throttle] = {}
        self._updates: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._listeners: dict[str, list[ProgressFn]] = {}
        self.live: dict[str, dict[str, Any]] = {}       # progress of running updates, by action

    # lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run every action that is not paused: scheduled ones, and any with an update left pending."""
        for a in self.state.actions():
            if not a.paused:
                self._start_loop(a.id)

    async def stop(self) -> None:
        tasks = [*self._loops.values(), *self._updates.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loops.clear()
        self._updates.clear()

    # actions ------------------------------------------------------------------------------------------
    async def create(self, volume: str, target: str, package: str, interval: float, continuous: bool, tls: bool,
                     rate: float | None) -> Action:
        action_id = "r" + uuid.uuid4().hex[:8]
        a = Action(id=action_id, volume=volume, target=self._full_jid(target),
                   package=package or f"{volume[:54]}.{action_id}", interval=interval, continuous=continuous,
                   tls=tls, rate=rate, created=time.time())
        await self.state.add_action(a)
        return a

    def schedule(self, action_id: str) -> None:
        self._start_loop(action_id)

    def list(self) -> list[dict[str, Any]]:
        return [dict(a.to_wire(), progress=self.live.get(a.id)) for a in self.state.actions()]

    async def pause(self, action_id: str) -> Action:
        self.state.action(action_id)        # an unknown action is refused before anything stops
        # Cancelled before the pause is written: a running update changes its action no more after that.
        stopping = [t for t in (self._loops.pop(action_id, None), self._updates.pop(action_id, None)) if t]
        for task in stopping:
            task.cancel()
        await self.state.change_action(action_id, paused=True, state="paused")
        await asyncio.gather(*stopping, return_exceptions=True)
        self.live.pop(action_id, None)
        return self.state.action(action_id)

    async def resume(self, action_id: str) -> Action:
        a = await self.state.change_action(action_id, paused=False, state="idle")
        self._start_loop(action_id)
        return a

    async def throttle(self, action_id: str, rate: float | None) -> Action:
        a = await self.state.change_action(action_id, rate=rate)
        self._throttle(a).set_rate(rate)        # a running transfer paces to the new rate at once
        return a

    async def destroy(self, action_id: str) -> dict[str, Any]:
        """Stop the action and drop its snapshots on the source; the package on the target stays."""
        a = await self.pause(action_id)
        kept = []
        for snap in await asyncio.to_thread(self._own_snapshots, a):
            try:
                await asyncio.to_thread(self.driver.destroy_snapshot, a.volume, snap)
            except StorageError as exc:
                if exc.code != "has_dependants":
                    raise
                kept.append(f"{a.volume}@{snap}")
        await self.state.drop_action(action_id)
        self._throttles.pop(action_id, None)
        return {"destroyed": action_id, "package": a.package, "target": a.target, "kept_snapshots": kept}

    # updates ------------------------------------------------------------------------------------------
    def update(self, action_id: str, progress: ProgressFn | None = None) -> asyncio.Task[dict[str, Any]]:
        """The running update of an action, or a new one."""
        a = self.state.action(action_id)
        if a.paused:
            raise Paused(action_id)
        task = self._updates.get(action_id)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._update(action_id))
            self._updates[action_id] = task
        if progress is not None:
            listeners = self._listeners.setdefault(action_id, [])
            listeners.append(progress)
            task.add_done_callback(lambda _t: listeners.remove(progress))
        return task

    async def _update(self, action_id: str) -> dict[str, Any]:
        a = await self.state.change_action(action_id, state="running", error=None)
        try:
            if a.pending is None:
                seq = a.seq + 1
                snap = f"{a.id}-{seq:06d}"
                await self._report(a, {"phase": "snapshot", "snapshot": snap})
                # Taken to be sent: the embedded driver need not make a base for clones of it.
                await asyncio.to_thread(lambda: self.driver.snapshot(a.volume, snap, for_clones=False))
                a = await self.state.change_action(
                    action_id, seq=seq, pending={"snap": snap, "base": None, "decided": False})
            return await self._transfer(a)
        except asyncio.CancelledError:
            raise           # paused or stopping: the pending update is kept as it is
        except StorageError as exc:
            if exc.code not in _PAUSES:
                await self.state.change_action(action_id, state="error", error=str(exc))
                raise
            reason = (f"{exc}; the action is paused, as every run would be refused the same way "
                      f"(storage.replication.resume tries again once that has changed)")
            await self.state.change_action(action_id, state="paused", paused=True, error=reason)
            raise StorageError(reason, code=exc.code) from None
        except Exception as exc:
            await self.state.change_action(action_id, state="error", error=str(exc))
            raise
        finally:
            self.live.pop(action_id, None)

    async def _transfer(self, a: Action) -> dict[str, Any]:
        pending = a.pending
        assert pending is not None
        snap = pending["snap"]
        sent = attempts = 0
        tries: list[dict[str, int]] = []      # per connection that completed: where it resumed, what it sent
        total = resumed = None
        started = time.monotonic()
        error: Exception | None = None
        for attempts in range(1, ATTEMPTS + 1):
            try:
                offer = await self._call(a.target, "storage.package.receive",
                                         {"package": a.package, "action": a.id, "source_volume": a.volume,
                                          "snapshot": snap, "tls": a.tls, "driver": self.driver.name})
                if any(s["name"] == snap for s in offer["snapshots"]):
                    break               # published before an interruption: only the bookkeeping is left
                base = await self._choose_base(a, offer)
                if total is None:
                    total = await asyncio.to_thread(self._estimate, a.volume, snap, base)
                meter = _Meter(int(offer["held"]), total)

                # This attempt's meter and base, bound now (the loop's names change on the next attempt).
                async def on_bytes(n: int, meter: _Meter = meter, base: str | None = base) -> None:
                    nonlocal sent
                    sent += n           # every byte written, on every connection, cut ones included
                    meter.add(n)
                    if meter.due():
                        await self._report(a, meter.report(snap, base))

                result = await send(offer["host"], int(offer["port"]), offer["transfer"], offer["token"],
                                    functools.partial(self.driver.send, a.volume, snap, base),
                                    throttle=self._throttle(a), on_bytes=on_bytes,
                                    ssl_context=client_context(offer["cert"]) if a.tls else None)
                total = result.total_bytes
                resumed = result.resumed_from
                tries.append({"resumed_from": result.resumed_from, "sent_bytes": result.sent_bytes})
                await self._call(a.target, "storage.package.commit",
                                 {"package": a.package, "snapshot": snap}, timeout=_COMMIT_TIMEOUT)
                error = None
                break
            except (StorageError, OSError, asyncio.IncompleteReadError) as exc:
                if isinstance(exc, StorageError) and exc.code in _NOT_RETRIED:
                    raise
                error = exc
                log.info("replication %s: attempt %d failed: %s", a.id, attempts, exc)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** attempts))
        if error is not None:
            raise StorageError(f"replication {a.id} to {a.target} failed {ATTEMPTS} times, last: {error}; "
                               f"the update stays pending and resumes on the next run", code="failed")
        return await self._finish(a, sent, total, resumed, attempts, tries, time.monotonic() - started)

    async def _choose_base(self, a: Action, offer: dict[str, Any]) -> str | None:
        """The snapshot the update is sent against (None: a full stream), recorded in the action."""
        pending = a.pending
        assert pending is not None, "only an update under way chooses a base"
        held = {s["guid"] for s in offer["snapshots"]}
        base = pending["base"]
        if pending["decided"] and base is None:
            return base
        # The catalog in a worker thread: listing snapshots takes the driver's lock (which a long clone
        # holds) and measures each snapshot's sharing (a statement per chunk in the embedded store).
        snapshots = await asyncio.to_thread(self.driver.list_snapshots, a.volume)
        if pending["decided"] and next((s.guid for s in snapshots if s.name == base), None) in held:
            return base
        candidates = [s for s in snapshots
                      if s.name.startswith(f"{a.id}-") and s.name != pending["snap"] and s.guid in held]
        a.pending = dict(pending, base=candidates[-1].name if candidates else None, decided=True)
        await self.state.change_action(a.id, pending=a.pending)
        return a.pending["base"]

    def _estimate(self, volume: str, snap: str, base: str | None) -> int | None:
        """The stream's length, for the ETA. Counting the embedded driver's stream reads the chunk store
        once more, which is cheap beside sending; a second `btrfs send` is not, so btrfs has no ETA."""
        if self.driver.name != "embedded":
            return None
        return sum(len(piece) for piece in self.driver.send(volume, snap, base))

    async def _finish(self, a: Action, sent: int, total: int | None, resumed: int | None, attempts: int,
                      tries: builtins.list[dict[str, int]], seconds: float) -> dict[str, Any]:
        pending = a.pending or {}
        snap = pending.get("snap")
        last = {"snapshot": snap, "base": pending.get("base"), "stream_bytes": total, "sent_bytes": sent,
                "resumed_from": resumed or 0, "attempts": attempts, "connections": tries, "seconds": round(seconds, 3),
                "rate": round(sent / seconds) if seconds > 0 else None}
        a = await self.state.change_action(a.id, last=last, last_snap=snap, last_end=time.time(), pending=None,
                                           state="idle", error=None)
        # Only the newest common snapshot is needed as the next base; older ones of this action go.
        for old in await asyncio.to_thread(self._own_snapshots, a):
            if old != snap:
                try:
                    await asyncio.to_thread(self.driver.destroy_snapshot, a.volume, old)
                except StorageError:
                    pass        # a clone made from it keeps it; it is simply not pruned
        await self._report(a, {"phase": "done", **last})
        return a.to_wire()

    def _own_snapshots(self, a: Action) -> builtins.list[str]:
        return [s.name for s in self.driver.list_snapshots(a.volume) if s.name.startswith(f"{a.id}-")]

    # schedule -----------------------------------------------------------------------------------------
    def _start_loop(self, action_id: str) -> None:
        loop = self._loops.get(action_id)
        if loop is None or loop.done():
            self._loops[action_id] = asyncio.get_running_loop().create_task(self._run(action_id))

    async def _run(self, action_id: str) -> None:
        """Run updates when due; an on-demand action only finishes an update left pending."""
        failures = 0
        while True:
            a = self.state.action(action_id)
            if a.paused:
                return
            if a.pending is None and not a.continuous:
                if a.interval <= 0:
                    return
                due = (a.last_end or a.created) + a.interval
                if due > time.time() and failures == 0:
                    await asyncio.sleep(due - time.time())
                    continue
            try:
                await asyncio.shield(self.update(action_id))
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("replication %s: %s", action_id, exc)
                if self.state.action(action_id).paused:
                    return          # refused for good: the reason is in the action, the schedule waits
                failures += 1
                await asyncio.sleep(min(300.0, 2.0 ** failures))
            if a.continuous:
                await asyncio.sleep(1.0)    # back to back, but never a busy loop on an idle volume

    # helpers ------------------------------------------------------------------------------------------
    def _throttle(self, a: Action) -> Throttle:
        if a.id not in self._throttles:
            self._throttles[a.id] = Throttle(a.rate)
        return self._throttles[a.id]

    async def _report(self, a: Action, payload: dict[str, Any]) -> None:
        payload = dict(payload, action=a.id)
        self.live[a.id] = payload
        for listener in list(self._listeners.get(a.id, ())):
            await listener(payload)

    async def _call(self, target: str, op: str, args: dict[str, Any], timeout: float = _CONTROL_TIMEOUT) -> Any:
        res = await self._request(target, op, args, timeout=timeout)
        if res.outcome is Outcome.OK:
            return res.result
        code = {Outcome.DENIED: "denied"}.get(res.outcome, "failed")
        if res.error and res.error.startswith(("not-found", "exists", "unsupported", "no-space")):
            code = res.error.split(":", 1)[0].replace("-", "_")
        raise StorageError(f"{op} on {target}: {res.outcome.value}: {res.error}", code=code)

    def _full_jid(self, target: str) -> str:
        return target if "/" in target else f"{target}/{self._resource}"


class _Meter:
    """Bytes, rate and ETA of one transfer attempt: reported with its first bytes, then every
    ``_REPORT_EVERY`` seconds (so even a short transfer shows its byte count)."""

    def __init__(self, held: int, total: int | None) -> None:
        self.done, self.total, self.sent = held, total, 0
        self.start, self.last = time.monotonic(), float("-inf")

    def add(self, n: int) -> None:
        self.done += n
        self.sent += n

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last >= _REPORT_EVERY:
            self.last = now
            return True
        return False

    def report(self, snap: str, base: str | None) -> dict[str, Any]:
        elapsed = time.monotonic() - self.start
        rate = self.sent / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if self.total and rate > 0 else None
        return {"phase": "sending", "snapshot": snap, "base": base, "bytes": self.done, "total": self.total,
                "rate": round(rate), "eta": round(eta, 1) if eta is not None else None}
