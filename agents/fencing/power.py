"""Verified power operations on nodes, over the device registry's levels.

An off counts only when a status run afterwards says OFF (an agent's exit 0 alone is not enough),
likewise on; reboot is a verified off followed by a verified on, and an on failure after a good off
is reported beside the success (the node is fenced, which is what matters for safety). A timeout,
an unexpected exit code or an unreadable secret is a failure, never a success.

Levels follow Pacemaker's fencing topology: a node's levels are tried in order; a level succeeds
only when every device in it succeeds (both power supplies of a node must be off), and the first
device that fails ends that level. Concurrent requests for the same node and action coalesce into
one device action whose outcome every caller gets; different actions on one node run one at a time.

A coalesced action keeps the budget of the request that started it: a caller that joins it with less
time left only stops waiting when its own time is up (``StillInFlight``), and the action goes on to
its verified end, which the request that started it reports (and announces, agents/fencing/agent.py).
A caller never cuts a fence short for everyone, nor runs a second one beside it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agents.fencing.devices import Device, DeviceRegistry, FencingConfigError, UnknownNodeError
from agents.fencing.driver import AgentProgramError, AgentRun, run_fence_agent
from agents.fencing.fence_api import FenceApiError, PowerState, state_from_status_exit

log = logging.getLogger(__name__)

# Inside Pacemaker's default 60 s per device action, with room to report back.
DEFAULT_BUDGET = 50.0
POWER_ACTIONS = ("off", "on", "reboot", "status")


class StillInFlight(Exception):
    """A caller that joined a device action stopped waiting before the action ended; the action goes
    on with its own budget. The message says so, as a sentence a person can act on."""


@dataclass(frozen=True)
class Attempt:
    """One fence agent run made while serving a request."""

    device: str
    action: str
    ok: bool
    exit_code: int | None
    timed_out: bool
    duration: float
    detail: str            # what the agent said, or why it did not run


@dataclass(frozen=True)
class PowerOutcome:
    """The result of one power request, shared by every caller it was coalesced with."""

    ok: bool
    action: str
    node: str
    devices: tuple[str, ...]        # the level's devices that did it; empty when nothing worked
    state: PowerState               # the node's power state as last verified
    message: str                    # a sentence a person can act on
    attempts: tuple[Attempt, ...] = ()
    on_error: str | None = None     # reboot only: fenced, but power did not come back on

    @property
    def device(self) -> str | None:
        return ",".join(self.devices) if self.devices else None


class _Trail:
    """The attempts of one request and its deadline."""

    def __init__(self, until: float) -> None:
        self.until = until
        self.attempts: list[Attempt] = []

    def remaining(self) -> float:
        return self.until - asyncio.get_running_loop().time()


@dataclass
class PowerController:
    """Performs verified power operations for the nodes in a DeviceRegistry."""

    registry: DeviceRegistry
    device_runs: int = 0      # fence agent processes started, for tests and benchmarks
    _inflight: dict[tuple[str, str], asyncio.Future[PowerOutcome]] = field(default_factory=dict)
    _budgets: dict[tuple[str, str], float] = field(default_factory=dict)  # each in-flight action's own budget
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    # `budget`: the device time of an action this request starts. `wait`: how long this request
    # waits for an action it joins (default: its budget); past it, StillInFlight.

    async def off(self, node: str, *, budget: float = DEFAULT_BUDGET, wait: float | None = None) -> PowerOutcome:
        """Power `node` off; ok only when a status run confirms OFF."""
        return await self._request("off", node, budget, wait)

    async def on(self, node: str, *, budget: float = DEFAULT_BUDGET, wait: float | None = None) -> PowerOutcome:
        """Power `node` on; ok only when a status run confirms ON."""
        return await self._request("on", node, budget, wait)

    async def reboot(self, node: str, *, budget: float = DEFAULT_BUDGET, wait: float | None = None) -> PowerOutcome:
        """Verified off, then on; ok once off is verified, with `on_error` if on then failed."""
        return await self._request("reboot", node, budget, wait)

    async def status(self, node: str, *, budget: float = DEFAULT_BUDGET, wait: float | None = None) -> PowerOutcome:
        """The node's power state; ok with state on/off, or not ok with state 'unknown'."""
        return await self._request("status", node, budget, wait)

    def nodes(self) -> list[str]:
        """The nodes this controller can fence (the Fence Agent API's `list`)."""
        return self.registry.nodes()

    # -- coalescing ---------------------------------------------------------------------------

    def in_flight(self, node: str, action: str) -> bool:
        """Whether a request would join a device action already running for `node` and `action`."""
        return (node, action) in self._inflight

    async def _request(self, action: str, node: str, budget: float, wait: float | None = None) -> PowerOutcome:
        if action not in POWER_ACTIONS:
            raise ValueError(f"unknown power action {action!r}")
        try:
            self.registry.levels_for(node)
        except UnknownNodeError as error:
            return PowerOutcome(ok=False, action=action, node=node, devices=(), state="unknown",
                                message=f"cannot {action} {node}: {error}")
        key = (node, action)
        future = self._inflight.get(key)
        if future is None:
            if not budget > 0:
                return PowerOutcome(ok=False, action=action, node=node, devices=(), state="unknown",
                                    message=f"cannot {action} {node}: the request left too little time to run a"
                                            " fence device; nothing was done")
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            self._inflight[key] = future
            self._budgets[key] = budget
            # The work runs in its own task: a caller that gives up must not abort a fence
            # action that other callers are waiting on.
            task = asyncio.create_task(self._perform(key, future, loop.time() + budget))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return await asyncio.shield(future)
        # Joining: the action keeps the budget it started with, whatever this caller has left.
        own = self._budgets.get(key, budget)
        patience = budget if wait is None else wait
        log.info("%s %s: joining the action already in flight (its budget %.1fs; this caller waits %.1fs)",
                 action, node, own, max(patience, 0.0))
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(patience, 0.0))
        except TimeoutError:
            raise StillInFlight(
                f"{action} {node} is still in progress: this request joined the {action} already running"
                f" (which keeps its own {own:g}s budget and goes on to a verified result) and stopped"
                f" waiting when its own time ran out; ask fence.status {node}, or the request that"
                " started it, for the result") from None

    async def _perform(self, key: tuple[str, str], future: asyncio.Future[PowerOutcome],
                       until: float) -> None:
        node, action = key
        work: dict[str, Callable[[str, _Trail], Awaitable[PowerOutcome]]] = {
            "off": self._off, "on": self._on, "reboot": self._reboot, "status": self._status,
        }
        trail = _Trail(until)
        try:
            async with self._locks.setdefault(node, asyncio.Lock()):
                outcome = await work[action](node, trail)
        except Exception as error:  # a bug must still end in a failure, never in silence
            log.exception("%s %s failed unexpectedly", action, node)
            outcome = PowerOutcome(
                ok=False, action=action, node=node, devices=(), state="unknown",
                attempts=tuple(trail.attempts),
                message=f"{action} {node} failed with an internal error ({error}); "
                        "treat the node as NOT fenced")
        except BaseException:
            future.cancel()  # shut down mid-request: callers get CancelledError, not a hang
            raise
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]
                self._budgets.pop(key, None)
        if not future.done():
            future.set_result(outcome)

    # -- the operations -----------------------------------------------------------------------

    async def _off(self, node: str, trail: _Trail) -> PowerOutcome:
        result = await self._set_power(node, "off", trail)
        if isinstance(result, tuple):
            return PowerOutcome(
                ok=True, action="off", node=node, devices=result, state="off",
                attempts=tuple(trail.attempts),
                message=f"{node} is off: {', '.join(result)} powered it off and status confirmed OFF")
        return self._failed("off", node, trail, result,
                            f"{node} may still be running: do not release its resources")

    async def _on(self, node: str, trail: _Trail) -> PowerOutcome:
        result = await self._set_power(node, "on", trail)
        if isinstance(result, tuple):
            return PowerOutcome(
                ok=True, action="on", node=node, devices=result, state="on",
                attempts=tuple(trail.attempts),
                message=f"{node} is on: {', '.join(result)} powered it on and status confirmed ON")
        return self._failed("on", node, trail, result, f"{node} was not confirmed on")

    async def _reboot(self, node: str, trail: _Trail) -> PowerOutcome:
        result = await self._set_power(node, "off", trail)
        if not isinstance(result, tuple):
            return self._failed("reboot", node, trail, result,
                                f"{node} may still be running: do not release its resources")
        # Power comes back through the same devices that cut it.
        level = tuple(self.registry.devices[name] for name in result)
        error = await self._level_set(level, node, "on", trail)
        fenced = f"{node} was fenced ({', '.join(result)} powered it off, status confirmed OFF)"
        if error is None:
            return PowerOutcome(ok=True, action="reboot", node=node, devices=result, state="on",
                                attempts=tuple(trail.attempts),
                                message=f"{fenced} and powered back on (status confirmed ON)")
        return PowerOutcome(
            ok=True, action="reboot", node=node, devices=result, state="unknown",
            attempts=tuple(trail.attempts), on_error=error,
            message=f"{fenced}, but powering it back on failed: {error}; "
                    "check the node and power it on by hand")

    async def _status(self, node: str, trail: _Trail) -> PowerOutcome:
        errors = []
        for index, level in enumerate(self.registry.levels_for(node), start=1):
            states = []
            for device in level:
                run = await self._run(device, "status", node, trail, expect=(0, 2))
                state = state_from_status_exit(run.exit_code) if run else "unknown"
                if state == "unknown":
                    errors.append(f"level {index}: {trail.attempts[-1].detail}")
                    break
                states.append(state)
            else:
                # One live power supply keeps a node running.
                node_state: PowerState = "on" if "on" in states else "off"
                names = tuple(d.name for d in level)
                return PowerOutcome(ok=True, action="status", node=node, devices=names,
                                    state=node_state, attempts=tuple(trail.attempts),
                                    message=f"{node} is {node_state.upper()} (by {', '.join(names)})")
        return PowerOutcome(ok=False, action="status", node=node, devices=(), state="unknown",
                            attempts=tuple(trail.attempts),
                            message=f"the power state of {node} is unknown: " + "; ".join(errors))

    # -- levels and devices -------------------------------------------------------------------

    async def _set_power(self, node: str, target: str, trail: _Trail) -> tuple[str, ...] | str:
        """Try each level until one verifies `target`; the level's device names, or the errors."""
        errors = []
        for index, level in enumerate(self.registry.levels_for(node), start=1):
            error = await self._level_set(level, node, target, trail)
            if error is None:
                return tuple(d.name for d in level)
            errors.append(f"level {index} ({', '.join(d.name for d in level)}): {error}")
        return "; ".join(errors)

    async def _level_set(self, level: tuple[Device, ...], node: str, target: str,
                         trail: _Trail) -> str | None:
        """Set and verify every device of a level; the first error ends the level."""
        for device in level:
            run = await self._run(device, target, node, trail, expect=(0,))
            if run is None:
                return trail.attempts[-1].detail
            check = await self._run(device, "status", node, trail, expect=(0, 2))
            if check is None:
                return f"{device.name}: {target} could not be verified: {trail.attempts[-1].detail}"
            seen = state_from_status_exit(check.exit_code)
            if seen != target:
                return (f"{device.name}: the agent reported {target} done, but status then said "
                        f"{seen.upper()}")
        return None

    async def _run(self, device: Device, action: str, node: str, trail: _Trail, *,
                   expect: tuple[int, ...]) -> AgentRun | None:
        """One agent run, recorded in the trail; the run if its exit code is expected, else None."""
        remaining = trail.remaining()
        timeout = min(device.timeout, remaining)
        if timeout <= 0:
            trail.attempts.append(Attempt(device.name, action, False, None, True, 0.0,
                                          f"{device.name}: {action} not tried: the request's time ran out"))
            return None
        try:
            params = device.agent_params()
            plug = device.plug_for(node)
            self.device_runs += 1
            run = await run_fence_agent(device.program, params, action, plug=plug, timeout=timeout)
        except (FencingConfigError, AgentProgramError, FenceApiError, UnknownNodeError,
                OSError) as error:
            trail.attempts.append(Attempt(device.name, action, False, None, False, 0.0,
                                          f"{device.name}: {action} could not run: {error}"))
            return None
        if run.timed_out:
            ok, detail = False, f"{device.name}: {action} timed out after {timeout:.1f}s and was killed"
        elif run.exit_code in expect:
            ok, detail = True, run.stdout.strip() or f"exit {run.exit_code}"
        else:
            ok, detail = False, (f"{device.name}: {action} failed (exit {run.exit_code}): "
                                 f"{run.error_text}")
        trail.attempts.append(Attempt(device.name, action, ok, run.exit_code, run.timed_out,
                                      run.duration, detail))
        return run if ok else None

    @staticmethod
    def _failed(action: str, node: str, trail: _Trail, errors: str, consequence: str) -> PowerOutcome:
        return PowerOutcome(ok=False, action=action, node=node, devices=(), state="unknown",
                            attempts=tuple(trail.attempts),
                            message=f"{action} {node} failed: {errors}; {consequence}")
