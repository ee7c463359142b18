"""The audit trail: an append-only, hash-chained SQLite log of every decision and every ending.

Each record's hash covers the previous record's hash and the record's own canonical content
(sequence number, time, kind and fields), so editing, deleting or reordering any record breaks the
chain at that record and :func:`verify` names it. Triggers refuse UPDATE and DELETE, which stops
accidents; a deliberate edit (dropping the triggers) is what the chain catches. Cutting records off
the end leaves a valid shorter chain: keep :meth:`AuditLog.head` somewhere else (the broker) and
pass it to ``verify(expect_head=...)`` to catch that too.

Two kinds of records for a request: ``decided`` (time, rid, caller, op, canonical resources, a hash
of the arguments with secret parameters redacted, decision, the rule that decided, policy version)
and ``ended`` (outcome, duration). A denied request has only its ``decided`` record.

Denials are rate-limited per sender (a token bucket: ``denial_burst`` at once, then
``denials_per_minute``) and overall, so a flood of refused requests cannot fill the disk. What
is held back is counted, not lost: the next record written for that sender (or :meth:`flush`) is
preceded by one ``denials-suppressed`` record with the count, the first and last time and the ops
most often tried. Allowed requests are never held back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

GENESIS = "0" * 64
# The logs this process has open, so that reading one here includes records still held back.
_OPEN: weakref.WeakValueDictionary[Path, "AuditLog"] = weakref.WeakValueDictionary()
REDACTED = "[secret]"

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


# Built once: json.dumps with these options builds a new encoder on every call, which was most of a
# record's cost.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def canonical(value: Any) -> str:
    """The one JSON spelling a record is hashed in: sorted keys, no spaces, ASCII."""
    return _CANONICAL.encode(value)


def chain_hash(prev: str, body: str) -> str:
    return hashlib.sha256(f"{prev}\n{body}".encode()).hexdigest()


def args_hash(args: Mapping[str, Any], secret: Iterable[str] = ()) -> str:
    """A hash of the arguments with secret ones replaced, so the log proves what was asked without
    holding a password. (A low-entropy argument can still be guessed from its hash.)"""
    hidden = set(secret)
    return hashlib.sha256(canonical({k: REDACTED if k in hidden else v for k, v in args.items()}).encode()
                          ).hexdigest()


@dataclass
class _Bucket:
    tokens: float
    at: float
    held: int = 0
    first: float = 0.0
    last: float = 0.0
    ops: Counter = field(default_factory=Counter)


class AuditLog:
    """One node's audit log. ``decided`` and ``ended`` are what the agent calls per request."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time, denial_burst: int = 10,
                 denials_per_minute: float = 6.0, all_denials_per_minute: float = 600.0,
                 max_senders: int = 10_000, write_behind: float = 0.0) -> None:
        self.path = Path(path)
        # With write_behind > 0 (seconds), records gathered inside that window are chained and committed
        # in one transaction, off the request's path: one commit per request pair cost an op round trip
        # about 25% (bench/authz.py). What a crash can lose is that window; stop() and flush() write it.
        self.write_behind = write_behind
        self._pending: list[tuple[float, str, str, str, dict[str, Any]]] = []
        self._writer: asyncio.TimerHandle | None = None
        _OPEN[self.path.resolve()] = self
        self.clock = clock
        self.burst = denial_burst
        self.rate = denials_per_minute / 60.0
        self.max_senders = max_senders
        self._senders: OrderedDict[str, _Bucket] = OrderedDict()
        # Every sender together: many accounts flooding at once are bounded too.
        self._all = _Bucket(tokens=float(max(denial_burst * 10, 1)), at=clock())
        self._all_rate = all_denials_per_minute / 60.0
        self._all_burst = float(max(denial_burst * 10, 1))
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        # WAL with synchronous=NORMAL: a record survives a process crash at once, a power cut after
        # the next checkpoint; fsync per request would make the log the slow part of every op.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.flush()
        self.db.close()
        _OPEN.pop(self.path.resolve(), None)

    # -- what the agent and broker call -----------------------------------------------------------

    def decided(self, *, rid: str, caller: str, op: str, resources: Sequence[str], args: Mapping[str, Any],
                secret: Iterable[str], allowed: bool, rule: str, version: int) -> bool:
        """Record a decision; returns False when a denial was only counted (rate limit)."""
        fields = {"rid": rid, "resources": list(resources), "args": args_hash(args, secret),
                  "decision": "allow" if allowed else "deny", "rule": rule, "policy_version": version}
        if not allowed and not self._admit_denial(caller, op):
            return False
        self._summarize(caller)
        self._append("decided", caller, op, fields)
        return True

    def ended(self, *, rid: str, caller: str, op: str, outcome: str, duration: float) -> None:
        """Record how an allowed request ended. A denial's decided record already says it all."""
        if outcome == "denied":
            return
        self._append("ended", caller, op, {"rid": rid, "outcome": outcome, "duration": round(duration, 6)})

    def flush(self) -> None:
        """Write the summaries of every denial still held back and every record not yet written
        (call on stop, and now and then)."""
        for caller in list(self._senders):
            self._summarize(caller)
        self._summarize("*")
        self._write_pending()

    def head(self) -> tuple[int, str]:
        """The last record's sequence number and hash: an anchor to keep elsewhere."""
        row = self.db.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, GENESIS)

    # -- the chain -------------------------------------------------------------------------------

    def _append(self, kind: str, caller: str, op: str, fields: Mapping[str, Any]) -> None:
        self._pending.append((self.clock(), kind, caller, op, dict(fields)))
        if self.write_behind <= 0:
            self._write_pending()
        elif self._writer is None:
            try:
                self._writer = asyncio.get_running_loop().call_later(self.write_behind, self._write_pending)
            except RuntimeError:  # no event loop to write later from: write now
                self._write_pending()

    def _write_pending(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")  # other writers of the same file wait: one chain, no forks
        try:
            row = cur.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (row[0], row[1]) if row else (0, GENESIS)
            for now, kind, caller, op, fields in pending:
                seq += 1
                body = canonical({**fields, "seq": seq, "at": now, "kind": kind, "caller": caller, "op": op})
                digest = chain_hash(prev, body)
                cur.execute("INSERT INTO records (seq, at, kind, caller, op, body, prev, hash)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (seq, now, kind, caller, op, body, prev, digest))
                prev = digest
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    # -- the denial rate limit -------------------------------------------------------------------

    def _take(self, bucket: _Bucket, rate: float, burst: float, now: float) -> bool:
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

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
            bucket = self._senders[caller] = _Bucket(tokens=float(self.burst), at=now)
            while len(self._senders) > self.max_senders:
                # The oldest sender's held count moves to the all-senders summary, never lost.
                _, old = self._senders.popitem(last=False)
                if old.held:
                    self._hold(self._all, "*", now)
                    self._all.held += old.held - 1
        self._senders.move_to_end(caller)
        if not self._take(bucket, self.rate, self.burst, now):
            self._hold(bucket, op, now)
            return False
        if not self._take(self._all, self._all_rate, self._all_burst, now):
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
class Verification:
    ok: bool
    records: int  # how many records were checked
    bad_seq: int | None = None  # the first record that does not hold (None when ok)
    message: str = ""

    def __str__(self) -> str:
        return self.message


def _open_read(path: str | Path) -> sqlite3.Connection:
    log = _OPEN.get(Path(path).resolve())
    if log is not None:  # a log this process writes: the records it holds back are part of it
        log._write_pending()
    if not Path(path).exists():
        raise FileNotFoundError(f"no audit log at {path}")
    return sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)


def verify(path: str | Path, expect_head: tuple[int, str] | None = None) -> Verification:
    """Walk the chain in order; name the first record that was edited, removed or moved."""
    db = _open_read(path)
    try:
        prev, expected_seq, count = GENESIS, 1, 0
        for seq, at, kind, caller, op, body, stored_prev, stored_hash in db.execute(
                "SELECT seq, at, kind, caller, op, body, prev, hash FROM records ORDER BY seq"):
            count += 1
            if seq != expected_seq:
                return Verification(False, count, expected_seq, f"record {expected_seq} is missing (the next"
                                                                f" record is {seq}): records were deleted")
            if stored_prev != prev:
                return Verification(False, count, seq, f"record {seq} does not follow record {seq - 1}:"
                                                       " a record before it was changed, removed or moved")
            if chain_hash(prev, body) != stored_hash:
                return Verification(False, count, seq, f"record {seq} was edited: its hash does not match"
                                                       " its content")
            try:
                content = json.loads(body)
            except ValueError:
                return Verification(False, count, seq, f"record {seq} holds no valid content")
            if (content.get("seq"), content.get("at"), content.get("kind"), content.get("caller"),
                    content.get("op")) != (seq, at, kind, caller, op):
                return Verification(False, count, seq, f"record {seq} was edited: its indexed columns do not"
                                                       " match its hashed content")
            prev, expected_seq = stored_hash, seq + 1
        if expect_head is not None and expect_head[0] > 0:
            head_seq, head_hash = expect_head
            if count < head_seq:
                return Verification(False, count, count + 1, f"the log ends at record {count} but the anchor"
                                                             f" says {head_seq}: records were cut off the end")
            row = db.execute("SELECT hash FROM records WHERE seq = ?", (head_seq,)).fetchone()
            if row is None or row[0] != head_hash:
                return Verification(False, count, head_seq, f"record {head_seq} does not match the anchor")
        return Verification(True, count, None, f"{count} records, chain intact")
    finally:
        db.close()


def _when(value: float | str | None) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    dt = datetime.fromisoformat(value)
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


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
        return f"{head} {rec['outcome']} in {rec['duration']:.3f}s (rid {rec['rid']})"
    return (f"{head} {rec.get('count')} denials held back between {_iso(rec.get('first', 0))} and"
            f" {_iso(rec.get('last', 0))}; most tried: {rec.get('ops')}")


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def audit_verify(path: str | Path, expect_head: tuple[int, str] | None = None) -> tuple[int, str]:
    """For the CLI: (exit code, message). 0 intact, 1 tampered, 2 unreadable."""
    try:
        result = verify(path, expect_head)
    except (OSError, sqlite3.Error) as exc:
        return 2, f"cannot read audit log {path}: {exc}"
    return (0 if result.ok else 1), f"{path}: {result.message}"


def audit_show(path: str | Path, **filters: Any) -> list[str]:
    """For the CLI: the matching records, one line each."""
    return [format_record(r) for r in show(path, **filters)]
