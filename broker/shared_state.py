"""Where the broker's instances keep what they share, chosen once at start from the mesh file.

By default SQLite files in the broker's shared state directory (instances on one machine); with
``state: etcd://...`` under the mesh file's ``broker``, an etcd cluster (instances on several
machines, broker/state_etcd.py). Each function gives the component the same interface either way;
the etcd client is imported only when the mesh names etcd.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from agents.actor import Backoff

from .constraints import RateLimits
from .directory import KnownAgents, KnownAgentsState
from .workflow_store import WorkflowState, WorkflowStore

if TYPE_CHECKING:
    from .fencing import FenceLedgerState
    from .leadership import LeaseStore

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_CAP = 30.0  # longest wait between two asks while the shared state cannot answer

# The SQLite files in the shared state directory.
LEASE_FILE, RATES_FILE, WORKFLOWS_FILE = "leader.sqlite", "rates.sqlite", "workflows.sqlite"
KNOWN_FILE, FENCING_FILE = "broker.sqlite", "fencing.sqlite"


async def until_answered(broker: Any, ask: Callable[[], Awaitable[T]], errors: tuple[type[BaseException], ...],
                         what: str) -> T | None:
    """What ``ask()`` returns, asked again with backoff (0.5 s, doubling to RETRY_CAP) while the shared
    state cannot answer (etcd down or cut off, a shared file out of reach: ``errors``), with a warning
    saying ``what`` waits each time; None once the broker's connection is gone (its next session asks
    again). For work a broker does on its own, where nobody waits to be told it failed: the greeting
    of the agents it knows, the fenced nodes pushed to an agent that joins."""
    backoff = Backoff(base=0.5, cap=RETRY_CAP)
    while broker.online_or_starting:
        try:
            return await ask()
        except errors as exc:
            wait = backoff.next()
            log.warning("the broker's shared state cannot answer (%s): %s waits; asking again in %.1f s",
                        exc, what, wait)
        await asyncio.sleep(wait)
    return None


def _etcd() -> Any:
    """broker/state_etcd.py, imported only now: the etcd client is an optional extra."""
    try:
        from . import state_etcd
    except ImportError as exc:
        raise ValueError(f"the mesh file keeps the broker's state on etcd, but the etcd client cannot be loaded"
                         f" ({exc}): install it with `make install`, or pip install 'vertebra[etcd]'") from None
    return state_etcd


def lease(broker: Any, holder: str, term: float) -> LeaseStore:
    """The workflow lead's lease, held as ``holder`` for ``term`` seconds at a time."""
    if broker.state_config is not None:
        return _etcd().EtcdLease(broker.state_config, holder, term)
    from .leadership import Lease

    shared: Path | None = broker.shared_dir
    return Lease(shared / LEASE_FILE if shared else None, holder, term)


def rate_limits(broker: Any) -> Any:
    """The workflow steps' rate limits (``take``, ``aclose``)."""
    if broker.state_config is not None:
        return _etcd().EtcdRateLimits(broker.state_config)
    shared: Path | None = broker.shared_dir
    return RateLimits(shared / RATES_FILE if shared else ":memory:")


def workflow_store(broker: Any) -> WorkflowState:
    """The workflow instances, their steps and their history."""
    if broker.state_config is not None:
        # Every write is conditional on the lead this instance holds (once the leadership exists).
        def lead() -> tuple[bytes, int] | None:
            leadership = getattr(broker, "leadership", None)
            if leadership is None or leadership.term is None:
                return None
            fencing = getattr(leadership.lease, "fencing", None)
            return fencing() if fencing is not None else None

        return _etcd().EtcdWorkflowStore(broker.state_config, lead)
    shared: Path | None = broker.shared_dir
    return WorkflowStore(shared / WORKFLOWS_FILE if shared else None)


def known_agents(broker: Any) -> KnownAgentsState:
    """The agents any instance of the broker has listed (greeted again after a restart)."""
    if broker.state_config is not None:
        return _etcd().EtcdKnownAgents(broker.state_config)
    shared: Path | None = broker.shared_dir
    return KnownAgents(shared / KNOWN_FILE if shared else None)


def fence_ledger(broker: Any) -> FenceLedgerState:
    """The fencing events and each node's fencing epochs."""
    if broker.state_config is not None:
        return _etcd().EtcdFenceLedger(broker.state_config)
    from .fencing import FenceLedger

    shared: Path | None = broker.shared_dir
    return FenceLedger(shared / FENCING_FILE if shared else ":memory:")
