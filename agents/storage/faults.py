"""How a driver's StorageError becomes the OpError an op ends in: one table from the driver's codes to
application conditions on the wire, so a caller sees `has-dependants: cannot destroy ...` rather than a
generic failure, and bad input is reported as a bad argument."""

from __future__ import annotations

from agents.errors import BadArguments, OpError
from agents.storage.driver import StorageError


class StorageOpError(OpError):
    """An op on the store failed; `condition` says how (not-found, exists, has-dependants, ...)."""


def _kind(condition: str, stanza_condition: str, stanza_type: str = "cancel") -> type[StorageOpError]:
    name = "".join(part.capitalize() for part in condition.split("-"))
    return type(name, (StorageOpError,), {"condition": condition, "stanza_condition": stanza_condition,
                                          "stanza_type": stanza_type, "__module__": __name__})


# Stanza conditions that mean "the addressee is gone" (item-not-found, service-unavailable, ...) are
# avoided on purpose: a reader that drops the application condition must not report a live agent unreachable.
NotFound = _kind("not-found", "undefined-condition")
Exists = _kind("exists", "conflict")
HasDependants = _kind("has-dependants", "conflict")
Busy = _kind("busy", "resource-constraint", "wait")
Corrupt = _kind("corrupt", "undefined-condition")
Unsupported = _kind("unsupported", "feature-not-implemented")
Environment = _kind("environment", "internal-server-error")
StorageFailed = _kind("storage-failed", "undefined-condition")
HookFailed = _kind("hook-failed", "undefined-condition")
QuotaExceeded = _kind("quota-exceeded", "not-allowed")  # an owner's clone count or bytes would go over
NotMasked = _kind("not-masked", "not-allowed")   # a masked-only clone asked of a snapshot no mask produced
NoSpace = _kind("no-space", "resource-constraint", "wait")   # the filesystem is full; nothing was published

_BY_CODE: dict[str, type[OpError]] = {
    "invalid": BadArguments, "not_found": NotFound, "exists": Exists, "has_dependants": HasDependants,
    "busy": Busy, "corrupt": Corrupt, "unsupported": Unsupported, "environment": Environment,
    "failed": StorageFailed, "hook_failed": HookFailed, "not_masked": NotMasked,
    "quota": QuotaExceeded, "no_space": NoSpace,
}


def op_error(exc: StorageError) -> OpError:
    """The OpError for a driver error; dependants travel in the details for the audit trail."""
    cls = _BY_CODE.get(exc.code, StorageFailed)
    return cls(str(exc), dependants=list(exc.dependants)) if exc.dependants else cls(str(exc))
