"""The audit trail: an append-only, keyed, hash-chained SQLite log of every decision and every ending.

Each record's hash covers the previous record's hash and the record's own canonical content
(sequence number, time, kind and fields), so editing, deleting or reordering any record breaks the
chain at that record and :func:`verify` names it. Triggers refuse UPDATE and DELETE, which stops
accidents; a deliberate edit (dropping the triggers) is what the chain catches.

The chain is keyed: each hash is an HMAC-SHA256 under a per-log key kept outside the database, in a
file beside it (``audit.key``, mode 0600, made on first use). Someone who can write the database but
not read the key cannot recompute the hashes after an edit. HMAC rather than Ed25519 signatures:
whoever verifies a log is on the agent's machine with the log (``vertebra audit verify`` reads the
state directory), so a public key buys nothing there, while HMAC costs about a microsecond per record
on every request's path and needs nothing beyond the standard library. What the key does not stop
(someone holding it, or cutting records off the end) the anchors do: each agent sends its head
(sequence, keyed hash) to its broker now and then and on shutdown (broker/anchors.py), and
:func:`verify` given those anchors reports a log that ends before an anchored record (truncation) or
holds another hash there (a rewrite). A log written before keys existed keeps its unkeyed records and
continues keyed; :func:`verify` accepts unkeyed records only before the first keyed one, and warns.

Records of a request: ``decided`` (time, rid, caller, op, canonical resources, a hash of the arguments
with secret parameters redacted, decision, the rule that decided, policy version) and ``ended``
(outcome, duration; for a request another agent served, as a broker instance forwards a workflow op to
the leading one, that agent and the request id its own log has); a request refused before any decision
could be made (a ``for`` from someone who is not a delegate, a payload that does not decode, an unknown
op, bad arguments) has one ``refused`` record (sender, op name as sent, condition, reason). A denied
request has only its ``decided`` record. The ``decided`` record of a destructive op is committed (and
synced) before the op starts; the others are written in small batches (``write_behind``). Every write
runs on the log's own thread (``agents.db.Store``), never on the event loop: whoever must know a record
is on disk before going on awaits :meth:`AuditLog.written`.

Denials are rate-limited per sender (a token bucket: ``denial_burst`` at once, then
``denials_per_minute``) and overall, so a flood of refused requests cannot fill the disk. What
is held back is counted, not lost: the next record written for that sender (or :meth:`flush`) is
preceded by one ``denials-suppressed`` record with the count, the first and last time and the ops
most often tried. Refusals count as denials. Allowed requests are never held back.

The log, its key and its directory are private to the agent's user (files 0600): every decision
names who asked for what (``agents.db.private_file``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .db import Store, open_read_only, private_file, transaction
from .ratelimit import TokenBucket

log = logging.getLogger(__name__)

GENESIS = "0" * 64
# The logs this process has open, so that reading one here includes records still held back.
_OPEN: weakref.WeakValueDictionary[Path, AuditLog] = weakref.WeakValueDictionary()
REDACTED = "[secret]"
MAX_SENT_TEXT = 200  # characters of a sender's own text (an op name, a 'for', a reason) a record keeps

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq    INTEGER PRIMARY KEY,
    at     REAL NOT NULL,
    kind   TEXT NOT NULL,
    caller TEXT NOT NULL,
    op     TEXT NOT NULL,
    body   TEXT NOT NULL,   -- canonical JSON of every field, seq/at/kind/caller/op included
    prev   TEXT NOT NULL,
    hash   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_caller ON records (caller, at);
CREATE INDEX IF NOT EXISTS records_op ON records (op, at);
CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


# The log's schema versions (agents.db.migrate): the first is the schema logs had before versions.
_MIGRATIONS = [_SCHEMA]


# Built once: json.dumps with these options builds a new encoder on every call, which was most of a
# record's cost.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def canonical(value: Any) -> str:
    """The one JSON spelling a record is hashed in: sorted keys, no spaces, ASCII."""
    return _CANONICAL.encode(value)


def chain_hasher(key: bytes | None = None) -> Callable[[str, str], str]:
    """:func:`chain_hash` under one key, for hashing many records: the key is made into the HMAC's
    starting state once and that state copied per record, instead of the key being padded and hashed
    into it again for every record (a quarter fewer instructions per record hash)."""
    if key is None:
        return lambda prev, body: hashlib.sha256(f"{prev}\n{body}".encode()).hexdigest()
    keyed = hmac.new(key, digestmod=hashlib.sha256)

    def keyed_hash(prev: str, body: str) -> str:
        mac = keyed.copy()
        mac.update(f"{prev}\n{body}".encode())
        return mac.hexdigest()
    return keyed_hash


def chain_hash(prev: str, body: str, key: bytes | None = None) -> str:
    """A record's hash: HMAC-SHA256 under the log's key, or plain SHA-256 for records written before
    the log had one."""
    return chain_hasher(key)(prev, body)


def key_path(log_path: str | Path) -> Path:
    """Where a log's key lives: beside the database, outside it (audit.sqlite -> audit.key)."""
    return Path(log_path).with_suffix(".key")


