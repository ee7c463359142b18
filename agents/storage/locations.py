"""Where a storage agent's volumes are, told to its brokers so that `--on /volume/NAME` reaches it.

A storage agent advertises the resources the mesh file configures for it (its host, its pool), which
is all its broker admits; its volumes come and go with ops, so they are reported separately: the
full list of names goes to each broker instance that has seen this agent (``mesh.volumes``, see
broker/volumes.py), and again after every op that creates or destroys one. A report that fails (a
broker that has not listed this agent yet, one that went away) is retried with backoff; an op that
changed the volumes waits briefly for its brokers to have the new list before it answers, so a
caller may address a volume right after creating it.

The agent itself counts a volume it holds as a held resource: a request addressed ``on`` /volume/NAME
is admitted here (and authorized over that path) when NAME is one of its volumes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .. import resources as paths
from ..actor import Backoff
from ..agent import MAX_ADDRESSED, Call
from ..errors import BadArguments, Outcome
from ..ops import OpSpec

log = logging.getLogger(__name__)

REPORT_OP = "mesh.volumes"
# Names one report may carry: 2,000 names of at most 64 characters stay within a payload's 160 KiB
# (docs/protocol.md 3.2). An agent holding more is located for the first 2,000 by name only.
MAX_REPORTED = 2000
REPORT_TIMEOUT = 5.0    # seconds one report to one broker may take
CHANGE_WAIT = 3.0       # seconds an op that changed the volumes waits for its brokers to know
# The ops after which the set of volumes may differ (a clone and a received replica are volumes too) say
# so on their declaration: the volume they make or remove when they succeed (makes="/volume/{clone}"),
# or rereads="/volume" for those that make or remove replicas, after which the catalog is read again.
VOLUMES = "/volume"


def _volume_of(template: str, args: dict[str, Any]) -> str:
    """The volume name a declared ``/volume/{arg}`` template gives with these arguments ("" for none)."""
    prefix = VOLUMES + "/"
    return template.format(**args)[len(prefix):] if template.startswith(prefix) else ""


def volume_path(name: str) -> str:
    """The resource a volume is addressed as; the storage ops' declarations name the same (/volume/{volume})."""
    return f"/volume/{name}"


class VolumeLocations:
    """Mixed into the storage agent before ``Agent``; needs ``self.driver.volume_names``."""

    def _open_locations(self) -> None:
        self._volume_names: frozenset[str] = frozenset(self.driver.volume_names())  # type: ignore[attr-defined]
        self._volumes_version = 0
        self._reported: dict[str, int] = {}          # broker full JID -> version it has
        self._report_wanted: asyncio.Event | None = None
        self._reports_done: asyncio.Condition | None = None
        self._reporter: asyncio.Task[None] | None = None

    def _start_locations(self) -> None:
        self._report_wanted = asyncio.Event()
        self._reports_done = asyncio.Condition()
        self._reporter = asyncio.get_running_loop().create_task(self._report_volumes())
        self._report_wanted.set()

    async def _stop_locations(self) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
            await asyncio.gather(self._reporter, return_exceptions=True)
            self._reporter = None

    # -- telling the brokers -----------------------------------------------------------------------
    def _on_broker_presence(self, pres: Any) -> None:
        super()._on_broker_presence(pres)  # type: ignore[misc]
        # A broker that is new to us (or came back) needs the whole list again.
        for gone in set(self._reported) - set(self._brokers):  # type: ignore[attr-defined]
            del self._reported[gone]
        if self._report_wanted is not None:
            self._report_wanted.set()

    async def _report_volumes(self) -> None:
        backoff = Backoff(base=0.5, cap=10.0)
        assert self._report_wanted is not None and self._reports_done is not None
        while True:
            await self._report_wanted.wait()
            self._report_wanted.clear()
            version, names = self._volumes_version, sorted(self._volume_names)
            if len(names) > MAX_REPORTED:
                log.warning("this agent holds %d volumes; its brokers are told of the first %d by name only, "
                            "so calls on the others need --to", len(names), MAX_REPORTED)
                names = names[:MAX_REPORTED]
            behind = [b for b in sorted(self._brokers) if self._reported.get(b) != version]  # type: ignore[attr-defined]
            if not behind:
                continue
            results = await asyncio.gather(*(
                self.request(b, REPORT_OP, {"volumes": names}, timeout=REPORT_TIMEOUT)  # type: ignore[attr-defined]
                for b in behind), return_exceptions=True)
            failed = False
            for broker, res in zip(behind, results):
                if not isinstance(res, BaseException) and res.outcome is Outcome.OK:
                    self._reported[broker] = version
                else:
                    failed = True
                    log.info("volume report to %s not taken yet (%s); retrying", broker,
                             res if isinstance(res, BaseException) else f"{res.outcome.value}: {res.error}")
            async with self._reports_done:
                self._reports_done.notify_all()
            if failed:
                await asyncio.sleep(backoff.next())
                self._report_wanted.set()
            else:
                backoff.reset()

    async def _volumes_changed(self, names: frozenset[str]) -> None:
        """If the volume names changed, have the brokers told and wait a little for it."""
        if names == self._volume_names:
            return
        self._volume_names = names
        self._volumes_version += 1
        if self._report_wanted is None or self._reports_done is None:
            return
        self._report_wanted.set()
        version = self._volumes_version

        def told() -> bool:
            return all(self._reported.get(b, -1) >= version for b in self._brokers)  # type: ignore[attr-defined]

        try:
            async with asyncio.timeout(CHANGE_WAIT):
                async with self._reports_done:
                    await self._reports_done.wait_for(told)
        except TimeoutError:
            log.info("brokers not told of volume change %d within %ss; the report goes on in the background",
                     version, CHANGE_WAIT)

    async def execute(self, spec: OpSpec, call: Call, args: dict[str, Any]) -> str:
        ok = False
        try:
            result = await super().execute(spec, call, args)  # type: ignore[misc]
            ok = True
            return result
        finally:
            # From the op's own arguments where they say it, so a long op of another caller holding the
            # driver's lock does not hold this answer back too.
            made, removed = _volume_of(spec.makes, args), _volume_of(spec.removes, args)
            if ok and made:
                await self._volumes_changed(self._volume_names | {made})
            elif ok and removed:
                await self._volumes_changed(self._volume_names - {removed})
            elif spec.rereads == VOLUMES:
                await self._volumes_changed(frozenset(
                    await asyncio.to_thread(self.driver.volume_names)))  # type: ignore[attr-defined]

    # -- being addressed -----------------------------------------------------------------------------
    def _resources_of(self, spec: OpSpec, args: dict[str, Any], addressed: list[str]) -> list[str]:
        """As ``Agent._resources_of``, with this agent's volumes (/volume/NAME) counted as held."""
        held = {volume_path(n) for n in self._volume_names}
        volumes = [r for r in addressed if r in held] if len(addressed) <= MAX_ADDRESSED else []
        if not volumes:
            return super()._resources_of(spec, args, addressed)  # type: ignore[misc]
        others = [r for r in addressed if r not in held]
        if others:
            rest = super()._resources_of(spec, args, others)  # type: ignore[misc]
        else:  # only volumes addressed: they and the named resources, not the agent's own as a fallback
            try:
                rest = [paths.check(r) for r in spec.resources_for(args)]
            except paths.BadResource as exc:
                raise BadArguments(str(exc)) from None
        return sorted(set(volumes)) + [r for r in rest if r not in volumes]
