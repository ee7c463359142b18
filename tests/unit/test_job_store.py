"""The agent's job store (agents/jobs.py) on a real SQLite file: a job still running when the store is
opened again was cut off and is found (to be followed, or ended as interrupted, once), with the work it
named; an ended job is kept for the retention window and deleted at the next start after it; only ended,
undelivered jobs whose caller still waits are sent again."""

from __future__ import annotations

import time

from agents import protocol
from agents.jobs import RETENTION, Job, JobStore


def job(job_id: str, **kw: object) -> Job:
    fields: dict = dict(op="sample.wait", caller="op@d", sender="op@d", reply_to="op@d/client-1", rid=f"r-{job_id}",
                        fingerprint="f", accepted_at=time.time(), deadline=time.time() + 60)
    fields.update(kw)
    return Job(job_id, **fields)


async def test_a_running_job_is_interrupted_when_the_store_opens_again(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    await store.accepted(job("cut"))
    await store.accepted(job("done"))
    await store.ended(job("done"), ("ok", "", protocol.encode("fine")))
    await store.aclose()

    again = JobStore(tmp_path / "jobs.sqlite")
    left = again.left_running()
    assert [j.job for j in left] == ["cut"]
    again.interrupt(left[0], "sample1")
    cut = await again.get("cut")
    assert cut is not None and cut.state == "ended" and (cut.status, cut.condition) == ("failed", "interrupted")
    assert "sample1 stopped while running sample.wait as job cut" in cut.describe()["error"]
    assert sorted(j.job for j in await again.undelivered()) == ["cut", "done"]
    await again.delivered(cut)
    assert [j.job for j in await again.undelivered()] == ["done"]
    assert again.left_running() == []
    await again.aclose()


async def test_the_work_a_job_follows_is_found_again_after_the_store_opens_again(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    running = job("replicating")
    await store.accepted(running)
    await store.follows(running, "replication r0123abcd")
    await store.aclose()

    again = JobStore(tmp_path / "jobs.sqlite")
    [left] = again.left_running()
    assert (left.job, left.state, left.work) == ("replicating", "running", "replication r0123abcd")
    await again.aclose()


async def test_ended_jobs_are_kept_for_the_window_and_callers_past_their_deadline_are_not_sent_to(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    old, recent, late = job("old"), job("recent"), job("late", deadline=time.time() - 1)
    for each in (old, recent, late):
        await store.accepted(each)
        await store.ended(each, ("ok", "", protocol.encode(None)))
    old.ended_at = time.time() - RETENTION - 60
    await store.accepted(old)  # rewritten with its end a day and a minute ago
    assert sorted(j.job for j in await store.undelivered()) == ["old", "recent"]
    await store.aclose()

    again = JobStore(tmp_path / "jobs.sqlite")
    assert await again.get("old") is None
    assert (await again.get("recent")) is not None and (await again.get("late")) is not None
    await again.aclose()


async def test_a_caller_attached_by_a_repeat_is_sent_the_outcome_until_its_receipt(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    running = job("shared")
    await store.accepted(running)
    deadline = time.time() + 60
    await store.attach("shared", "op@d/client-2", "r-shared", deadline)
    await store.attach("shared", "op@d/client-3", "r-shared", time.time() - 1)  # stopped waiting
    assert await store.attached("shared") == [("op@d/client-2", "r-shared", deadline)]
    assert await store.attached_undelivered() == []  # still running: nothing to send yet
    await store.ended(running, ("ok", "", protocol.encode("fine")))
    [copy] = await store.attached_undelivered()
    assert (copy.job, copy.reply_to, copy.status, copy.describe()["result"]) == ("shared", "op@d/client-2", "ok",
                                                                                  "fine")
    await store.attached_delivered("shared", "op@d/client-2")
    assert await store.attached_undelivered() == [] and await store.attached("shared") == []
    await store.aclose()