def load_key(path: str | Path, create: bool = False) -> bytes | None:
    """The log's key (32 random bytes, hex in a 0600 file); made when missing if ``create``."""
    path = Path(path)
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another writer made it first: read theirs
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"the audit key {path} is not 64 hexadecimal characters; restore it from a backup"
                         " (a new key cannot check the records the old one made)") from None
    if len(key) < 16:
        raise ValueError(f"the audit key {path} is too short ({len(key)} bytes); restore it from a backup")
    return key


def args_hash(args: Mapping[str, Any], secret: Iterable[str] = ()) -> str:
    """A hash of the arguments with secret ones replaced, so the log proves what was asked without
    holding a password. (A low-entropy argument can still be guessed from its hash.)"""
    hidden = set(secret)
    return hashlib.sha256(canonical({k: REDACTED if k in hidden else v for k, v in args.items()}).encode()
                          ).hexdigest()


@dataclass
class _Bucket(TokenBucket):
    """A sender's denial bucket, and what it held back since the last summary."""

    held: int = 0
    first: float = 0.0
    last: float = 0.0
    ops: Counter = field(default_factory=Counter)


class AuditLog:
    """One node's audit log. ``decided`` and ``ended`` are what the agent calls per request."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time, denial_burst: int = 10,
                 denials_per_minute: float = 6.0, all_denials_per_minute: float = 600.0,
                 max_senders: int = 10_000, write_behind: float = 0.0, keyed: bool = True) -> None:
        self.path = private_file(path)
        # Made on first use (keyed=False only to build a log as it was before keys, for tests).
        self.key = load_key(key_path(self.path), create=True) if keyed else None
        if self.key is not None:
            private_file(key_path(self.path))
        self._chain_hash = chain_hasher(self.key)
        # With write_behind > 0 (seconds), records gathered inside that window are chained and committed
        # in one transaction, off the request's path: one commit per request pair cost an op round trip
        # about 25% (bench/authz.py). What a crash can lose is that window; stop() and flush() write it.
        self.write_behind = write_behind
        self._pending: list[tuple[float, str, str, str, dict[str, Any]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._last_write: Future[None] | None = None  # the latest batch handed to the log's thread
        _OPEN[self.path.resolve()] = self
        self.clock = clock
        self.burst = denial_burst
        self.rate = denials_per_minute / 60.0
        self.max_senders = max_senders
        self._senders: OrderedDict[str, _Bucket] = OrderedDict()
        # Every sender together: many accounts flooding at once are bounded too.
        self._all = _Bucket(float(max(denial_burst * 10, 1)), all_denials_per_minute / 60.0, clock())
        # WAL with synchronous=NORMAL: a record survives a process crash at once, a power cut after
        # the next checkpoint; fsync per request would make the log the slow part of every op.
        self.store = Store(self.path, _MIGRATIONS, name=f"audit {self.path.name}", synchronous="NORMAL")
        self.db = self.store.db  # statements on it belong on the store's thread (tests read it directly)
        if self.key is not None:
            self._mark_keyed()

    def _mark_keyed(self) -> None:
        """A log begun before keys existed continues keyed from a ``keyed`` record written at once,
        so that it never shows a key beside records none of which it made."""
        row = self.store.call(lambda db: db.execute(
            "SELECT seq, body, prev, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone())
        if row is not None and self._chain_hash(row[2], row[1]) != row[3]:
            self._pending.append((self.clock(), "keyed", "", "*", {"unkeyed_before": row[0] + 1}))
            self._write_pending(sync=True).result()

    def close(self) -> None:
        """Write what is held back, wait for every write, and close the log."""
        self.flush()
        self.store.close()
        _OPEN.pop(self.path.resolve(), None)

    async def aclose(self) -> None:
        """:meth:`close` without holding up the event loop."""
        self.flush()
        await self.store.aclose()
        _OPEN.pop(self.path.resolve(), None)

    # -- what the agent and broker call -----------------------------------------------------------

    def decided(self, *, rid: str, caller: str, op: str, resources: Sequence[str], args: Mapping[str, Any],
                secret: Iterable[str], allowed: bool, rule: str, version: int, durable: bool = False) -> bool:
        """Record a decision; returns False when a denial was only counted (rate limit). With
        ``durable`` the record (and every one before it) is committed and synced on the log's thread at
        once: the decision to run a destructive op must outlive a crash the op may cause, so the
        caller awaits :meth:`written` before the op starts. Called with no event loop running, this
        waits for that write itself."""
        fields = {"rid": rid, "resources": list(resources), "args": args_hash(args, secret),
                  "decision": "allow" if allowed else "deny", "rule": rule, "policy_version": version}
        if not allowed and not self._admit_denial(caller, op):
            return False
        self._summarize(caller)
        self._append("decided", caller, op, fields)
        if durable:
            write = self._write_pending(sync=True)
            if not _in_event_loop():
                write.result()
        return True

    def refused(self, *, rid: str, caller: str, op: str, condition: str, reason: str, behalf: str = "") -> bool:
        """Record a request refused before any decision (who sent it, the op it named, why); rate-limited
        per sender like denials. ``caller`` is the sender as the server stamped it, ``behalf`` the
        ``for`` it claimed. Returns False when it was only counted."""
        op = op[:MAX_SENT_TEXT]
        if not self._admit_denial(caller, op):
            return False
        self._summarize(caller)
        fields = {"rid": rid[:MAX_SENT_TEXT], "condition": condition, "reason": reason[:MAX_SENT_TEXT]}
        if behalf:
            fields["for"] = behalf[:MAX_SENT_TEXT]
        self._append("refused", caller, op, fields)
        return True

    def ended(self, *, rid: str, caller: str, op: str, outcome: str, duration: float,
              passed_to: tuple[str, str] | None = None) -> None:
        """Record how an allowed request ended. A denial's decided record already says it all. ``passed_to``:
        the agent that served it instead and the request id it was sent there under, which that agent's
        own log names it by (a broker instance forwarding a workflow op to the leading one)."""
        if outcome == "denied":
            return
        fields: dict[str, Any] = {"rid": rid, "outcome": outcome, "duration": round(duration, 6)}
        if passed_to is not None:
            fields["passed_to"], fields["passed_rid"] = passed_to
        self._append("ended", caller, op, fields)

    def flush(self) -> Future[None] | None:
        """Hand the summaries of every denial still held back and every record not yet written to the
        log's thread (call on stop, and now and then); the future, if any, says when they are written."""
        for caller in list(self._senders):
            self._summarize(caller)
        self._summarize("*")
        return self._write_pending()

    async def written(self) -> None:
        """Wait until every record handed over so far is written; raises if writing one failed."""
        if self._last_write is not None:
            await asyncio.wrap_future(self._last_write)

    def head(self) -> tuple[int, str]:
        """The last record's sequence number and hash: an anchor to keep elsewhere. Waits here for the
        records already handed over; from async code, await :meth:`current_head` instead."""
        return self.store.call(_head)

    async def current_head(self) -> tuple[int, str]:
        """:meth:`head`, awaited on the log's thread after every record handed over before it."""
        return await self.store.run(_head)

    # -- the chain -------------------------------------------------------------------------------

    def _append(self, kind: str, caller: str, op: str, fields: Mapping[str, Any]) -> None:
        self._pending.append((self.clock(), kind, caller, op, dict(fields)))
        if not _in_event_loop():  # nothing to give the time back to (the command line, a test): write now
            self._write_pending().result()
        elif self.write_behind <= 0:
            self._write_pending()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.write_behind, self._write_pending)

    def _write_pending(self, sync: bool = False) -> Future[None]:
        """Hand the records gathered so far to the log's thread, chained and committed in one
        transaction there (synced to the disk itself with ``sync``); the future says when."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending and self._last_write is not None and not sync:
            return self._last_write
        pending, self._pending = self._pending, []
        write = self.store.submit(self._write, pending, sync)
        write.add_done_callback(self._report_failure)
        self._last_write = write
        return write

    def _report_failure(self, write: Future[None]) -> None:
        if not write.cancelled() and write.exception() is not None:
            log.error("writing records to the audit log %s failed", self.path, exc_info=write.exception())

    def _write(self, db: sqlite3.Connection, pending: list[tuple[float, str, str, str, dict[str, Any]]],
               sync: bool) -> None:
        """On the log's thread: append ``pending`` to the chain in one transaction."""
        if not pending and not sync:
            return
        if sync:  # this commit reaches the disk itself, not only the OS (a power cut keeps it too)
            db.execute("PRAGMA synchronous=FULL")
        cur = db.cursor()
        try:
            with transaction(db):  # BEGIN IMMEDIATE: other writers of the same file wait: one chain, no forks
                row = cur.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev = (row[0], row[1]) if row else (0, GENESIS)
                for now, kind, caller, op, fields in pending:
                    seq += 1
                    body = canonical({**fields, "seq": seq, "at": now, "kind": kind, "caller": caller, "op": op})
                    digest = self._chain_hash(prev, body)
                    cur.execute("INSERT INTO records (seq, at, kind, caller, op, body, prev, hash)"
                                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (seq, now, kind, caller, op, body, prev, digest))
                    prev = digest
        finally:
            if sync:
                db.execute("PRAGMA synchronous=NORMAL")

    # -- the denial rate limit -------------------------------------------------------------------

    def _hold(self, bucket: _Bucket, op: str, now: float) -> None:
        if not bucket.held:
            bucket.first = now
        bucket.held += 1
        bucket.last = now
        if op in bucket.ops or len(bucket.ops) < 20:  # bounded: a flood of op names cannot grow it
            bucket.ops[op] += 1

    def _admit_denial(self, caller: str, op: str) -> bool:
        now = self.clock()
        bucket = self._senders.get(caller)
        if bucket is None:
            bucket = self._senders[caller] = _Bucket(float(self.burst), self.rate, now)
            while len(self._senders) > self.max_senders:
                # The oldest sender's held count moves to the all-senders summary, never lost.
                _, old = self._senders.popitem(last=False)
                if old.held:
                    self._hold(self._all, "*", now)
                    self._all.held += old.held - 1
        self._senders.move_to_end(caller)
        if not bucket.take(now):
            self._hold(bucket, op, now)
            return False
        if not self._all.take(now):
            self._hold(self._all, op, now)
            return False
        return True

    def _summarize(self, caller: str) -> None:
        bucket = self._all if caller == "*" else self._senders.get(caller)
        if bucket is None or not bucket.held:
            return
        fields = {"count": bucket.held, "first": bucket.first, "last": bucket.last,
                  "ops": dict(bucket.ops.most_common(5))}
        bucket.held, bucket.ops = 0, Counter()
        self._append("denials-suppressed", caller, "*", fields)


