"""Alerts: monitor agents post hard state changes to the broker, which keeps the recent ones.

``mesh.alert`` is declared here, in a component of the broker; ``mesh.alerts`` lists what was kept,
for operators; the chat bot's operators' room subscribes with :meth:`Alerts.on_alert` to show each
one there (broker/room.py). The poster is the caller's JID as the server stamped it, never a field
of the alert.

Who may post: every live agent in the broker's directory that the mesh file configures as a
monitor (a monitor agent reporting on its own host is not an operator, and the mesh file's admins
are not the right list for it); anyone else is up to the mesh's policy, as for every other op. The
declaration says so (``sender_kinds=("monitor",)``) and the broker's sender rule checks it; the kind
is the broker's configuration (its roster), never what the agent advertises.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Callable, Literal

from agents.agent import Call
from agents.ops import Arg, Field, Result, op

from .recent import Recent

log = logging.getLogger(__name__)

RECENT_ALERTS = 500
_STATE = Literal["OK", "WARNING", "CRITICAL", "UNKNOWN"]


@dataclass(frozen=True)
class Alert:
    seq: int
    at: float
    source: str  # bare JID of the agent that posted it
    check: str
    host: str
    state: str
    previous: str
    text: str


ALERTING_KIND = "monitor"


class Alerts:
    """A component of the broker (broker/service.py): the alert ops and the recent alerts."""

    def __init__(self) -> None:
        self.recent: Recent[Alert] = Recent("alert", keep=RECENT_ALERTS)

    def on_alert(self, listener: Callable[[Alert], Any]) -> None:
        """Call ``listener`` with each new alert (the operator chat shows them)."""
        self.recent.listen(listener)

    @op("mesh.alert", effect="change", deadline=5, sender_kinds=(ALERTING_KIND,))
    async def alert(self, call: Call,
                    check: Annotated[str, Arg("the check whose state changed", pattern=r"[^\x00-\x1f]{1,128}")],
                    host: Annotated[str, Arg("the host it checks", pattern=r"[^\x00-\x1f]{1,255}")],
                    state: Annotated[_STATE, Arg("the new hard state")],
                    previous: Annotated[str, Arg("the hard state before (empty for a first problem)",
                                                 pattern=r"(OK|WARNING|CRITICAL|UNKNOWN)?")] = "",
                    text: Annotated[str, Arg("the check's short text", pattern=r"[^\x00]{0,1024}")] = "") -> dict:
        """Post a check's hard state change; the broker keeps it and tells operators."""
        alert = Alert(self.recent.next_seq(), time.time(), call.caller, check, host, state, previous, text)
        log.info("alert %d from %s: %s on %s %s -> %s", alert.seq, alert.source, check, host, previous or "-", state)
        self.recent.add(alert)
        return {"seq": alert.seq}

    @op("mesh.alerts", effect="read", deadline=5, result=Result(
        Field("seq", "#"), Field("at", "time", "time"), Field("host"), Field("check"), Field("state", display="state"),
        Field("previous", "was", "state"), Field("source", "from"), Field("text"), empty="no alerts"))
    async def recent_alerts(self, call: Call,
                            since: Annotated[int, Arg("only alerts after this sequence number", min=0)] = 0,
                            limit: Annotated[int, Arg("at most this many, newest last", min=1,
                                                      max=RECENT_ALERTS)] = 50) -> list:
        """The recent alerts the broker keeps, oldest first."""
        found = [asdict(a) for a in self.recent.after(since)]
        return found[-limit:]
