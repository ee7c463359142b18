"""Where volumes are: storage agents report the volumes they hold, so a call on /volume/NAME is
discovered at the one agent that holds NAME.

Volumes come and go with ops, so they are not part of an agent's advertisement: its caps (and the
resources the mesh file configures for it, which admission checks every advertisement against) stay
what configuration says. Instead each storage agent sends ``mesh.volumes`` with the full list of its
volume names to every broker instance that has acknowledged it, and again after each op that creates
or destroys a volume. The broker files them as ``/volume/NAME`` locations beside that agent's entry in
the directory (``Directory.locate``), and they go when the entry goes. Locations only route calls:
every agent still authorizes each request it receives itself, over the resources the request names.

Who may report: a live agent in the directory that the mesh file configures as a storage agent (its
roster kind, never what it advertises), for its own entries only, never on someone's behalf: the
op's declaration says so (``sender="live agent"``) and the broker's sender rule checks it.
"""

from __future__ import annotations

from typing import Annotated, Mapping

from agents.agent import Call
from agents.errors import BadArguments, Denied
from agents.ops import Arg, op
from agents.storage.locations import MAX_REPORTED, REPORT_OP, volume_path
from agents.storage.names import NAME_PATTERN

from .directory import Admission, Directory

REPORTING_KIND = "storage"


class Volumes:
    """A component of the broker (broker/service.py): the ``mesh.volumes`` op, filing what storage
    agents report in the broker's directory."""

    def __init__(self, directory: Directory, roster: Mapping[str, Admission]) -> None:
        self.directory = directory
        self.roster = roster  # the broker's: who the mesh file configures, by lowercased bare JID

    def _listed(self, bare: str) -> list[str]:
        """Full JIDs of the directory's entries for one account whose configured kind is storage."""
        admission = self.roster.get(bare.lower())
        if admission is None or admission.kind != REPORTING_KIND:
            return []
        return [e.jid for e in self.directory.entries() if e.jid.split("/", 1)[0].lower() == bare.lower()]

    @op(REPORT_OP, effect="change", deadline=5, sender="live agent", sender_kinds=(REPORTING_KIND,))
    async def volumes_report(self, call: Call,
                             volumes: Annotated[list[str], Arg("every volume, clone and replica the reporting"
                                                               " storage agent holds", pattern=NAME_PATTERN)] = (),  # type: ignore[assignment]
                             ) -> dict:
        """(For storage agents.) Report the volumes this agent holds; replaces its previous report."""
        if len(volumes) > MAX_REPORTED:
            raise BadArguments(f"a report may name at most {MAX_REPORTED} volumes, got {len(volumes)}",
                               argument="volumes")
        jids = self._listed(call.caller)
        if not jids:
            raise Denied(f"{call.caller} is not a live storage agent of this mesh; only those report volumes")
        paths = frozenset(volume_path(v) for v in volumes)
        for jid in jids:
            self.directory.locate(jid, paths)
        return {"located": len(paths)}
