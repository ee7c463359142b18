"""The broker's small shared stores: what they keep across instances and restarts, and that their
statements run on the store's own thread, never on the event loop's."""

from __future__ import annotations

import threading

from broker.constraints import RateLimits
from broker.directory import KnownAgents
from broker.fencing import FenceLedger


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


async def test_rate_limits_and_the_fence_ledger_write_off_the_event_loop(tmp_path):
    limits, ledger = RateLimits(tmp_path / "rates.sqlite"), FenceLedger(tmp_path / "fencing.sqlite")
    loop_thread, threads = threading.get_ident(), set()
    for db in (limits.store.db, ledger.store.db):
        db.set_trace_callback(lambda _sql: threads.add(threading.get_ident()))
    assert (await limits.take("fence", 1, 60, "alice")).ok and not (await limits.take("fence", 1, 60, "bob")).ok
    event = {"event": "outcome", "action": "off", "cluster": "c1", "node": "n1", "ok": True, "at": 100.0,
             "state": "off", "requester": "pcmk@x.test", "identities": ["db1@x.test"], "id": "e1"}
    assert await ledger.record("f@x.test", event) == (1, "fenced", True)
    assert [f.node for f in await ledger.fenced()] == ["n1"] and len(await ledger.events()) == 1
    assert threads and loop_thread not in threads
    # What the synchronous fenced-identity rule reads (answered at once): the epoch recorded here.
    assert ledger.written_elsewhere() and [f.node for f in ledger.fenced_now()] == ["n1"]
    # Which state of the ledger a push is: its id (kept in the file, so another instance and a restart
    # read the same) and the newest event's number; a ledger made anew has another id.
    other = FenceLedger(tmp_path / "fencing.sqlite")
    assert await ledger.fenced_state() == (other.id, 1, await ledger.fenced())
    anew = FenceLedger(tmp_path / "anew.sqlite")
    assert anew.id not in ("", ledger.id)
    await anew.aclose()
    await other.aclose()
    await limits.aclose()
    await ledger.aclose()
