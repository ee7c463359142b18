"""The request log's record on disk (agents/idempotency.py): what a restarted agent answers a repeat with,
for how long, and what it never answers with."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import time

from agents import idempotency
from agents.errors import BadArguments, Interrupted
from agents.idempotency import Answer, RequestLog

KEY = ("operator@vertebra.test", "rid-1")


async def reopened(path, write) -> RequestLog:
    """A log that ``write`` fills, closed and opened again, as across an agent's restart."""
    first = RequestLog(path)
    await write(first)
    await first.aclose()
    return RequestLog(path)


async def test_a_recorded_failure_comes_back_with_its_own_condition(tmp_path):
    async def write(log):
        seen = log.start(KEY, "fp")
        error = BadArguments("x")
        error.condition = "exists"  # a storage agent's condition, which the core does not know
        await log.finish(KEY, seen, Answer(error=error, admitted=True), durable=True)

    log = await reopened(tmp_path / "r.sqlite", write)
    seen = await log.recall(KEY)
    assert seen is not None and seen.fingerprint == "fp"
    error = seen.answer.result().error
    assert error.condition == "exists" and error.text == "x"
    await log.aclose()


async def test_a_started_change_without_an_outcome_is_interrupted_after_a_restart(tmp_path):
    async def write(log):
        log.start(KEY, "fp")
        await log.started(KEY, "fp", "storage.volume.create", "storage1")  # then the agent dies

    log = await reopened(tmp_path / "r.sqlite", write)
    error = (await log.recall(KEY)).answer.result().error
    assert isinstance(error, Interrupted) and error.condition == "interrupted"
    assert "storage.volume.create was started under request id rid-1, but storage1 stopped" in error.text
    await log.aclose()


async def test_a_request_that_never_ran_leaves_no_row(tmp_path):
    async def write(log):
        seen = log.start(KEY, "fp")
        await log.started(KEY, "fp", "storage.volume.create", "storage1")
        log.abandon(KEY, seen, Interrupted("expired"), ran=False)

    log = await reopened(tmp_path / "r.sqlite", write)
    assert await log.recall(KEY) is None
    await log.aclose()


async def test_records_past_the_window_are_never_used_and_are_deleted(tmp_path):
    path = tmp_path / "r.sqlite"
    old = ("operator@vertebra.test", "old")

    async def write(log):
        past = time.time() - idempotency.DURABLE_WINDOW - 60
        await log._keep((*old, "fp", "payload", None, None, past))
        await log._keep((*KEY, "fp", "payload", None, None, time.time()))

    log = await reopened(path, write)
    assert await log.recall(old) is None  # too old to answer with, even before it is deleted
    assert (await log.recall(KEY)).answer.result().payload == "payload"
    await log.aclose()
    db = sqlite3.connect(path)
    try:
        assert [r[0] for r in db.execute("SELECT rid FROM outcomes")] == ["rid-1"]  # deleted at the start
    finally:
        db.close()


async def test_the_window_is_kept_while_the_agent_runs(tmp_path, monkeypatch):
    path = tmp_path / "r.sqlite"
    log = RequestLog(path)
    past = time.time() - idempotency.DURABLE_WINDOW - 1
    await log._keep(("operator@vertebra.test", "old", "fp", "", None, None, past))
    monkeypatch.setattr(idempotency, "PRUNE_EVERY", 0.0)  # the next write prunes
    await log._keep((*KEY, "fp", "", None, None, time.time()))
    await log.aclose()
    db = sqlite3.connect(path)
    try:
        assert [r[0] for r in db.execute("SELECT rid FROM outcomes")] == ["rid-1"]
    finally:
        db.close()


async def test_rows_handed_over_together_are_written_in_one_transaction(tmp_path, monkeypatch):
    """Many requests ending at once wait for one sync between them, not one each, and all are on disk."""
    transactions: list[int] = []
    keep = idempotency._keep_outcomes

    def counted(db, rows):
        transactions.append(len(rows))
        keep(db, rows)

    monkeypatch.setattr(idempotency, "_keep_outcomes", counted)
    path = tmp_path / "r.sqlite"
    log = RequestLog(path)
    await asyncio.gather(*(log._keep(("operator@vertebra.test", f"rid-{i}", "fp", "", None, None, time.time()))
                           for i in range(200)))
    assert sum(transactions) == 200 and len(transactions) < 200, transactions
    await log.aclose()
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0] == 200
    finally:
        db.close()


async def test_a_finished_outcome_is_kept_where_the_garbage_collector_does_not_walk():
    """In memory, a quick op's outcome answers a repeat as it answered the first request, and is kept as
    an untracked tuple: a window of 20,000 of them would otherwise be walked by every full collection."""
    log = RequestLog()
    ok_key, failed_key = ("operator@vertebra.test", "ok"), ("operator@vertebra.test", "failed")
    seen = log.start(ok_key, "fp-ok")
    await log.finish(ok_key, seen, Answer(payload="result", admitted=True), durable=False)
    seen = log.start(failed_key, "fp-failed")
    try:
        try:
            raise FileNotFoundError("/srv/volumes/v1")
        except FileNotFoundError as cause:
            raise BadArguments("no such volume") from cause
    except BadArguments as exc:
        error = exc
    await log.finish(failed_key, seen, Answer(error=error, admitted=True), durable=False)

    gc.collect()  # tuples of strings and numbers are untracked when a collection first meets them
    assert not gc.is_tracked(log._seen[ok_key])
    again = log.get(ok_key)
    assert again.fingerprint == "fp-ok" and again.answer.result().payload == "result"
    again = log.get(failed_key)
    assert again.fingerprint == "fp-failed" and again.answer.result().error is error
    # The failed run's frames are not kept alive with its outcome, nor those of the error it came from,
    # whose message stays.
    assert error.__traceback__ is None and error.__cause__.__traceback__ is None
    assert str(error.__cause__) == "/srv/volumes/v1"
    await log.aclose()
