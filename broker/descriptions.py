"""The broker's ``mesh.describe``: what each op a live agent offers takes, read from that agent.

Agents publish each op's description on a disco node of its own (agents/describe.py). The broker
reads it from a live agent offering the op, once per caps hash: agents with one caps hash serve the
same ops, so the answer of one stands for all of them. The CLI's ``vertebra help`` and the chat bot
ask here, so neither imports any kind's code. The broker's own ops it describes from its declarations.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from slixmpp.exceptions import IqError, IqTimeout

from agents import describe
from agents.agent import Call
from agents.errors import BadArguments, UnknownOp
from agents.ops import Arg, op

from .directory import CAPS_CACHE, BoundedMap, Capabilities

log = logging.getLogger(__name__)

DESCRIBE_TIMEOUT = 4.0  # seconds one agent has to answer a disco query; mesh.describe's deadline is 5


class OpDescriptions:
    """A component of the broker (broker/service.py): ``mesh.describe``, and the descriptions
    learned from agents, cached per caps hash."""

    def __init__(self, broker: Any) -> None:
        self.directory = broker.directory
        self.ops: dict[str, Any] = broker.ops  # the broker's own, described from their declarations
        self.xmpp = broker.xmpp
        # Keyed by the directory's capabilities, one per caps hash (bounded as the directory's cache).
        self._descriptions: BoundedMap[tuple[Capabilities, str], dict[str, Any]] = BoundedMap(CAPS_CACHE)
        self._summaries: BoundedMap[Capabilities, dict[str, str]] = BoundedMap(CAPS_CACHE)

    @op("mesh.describe", effect="read", deadline=5, scope="one")
    async def describe_op(self, call: Call,
                          op: Annotated[str, Arg("the op to describe; empty: list every op with its summary")] = ""
                          ) -> Any:
        """Describe an op (its arguments and facts) as a live agent offering it publishes it."""
        if not op:
            return await self.op_summaries()
        return await self.op_description(op)

    async def op_description(self, name: str) -> dict[str, Any]:
        """The description of ``name`` (as ``OpSpec.describe()``) from the broker or a live agent offering it."""
        if name in self.ops:
            # Marked when only the broker serves it (mesh.alerts): sent to the broker, as discovery finds
            # agents alone; an op agents serve too (job.status) goes to them as before.
            return self.ops[name].describe() | ({} if self.directory.discover(name) else {"broker": True})
        entries = self.directory.discover(name)
        if not entries:
            raise UnknownOp(f"no live agent offers an op named {name!r}; `mesh.describe` with no op lists"
                            " those that are offered")
        for entry in entries:  # the first that answers; each caps hash is asked once
            cached = self._descriptions.get((entry.caps, name))
            if cached is not None:
                return cached
            try:
                found = await describe.fetch_description(self.xmpp, entry.jid, name, DESCRIBE_TIMEOUT)
            except (IqError, IqTimeout, BadArguments) as exc:
                log.warning("%s did not describe %s: %s", entry.jid, name, exc)
                continue
            self._descriptions[(entry.caps, name)] = found
            return found
        raise UnknownOp(f"no live agent offering {name!r} described it; try again when one is back")

    async def op_summaries(self) -> list[dict[str, Any]]:
        """Every op the broker and the live agents offer, with its summary, sorted by name; the
        broker's own are marked ``"broker": true`` (sent to the broker, not found by discovery)."""
        out = {name: spec.summary for name, spec in self.ops.items() if not spec.internal}
        by_caps: dict[Capabilities, list[str]] = {}
        for entry in self.directory.entries():
            by_caps.setdefault(entry.caps, []).append(entry.jid)

        async def summaries(caps: Capabilities, jids: list[str]) -> dict[str, str]:
            cached = self._summaries.get(caps)
            if cached is not None:
                return cached
            for jid in jids:
                try:
                    found = await describe.fetch_summaries(self.xmpp, jid, DESCRIBE_TIMEOUT)
                except (IqError, IqTimeout) as exc:
                    log.warning("%s did not list its ops: %s", jid, exc)
                    continue
                self._summaries[caps] = found
                return found
            return {name: "" for name in caps.ops}  # named by its caps, described by nobody now

        for found in await asyncio.gather(*(summaries(c, j) for c, j in by_caps.items())):
            for name, summary in found.items():
                out[name] = out.get(name) or summary
        return [{"name": name, "summary": out[name], **({"broker": True} if name in self.ops else {})}
                for name in sorted(out)]
