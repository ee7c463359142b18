"""Recent items of one kind the broker takes in (alerts, storage notices, fencing events): the last
few kept in memory, numbered as they come, and listeners told of each new one (the operators' room).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import Any, Callable, Generic, Iterator, Protocol, TypeVar

log = logging.getLogger(__name__)


class Numbered(Protocol):
    @property
    def seq(self) -> int: ...


T = TypeVar("T")
N = TypeVar("N", bound=Numbered)


class Recent(Generic[T]):
    """The last ``keep`` items added (none when 0: the items are kept elsewhere, e.g. on disk),
    oldest first, and the listeners called with each new one. ``what`` names an item in logs."""

    def __init__(self, what: str, keep: int = 0) -> None:
        self.what = what
        self._items: deque[T] = deque(maxlen=keep)
        self._seq = itertools.count(1)
        self._listeners: list[Callable[[T], Any]] = []

    def next_seq(self) -> int:
        """The next item's number: 1, 2, ... (for items that take their number here)."""
        return next(self._seq)

    def listen(self, listener: Callable[[T], Any]) -> None:
        """Call ``listener`` with each item added from now on."""
        self._listeners.append(listener)

    def add(self, item: T) -> T:
        """Keep ``item`` (dropping the oldest beyond ``keep``) and tell every listener."""
        self._items.append(item)
        for listener in list(self._listeners):
            try:
                listener(item)
            except Exception:  # a broken listener must not lose the item for the others
                log.exception("%s listener failed", self.what)
        return item

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def after(self: Recent[N], seq: int) -> list[N]:
        """The kept items numbered after ``seq``, oldest first."""
        return [item for item in self._items if item.seq > seq]
