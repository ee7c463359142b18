"""The ops room's coalescing: a storm of alerts becomes one short message per interval."""

from __future__ import annotations

import asyncio

from broker.alerts import Alert
from broker.room import Coalescer, alert_line


async def test_a_storm_is_coalesced_into_one_message_per_interval():
    sent: list[str] = []
    c = Coalescer(sent.append, interval=0.05, max_lines=4)
    for i in range(30):
        c.post(("alert", f"h{i}", "disk"), f"CRITICAL: disk on h{i}", "CRITICAL" if i % 3 else "WARNING")
    c.post(("alert", "h0", "disk"), "OK: disk on h0 (was CRITICAL)", "OK")  # newer news about h0 replaces it
    await asyncio.sleep(0.1)
    assert len(sent) == 1
    lines = sent[0].splitlines()
    assert lines[:3] == ["CRITICAL: disk on h1", "CRITICAL: disk on h2", "CRITICAL: disk on h3"]
    assert lines[3] == "... and 27 more: 18 CRITICAL, 8 WARNING, 1 OK"
    assert not any("CRITICAL: disk on h0" in line for line in lines)


async def test_posts_after_a_message_wait_for_the_interval():
    sent: list[str] = []
    c = Coalescer(sent.append, interval=0.2, max_lines=4)
    c.post("a", "first")
    await asyncio.sleep(0.05)
    c.post("b", "second")
    c.post("c", "third")
    await asyncio.sleep(0.05)
    assert sent == ["first"]  # the next two wait out the interval, then go together
    await asyncio.sleep(0.3)
    assert sent == ["first", "second\nthird"]


def test_alert_line():
    a = Alert(1, 0.0, "mon@x", "load", "db1", "WARNING", "", "LOAD WARNING - 4.2")
    assert alert_line(a) == "WARNING: load on db1: LOAD WARNING - 4.2"
