"""Masking: production data made safe in a clone before any developer gets a copy (storage.mask).

A masking hook is a real program the storage agent's settings name, never the caller::

    settings:
      masking:
        hooks:
          demo: {argv: [masking/sqlite-mask, app.db, mask-demo.sql], timeout: 60, output_cap: 65536}
        default: demo           # the hook storage.mask runs when the caller names none (default: the
                                # only one, when there is just one)

``argv`` is a list, never a shell line; its first item is an absolute path to an executable, or a path
relative to Vertebra's own ``deploy/`` directory for a hook shipped with it (deploy/masking/). Settings
are checked when the agent starts, so a hook that cannot run stops the agent with a sentence saying so.

One run (:func:`mask_clone`) runs the hook in a clone's directory through agents/storage/hooks.py and
the process runner, agents/process.py (clean environment, own process group, deadline then TERM and
KILL, output capped), and only if it exits 0 in time snapshots the clone and records in the driver's
catalog that a successful mask produced that snapshot (``mark_masked``). Hook and snapshot are one op,
so nothing can be written into the clone between the hook's success and the snapshot through the
agent. A clone made with ``masked_only`` comes only from such a snapshot: that is how the masked-copy
workflow refuses to hand out unmasked data; and a clone made from one is refreshed only to another
(agents/storage/catalog.py). If the hook fails, no snapshot is taken and the clone goes back to its
latest masked snapshot if it has one; otherwise it still holds what the hook left, and the error says so.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agents.schema import Fields
from agents.storage.driver import BytesProgress, StorageError
from agents.storage.hooks import DEFAULT_OUTPUT_CAP, check_hook, run_hook
from agents.storage.names import NAME_PATTERN
from agents.storage.settings import SettingsError

T = TypeVar("T")

# Hooks shipped with Vertebra live here; a relative argv[0] in the settings names one of them.
SHIPPED_HOOKS = Path(__file__).resolve().parents[2] / "deploy"
MAX_TIMEOUT = 3000.0        # seconds; storage.mask's own deadline (3600 s) must cover the hook's
MAX_OUTPUT_CAP = 1 << 20    # bytes of hook output kept for the result or the error
_HOOK_KEYS = {"argv", "timeout", "output_cap"}


# The masking settings are the storage agent's: their errors are its settings errors.
MaskingSettingsError = SettingsError


@dataclass(frozen=True)
class MaskingHook:
    name: str
    argv: tuple[str, ...]
    timeout: float = 60.0
    output_cap: int = DEFAULT_OUTPUT_CAP


@dataclass(frozen=True)
class Masking:
    """The agent's masking hooks by name, and the one run when a caller names none."""
    hooks: Mapping[str, MaskingHook]
    default: str | None

    def hook(self, name: str) -> MaskingHook:
        """The hook called `name` ('' for the default), else StorageError saying which exist."""
        if not self.hooks:
            raise StorageError("this storage agent has no masking hook; configure one in its settings "
                               "(masking: {hooks: {NAME: {argv: [...]}}}) to use storage.mask", code="invalid")
        chosen = name or self.default
        if chosen is None:
            raise StorageError(f"name the masking hook to run: this agent has {', '.join(sorted(self.hooks))} "
                               f"and no masking.default", code="invalid")
        if chosen not in self.hooks:
            raise StorageError(f"no masking hook {chosen!r} on this agent; it has "
                               f"{', '.join(sorted(self.hooks))}", code="invalid")
        return self.hooks[chosen]


