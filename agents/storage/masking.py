"""Masked copies: production data for every developer, masked before anyone sees it.

One run, as a workflow step calls it: snapshot the source volume; bring the masking volume (a clone of
the source that only this step touches) to that snapshot; run the masking hook in it; snapshot the
masked result under the source snapshot's name; then give each developer a clone of that masked
snapshot (a new clone, or their existing one refreshed). Developers only ever get clones of masked
snapshots. If the hook fails, the masking volume is put back as it was (rolled back to its last masked
snapshot, or destroyed if this run created it), no developer clone is made or changed, and the error
carries the hook's output. The source snapshot stays: it is production's, and cheap to keep or destroy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from agents.storage.driver import StorageDriver, StorageError
from agents.storage.hooks import check_hook, run_hook
from agents.storage.names import validate_name

T = TypeVar("T")


@dataclass(frozen=True)
class MaskedCopies:
    source: str                 # source@snapshot that was masked
    masked: str                 # masking_volume@snapshot every developer clone comes from
    clones: tuple[str, ...]     # developer clones made or refreshed
    hook_output: str


def masking_volume_name(source: str) -> str:
    return f"{source}-masked"


async def masked_copies(driver: StorageDriver, *, source: str, snapshot: str, developers: Sequence[str],
                        hook: Sequence[str], timeout: float, env: Mapping[str, str] | None = None,
                        masking_volume: str | None = None) -> MaskedCopies:
    """Run one masked-copies round (see the module docstring); raises StorageError saying what failed."""
    work = masking_volume or masking_volume_name(source)
    for name, what in [(source, "source volume"), (snapshot, "snapshot name"), (work, "masking volume"),
                       *((d, "developer clone name") for d in developers)]:
        validate_name(name, what)
    check_hook(hook)
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise StorageError(f"hook timeout must be a positive number of seconds, got {timeout!r}",
                           code="invalid")
    if not developers:
        raise StorageError("no developer clones asked for; name at least one", code="invalid")
    if len(set(developers)) != len(developers) or work in developers or source in developers:
        raise StorageError("developer clone names must be distinct and differ from the source and masking "
                           "volumes", code="invalid")
    volumes = {v.name: v for v in await _thread(driver.list_volumes)}
    for dev in developers:
        held = volumes.get(dev)
        if held is not None and (held.kind != "clone" or held.origin is None or held.origin[0] != work):
            raise StorageError(f"{dev!r} exists and is not a masked copy of {source!r} (a clone of {work!r}); "
                               f"pick another name", code="exists")
    existing = volumes.get(work)
    if existing is not None and (existing.kind != "clone" or existing.origin is None
                                 or existing.origin[0] != source):
        raise StorageError(f"masking volume {work!r} exists and is not a clone of {source!r}; name another "
                           f"masking volume", code="exists")

    await _thread(driver.snapshot, source, snapshot)
    if existing is None:
        await _thread(driver.clone, source, snapshot, work)
    else:
        await _thread(driver.refresh_clone, work, snapshot)
    # From here until the masked snapshot exists, the masking volume holds unmasked data.
    try:
        result = await run_hook(hook, await _thread(driver.path, work), timeout=timeout, env=env)
        if not result.ok:
            raise StorageError(f"masking {source}@{snapshot} failed, no developer clone was made or changed: "
                               f"{result.describe()}", code="hook_failed")
        await _thread(driver.snapshot, work, snapshot)
    except BaseException:
        await _unmask_nothing(driver, work, existing is None)
        raise
    done = []
    for dev in developers:
        if dev in volumes:
            await _thread(driver.refresh_clone, dev, snapshot)
        else:
            await _thread(driver.clone, work, snapshot, dev)
        done.append(dev)
    return MaskedCopies(f"{source}@{snapshot}", f"{work}@{snapshot}", tuple(done), result.output)


async def _unmask_nothing(driver: StorageDriver, work: str, created: bool) -> None:
    """Put the masking volume back so no unmasked tree is left under its name."""
    if created:
        await _thread(driver.destroy_clone, work)
        return
    snaps = await _thread(driver.list_snapshots, work)
    if snaps:
        await _thread(driver.rollback, work, snaps[-1].name)
    else:       # refreshed but never masked (an earlier run died mid-hook): nothing masked to go back to
        await _thread(driver.destroy_clone, work)


async def _thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)
