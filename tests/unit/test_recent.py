"""The broker's recent items (alerts, storage notices, fencing events): bounded, numbered in order,
and every listener told of each new item even when another listener fails."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from broker.recent import Recent


@dataclass(frozen=True)
class Item:
    seq: int
    text: str


def test_keeps_the_last_items_numbered_in_order() -> None:
    recent: Recent[Item] = Recent("item", keep=3)
    for text in "abcde":
        recent.add(Item(recent.next_seq(), text))
    assert [(i.seq, i.text) for i in recent] == [(3, "c"), (4, "d"), (5, "e")]
    assert len(recent) == 3
    assert [i.text for i in recent.after(3)] == ["d", "e"]
    assert recent.after(5) == []


def test_keep_zero_only_tells_listeners() -> None:
    recent: Recent[dict] = Recent("event")
    seen: list[dict] = []
    recent.listen(seen.append)
    recent.add({"seq": 7})
    assert seen == [{"seq": 7}] and list(recent) == [] and not recent


def test_a_failing_listener_does_not_stop_the_others(caplog) -> None:
    recent: Recent[Item] = Recent("alert", keep=10)
    seen: list[str] = []

    def broken(item: Item) -> None:
        raise RuntimeError("broken listener")

    recent.listen(broken)
    recent.listen(lambda item: seen.append(item.text))
    with caplog.at_level(logging.ERROR):
        recent.add(Item(recent.next_seq(), "disk full"))
    assert seen == ["disk full"] and [i.text for i in recent] == ["disk full"]
    assert "alert listener failed" in caplog.text
