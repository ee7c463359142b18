"""Storage notices: what a storage agent must tell operators without being a monitor (issue 14), such as
"clone dev-alice expires in 10 minutes" and "clone dev-alice expired and was destroyed".

A live storage agent of the mesh (its configured kind, as for mesh.volumes) sends ``mesh.storage.notice``;
the broker keeps the recent ones (``mesh.storage.notices``) and hands each to its listeners, which is how
the ops room shows them (``StorageNoticesMixin.on_storage_notice``). It is separate from mesh.alert, which
only monitors may send: a notice is not a check's state.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Callable, Sequence

from agents.agent import Call
from agents.authz import Authorizer, Decision
from agents.errors import Denied
from agents.ops import Arg, OpSpec, op
from agents.storage.names import NAME_PATTERN

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


class StorageMayNotify:
    """Admit ``mesh.storage.notice`` from live storage agents only; ask the inner authorizer otherwise."""

    def __init__(self, inner: Authorizer, senders: Callable[[], set[str]]) -> None:
        self.inner = inner
        self.senders = senders

    def decide(self, caller: str, spec: OpSpec, resources: Sequence[str]) -> Decision:
        if spec.name == NOTICE_OP:
            if caller.lower() in self.senders():
                return Decision(True, "live storage agents of the mesh post storage notices")
            return Decision(False, f"{caller} is not a live storage agent of this mesh; only those post "
                                   f"storage notices")
        return self.inner.decide(caller, spec, resources)


class StorageNoticesMixin:
    """Mixed into the broker before VolumesMixin (whose _live_storage says who is a storage agent)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.storage_notices: deque[StorageNotice] = deque(maxlen=RECENT_NOTICES)
        self._notice_seq = itertools.count(1)
        self._notice_listeners: list[Callable[[StorageNotice], Any]] = []
        self.authorizer = StorageMayNotify(self.authorizer, self._live_storage)  # type: ignore[has-type,attr-defined]

    def on_storage_notice(self, listener: Callable[[StorageNotice], Any]) -> None:
        """Call ``listener`` with each new storage notice (the ops room shows them)."""
        self._notice_listeners.append(listener)

    @op(NOTICE_OP, effect="change", deadline=5)
    async def storage_notice(self, call: Call,
                             text: Annotated[str, Arg("what operators should know", pattern=r"[^\x00]{1,1024}")],
                             clone: Annotated[str, Arg("the clone it is about", pattern=NAME_PATTERN)],
                             owner: Annotated[str, Arg("the clone's owner (bare JID)",
                                                       pattern=r"[^\x00-\x20]{1,255}")]) -> dict:
        """(For storage agents.) Post a notice about a clone to the operators, e.g. its coming expiry."""
        if call.via:
            raise Denied(f"{NOTICE_OP} is never sent on someone's behalf")
        notice = StorageNotice(next(self._notice_seq), time.time(), call.caller, clone, owner, text)
        self.storage_notices.append(notice)
        log.warning("storage notice %d from %s: %s", notice.seq, notice.source, text)
        for listener in list(self._notice_listeners):
            try:
                listener(notice)
            except Exception:  # a broken listener must not lose the notice for the others
                log.exception("storage notice listener failed")
        return {"seq": notice.seq}

    @op("mesh.storage.notices", effect="read", deadline=5)
    async def recent_storage_notices(self, call: Call,
                                     since: Annotated[int, Arg("only notices after this sequence number",
                                                               min=0)] = 0) -> list:
        """The recent storage notices the broker keeps, oldest first."""
        return [asdict(n) for n in self.storage_notices if n.seq > since]
