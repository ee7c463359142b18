"""Workflow constraints over an instance's history: SoD, two-person rule, binding of duty, rate limits."""

from __future__ import annotations

import asyncio
import multiprocessing

from broker.constraints import (APPROVED, PERFORMED, REQUESTED, Event, RateLimits, StepRule, check_approval,
                                check_perform)

FENCE = StepRule("fence", destructive=True)
ALWAYS = lambda jid: True  # noqa: E731


def history(*events: tuple[str, str, str]) -> list[Event]:
    return [Event(kind, step, actor) for kind, step, actor in events]


def test_requester_may_not_approve_their_own_fence():
    h = history((REQUESTED, "fence", "alice"))
    v = check_approval(h, FENCE, "alice")
    assert not v.ok and "separation of duty" in v.reason
    # And an approval that slipped into the history anyway does not count.
    h += history((APPROVED, "fence", "alice"), (APPROVED, "fence", "bob"))
    v = check_perform(h, FENCE, "alice", ALWAYS)
    assert not v.ok and "two-person rule" in v.reason and "has 1 (bob)" in v.reason


def test_the_same_approver_twice_counts_once():
    h = history((REQUESTED, "fence", "alice"), (APPROVED, "fence", "bob"))
    assert not check_approval(h, FENCE, "bob").ok
    h += history((APPROVED, "fence", "bob"))
    assert not check_perform(h, FENCE, "alice", ALWAYS).ok


def test_two_distinct_approvers_let_a_destructive_step_run_once():
    h = history((REQUESTED, "fence", "alice"), (APPROVED, "fence", "bob"), (APPROVED, "fence", "carol"))
    assert check_perform(h, FENCE, "alice", ALWAYS).ok
    h += history((PERFORMED, "fence", "alice"))
    v = check_perform(h, FENCE, "alice", ALWAYS)
    assert not v.ok and "never runs twice" in v.reason


def test_approvals_are_rechecked_at_execution_time():
    h = history((REQUESTED, "fence", "alice"), (APPROVED, "fence", "bob"), (APPROVED, "fence", "carol"))
    v = check_perform(h, FENCE, "alice", lambda jid: jid != "carol")  # carol revoked since approving
    assert not v.ok and "has 1 (bob)" in v.reason


def test_binding_of_duty():
    unfence = StepRule("unfence", bound_to="fence")
    h = history((REQUESTED, "fence", "alice"), (PERFORMED, "fence", "alice"), (REQUESTED, "unfence", "bob"))
    v = check_perform(h, unfence, "bob", ALWAYS)
    assert not v.ok and "binding of duty" in v.reason and "alice" in v.reason
    assert check_perform(h, unfence, "alice", ALWAYS).ok


def test_non_destructive_step_needs_no_approval_but_must_be_requested():
    status = StepRule("status")
    assert not check_perform([], status, "alice", ALWAYS).ok
    assert check_perform(history((REQUESTED, "status", "alice")), status, "alice", ALWAYS).ok


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_rate_limit_counts_within_the_period(tmp_path):
    clock = Clock()
    limits = RateLimits(tmp_path / "rates.db", clock)
    assert [(await limits.take("fence:/cluster/c1", 2, 3600, "a")).ok for _ in range(3)] == [True, True, False]
    clock.now += 3601
    assert (await limits.take("fence:/cluster/c1", 2, 3600, "a")).ok
    assert (await limits.take("fence:/cluster/c2", 2, 3600, "a")).ok  # another key, another count
    await limits.aclose()


def _race(path: str, start, results) -> None:
    limits = RateLimits(path)
    start.wait()
    results.put(asyncio.run(limits.take("fence", 3, 3600, "racer")).ok)
    limits.close()


def test_racing_takers_never_exceed_the_limit(tmp_path):
    path = str(tmp_path / "race.db")
    RateLimits(path).close()
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(path, start, results)) for _ in range(8)]
    for p in procs:
        p.start()
    start.set()
    outcomes = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sorted(outcomes) == [False] * 5 + [True] * 3