# -- reading: what `vertebra audit verify|show` call -------------------------------------------------

@dataclass(frozen=True)
class Anchor:
    """A head an agent sent its broker: its log had record ``seq`` with hash ``hash`` at time ``at``."""

    seq: int
    hash: str
    at: float | None = None

    def when(self) -> str:
        return f" (anchored {_iso(self.at)})" if self.at else ""


@dataclass(frozen=True)
class Verification:
    ok: bool
    records: int  # how many records were checked
    bad_seq: int | None = None  # the first record that does not hold (None when ok)
    message: str = ""
    warnings: tuple[str, ...] = ()  # what was not or could not be checked, in sentences

    def __str__(self) -> str:
        return self.message


_FROM_FILE: Any = object()  # verify's default: the key in the file beside the log, if there is one


def _head(db: sqlite3.Connection) -> tuple[int, str]:
    row = db.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
    return (row[0], row[1]) if row else (0, GENESIS)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _open_read(path: str | Path) -> sqlite3.Connection:
    log = _OPEN.get(Path(path).resolve())
    if log is not None:  # a log this process writes: the records it holds back are part of it
        log._write_pending().result()
    if not Path(path).exists():
        raise FileNotFoundError(f"no audit log at {path}")
    return open_read_only(path)


def verify(path: str | Path, expect_head: tuple[int, str] | None = None, *,
           anchors: Iterable[Anchor] | None = None, key: bytes | None = _FROM_FILE) -> Verification:
    """Walk the chain in order and name the first record that was edited, removed or moved; then
    compare the log with the heads its agent anchored at the broker (``anchors``, and/or one
    ``expect_head``), which names a log cut off before an anchored record or rewritten up to one.

    Records are checked under the log's key (by default read from :func:`key_path`); unkeyed records
    are accepted only before the first keyed one (a log begun before keys existed), with a warning."""
    if key is _FROM_FILE:
        key = load_key(key_path(path))
    wanted = sorted({*(anchors or ()), *([Anchor(*expect_head)] if expect_head and expect_head[0] > 0 else [])},
                    key=lambda a: (a.seq, a.at or 0.0))
    anchored_seqs = {a.seq for a in wanted}
    keyed_hash, unkeyed_hash = chain_hasher(key) if key is not None else None, chain_hasher()
    hashes: dict[int, str] = {}
    db = _open_read(path)
    try:
        prev, expected_seq, count, keyed_from = GENESIS, 1, 0, None
        for seq, at, kind, caller, op, body, stored_prev, stored_hash in db.execute(
                "SELECT seq, at, kind, caller, op, body, prev, hash FROM records ORDER BY seq"):
            count += 1
            if seq != expected_seq:
                return Verification(False, count, expected_seq, f"record {expected_seq} is missing (the next"
                                                                f" record is {seq}): records were deleted")
            if stored_prev != prev:
                return Verification(False, count, seq, f"record {seq} does not follow record {seq - 1}:"
                                                       " a record before it was changed, removed or moved")
            if keyed_hash is not None and keyed_hash(prev, body) == stored_hash:
                keyed_from = keyed_from or seq
            elif keyed_from is not None or unkeyed_hash(prev, body) != stored_hash:
                if key is None:
                    return Verification(False, count, seq, f"record {seq} was edited, or is keyed and there is no"
                                                           f" key at {key_path(path)} to check it: its hash does"
                                                           " not match its content")
                return Verification(False, count, seq, f"record {seq} was edited: its hash does not match its"
                                                       " content under the log's key")
            try:
                content = json.loads(body)
            except ValueError:
                return Verification(False, count, seq, f"record {seq} holds no valid content")
            if (content.get("seq"), content.get("at"), content.get("kind"), content.get("caller"),
                    content.get("op")) != (seq, at, kind, caller, op):
                return Verification(False, count, seq, f"record {seq} was edited: its indexed columns do not"
                                                       " match its hashed content")
            if seq in anchored_seqs:
                hashes[seq] = stored_hash
            prev, expected_seq = stored_hash, seq + 1
    finally:
        db.close()
    warnings: list[str] = []
    if key is None and count:
        warnings.append(f"the log is unkeyed (no key at {key_path(path)}): an edit that recomputes every later"
                        " hash is detected only by the broker's anchors")
    elif key is not None and count and keyed_from is None:
        return Verification(False, count, 1, f"no record is keyed though the log has a key at {key_path(path)}:"
                                             " the log was replaced or rewritten without the key")
    elif keyed_from is not None and keyed_from > 1:
        warnings.append(f"records 1-{keyed_from - 1} were written before the log had a key; they are held by"
                        f" record {keyed_from}'s keyed hash, and by the anchors")
    problems: list[str] = []
    bad: int | None = None
    for anchor in wanted:
        if anchor.seq > count:
            problems.append(f"records were cut off the end: the log ends at record {count}, but its agent"
                            f" anchored record {anchor.seq}{anchor.when()} at the broker")
            bad = count + 1 if bad is None else bad
            break  # every later anchor says the same
        if hashes.get(anchor.seq) != anchor.hash:
            problems.append(f"the log was rewritten: record {anchor.seq} is not the one its agent anchored at"
                            f" the broker{anchor.when()} (it or a record before it was replaced)")
            bad = anchor.seq if bad is None else bad
            break  # the first rewritten anchor is where to look
    if problems:
        return Verification(False, count, bad, "; ".join(problems), tuple(warnings))
    keyed = "keyed" if keyed_from is not None else "unkeyed"
    message = f"{count} records, chain intact ({keyed})"
    if wanted:
        message += f", matching the {len(wanted)} anchors at the broker (the last for record {wanted[-1].seq})"
    return Verification(True, count, None, message, tuple(warnings))


