"""The workflow lease broker instances share (broker.leadership.Lease), on a real SQLite file."""

from __future__ import annotations

import time

from broker.leadership import Lease


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pair(tmp_path, clock):
    path = tmp_path / "leader.sqlite"
    return Lease(path, "b@x/broker", term=6, clock=clock), Lease(path, "b@x/broker-2", term=6, clock=clock)


async def test_one_holder_at_a_time_and_renewal_keeps_it(tmp_path):
    clock = Clock()
    one, two = pair(tmp_path, clock)
    assert await one.take() and not await two.take()
    clock.now += 5
    assert await one.take()  # renewed: a further 6 s from now
    clock.now += 5
    assert not await two.take() and await one.current() == "b@x/broker"


async def test_an_expired_lease_is_taken_over(tmp_path):
    clock = Clock()
    one, two = pair(tmp_path, clock)
    assert await one.take()
    clock.now += 6.5
    assert await one.current() is None
    assert await two.take() and await two.current() == "b@x/broker-2"
    assert not await one.take()  # the old holder, back, does not take it back while it is renewed


async def test_a_holder_the_server_says_has_gone_is_replaced_at_once(tmp_path):
    clock = Clock()
    one, two = pair(tmp_path, clock)
    assert await one.take()
    assert not await two.take(gone="b@x/someone-else")
    assert await two.take(gone="b@x/broker") and await two.current() == "b@x/broker-2"


async def test_release_frees_it_only_for_its_holder(tmp_path):
    clock = Clock()
    one, two = pair(tmp_path, clock)
    assert await one.take()
    await two.release()
    assert await one.current() == "b@x/broker"
    await one.release()
    assert await one.current() is None and await two.take()


async def test_the_term_grows_with_each_new_holder_and_stays_while_renewed(tmp_path):
    clock = Clock()
    one, two = pair(tmp_path, clock)
    first = await one.take()
    clock.now += 5
    assert await one.take() == first  # renewed without a gap: the same lead
    await one.release()
    second = await two.take()
    assert second is not None and second > first
    clock.now += 6.5  # two's lease runs out; one takes it back: a new lead, a newer term
    third = await one.take()
    assert third is not None and third > second


async def test_a_holder_counts_on_its_lease_only_as_long_as_it_was_asked_for(tmp_path):
    clock = Clock()
    one, _ = pair(tmp_path, clock)
    before = time.monotonic()
    assert await one.take()
    assert before + 6 <= one.valid_until <= time.monotonic() + 6


async def test_the_lease_s_statements_run_off_the_event_loop(tmp_path):
    import threading

    one, _ = pair(tmp_path, Clock())
    loop_thread, threads = threading.get_ident(), set()
    one.store.db.set_trace_callback(lambda _sql: threads.add(threading.get_ident()))
    assert await one.take() and await one.current() == "b@x/broker"
    await one.release()
    assert threads and loop_thread not in threads
    await one.aclose()
