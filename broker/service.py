"""The broker actor: keeps the directory from presence and caps, and answers discovery as ops.

Agents send the broker a directed presence carrying their caps hash; the XMPP server then tells the
broker, with an unavailable presence, the moment an agent's session ends. For each caps hash not
seen before the broker asks that agent for disco#info once, checks the hash against the answer, and
files the agent's ops and resources under it. When the broker itself (re)starts it sends a directed
presence to every agent it has known, which each answers with its own, so a restarted broker has
the whole directory back without waiting for agents to reconnect. The broker answers each newly
listed agent with a directed presence of its own; an agent repeats its announcement, with backoff,
until some broker has answered, so an agent that came up before the broker is not lost.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Annotated, Any

from slixmpp import Presence
from slixmpp.exceptions import IqError, IqTimeout

from agents.agent import AGENT_FORM, Agent, Call, info_op
from agents.ops import OP_FEATURE_PREFIX, Arg, op
from agents.resources import check as check_resource, BadResource
from agents.errors import BadArguments

from .alerts import AlertsMixin
from .fencing import FencingMixin
from .directory import Capabilities, Directory
from .leadership import LeadershipMixin
from .policy import PolicyDistribution
from .workflows import WorkflowMixin

log = logging.getLogger(__name__)

DISCO_TIMEOUT = 10.0
# The hash functions caps are checked with: XEP-0115 names more, but slixmpp's caps plugin computes
# only sha-1 (and md5, which is refused), so a sha-256 hash could never be verified here.
CAPS_HASHES = {"sha-1"}
BAD_CAPS_MEMORY = 60.0  # seconds a caps hash that failed to verify is not asked about again
HELLO_AGAIN = 3.0  # seconds after a new session until the second hello to agents not yet listed


class Broker(FencingMixin, WorkflowMixin, LeadershipMixin, AlertsMixin, PolicyDistribution, Agent):
    kind = "broker"
    resource = "broker"

    info = info_op("mesh")

    def __init__(self, *args: Any, shared_dir: Path | None = None, **kwargs: Any) -> None:
        # Set first: the mixins open their stores in it. One instance per cluster node each has a
        # state_dir of its own (audit log, request log) and all share shared_dir (workflows, leases).
        self._shared_dir = shared_dir
        super().__init__(*args, **kwargs)
        self.directory = Directory()
        self._present: set[str] = set()
        self._learning: dict[str, asyncio.Future[Capabilities | None]] = {}
        self._bad_caps: dict[str, float] = {}  # caps hash -> loop time until which it is ignored
        self._known = _KnownAgents(self.shared_dir / "broker.sqlite" if self.shared_dir else None)
        caps = self.xmpp.plugin["xep_0115"]
        # slixmpp's caps plugin would also query every new hash; the directory does that itself.
        self.xmpp.del_event_handler("entity_caps", caps._process_caps)
        self.xmpp.del_event_handler("presence_available", self._on_broker_presence)
        self.xmpp.del_event_handler("presence_unavailable", self._on_broker_presence)
        self.xmpp.add_event_handler("presence_available", self._on_available)
        self.xmpp.add_event_handler("presence_unavailable", self._on_unavailable)

    async def on_session(self) -> None:
        # A new session (not a resumed one): the server has forgotten our directed presences.
        self.directory.clear()
        self._present.clear()
        caps = self.xmpp.plugin["xep_0115"]
        await caps.update_caps(broadcast=False)
        self._caps_ver = await caps.get_verstring(self.jid)
        self.presence()  # available, so presence sent to our bare JID reaches us
        self._hello_known()
        # Another instance of this broker may be learning an agent that announced itself just before
        # this one came online (and so never reached it): a second hello a little later finds it.
        asyncio.get_running_loop().call_later(HELLO_AGAIN, self._hello_known, True)
        self.start_leading()

    def _hello_known(self, unlisted_only: bool = False) -> None:
        """Directed presence to every agent any instance of this broker has seen; each answers with
        its own, which lists it here."""
        if not self.online and unlisted_only:
            return  # stopped or lost in the meantime: the next session says hello again anyway
        listed = {e.jid.split("/")[0] for e in self.directory.entries()} if unlisted_only else set()
        for bare in self._known.all():
            if bare not in listed:
                self.presence(bare)

    @property
    def shared_dir(self) -> Path | None:
        """Where the state all instances of this broker share lives (by default its own state_dir)."""
        return self._shared_dir or self.state_dir

    # -- the ops the broker serves ------------------------------------------------------------

    @op("mesh.discover", deadline=5)
    async def discover(self, call: Call,
                       op: Annotated[str, Arg("only agents offering this op (all ops if empty)")] = "",
                       resources: Annotated[list[str], Arg("only agents holding these resources,"
                                                           " their ancestors or descendants")] = ()) -> list:
        """Find the live agents that offer an op on resources."""
        try:
            wanted = [check_resource(r) for r in resources]
        except BadResource as exc:
            raise BadArguments(str(exc), argument="resources") from None
        # Only what a caller needs to address and scope each target: a thousand agents must fit one answer.
        return [{"jid": e.jid, "resources": list(e.caps.resources)} for e in self.directory.discover(op or None, wanted)]

    @op("mesh.agents", deadline=5)
    async def agents(self, call: Call) -> list:
        """List every live agent with its kind, ops and resources."""
        return [e.to_dict() for e in self.directory.entries()]

    # -- presence and caps -------------------------------------------------------------------

    async def _on_available(self, pres: Presence) -> None:
        jid = str(pres["from"])
        ver = pres["caps"]["ver"]
        if pres["from"].bare == self.jid.bare:
            if jid != str(self.jid):
                self.sibling_seen(jid, available=True)
            return
        if not ver:
            return
        self._present.add(jid)
        caps = self.directory.caps.get(ver) or await self._learn(jid, pres["caps"]["node"], ver,
                                                                 pres["caps"]["hash"])
        if caps is not None and jid in self._present:
            if self.directory.add(jid, caps):
                # Our presence back acknowledges the agent (it stops repeating its own) and makes the
                # server tell the agent when this broker goes.
                self.presence(jid)
                self.policy_on_join(jid)
            self._known.add(pres["from"].bare)

    def _on_unavailable(self, pres: Presence) -> None:
        jid = str(pres["from"])
        if pres["from"].bare == self.jid.bare and jid != str(self.jid):
            self.sibling_seen(jid, available=False)
            return
        self._present.discard(jid)
        if self.directory.remove(jid):
            log.info("agent %s left the directory", jid)

    async def _learn(self, jid: str, node: str, ver: str, hash_name: str) -> Capabilities | None:
        """One disco#info query per caps hash, however many agents present it at once."""
        pending = self._learning.get(ver)
        if pending is not None:
            return await asyncio.shield(pending)
        now = asyncio.get_running_loop().time()
        if self._bad_caps.get(ver, 0.0) > now:
            return None  # an agent repeating a bad announcement costs no new query
        fut: asyncio.Future[Capabilities | None] = asyncio.get_running_loop().create_future()
        self._learning[ver] = fut
        caps = None
        try:
            caps = await self._query(jid, node, ver, hash_name)
        finally:
            del self._learning[ver]
            fut.set_result(caps)
        if caps is not None:
            self.directory.caps[ver] = caps
        else:
            self._bad_caps[ver] = now + BAD_CAPS_MEMORY
        return caps

    async def _query(self, jid: str, node: str, ver: str, hash_name: str) -> Capabilities | None:
        plugin = self.xmpp.plugin["xep_0115"]
        try:
            iq = await self.xmpp.plugin["xep_0030"].get_info(jid=jid, node=f"{node}#{ver}", timeout=DISCO_TIMEOUT)
        except (IqError, IqTimeout) as exc:
            log.warning("disco#info of %s failed: %s", jid, exc)
            return None
        info = iq["disco_info"]
        if hash_name not in CAPS_HASHES or plugin.generate_verstring(info, hash_name) != ver:
            log.warning("%s presented caps %s that do not match its disco#info; ignored", jid, ver)
            return None
        form_class = self.xmpp.plugin["xep_0004"].stanza.Form
        form = next((f for f in info["substanzas"] if isinstance(f, form_class)
                     and AGENT_FORM in _values(f.get_values().get("FORM_TYPE"))), None)
        if form is None:
            return None  # not a Vertebra agent
        values = form.get_values()
        ops = frozenset(f[len(OP_FEATURE_PREFIX):] for f in info["features"] if f.startswith(OP_FEATURE_PREFIX))
        return Capabilities(kind=str(values.get("kind") or "agent"), ops=ops,
                            resources=tuple(_values(values.get("resources"))))


def _values(value: Any) -> list[str]:
    """A form field's values as a list, whichever shape slixmpp returns them in."""
    if value is None:
        return []
    return value.splitlines() if isinstance(value, str) else [str(v) for v in value]


class _KnownAgents:
    """The bare JIDs of agents seen before, kept on disk so a restarted broker can greet them."""

    def __init__(self, path: Path | None) -> None:
        self._db = sqlite3.connect(path or ":memory:", isolation_level=None, timeout=30)
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")  # the broker's instances share it
        self._db.execute("CREATE TABLE IF NOT EXISTS known_agents (jid TEXT PRIMARY KEY)")
        self._cache = {row[0] for row in self._db.execute("SELECT jid FROM known_agents")}

    def add(self, jid: str) -> None:
        if jid not in self._cache:
            self._cache.add(jid)
            self._db.execute("INSERT OR IGNORE INTO known_agents VALUES (?)", (jid,))

    def all(self) -> list[str]:
        """Read afresh: the broker's other instances add to the same table."""
        self._cache = {row[0] for row in self._db.execute("SELECT jid FROM known_agents")}
        return sorted(self._cache)