def masking_from_settings(value: Any, where: Fields | None = None) -> Masking:
    """The `masking` setting, checked (hooks exist and are executable); raises MaskingSettingsError.
    ``where`` places it in the mesh file (agents/schema.py); on its own, errors name ``storage settings``."""
    where = where or Fields("storage settings", MaskingSettingsError, prefix="masking")
    if value is None:
        return Masking({}, None)
    if not isinstance(value, Mapping) or set(value) - {"hooks", "default"}:
        raise where.error("", "must be a map with hooks (NAME: {argv: [...], timeout: SECONDS}) and optionally"
                              " default (a hook name)")
    raw = value.get("hooks") or {}
    if not isinstance(raw, Mapping):
        raise where.error("hooks", "must map hook names to {argv: [...], timeout: SECONDS}")
    hooks = {}
    for name, spec in raw.items():
        f = f"hooks.{name}"
        if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
            raise where.error(f, f"masking hook name {name!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        if not isinstance(spec, Mapping) or "argv" not in spec or set(spec) - _HOOK_KEYS:
            raise where.error(f, "must be a map with argv (a list: program, then its arguments) and optionally"
                                 " timeout and output_cap")
        argv = spec["argv"]
        if isinstance(argv, list) and argv and isinstance(argv[0], str) and not Path(argv[0]).is_absolute():
            argv = [str(SHIPPED_HOOKS / argv[0]), *argv[1:]]
        try:
            argv = check_hook(argv)
        except StorageError as exc:
            raise where.error(f"{f}.argv", str(exc)) from None
        timeout = spec.get("timeout", 60)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
            raise where.error(f"{f}.timeout", f"must be a number of seconds above 0 and at most {MAX_TIMEOUT:g},"
                                              f" got {timeout!r}")
        cap = spec.get("output_cap", DEFAULT_OUTPUT_CAP)
        if isinstance(cap, bool) or not isinstance(cap, int) or not 0 < cap <= MAX_OUTPUT_CAP:
            raise where.error(f"{f}.output_cap", "must be a whole number of bytes above 0 and at most"
                                                 f" {MAX_OUTPUT_CAP}, got {cap!r}")
        hooks[name] = MaskingHook(name, tuple(argv), float(timeout), cap)
    default = value.get("default")
    if default is None and len(hooks) == 1:
        default = next(iter(hooks))
    if default is not None and default not in hooks:
        raise where.error("default", f"names {default!r}, which is not one of masking.hooks"
                                     f" ({', '.join(sorted(hooks)) or 'none'})")
    return Masking(hooks, default)


async def mask_clone(driver: Any, clone: str, snapshot: str, hook: MaskingHook,
                     progress: BytesProgress | None = None) -> dict[str, Any]:
    """Run `hook` in `clone`, then snapshot it as clone@snapshot and record it masked (see the module
    docstring); ``progress`` hears the bytes that snapshot reads. Returns how the hook ended; raises
    StorageError (code hook_failed) if it failed."""
    info = next((v for v in await _thread(driver.list_volumes) if v.name == clone), None)
    if info is None:
        raise StorageError(f"no clone named {clone!r}; make one with storage.clone.create", code="not_found")
    if info.kind != "clone":
        raise StorageError(f"{clone!r} is a {info.kind}, not a clone; masking rewrites data in place, so it "
                           f"runs on a clone only, never on a source volume", code="invalid")
    if snapshot in info.snapshots:
        raise StorageError(f"clone {clone!r} already has a snapshot {snapshot!r}; name a new one",
                           code="exists")
    result = await run_hook(hook.argv, await _thread(driver.path, clone), timeout=hook.timeout,
                            output_cap=hook.output_cap)
    ran = {"hook": hook.name, "argv": list(result.argv), "exit_code": result.exit_code,
           "timed_out": result.timed_out, "deadline": hook.timeout, "duration": round(result.duration, 3),
           "output": result.output, "output_cap": hook.output_cap, "output_truncated": result.truncated}
    if not result.ok:
        masked = [s for s in info.snapshots if await _thread(driver.masking_of, clone, s) is not None]
        if masked:
            await _thread(driver.rollback, clone, masked[-1])
            after = f"the clone was rolled back to its last masked snapshot {clone}@{masked[-1]}"
        else:
            after = (f"the clone {clone!r} still holds what the hook left (unmasked data); destroy it with "
                     f"storage.clone.destroy or mask it again")
        raise StorageError(f"masking {clone} with hook {hook.name} failed, no masked snapshot was taken and "
                           f"{after}: {result.describe()}", code="hook_failed")
    await asyncio.to_thread(lambda: driver.snapshot(clone, snapshot, progress=progress))
    await _thread(driver.mark_masked, clone, snapshot, hook.name)
    return {"clone": clone, "snapshot": snapshot, "masked": f"{clone}@{snapshot}",
            "masked_from": "@".join(info.origin) if info.origin else None, **ran}


async def _thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)
