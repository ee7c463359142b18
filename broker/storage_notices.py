"""Storage notices: what a storage agent must tell operators without being a monitor, such as
"clone dev-alice expires in 10 minutes" and "clone dev-alice expired and was destroyed".

A live storage agent of the mesh (its configured kind, as for mesh.volumes; the op's declaration says so
and the broker's sender rule checks it) sends ``mesh.storage.notice``;
the broker keeps the recent ones (``mesh.storage.notices``) and hands each to its listeners, which is how
the ops room shows them (``StorageNotices.on_storage_notice``). It is separate from mesh.alert, which
only monitors may send: a notice is not a check's state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Callable

from agents.agent import Call
from agents.ops import Arg, op
from agents.storage.names import NAME_PATTERN

from .recent import Recent

log = logging.getLogger(__name__)

NOTICE_OP = "mesh.storage.notice"
RECENT_NOTICES = 200


@dataclass(frozen=True)
class StorageNotice:
    seq: int
    at: float
    source: str          # the storage agent's bare JID
    clone: str
    owner: str
    text: str


class StorageNotices:
    """A component of the broker (broker/service.py): the notice ops and the recent notices."""

    def __init__(self) -> None:
        self.recent: Recent[StorageNotice] = Recent("storage notice", keep=RECENT_NOTICES)

    def on_storage_notice(self, listener: Callable[[StorageNotice], Any]) -> None:
        """Call ``listener`` with each new storage notice (the ops room shows them)."""
        self.recent.listen(listener)

    @op(NOTICE_OP, effect="change", deadline=5, sender="live agent", sender_kinds=("storage",))
    async def storage_notice(self, call: Call,
                             text: Annotated[str, Arg("what operators should know", pattern=r"[^\x00]{1,1024}")],
                             clone: Annotated[str, Arg("the clone it is about", pattern=NAME_PATTERN)],
                             owner: Annotated[str, Arg("the clone's owner (bare JID)",
                                                       pattern=r"[^\x00-\x20]{1,255}")]) -> dict:
        """(For storage agents.) Post a notice about a clone to the operators, e.g. its coming expiry."""
        notice = StorageNotice(self.recent.next_seq(), time.time(), call.caller, clone, owner, text)
        log.warning("storage notice %d from %s: %s", notice.seq, notice.source, text)
        self.recent.add(notice)
        return {"seq": notice.seq}

    @op("mesh.storage.notices", effect="read", deadline=5)
    async def recent_storage_notices(self, call: Call,
                                     since: Annotated[int, Arg("only notices after this sequence number",
                                                               min=0)] = 0) -> list:
        """The recent storage notices the broker keeps, oldest first."""
        return [asdict(n) for n in self.recent.after(since)]