def _when(value: float | str | None) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    dt = datetime.fromisoformat(value)
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def show(path: str | Path, *, caller: str | None = None, op: str | None = None,
         since: float | str | None = None, until: float | str | None = None,
         limit: int | None = None) -> list[dict[str, Any]]:
    """Records matching every filter given (times as epoch seconds or ISO 8601, UTC if no zone)."""
    where, params = [], []  # type: list[str], list[Any]
    if caller:
        where.append("caller = ?")
        params.append(caller)
    if op:
        where.append("op = ?")
        params.append(op)
    if (start := _when(since)) is not None:
        where.append("at >= ?")
        params.append(start)
    if (end := _when(until)) is not None:
        where.append("at <= ?")
        params.append(end)
    sql = "SELECT body FROM records" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq"
    if limit:
        sql += f" LIMIT {int(limit)}"
    db = _open_read(path)
    try:
        return [json.loads(body) for (body,) in db.execute(sql, params)]
    finally:
        db.close()


def format_record(rec: Mapping[str, Any]) -> str:
    """One line per record for ``vertebra audit show``."""
    head = f"{rec['seq']:>6} {_iso(rec['at'])} {rec['kind']:<18} {rec['caller']} {rec['op']}"
    if rec["kind"] == "decided":
        return (f"{head} {' '.join(rec['resources']) or '-'} {rec['decision'].upper()} by {rec['rule']}"
                f" (policy v{rec['policy_version']}, rid {rec['rid']})")
    if rec["kind"] == "ended":
        passed = f"; served by {rec['passed_to']} as rid {rec['passed_rid']}" if rec.get("passed_to") else ""
        return f"{head} {rec['outcome']} in {rec['duration']:.3f}s (rid {rec['rid']}{passed})"
    if rec["kind"] == "keyed":
        return f"{head} the log is keyed from here on (records before {rec.get('unkeyed_before')} are not)"
    if rec["kind"] == "refused":
        behalf = f" for {rec['for']}" if rec.get("for") else ""
        return f"{head}{behalf} REFUSED {rec['condition']}: {rec['reason']} (rid {rec['rid']})"
    return (f"{head} {rec.get('count')} denials held back between {_iso(rec.get('first', 0))} and"
            f" {_iso(rec.get('last', 0))}; most tried: {rec.get('ops')}")


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def audit_verify(path: str | Path, expect_head: tuple[int, str] | None = None, *,
                 anchors: Iterable[Anchor] | None = None) -> tuple[int, str]:
    """For the CLI: (exit code, message with any warnings on lines of their own). 0 intact, 1
    tampered (edited, cut off or rewritten), 2 unreadable (the log or its key)."""
    try:
        result = verify(path, expect_head, anchors=anchors)
    except (OSError, sqlite3.Error, ValueError) as exc:
        return 2, f"cannot read audit log {path}: {exc}"
    lines = [f"{path}: {'' if result.ok else 'TAMPERED: '}{result.message}"]
    lines += [f"  warning: {w}" for w in result.warnings]
    return (0 if result.ok else 1), "\n".join(lines)


def audit_show(path: str | Path, **filters: Any) -> list[str]:
    """For the CLI: the matching records, one line each."""
    return [format_record(r) for r in show(path, **filters)]
