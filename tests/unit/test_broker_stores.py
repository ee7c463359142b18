"""The broker's small shared stores: what they keep across instances and restarts, and that their
statements run on the store's own thread, never on the event loop's."""

from __future__ import annotations

import threading

from broker.directory import KnownAgents


async def test_known_agents_are_shared_and_kept_off_the_event_loop(tmp_path):
    path = tmp_path / "broker.sqlite"
    mine, other = KnownAgents(path), KnownAgents(path)  # two instances of a broker share the file
    loop_thread, threads = threading.get_ident(), set()
    mine.store.db.set_trace_callback(lambda _sql: threads.add(threading.get_ident()))
    mine.add("a@example.net")
    mine.add("a@example.net")  # seen again: nothing new
    assert await mine.all() == ["a@example.net"]  # read after the write handed over before it
    other.add("b@example.net")
    assert await other.all() == ["a@example.net", "b@example.net"]  # read afresh: the other's too
    assert await mine.all() == ["a@example.net", "b@example.net"]
    assert threads and loop_thread not in threads
    await mine.aclose()
    await other.aclose()
    again = KnownAgents(path)  # a restarted broker greets them
    assert await again.all() == ["a@example.net", "b@example.net"]
    await again.aclose()
