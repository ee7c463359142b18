"""The broker's shared state on etcd, for broker instances on several machines.

SQLite in a shared directory serves instances on one machine; across machines the instances share
an etcd cluster instead (the mesh file's ``broker: {state: etcd://host:port,...}``; which store each
part uses is chosen in broker/shared_state.py). This module holds:

- the connection (``EtcdClient``): one member at a time, the next when a call fails, TLS and
  credentials as the mesh file gives them;
- the workflow lead as an etcd election (``EtcdLease``): each instance keeps a key under the election
  prefix, attached to an etcd lease it renews, and the key created first leads. The leader's key's
  create revision is its *term*: it only grows from one leader to the next, so the leader stamps it
  on every workflow step as a fencing token (docs/protocol.md, section 6), agents refuse a step from
  an older term, and etcd refuses the leader's workflow writes once its key is gone;
- the same interfaces as the SQLite stores, each change a transaction that compares the revisions it
  read (compare-and-swap), never read-then-write: the workflows (``EtcdWorkflowStore``), their rate
  limits (``EtcdRateLimits``), the fence ledger (``EtcdFenceLedger``) and the known agents
  (``EtcdKnownAgents``). Each decides with the same functions as its SQLite twin.

Imported only when the mesh file names etcd: the aetcd client and gRPC stay out of every other
program's start-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any, Callable

import aetcd
import grpc
from aetcd import rpc, watcher

from agents.config import StateConfig
from agents.errors import OpError
from agents.fenced import Fenced

from .constraints import PERFORMED, REQUESTED, Event, Verdict, rate_verdict
from .fencing import epoch_change
from .leadership import Deposed
from .workflow_store import FINISHED, STEP_FIELDS

log = logging.getLogger(__name__)

CALL_TIMEOUT = 2.0  # seconds one etcd call may take; a member without quorum must not hold up the lead
SWAP_ATTEMPTS = 50  # compare-and-swap rounds before a change that keeps losing races gives up


class EtcdClient(aetcd.Client):
    """aetcd's client on one member of the cluster at a time, moving to the next member when a call
    to the current one fails or times out (a member that died, or one cut off from the others that
    cannot answer), with TLS and user credentials when the mesh file gives them.

    A call that only reads, or that is safe to repeat (a lease's grant, renewal or revocation), is
    tried once on each member before it fails; a transaction whose answer did not come may have been
    applied, so it is not repeated: its caller reads again, as after losing a compare-and-swap.

    etcd's auth tokens do not last (a simple token lapses after five minutes unused, a member forgets
    a user's tokens when its password changes and all of them when it restarts), and aetcd logs in only
    as it connects. A call refused for its token logs in again, reading the password file anew, and is
    sent once more: etcd refuses such a call before applying anything, transactions included."""

    # What a cluster that cannot be reached, or a broken call, raises.
    errors: tuple[type[BaseException], ...] = (aetcd.exceptions.ClientError, grpc.RpcError, OSError)

    def __init__(self, config: StateConfig) -> None:
        password = config.password_file.read_text().strip() if config.password_file else None
        super().__init__(username=config.user, password=password, timeout=CALL_TIMEOUT)
        self.config = config
        self._member = 0  # index in config.endpoints of the member in use

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        options: list[tuple[str, Any]] = [("grpc.enable_http_proxy", 0), ("grpc.initial_reconnect_backoff_ms", 200),
                                          ("grpc.max_reconnect_backoff_ms", 2000)]
        cfg = self.config
        if cfg.ca is None:
            return grpc.aio.insecure_channel(endpoint, options=options)
        creds = grpc.ssl_channel_credentials(
            root_certificates=cfg.ca.read_bytes(),
            private_key=cfg.key.read_bytes() if cfg.key else None,
            certificate_chain=cfg.cert.read_bytes() if cfg.cert else None)
        return grpc.aio.secure_channel(endpoint, creds, options=options)

    async def connect(self) -> None:
        """Open a channel to the member in use (aetcd's own opens one to a fixed member, without TLS)."""
        if self._connected.is_set():
            return
        self.channel = self._channel(self.config.endpoints[self._member])
        if self._username is not None:  # a token of the member that issued it
            auth = rpc.AuthStub(self.channel)
            reply = await auth.Authenticate(rpc.AuthenticateRequest(name=self._username, password=self._password),
                                            timeout=self._timeout)
            self.metadata = (("token", reply.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
        self._connected.set()

    async def _next_member(self, failed: Exception) -> None:
        log.warning("etcd member %s failed (%s); moving to the next", self.config.endpoints[self._member], failed)
        await self.close()
        self._member = (self._member + 1) % len(self.config.endpoints)

    async def _logged_in(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``call``, and once more after logging in again if the member no longer knows the token."""
        metadata = self.metadata
        try:
            return await _on_channel(call, *args, **kwargs)
        except aetcd.exceptions.UnauthenticatedError as exc:
            if self._username is None:
                raise
            if self.metadata is metadata:  # not logged in again meanwhile by a call that failed alike
                log.info("etcd member %s no longer knows this broker's token (%s); logging in again",
                         self.config.endpoints[self._member], exc)
                await self._log_in()
            return await _on_channel(call, *args, **kwargs)

    async def _log_in(self) -> None:
        """A new token for calls on the current channel, and a watcher that sends it."""
        if self.config.password_file is not None:  # a password changed since the start is the one to use
            self._password = self.config.password_file.read_text().strip()
        reply = await rpc.AuthStub(self.channel).Authenticate(  # a wrong password: a grpc.RpcError, in errors
            rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
        self.metadata = (("token", reply.token),)
        # The watcher's stream carries the token it was made with: a new one for the watches to come.
        old, self._watcher = self._watcher, watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                                            metadata=self.metadata)
        if old is not None:
            await old.shutdown()

    async def _on_each_member(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        for left in range(len(self.config.endpoints) - 1, -1, -1):
            try:
                return await self._logged_in(call, *args, **kwargs)
            except ChannelClosed:
                if not left:  # the call that closed it has moved on to the next member already
                    raise
            except UNREACHABLE as exc:
                await self._next_member(exc)
                if not left:
                    raise
        raise AssertionError("unreachable")

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        return await self._on_each_member(super().get, *args, **kwargs)

    async def get_prefix(self, *args: Any, **kwargs: Any) -> Any:
        return await self._on_each_member(super().get_prefix, *args, **kwargs)

    async def lease(self, *args: Any, **kwargs: Any) -> Any:
        return await self._on_each_member(super().lease, *args, **kwargs)

    async def refresh_lease(self, *args: Any, **kwargs: Any) -> Any:
        return await self._on_each_member(super().refresh_lease, *args, **kwargs)

    async def revoke_lease(self, *args: Any, **kwargs: Any) -> Any:
        return await self._on_each_member(super().revoke_lease, *args, **kwargs)

    async def put(self, *args: Any, **kwargs: Any) -> Any:  # only ever of a value that may be written twice
        return await self._on_each_member(super().put, *args, **kwargs)

    async def transaction(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self._logged_in(super().transaction, *args, **kwargs)
        except ChannelClosed:
            raise  # may have been applied; the call that closed the channel has moved on already
        except UNREACHABLE as exc:
            await self._next_member(exc)  # the next call goes elsewhere; this one may have been applied
            raise


# What a member that is down, or cut off from the others, answers (or fails to).
UNREACHABLE = (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError)


class ChannelClosed(aetcd.exceptions.ConnectionFailedError):
    """A call whose channel another call on the same client closed, moving to the next member."""


# etcd's own timeout of a request it could not get through its cluster in time (a member catching up after
# a partition heals, an election): Go's context error, which reaches the client without a grpc status code.
_SERVER_TIMEOUT = "context deadline exceeded"


async def _on_channel(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call``, failing as unreachable where the member could not answer it:

    - where etcd timed the request out itself, as a ConnectionTimeoutError (it may have been applied, like
      a call whose answer did not come), not as an unclassified ClientError that callers do not retry;
    - where grpc cancelled it because its channel was closed, as ChannelClosed: grpc cancels every call in
      flight on a channel it closes, so when one call finds the member down and moves on, the others on
      the client (the fence ledger's poll beside a push, say) would end with a CancelledError nobody asked
      for, and whatever awaited them would stop as if cancelled."""
    try:
        return await call(*args, **kwargs)
    except aetcd.exceptions.ClientError as exc:
        if type(exc) is aetcd.exceptions.ClientError and _SERVER_TIMEOUT in str(exc):
            raise aetcd.exceptions.ConnectionTimeoutError(str(exc)) from exc
        raise
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # a real cancellation of this task
        raise ChannelClosed("the call's channel to the etcd member was closed under it (another call moved"
                            " to the next member)") from None


async def _on_a_live_member(client: EtcdClient, compare: list[Any], success: list[Any]) -> tuple[bool, list[Any]]:
    """A transaction that is safe to send again (its puts are of the same keys and values, and its
    compares fail once it has been applied), tried on each member until one answers: whether it was
    applied, and the responses."""
    for left in range(len(client.config.endpoints) - 1, -1, -1):
        try:
            succeeded, responses = await client.transaction(compare=compare, success=success, failure=[])
            return bool(succeeded), responses
        except UNREACHABLE:
            if not left:
                raise
    raise AssertionError("unreachable")


def _read_back_revision(responses: list[Any]) -> int:
    """The mod revision of the key a transaction's last operation read back (a get after its puts): the
    revision those puts were written at."""
    _value, kv = responses[-1][0]
    return int(kv.mod_revision)


class EtcdLease:
    """The workflow lead as an etcd election among the broker's instances (the same methods as the
    SQLite lease in broker/leadership.py)."""

    errors = EtcdClient.errors

    def __init__(self, config: StateConfig, holder: str, term: float) -> None:
        self.holder, self.ttl = holder, max(2, round(term))
        self.client = EtcdClient(config)
        self.prefix = f"{config.prefix.rstrip('/')}/workflow-leader/".encode()
        self._lease_id: int | None = None
        self._key = b""
        self._term: int | None = None
        self._revision = 0  # etcd's revision when the election was last read
        self.valid_until = 0.0  # time.monotonic() after which the lead may have passed to another

    async def _join(self) -> None:
        """Put this instance's key under the prefix, attached to its lease (unless it is there)."""
        tx = self.client.transactions
        await self.client.transaction(compare=[tx.create(self._key) == 0],
                                      success=[tx.put(self._key, self.holder.encode(), self._lease_id)], failure=[])

    async def _renew(self) -> bool:
        """Keep the lease alive; False when etcd has already let it expire."""
        assert self._lease_id is not None
        reply = await self.client.refresh_lease(self._lease_id)
        return reply is not None and reply.TTL > 0

    async def _candidates(self) -> list[Any]:
        """Every instance's election key, the first created (the leader's) first."""
        found = await self.client.get_prefix(self.prefix, sort_order="ascend", sort_target="create")
        self._revision = found.header.revision
        return list(found)

    async def wait_for_change(self, timeout: float) -> None:
        """Return when an instance joins or leaves the election since it was last read (a leader that
        gives up its lead is followed at once, not at the next renewal), or after ``timeout``."""
        watch = self.client.watch_prefix_once(self.prefix, timeout=timeout,
                                              start_revision=self._revision + 1 if self._revision else None)
        try:  # bounded even where setting the watch up hangs (a member cut off from the others)
            await asyncio.wait_for(watch, timeout + CALL_TIMEOUT)
        except (aetcd.exceptions.WatchTimeoutError, TimeoutError):
            pass
        except self.errors as exc:  # no watch (a member moving, a compacted revision): the renewal comes anyway
            log.debug("watching the election: %s", exc)
            await asyncio.sleep(timeout)

    async def take(self, gone: str = "") -> int | None:
        """Renew this instance's place in the election (joining it when it has none) and return its
        term while it leads, else None. ``gone``: an instance the XMPP server says has left, whose
        key is removed rather than waiting for its lease to run out."""
        sent = time.monotonic()
        if self._lease_id is None or not await self._renew():
            self._lease_id = (await self.client.lease(self.ttl)).id
            self._key = self.prefix + b"%016x" % self._lease_id
        candidates = await self._candidates()
        if not any(c.key == self._key for c in candidates):  # new, or removed as gone: join (again)
            await self._join()
            candidates = await self._candidates()
        if gone and candidates and candidates[0].value.decode() == gone and candidates[0].key != self._key:
            tx = self.client.transactions
            first = candidates[0]
            # Only that very key: if it was renewed into a new one meanwhile, the holder is back.
            await self.client.transaction(compare=[tx.mod(first.key) == first.mod_revision],
                                          success=[tx.delete(first.key)], failure=[])
            candidates = await self._candidates()
        if not candidates or candidates[0].key != self._key:
            self._term = None
            return None
        self.valid_until = sent + self.ttl  # etcd counts the lease from no earlier than this request
        self._term = int(candidates[0].create_revision)
        return self._term

    def fencing(self) -> tuple[bytes, int] | None:
        """This instance's election key and the term it last led with (the guard of its writes,
        EtcdWorkflowStore: etcd refuses them once that key is gone), else None."""
        return (self._key, self._term) if self._term is not None else None

    async def leader(self) -> tuple[str, int] | None:
        """The leading instance and its term, if any instance is in the election."""
        candidates = await self._candidates()
        return (candidates[0].value.decode(), int(candidates[0].create_revision)) if candidates else None

    async def holders(self) -> list[str]:
        """Every instance in the election, the leader first and the others in the order they follow."""
        return [kv.value.decode() for kv in await self._candidates()]

    async def current(self) -> str | None:
        found = await self.leader()
        return found[0] if found else None

    async def release(self) -> None:
        """Leave the election at once (the lease's key goes with it)."""
        lease_id, self._lease_id, self.valid_until, self._term = self._lease_id, None, 0.0, None
        if lease_id is not None:
            try:
                await self.client.revoke_lease(lease_id)
            except aetcd.exceptions.ClientError as exc:  # it expires on its own within its TTL
                log.warning("could not give up the workflow lead in etcd at once: %s", exc)

    async def aclose(self) -> None:
        await self.release()
        await self.client.close()


class EtcdRateLimits:
    """The workflow rate limits (``RateLimits`` in broker/constraints.py) on etcd: one key per limited
    key, holding the uses inside the window, changed by compare-and-swap on the key's revision, so two
    instances taking the last slot at once cannot both have it (the loser reads again and is refused).
    Windows are measured with the instances' wall clocks, as in SQLite."""

    def __init__(self, config: StateConfig, clock: Callable[[], float] = time.time) -> None:
        self.client, self.clock = EtcdClient(config), clock
        self.prefix = f"{config.prefix.rstrip('/')}/rate-limits/"

    async def take(self, key: str, limit: int, period: float, who: str) -> Verdict:
        """Count one use of ``key`` if fewer than ``limit`` were counted in the last ``period`` seconds."""
        name = (self.prefix + key).encode()
        tx = self.client.transactions
        for _ in range(SWAP_ATTEMPTS):
            now = self.clock()
            found = await self.client.get(name)
            uses = [u for u in json.loads(found.value) if u[0] > now - period] if found else []
            verdict = rate_verdict(key, len(uses), limit, period)
            if not verdict.ok:
                return verdict
            unchanged = tx.mod(name) == found.mod_revision if found else tx.create(name) == 0
            try:
                swapped, _ = await self.client.transaction(
                    compare=[unchanged], success=[tx.put(name, json.dumps(uses + [[now, who]]).encode())], failure=[])
            except UNREACHABLE:  # no answer: it may have been applied; the next member says
                again = await self.client.get(name)
                if again is not None and [now, who] in json.loads(again.value):
                    return verdict
                continue
            if swapped:
                return verdict
        raise OpError(f"the rate limit {key} changed under {SWAP_ATTEMPTS} attempts in a row to count a use;"
                      " try again in a moment")

    async def aclose(self) -> None:
        await self.client.close()


class LeadLost(OpError, Deposed):
    """A write of the workflow state refused by etcd because the instance making it no longer leads:
    its election key is gone (its lease ran out while it stalled, or it was cut off). The engine stops
    as when it notices the loss itself (``Deposed``); an op answers with this sentence."""


class EtcdWorkflowStore:
    """The workflow state (``WorkflowState`` in broker/workflow_store.py) on etcd. Each instance, each
    step and each history event is one key holding JSON; what the SQLite store writes in one
    transaction (a new instance with its steps and events; a step's start with its ``performed``
    event) is one etcd transaction, and a change to an instance or a step is a compare-and-swap on
    its revision, so two writers never lose each other's change.

    ``lead`` gives the writer's election key and term while it leads (broker/leadership.py): every
    write is then also conditional on that key still being the one created at that term, so a leader
    deposed without noticing (stalled past its lease) cannot change the state its successor runs.

    A record this instance wrote last is changed again without reading it first: the value and
    revision its write left are kept (``_written``), and the compare-and-swap proves them current or
    sends the change back to read. A step's run changes its record three times, and reads were most of
    an etcd step's time (bench/README.md has the figures)."""

    MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
    WRITTEN_KEPT = 4096  # records whose last write is remembered (a few per step of a running instance)

    def __init__(self, config: StateConfig,
                 lead: Callable[[], tuple[bytes, int] | None] = lambda: None) -> None:
        self.client, self.lead = EtcdClient(config), lead
        self.prefix = f"{config.prefix.rstrip('/')}/workflows/"
        self._written: dict[bytes, tuple[int, bytes]] = {}  # key -> (mod revision, value) of this instance's write

    def _key(self, *parts: str) -> bytes:
        return (self.prefix + "/".join(parts)).encode()

    def _event(self, iid: str, n: int, kind: str, step: str, actor: str, at: float) -> Any:
        # Events of one transaction share a revision: the key's counter orders them within it.
        key = self._key("e", iid, f"{n:05d}-{uuid.uuid4().hex}")
        return self.client.transactions.put(key, json.dumps([kind, step, actor, at]).encode())

    async def _txn(self, compare: list[Any], success: list[Any]) -> list[Any] | None:
        """One transaction, guarded by the writer's lead when it has one: the responses to ``success``,
        None when ``compare`` failed, LeadLost when the lead did."""
        tx, lead = self.client.transactions, self.lead()
        guard = [tx.create(lead[0]) == lead[1]] if lead else []
        succeeded, responses = await _on_a_live_member(self.client, [*compare, *guard], success)
        if not succeeded and lead:
            held = await self.client.get(lead[0])
            if held is None or held.create_revision != lead[1]:
                raise LeadLost(f"this broker instance's lead (term {lead[1]}) has ended, so it may no longer change"
                               " the workflows; the instance that leads now carries on. Try again")
        return responses if succeeded else None

    async def _update(self, key: bytes, change: Callable[[dict[str, Any]], None],
                      extra: Iterable[Any] = ()) -> dict[str, Any]:
        """Change the JSON at ``key`` and write it back if nobody wrote it meanwhile (else read it and
        change it again); the record as written. Where this instance wrote it last, its own write is
        the starting point."""
        tx = self.client.transactions
        known = self._written.pop(key, None)    # taken out: a write that fails leaves nothing to trust
        for _ in range(SWAP_ATTEMPTS):
            if known is None:
                found = await self.client.get(key)
                if found is None:
                    raise KeyError(f"no workflow record {key.decode()}")
                known = (found.mod_revision, found.value)
            row = json.loads(known[1])
            change(row)
            value = json.dumps(row).encode()
            # The record read back in the same transaction: its new revision, for the next change.
            done = await self._txn([tx.mod(key) == known[0]], [tx.put(key, value), *extra, tx.get(key)])
            if done is not None:
                self._remember(key, _read_back_revision(done), value)
                return row
            known = None
        raise OpError(f"the workflow record {key.decode()} kept changing under {SWAP_ATTEMPTS} attempts to write it;"
                      " try again in a moment")

    def _remember(self, key: bytes, revision: int, value: bytes) -> None:
        if len(self._written) >= self.WRITTEN_KEPT:
            del self._written[next(iter(self._written))]    # the longest unchanged
        self._written[key] = (revision, value)

    async def aclose(self) -> None:
        await self.client.close()

    # -- instances -----------------------------------------------------------------------------

    async def create(self, iid: str, workflow: str, requester: str, params: dict[str, Any], plan: list,
                     steps: Iterable[str]) -> None:
        """A new instance, every step pending and requested by the requester, in one transaction."""
        steps, now, tx = list(steps), time.time(), self.client.transactions
        if 2 + 2 * len(steps) > self.MAX_TXN_OPS:
            raise OpError(f"a workflow of {len(steps)} steps is more than one etcd transaction holds (at most"
                          f" {(self.MAX_TXN_OPS - 2) // 2} steps); split it into smaller workflows")
        instance = {"id": iid, "workflow": workflow, "requester": requester, "params": params, "plan": plan,
                    "state": "running", "error": "", "created": now, "updated": now}
        records = {self._key("i", iid): json.dumps(instance).encode()}
        events = []
        for n, step in enumerate(steps):
            row = {"instance": iid, "step": step, "state": "pending", "performer": "", "target": "",
                   "rate_taken": 0, "attempts": 0, "outcome": "", "result": None, "reason": "", "started": None,
                   "ended": None}
            records[self._key("s", iid, step)] = json.dumps(row).encode()
            events.append(self._event(iid, n, REQUESTED, step, requester, now))
        # The instance read back in the same transaction: the revision every record of it was written at.
        done = await self._txn([tx.create(self._key("i", iid)) == 0],
                               [*(tx.put(k, v) for k, v in records.items()), *events, tx.get(self._key("i", iid))])
        if done is not None:
            revision = _read_back_revision(done)
            for key, value in records.items():
                self._remember(key, revision, value)
        elif await self.instance(iid) != json.loads(json.dumps(instance)):  # not this very create, retried
            raise OpError(f"a workflow instance {iid} exists already")

    async def instance(self, iid: str) -> dict[str, Any] | None:
        found = await self.client.get(self._key("i", iid))
        return json.loads(found.value) if found else None

    async def _all(self) -> list[dict[str, Any]]:
        return [json.loads(kv.value) for kv in await self.client.get_prefix(self._key("i", ""))]

    async def instances(self, state: str = "", limit: int = 50) -> list[dict[str, Any]]:
        rows = sorted((r for r in await self._all() if not state or r["state"] == state),
                      key=lambda r: r["created"], reverse=True)[:limit]
        keep = ("id", "workflow", "requester", "state", "error", "created", "updated")
        return [{k: r[k] for k in keep} for r in rows]

    async def unfinished(self) -> list[str]:
        rows = sorted((r for r in await self._all() if r["state"] not in FINISHED), key=lambda r: r["created"])
        return [r["id"] for r in rows]

    async def set_instance(self, iid: str, state: str, error: str = "") -> None:
        await self._update(self._key("i", iid), lambda r: r.update(state=state, error=error, updated=time.time()))

    # -- steps and history ---------------------------------------------------------------------

    async def step(self, iid: str, step: str) -> dict[str, Any]:
        found = await self.client.get(self._key("s", iid, step))
        if found is None:
            raise KeyError(f"workflow instance {iid} has no step {step}")
        return dict(json.loads(found.value))

    async def steps(self, iid: str) -> dict[str, dict[str, Any]]:
        rows = [json.loads(kv.value) for kv in await self.client.get_prefix(self._key("s", iid, ""))]
        return {r["step"]: r for r in rows}

    async def set_step(self, iid: str, step: str, **fields: Any) -> None:
        unknown = set(fields) - STEP_FIELDS
        if unknown:
            raise ValueError(f"a step has no field {', '.join(sorted(unknown))}")
        if "result" in fields:  # as the SQLite store keeps it: what JSON makes of it
            fields["result"] = json.loads(json.dumps(fields["result"], default=str))
        await self._update(self._key("s", iid, step), lambda r: r.update(fields))

    async def start_step(self, iid: str, step: str, performer: str, target: str) -> dict[str, Any]:
        """The point of no return: the performed event and the running state, in one transaction; the
        step's record as written."""
        now = time.time()
        return await self._update(self._key("s", iid, step),
                                  lambda r: r.update(state="running", performer=performer, target=target,
                                                     started=now, reason=""),
                                  extra=[self._event(iid, 0, PERFORMED, step, performer, now)])

    async def add_event(self, iid: str, kind: str, step: str, actor: str) -> None:
        await self._txn([], [self._event(iid, 0, kind, step, actor, time.time())])

    async def history(self, iid: str) -> list[Event]:
        found = list(await self.client.get_prefix(self._key("e", iid, "")))
        found.sort(key=lambda kv: (kv.create_revision, kv.key))
        return [Event(*json.loads(kv.value)) for kv in found]


class EtcdKnownAgents:
    """The agents any instance has listed (``KnownAgentsState`` in broker/directory.py) on etcd: one
    key per bare JID, written in the background (``add`` is called for every available presence)."""

    errors = EtcdClient.errors

    def __init__(self, config: StateConfig) -> None:
        self.client = EtcdClient(config)
        self.prefix = f"{config.prefix.rstrip('/')}/known-agents/"
        self._written: set[str] = set()
        self._writing: set[asyncio.Task[None]] = set()

    def add(self, jid: str) -> None:
        if jid not in self._written:
            self._written.add(jid)
            task = asyncio.get_running_loop().create_task(self._put(jid))
            self._writing.add(task)
            task.add_done_callback(self._writing.discard)

    async def _put(self, jid: str) -> None:
        try:
            await self.client.put((self.prefix + jid).encode(), b"")
        except EtcdClient.errors as exc:
            self._written.discard(jid)  # written at its next presence
            log.warning("could not remember the known agent %s in etcd: %s", jid, exc)

    async def all(self) -> list[str]:
        """Read afresh: the broker's other instances add to the same keys."""
        found = await self.client.get_prefix(self.prefix.encode(), keys_only=True)
        self._written = {kv.key.decode()[len(self.prefix):] for kv in found}
        return sorted(self._written)

    async def aclose(self) -> None:
        if self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)
        await self.client.close()


class EtcdFenceLedger:
    """The fencing events and epochs (``FenceLedgerState`` in broker/fencing.py) on etcd, deciding what
    an event does with the same ``epoch_change`` as the SQLite ledger.

    Keys under ``<prefix>/fencing/``: ``seq`` (the last event's number), ``events/<seq>``, ``ids/<agent>/
    <event id>`` (each event once however often it is resent) and ``epochs/<cluster>/<node>`` (a node's
    epochs, oldest first). An event is recorded in one transaction that compares the revisions of
    ``seq`` and of the node's epochs it read: two instances recording at once never reuse a number nor
    lose an epoch; the loser reads again. The fenced-identity rule asks ``written_elsewhere`` and
    ``fenced_now`` without waiting: a task of the ledger reads the open epochs again each second when
    etcd's revision of them has moved (another instance recorded), and at once after a recording here."""

    POLL = 1.0  # seconds between looks for epochs another instance recorded
    errors = EtcdClient.errors

    def __init__(self, config: StateConfig) -> None:
        self.client = EtcdClient(config)
        self.prefix = f"{config.prefix.rstrip('/')}/fencing/"
        self._fenced: list[Fenced] = []
        self._changed = True  # the first decision installs what the ledger holds (once read)
        self._seen_revision = -1
        self._watcher: asyncio.Task[None] | None = None
        self._id = ""           # the ledger's id (fenced_state)

    def _key(self, *parts: str) -> bytes:
        return (self.prefix + "/".join(parts)).encode()

    # -- what the synchronous rule reads --------------------------------------------------------------

    def written_elsewhere(self) -> bool:
        self._watch()
        changed, self._changed = self._changed, False
        return changed

    def fenced_now(self) -> list[Fenced]:
        self._watch()
        return list(self._fenced)

    def _watch(self) -> None:
        if self._watcher is None or self._watcher.done():
            try:
                self._watcher = asyncio.get_running_loop().create_task(self._follow(), name="fence ledger on etcd")
            except RuntimeError:  # no event loop yet: the first decision inside one starts it
                pass

    async def _follow(self) -> None:
        while True:
            try:
                await self._reread()
            except EtcdClient.errors as exc:
                log.warning("could not read the fencing epochs from etcd: %s", exc)
            await asyncio.sleep(self.POLL)

    async def _reread(self) -> None:
        nodes = list(await self.client.get_prefix(self._key("epochs", "")))
        revision = max((kv.mod_revision for kv in nodes), default=0)
        if revision != self._seen_revision:
            self._seen_revision = revision
            self._fenced, self._changed = _open_epochs(nodes), True

    # -- recording ----------------------------------------------------------------------------------

    async def record(self, agent: str, event: dict[str, Any]) -> tuple[int, str | None, bool]:
        agent, event_id = agent.lower(), event.get("id") or None
        tx = self.client.transactions
        outcome = event["event"] == "outcome" and event["ok"]
        sent: tuple[int, str | None] | None = None  # a transaction whose answer was lost: (seq, change)
        for _ in range(SWAP_ATTEMPTS):
            if event_id is not None:
                known = await self.client.get(self._key("ids", agent, event_id))
                if known is not None:
                    if sent is not None and int(known.value) == sent[0]:
                        return sent[0], sent[1], True  # it was applied: this is its first recording
                    return int(known.value), None, False
            seq_key = self._key("seq")
            counter = await self.client.get(seq_key)
            seq = (int(counter.value) if counter else 0) + 1
            compare = [tx.mod(seq_key) == counter.mod_revision if counter else tx.create(seq_key) == 0]
            puts = [tx.put(seq_key, str(seq).encode()),
                    tx.put(self._key("events", f"{seq:012d}"),
                           json.dumps({"seq": seq, "agent": agent, **event}, sort_keys=True).encode())]
            if event_id is not None:
                compare.append(tx.create(self._key("ids", agent, event_id)) == 0)
                puts.append(tx.put(self._key("ids", agent, event_id), str(seq).encode()))
            change = None
            if outcome:
                node_key = self._key("epochs", event["cluster"], event["node"])
                found = await self.client.get(node_key)
                epochs = json.loads(found.value) if found else []
                last = max((max(e["fenced_at"], e["unfenced_at"] or 0) for e in epochs), default=0.0)
                change = epoch_change(event, last, any(e["unfenced_at"] is None for e in epochs))
                if change is not None:
                    _apply_change(epochs, change, agent, event)
                    compare.append(tx.mod(node_key) == found.mod_revision if found else tx.create(node_key) == 0)
                    puts.append(tx.put(node_key, json.dumps(epochs).encode()))
            try:
                applied = await self._txn(compare, puts)
            except UNREACHABLE:  # no answer: it may have been applied; read again on the next member
                sent = (seq, change)
                continue
            if applied:
                if change is not None:
                    await self._reread()  # the rule sees this instance's own change at its next decision
                return seq, change, True
        raise OpError(f"the fencing ledger kept changing under {SWAP_ATTEMPTS} attempts to record an event from"
                      f" {agent}; it will be sent again")

    async def _txn(self, compare: list[Any], success: list[Any]) -> bool:
        succeeded, _ = await self.client.transaction(compare=compare, success=success, failure=[])
        return bool(succeeded)

    # -- reading ------------------------------------------------------------------------------------

    async def open_epoch(self, cluster: str, node: str) -> Fenced | None:
        found = [f for f in await self.fenced() if f.cluster == cluster and f.node == node]
        return found[0] if found else None

    async def fenced(self) -> list[Fenced]:
        return _open_epochs(list(await self.client.get_prefix(self._key("epochs", ""))))

    async def fenced_state(self) -> tuple[str, int, list[Fenced]]:
        """The open epochs, with the ledger's id (``id``, made by the first instance that asks) and the
        number of its newest event when they were read: the number read again after the epochs, until
        it has not moved (an event and its epoch change are one transaction)."""
        if not self._id:        # asked of etcd once: it never changes while the prefix lives
            key = self._key("id")
            await self._txn([self.client.transactions.create(key) == 0],
                            [self.client.transactions.put(key, uuid.uuid4().hex.encode())])
            found = await self.client.get(key)
            self._id = found.value.decode() if found else ""
        before = await self.client.get(self._key("seq"))
        for _ in range(SWAP_ATTEMPTS):
            fenced = await self.fenced()
            after = await self.client.get(self._key("seq"))
            if (before and before.value) == (after and after.value):
                return self._id, int(after.value) if after else 0, fenced
            before = after
        raise OSError(f"the fencing ledger on etcd changed {SWAP_ATTEMPTS} times while it was read; try again")

    async def epochs(self, cluster: str = "", node: str = "") -> list[dict[str, Any]]:
        rows = [e for kv in await self.client.get_prefix(self._key("epochs", "")) for e in json.loads(kv.value)
                if (not cluster or e["cluster"] == cluster) and (not node or e["node"] == node)]
        return sorted(rows, key=lambda e: (e["cluster"], e["node"], e["epoch"]))

    async def events(self, since: int = 0, limit: int = 50) -> list[dict[str, Any]]:
        found = [json.loads(kv.value) for kv in await self.client.get_prefix(self._key("events", ""))]
        newer = sorted((e for e in found if e["seq"] > since), key=lambda e: e["seq"])
        return newer[-limit:] if limit else []

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.client.close()


def _apply_change(epochs: list[dict[str, Any]], change: str, agent: str, event: dict[str, Any]) -> None:
    """Open and/or end the node's epoch as ``change`` (from ``epoch_change``) says, in ``epochs``."""
    if change in ("fenced", "rebooted"):
        epochs.append({"cluster": event["cluster"], "node": event["node"],
                       "epoch": max((e["epoch"] for e in epochs), default=0) + 1, "fenced_at": event["at"],
                       "fenced_by": agent, "requester": event["requester"],
                       "identities": sorted({j.lower() for j in event.get("identities", ())}),
                       "unfenced_at": None, "unfenced_by": None})
    if change in ("rebooted", "unfenced"):
        for e in epochs:
            if e["unfenced_at"] is None:
                e["unfenced_at"], e["unfenced_by"] = event["at"], agent


def _open_epochs(nodes: list[Any]) -> list[Fenced]:
    open_ = [e for kv in nodes for e in json.loads(kv.value) if e["unfenced_at"] is None]
    return [Fenced(e["cluster"], e["node"], e["epoch"], e["fenced_at"], e["fenced_by"], e["requester"],
                   tuple(e["identities"])) for e in sorted(open_, key=lambda e: (e["cluster"], e["node"]))]
