"""The audit log: chained records, verify naming the first bad one, filters, the denial rate limit."""

from __future__ import annotations

import sqlite3

import pytest

from agents import audit
from agents.audit import AuditLog, args_hash, audit_show, audit_verify, show, verify


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log(tmp_path):
    clock = Clock()
    a = AuditLog(tmp_path / "audit.db", clock=clock, denial_burst=3, denials_per_minute=6)
    a.clock_ = clock
    yield a
    a.db.close()


def record_requests(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.decided(rid=f"r{i}", caller="alice@x.test", op="sample.echo", resources=["/host/a"],
                    args={"text": "hi"}, secret=(), allowed=True, rule="grant line 3", version=1)
        log.clock_.now += 1
        log.ended(rid=f"r{i}", caller="alice@x.test", op="sample.echo", outcome="ok", duration=0.01)


def tamper(path, sql: str) -> None:
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER records_no_update")
    db.execute("DROP TRIGGER records_no_delete")
    db.execute(sql)
    db.commit()
    db.close()


def test_records_carry_what_the_issue_asks(log):
    log.decided(rid="r1", caller="alice@x.test", op="fencing.node.fence", resources=["/cluster/c1/node/1"],
                args={"node": "1", "password": "hunter2"}, secret=["password"], allowed=True,
                rule="grant line 9", version=4)
    log.ended(rid="r1", caller="alice@x.test", op="fencing.node.fence", outcome="ok", duration=1.5)
    decided, ended = show(log.path)
    assert decided["kind"] == "decided" and decided["rid"] == "r1" and decided["caller"] == "alice@x.test"
    assert decided["resources"] == ["/cluster/c1/node/1"] and decided["decision"] == "allow"
    assert decided["rule"] == "grant line 9" and decided["policy_version"] == 4
    assert decided["args"] == args_hash({"node": "1", "password": "anything-else"}, ["password"])
    assert "hunter2" not in (log.path.read_bytes() + (log.path.parent / "audit.db-wal").read_bytes()).decode(
        "latin-1")
    assert ended["outcome"] == "ok" and ended["duration"] == 1.5


def test_intact_chain_verifies(log):
    record_requests(log, 5)
    result = verify(log.path)
    assert result.ok and result.records == 10
    assert audit_verify(log.path)[0] == 0


def test_updates_and_deletes_are_refused_by_the_database(log):
    record_requests(log, 1)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        log.db.execute("UPDATE records SET caller = 'mallory@x.test'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        log.db.execute("DELETE FROM records")


def test_an_edited_record_is_named(log):
    record_requests(log, 5)
    tamper(log.path, "UPDATE records SET body = replace(body, 'alice', 'mallory') WHERE seq = 4")
    result = verify(log.path)
    assert not result.ok and result.bad_seq == 4 and "record 4 was edited" in result.message
    code, message = audit_verify(log.path)
    assert code == 1 and "record 4" in message


def test_an_edited_index_column_is_named(log):
    record_requests(log, 3)
    tamper(log.path, "UPDATE records SET caller = 'mallory@x.test' WHERE seq = 2")
    assert verify(log.path).bad_seq == 2


def test_a_deleted_record_is_named(log):
    record_requests(log, 5)
    tamper(log.path, "DELETE FROM records WHERE seq = 3")
    result = verify(log.path)
    assert not result.ok and result.bad_seq == 3 and "missing" in result.message


def test_reordered_records_are_named(log):
    record_requests(log, 5)
    db = sqlite3.connect(log.path)
    rows = db.execute("SELECT seq, at, kind, caller, op, body, prev, hash FROM records WHERE seq IN (5, 6)"
                      " ORDER BY seq").fetchall()
    db.close()
    # Swap the content of records 5 and 6, keeping the sequence numbers in place.
    tamper(log.path, "DELETE FROM records WHERE seq IN (5, 6)")
    db = sqlite3.connect(log.path)
    for (seq, *_), (_, *rest) in zip(rows, reversed(rows)):
        db.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (seq, *rest))
    db.commit()
    db.close()
    result = verify(log.path)
    assert not result.ok and result.bad_seq == 5


def test_records_cut_off_the_end_are_caught_with_an_anchor(log):
    record_requests(log, 3)
    anchor = log.head()
    tamper(log.path, "DELETE FROM records WHERE seq = 6")
    assert verify(log.path).ok  # a shorter chain is still a chain...
    result = verify(log.path, expect_head=anchor)
    assert not result.ok and "cut off" in result.message  # ...which the anchor catches


def test_show_filters_by_caller_op_and_time(log):
    record_requests(log, 2)
    log.clock_.now += 5
    t = log.clock_.now
    log.decided(rid="b1", caller="bob@x.test", op="storage.info", resources=[], args={}, secret=(),
                allowed=False, rule="default deny", version=1)
    assert [r["rid"] for r in show(log.path, caller="bob@x.test")] == ["b1"]
    assert len(show(log.path, op="sample.echo")) == 4
    assert [r["rid"] for r in show(log.path, since=t)] == ["b1"]
    assert len(show(log.path, until=t - 1)) == 4
    lines = audit_show(log.path, caller="bob@x.test")
    assert len(lines) == 1 and "DENY by default deny" in lines[0]


def test_a_denial_flood_is_summarized_not_written(log):
    for i in range(1000):
        log.decided(rid=f"f{i}", caller="mallory@x.test", op="sample.echo", resources=[], args={}, secret=(),
                    allowed=False, rule="default deny", version=1)
        log.ended(rid=f"f{i}", caller="mallory@x.test", op="sample.echo", outcome="denied", duration=0)
    assert len(show(log.path)) == 3  # the burst; denied requests get no "ended" record
    log.clock_.now += 10  # one token back: the held-back count is written before the next denial
    assert log.decided(rid="late", caller="mallory@x.test", op="sample.echo", resources=[], args={}, secret=(),
                       allowed=False, rule="default deny", version=1)
    summary, late = show(log.path)[-2:]
    assert summary["kind"] == "denials-suppressed" and summary["count"] == 997
    assert summary["ops"] == {"sample.echo": 997} and late["rid"] == "late"
    # Allowed requests of the same sender are never held back.
    assert log.decided(rid="ok", caller="mallory@x.test", op="sample.echo", resources=[], args={}, secret=(),
                       allowed=True, rule="grant", version=1)
    assert verify(log.path).ok


def test_flush_writes_what_is_held_back(log):
    for i in range(5):
        log.decided(rid=f"f{i}", caller="m@x.test", op="a.b", resources=[], args={}, secret=(), allowed=False,
                    rule="deny", version=1)
    log.flush()
    assert show(log.path)[-1]["count"] == 2


def test_missing_log_is_reported_not_raised(tmp_path):
    code, message = audit_verify(tmp_path / "none.db")
    assert code == 2 and "no audit log" in message


def test_two_writers_share_one_chain(tmp_path):
    a = AuditLog(tmp_path / "shared.db")
    b = AuditLog(tmp_path / "shared.db")
    for i in range(10):
        (a if i % 2 else b).ended(rid=str(i), caller="x@y", op="a.b", outcome="ok", duration=0)
    assert verify(tmp_path / "shared.db").records == 10 and verify(tmp_path / "shared.db").ok
    a.close()
    b.close()


def test_canonical_is_stable():
    assert audit.canonical({"b": 1, "a": [1, "é"]}) == '{"a":[1,"\\u00e9"],"b":1}'


# -- keyed chain, anchors, durable decisions, refusals, private files ---------------------------------

def rehash(path, key: bytes | None, start: int = 1, stop: int = 1 << 62) -> None:
    """Recompute every hash from record ``start`` (to ``stop``), as someone who edited the log would."""
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER IF EXISTS records_no_update")
    prev = db.execute("SELECT hash FROM records WHERE seq = ?", (start - 1,)).fetchone()
    prev = prev[0] if prev else audit.GENESIS
    for seq, body in db.execute("SELECT seq, body FROM records WHERE seq BETWEEN ? AND ? ORDER BY seq",
                                 (start, stop)).fetchall():
        digest = audit.chain_hash(prev, body, key)
        db.execute("UPDATE records SET prev = ?, hash = ? WHERE seq = ?", (prev, digest, seq))
        prev = digest
    db.commit()
    db.close()


def test_the_chain_is_keyed_with_a_private_key_file_beside_the_log(log):
    record_requests(log, 2)
    key_file = audit.key_path(log.path)
    assert key_file.exists() and (key_file.stat().st_mode & 0o777) == 0o600
    assert (log.path.stat().st_mode & 0o777) == 0o600 and (log.path.parent.stat().st_mode & 0o777) == 0o700
    assert audit.load_key(key_file) == log.key and len(log.key) == 32
    result = verify(log.path)
    assert result.ok and "(keyed)" in result.message and not result.warnings


def test_an_edit_with_every_later_hash_recomputed_without_the_key_is_named(log):
    record_requests(log, 4)
    tamper(log.path, "UPDATE records SET body = replace(body, '\"rid\":\"', '\"rid\":\"X') WHERE seq = 3")
    rehash(log.path, key=None, start=3)
    result = verify(log.path)
    assert not result.ok and result.bad_seq == 3 and "under the log's key" in result.message
    # Rewritten from the first record, unkeyed throughout: the key beside it says that cannot be.
    rehash(log.path, key=None, start=1)
    result = verify(log.path)
    assert not result.ok and "no record is keyed though the log has a key" in result.message


def test_with_the_key_a_rewrite_passes_the_chain_and_fails_the_anchors(log):
    record_requests(log, 4)
    anchors = [audit.Anchor(*log.head(), at=1_700_000_100.0)]
    tamper(log.path, "UPDATE records SET body = replace(body, '\"rid\":\"', '\"rid\":\"X') WHERE seq = 3")
    rehash(log.path, key=log.key, start=3)
    assert verify(log.path).ok
    result = verify(log.path, anchors=anchors)
    assert not result.ok and result.bad_seq == 8 and "the log was rewritten: record 8" in result.message
    assert "anchored 2023-11-14T22:15:00" in result.message


def test_truncation_is_named_against_the_last_anchor(log):
    record_requests(log, 3)
    early = audit.Anchor(*log.head())
    record_requests(log, 2)
    late = audit.Anchor(*log.head())
    tamper(log.path, "DELETE FROM records WHERE seq > 7")
    assert verify(log.path, anchors=[early]).ok
    result = verify(log.path, anchors=[early, late])
    assert not result.ok and "the log ends at record 7, but its agent anchored record 10" in result.message
    code, message = audit_verify(log.path, anchors=[early, late])
    assert code == 1 and message.startswith(f"{log.path}: TAMPERED: records were cut off the end")


def test_an_unkeyed_log_still_verifies_with_a_warning_and_continues_keyed(tmp_path):
    old = AuditLog(tmp_path / "audit.sqlite", keyed=False)  # as logs were written before keys
    record_requests_plain(old, 3)
    old.close()
    assert not audit.key_path(tmp_path / "audit.sqlite").exists()
    result = verify(tmp_path / "audit.sqlite")
    assert result.ok and "(unkeyed)" in result.message and "the log is unkeyed" in result.warnings[0]
    new = AuditLog(tmp_path / "audit.sqlite")  # the agent upgraded: a key, and the log goes on keyed
    assert show(new.path)[-1]["kind"] == "keyed"
    record_requests_plain(new, 1)
    new.close()
    result = verify(tmp_path / "audit.sqlite")
    assert result.ok and "(keyed)" in result.message and "records 1-3 were written before" in result.warnings[0]
    # The unkeyed part is held by the first keyed record: editing it breaks the chain there.
    tamper(tmp_path / "audit.sqlite",
           "UPDATE records SET body = replace(body, '\"rid\":\"', '\"rid\":\"X') WHERE seq = 2")
    rehash(tmp_path / "audit.sqlite", key=None, start=2, stop=3)  # all the unkeyed ones; the keyed cannot be
    result = verify(tmp_path / "audit.sqlite")
    assert result.bad_seq == 4 and "does not follow record 3" in result.message


def record_requests_plain(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.ended(rid=f"p{i}", caller="alice@x.test", op="sample.echo", outcome="ok", duration=0.01)


def test_a_missing_key_fails_the_keyed_records(log):
    record_requests(log, 1)
    audit.key_path(log.path).unlink()
    result = verify(log.path)
    assert not result.ok and result.bad_seq == 1 and "no key at" in result.message


async def test_a_durable_decision_is_written_when_written_returns(tmp_path):
    """In an event loop the write runs on the log's thread; the agent awaits ``written`` before the op
    starts (tests/integration/test_audit_anchors.py kills an agent as the op starts and finds it)."""
    log = AuditLog(tmp_path / "audit.sqlite", write_behind=10.0)
    args = dict(caller="alice@x.test", resources=[], args={}, secret=(), allowed=True, rule="grant", version=1)
    log.decided(rid="batched", op="sample.echo", **args)
    log.decided(rid="fence", op="fencing.node.off", durable=True, **args)
    await log.written()  # not held back for write_behind's ten seconds
    other = sqlite3.connect(tmp_path / "audit.sqlite")  # another reader sees both, in order, at once
    assert [r for (r,) in other.execute("SELECT json_extract(body, '$.rid') FROM records ORDER BY seq")] == [
        "batched", "fence"]
    other.close()
    log.close()


def test_refusals_are_recorded_and_rate_limited_like_denials(log):
    for i in range(50):
        log.refused(rid=f"x{i}", caller="mallory@x.test", op="sample.echo" * 40, condition="denied",
                    reason="mallory@x.test may not act on behalf of alice@x.test", behalf="alice@x.test")
    written = show(log.path)
    assert len(written) == 3 and written[0]["kind"] == "refused" and written[0]["for"] == "alice@x.test"
    assert len(written[0]["op"]) == audit.MAX_SENT_TEXT
    log.flush()
    assert show(log.path)[-1]["count"] == 47
    assert "REFUSED denied" in audit_show(log.path)[0]
    assert verify(log.path).ok


def test_private_file_tightens_what_exists(tmp_path):
    import os

    d = tmp_path / "open"
    d.mkdir(mode=0o755)
    f = d / "requests.sqlite"
    f.write_text("")
    os.chmod(d, 0o755)
    os.chmod(f, 0o644)
    audit.private_file(f)
    assert (f.stat().st_mode & 0o777) == 0o600 and (d.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("key_len", [16, 32, 64, 65, 200])
def test_the_keyed_hasher_is_hmac_sha256_of_prev_and_body(key_len):
    """The hasher a log keeps (its key's HMAC state, copied per record) gives the chain's hash:
    HMAC-SHA256 of "prev\\nbody" under the key, for keys shorter and longer than SHA-256's block."""
    import hashlib
    import hmac
    import secrets

    key = secrets.token_bytes(key_len)
    keyed = audit.chain_hasher(key)
    for prev, body in [(audit.GENESIS, '{"seq":1}'), ("ab" * 32, '{"seq":2,"text":"\\u00e9"}'), ("", "")]:
        expected = hmac.new(key, f"{prev}\n{body}".encode(), hashlib.sha256).hexdigest()
        assert keyed(prev, body) == expected == audit.chain_hash(prev, body, key)
        # Used again, the hasher starts from the key's state, not from the last record's.
        assert keyed(prev, body) == expected
    assert audit.chain_hasher()("p", "b") == hashlib.sha256(b"p\nb").hexdigest() == audit.chain_hash("p", "b")
