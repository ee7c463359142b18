"""The broker actor: keeps the directory from presence and caps, and answers discovery as ops.

Agents send the broker a directed presence carrying their caps hash; the XMPP server then tells the
broker, with an unavailable presence, the moment an agent's session ends. For each caps hash not
seen before the broker asks that agent for disco#info once, checks the hash against the answer, and
files the agent's ops and resources under it. When the broker itself (re)starts it sends a directed
presence to every agent it has known, which each answers with its own, so a restarted broker has
the whole directory back without waiting for agents to reconnect. The broker answers each newly
listed agent with a directed presence of its own; an agent repeats its announcement, with backoff,
until some broker has answered, so an agent that came up before the broker is not lost.

Only agents that configuration names are listed: the broker's ``roster`` (from the mesh file's
``agents:``, or ``admit``) gives each bare JID its kind and the resources it may claim, and an
advertisement that is not admitted (an account the mesh file does not name, another kind, a kind the
broker does not know, resources beyond the configured ones) is not listed, acknowledged, recorded
or pushed anything. An account the roster does not name costs no disco query at all; the caches
and the queries a configured account can cause are bounded, whatever hashes it invents.

The rest of the broker is a set of components, plain classes each declaring its own ops, listed in
``Broker.components`` and made in ``Broker.__init__`` with what each needs: the workflow engine
(broker/workflows.py) and which instance leads it (broker/leadership.py), the fence ledger
(broker/fencing.py), policy push (broker/policy.py), op descriptions (broker/descriptions.py),
alerts, storage notices, volume reports and audit anchors. ``Broker.rules`` lists, in order, what
authorization walks here.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Annotated, Any, Iterable, Mapping

from slixmpp import JID, InvalidJID, Presence
from slixmpp.plugins.xep_0198.stream_management import MAX_SEQ
from slixmpp.xmlstream import ET, tostring
from slixmpp.exceptions import IqError, IqTimeout

from agents import caps as entity_caps
from agents.agent import AGENT_FORM, Agent, Call, info_op
from agents.config import StateConfig
from agents.authz import Decision, Request
from agents.ops import OP_FEATURE_PREFIX, Arg, Field, OpSpec, Result, op
from agents.resources import check as check_resource, BadResource
from agents import fanout, protocol
from agents.errors import BadArguments, TooLarge
from agents.kinds import distribution_kinds
from agents.xmpp_speedups import escape

from .alerts import Alerts
from .anchors import Anchors, read_anchors
from .descriptions import OpDescriptions
from .fencing import Fencing
from agents.ratelimit import RateLimit
from . import shared_state
from .directory import Admission, BoundedMap, Capabilities, Directory, KnownAgentsState, sent_by_agents
from .leadership import Leadership
from .policy import PolicyDistribution
from .volumes import Volumes
from .storage_notices import StorageNotices
from .workflows import WorkflowEngine

log = logging.getLogger(__name__)

DISCO_TIMEOUT = 10.0
BAD_CAPS_MEMORY = 60.0  # seconds a caps hash that failed to verify is not asked about again
# What a server answers for a full JID with no session (Prosody and ejabberd: service-unavailable). Not
# item-not-found, which an agent answers for a caps node it does not have: that hash is bad.
NO_SESSION = frozenset({"service-unavailable", "recipient-unavailable"})
# What one announcement may cost, however many hashes an account invents: the broker remembers at
# most BAD_CAPS_CACHE bad hashes and asks about at most LEARNING_LIMIT hashes at once, at most
# QUERIES_PER_SENDER of them for one account, which gets QUERY_BURST queries and then one every
# 1/QUERY_RATE seconds (an agent's hash changes only when its configuration does).
BAD_CAPS_CACHE = 4096
LEARNING_LIMIT = 256
QUERIES_PER_SENDER = 2
QUERY_BURST, QUERY_RATE = 10, 0.2
MAX_VER, MAX_NODE = 128, 512  # characters; a sha-512 hash in base64 has 88
REFUSAL_MEMORY = 600.0  # seconds an account's refusal is not logged again at WARNING
# What people are shown of a live agent (mesh.agents) and of one found (mesh.discover): a table row.
_AGENT = Result(Field("jid", "agent"), Field("kind"), Field("resources", display="list"), Field("ops", display="list"))
_FOUND = Result(Field("jid", "agent"), Field("resources", display="list"))
# Up to this many agents an unpaged discovery answer is not measured before it is sent: 1,000 of the
# longest JIDs with a few resources each still fit one payload (docs/protocol.md 3.2).
DISCOVER_UNPAGED = 1000
HELLO_AGAIN = 3.0  # seconds after the hello until the second hello to agents not yet listed
# Presences written in one transport write, between which the broker reads what came in: a hello to
# 50,000 agents sent at once kept it from reading for tens of seconds (bench/README.md, the storm).
# The next batch waits until the server has acknowledged (XEP-0198) all but the last one, at most
# ACK_WAIT seconds: the server's process for the broker's session routes what the broker sends
# before it delivers anything to it, and 50,000 presences written at once kept it from answering
# the broker's keepalive ping, or reading its acks, for over 10 s (ejabberd, 3 nodes).
PRESENCE_BATCH = 1000
ACK_WAIT = 30.0
_TO, _ID = "vertebra-presence-to", "vertebra-presence-id"  # placeholders of the presence template
_CAPS = f"{{{entity_caps.NAMESPACE}}}c"


class Broker(Agent):
    kind = "broker"
    resource = "broker"
    # The parts the broker is made of, each a plain class declaring its own ops (made in __init__).
    components = (Alerts, StorageNotices, Volumes, Anchors, Fencing, PolicyDistribution, WorkflowEngine,
                  OpDescriptions)

    info = info_op("mesh")
    read_anchors = staticmethod(read_anchors)  # `vertebra audit verify --anchors`, through the broker kind

    def __init__(self, *args: Any, shared_dir: Path | None = None, state: StateConfig | None = None,
                 **kwargs: Any) -> None:
        # Set first: the components open their stores in it. One instance per cluster node each has a
        # state_dir of its own (audit log, request log) and all share shared_dir (workflows, leases),
        # or, on several machines, the etcd cluster ``state`` names (``state`` under the mesh file's ``broker``).
        self._shared_dir = shared_dir
        self.state_config = state
        super().__init__(*args, **kwargs)
        self.directory = Directory()
        # Who may be listed, by lowercased bare JID: the mesh file's agents (``admit``).
        self.roster: dict[str, Admission] = {}
        self._admitted_kinds: set[str] = set()
        self._present: set[str] = set()
        self._session = ""  # this session's id, which every presence it sends carries (on_session)
        self._acks: list[str] = []  # agents newly listed in this turn of the loop: acknowledged in one write
        self._greeting: asyncio.Task[None] | None = None  # this session's hello to the agents it knows
        self._learning: dict[str, asyncio.Future[Capabilities | None]] = {}  # at most LEARNING_LIMIT
        self._querying: dict[str, int] = {}  # bare JID -> disco queries in flight for it
        self._query_budget = RateLimit(burst=QUERY_BURST, rate=QUERY_RATE, max_senders=BAD_CAPS_CACHE)
        # (bare JID, caps hash) -> loop time until which it is ignored: keyed by sender too, so that
        # an account announcing another's hash and failing its query cannot get that one ignored.
        self._bad_caps: BoundedMap[tuple[str, str], float] = BoundedMap(BAD_CAPS_CACHE)
        self._refused: BoundedMap[str, tuple[str, float]] = BoundedMap(BAD_CAPS_CACHE)  # bare -> last warning
        self._known: KnownAgentsState = shared_state.known_agents(self)  # SQLite in shared_dir, or etcd
        self.xmpp.del_event_handler("presence_available", self._on_broker_presence)
        self.xmpp.del_event_handler("presence_unavailable", self._on_broker_presence)
        # A plain function: an announcement whose caps are known is filed at once, without a task of its own.
        self.xmpp.add_event_handler("presence_available", self._on_available)
        self.xmpp.add_event_handler("presence_unavailable", self._on_unavailable)
        self.xmpp.take_presence = self._take_presence
        # The components, each serving the ops it declares (Broker.components) with what it is given.
        self.workflows = self.serve_part(WorkflowEngine(self))
        # Which instance leads (one per cluster node): the workflow engine runs while this one does.
        self.leadership = Leadership(self, elected=self.workflows.on_elected, deposed=self.workflows.on_deposed)
        self.workflows.leadership = self.leadership
        self.fencing = self.serve_part(Fencing(self))
        self.policy = self.serve_part(PolicyDistribution(self))
        self.descriptions = self.serve_part(OpDescriptions(self))
        self.alerts = self.serve_part(Alerts())
        self.storage_notices = self.serve_part(StorageNotices())
        self.volumes = self.serve_part(Volumes(self.directory, self.roster))
        self.anchors = self.serve_part(Anchors(self.shared_dir))
        # What authorization walks for every request here and for every workflow step, approval and
        # performer (agents/authz.py): the broker-only ops; anyone but the agents the mesh file
        # configures refused the ops only they send; the fenced-identity guard, reading the ledger
        # the instances share; those agents admitted to those ops without a grant; then the policy.
        self.rules = [self.sent_by_broker, self.refuse_other_senders, self.fencing.fenced_now,
                      self.admit_agent_senders, self.by_policy]

    async def stop(self) -> None:
        await self.workflows.halt()
        await super().stop()
        await self.leadership.aclose()
        await self.anchors.aclose()
        await self._known.aclose()
        await self.fencing.aclose()
        await self.workflows.aclose()

    def on_join(self, jid: str) -> None:
        """A newly listed agent gets the policy and the fenced nodes at once; a fencing agent's
        ledger is read."""
        self.policy.on_join(jid)
        self.fencing.on_join(jid)

    def refuse_other_senders(self, request: Request, spec: OpSpec) -> Decision | None:
        """Refuses whoever may not send an op only the mesh file's agents send (directory.sent_by_agents)."""
        decision = sent_by_agents(request, spec, self.roster, self.directory)
        return decision if decision is not None and not decision.allowed else None

    def admit_agent_senders(self, request: Request, spec: OpSpec) -> Decision | None:
        """Admits those agents to those ops, whatever the policy says (directory.sent_by_agents)."""
        decision = sent_by_agents(request, spec, self.roster, self.directory)
        return decision if decision is not None and decision.allowed else None

    async def perform(self, spec: OpSpec, call: Call, args: dict[str, Any]) -> Any:
        """An op declared ``leader=True`` runs on the leading instance: this one, or the leader's
        answer, asked for on the caller's behalf (broker/leadership.py)."""
        if spec.leader:
            answer = await self.leadership.forward_to_leader(spec.name, call, args)
            if answer is not None:
                return answer.result
        return await super().perform(spec, call, args)

    @property
    def session(self) -> str:
        """This session's id: a new one with each new session, which also clears the directory."""
        return self._session

    async def on_session(self) -> None:
        # A new session (not a resumed one): the server has forgotten our directed presences.
        self.directory.clear()
        self._present.clear()
        self._acks.clear()
        # Every presence of this session says which session it is (``_stamp_presence``), so an agent
        # that answered the one before answers this one's hello, whatever the server told it between.
        self._session = uuid.uuid4().hex
        self._caps_ver = await entity_caps.advertise(self.xmpp)
        self.presence()  # available, so presence sent to our bare JID reaches us
        # The greeting takes as long as the server takes to route it (_send_presences): not part of
        # starting the session. One greeting at a time: a new session's replaces the last one's.
        if self._greeting is not None:
            self._greeting.cancel()
        self._greeting = self.spawn(self._greet(), name="hello to agents")
        self.leadership.start_leading()

    async def _greet(self) -> None:
        await self._hello_known()
        # Another instance of this broker may be learning an agent that announced itself just before
        # this one came online (and so never reached it): a second hello a little later finds it.
        await asyncio.sleep(HELLO_AGAIN)
        await self._hello_known(True)

    def _stamp_presence(self, pres: Presence) -> None:
        ET.SubElement(pres.xml, protocol.BROKER_SESSION, {"id": self._session})

    async def _hello_known(self, unlisted_only: bool = False) -> None:
        """Directed presence to every admitted agent any instance of this broker has seen; each
        answers with its own, which lists it here."""
        if not self.online and unlisted_only:
            return  # stopped or lost in the meantime: the next session says hello again anyway
        # While the shared state cannot answer (etcd out of reach as the session starts), the agents that
        # were online before this session are not greeted, so not listed: asked again until it can.
        known = await shared_state.until_answered(self, self._known.all, self._known.errors,
                                                  "greeting the agents this broker's instances know")
        if known is None:
            return
        await self._send_presences([bare for bare in known if bare.lower() in self.roster
                                    and not (unlisted_only and self.directory.lists(bare))])

    async def _send_presences(self, jids: list[str]) -> None:
        """This session's presence to each of ``jids``, PRESENCE_BATCH to a write, the loop reading what
        came in between, and each batch written once the server has acknowledged the one before the
        last (an ack asked for after each)."""
        sm = self.xmpp.plugin.get("xep_0198", None)
        loop = asyncio.get_running_loop()
        marks: list[int] = []  # our XEP-0198 count after each batch
        for start in range(0, len(jids), PRESENCE_BATCH):
            await asyncio.sleep(0)
            if self.xmpp.transport is None:
                return  # the connection went: the next session greets them all again
            if len(marks) >= 2 and sm is not None:
                end = loop.time() + ACK_WAIT
                while sm.enabled_out and self.xmpp.transport is not None and loop.time() < end \
                        and 0 < (marks[-2] - sm.last_ack) % MAX_SEQ < MAX_SEQ // 2:  # not acknowledged yet
                    await asyncio.sleep(0.02)
            self._write_presences(jids[start:start + PRESENCE_BATCH], hello=True)
            if sm is not None and sm.enabled_out:
                marks.append(sm.seq)
                sm.request_ack()

    def _write_presences(self, jids: list[str], hello: bool = False) -> None:
        """This session's presence (a hello, or an acknowledgement) to each of ``jids`` in one write, as
        slixmpp would write each (agents.fanout counts them for XEP-0198), or through slixmpp one by one
        when that cannot be done now."""
        if not jids:
            return
        pres = self._session_presence(_TO, hello)
        pres["id"] = _ID
        head, rest = tostring(pres.xml, xmlns=self.xmpp.default_ns, stream=self.xmpp, top_level=True).split(_TO)
        middle, tail = rest.split(_ID)  # slixmpp writes ``to`` before ``id``
        prefix = uuid.uuid4().hex
        texts = [f"{head}{escape(jid)}{middle}{prefix}.{i}{tail}" for i, jid in enumerate(jids)]
        if not fanout.write_stanzas(self.xmpp, texts):
            for jid in jids:
                self._session_presence(jid, hello).send()

    def _session_presence(self, to: str, hello: bool) -> Presence:
        pres = self._available(to)
        if hello:
            # A hello says so (4.5): the agent answers every hello, but not the acknowledgement of its
            # answer, whatever address the server delivered either to.
            for marker in pres.xml.iter(protocol.BROKER_SESSION):  # the one _stamp_presence added
                marker.set("hello", "1")
        return pres

    def _acknowledge(self, jid: str) -> None:
        """Our presence back to a newly listed agent, written with the others of this turn of the loop."""
        self._acks.append(jid)
        if len(self._acks) == 1:
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        jids, self._acks = self._acks, []
        self._write_presences(jids)

    def admit(self, bare_jid: str, kind: str, resources: Iterable[str],
              settings: Mapping[str, Any] | None = None) -> Admission:
        """Let the account ``bare_jid`` be listed as an agent of ``kind`` holding some or all of
        ``resources`` (the mesh file's ``agents:`` entries go through here; so do tests). A kind
        named here becomes one the broker knows."""
        settings = settings or {}
        try:
            checked = tuple(check_resource(r) for r in _advertised_resources(kind, resources, settings))
        except BadResource as exc:
            raise ValueError(f"cannot admit {bare_jid}: {exc}") from None
        admission = Admission(kind, checked, settings)
        self.roster[bare_jid.split("/", 1)[0].lower()] = admission
        self._admitted_kinds.add(kind)
        return admission

    @property
    def known_kinds(self) -> set[str]:
        """The kinds an agent may be admitted as: the distribution's own, and any ``admit`` named."""
        return set(distribution_kinds()) | self._admitted_kinds

    @property
    def shared_dir(self) -> Path | None:
        """Where the state all instances of this broker share lives (by default its own state_dir)."""
        return self._shared_dir or self.state_dir

    # -- the ops the broker serves ------------------------------------------------------------

    @op("mesh.discover", effect="read", deadline=5, result=_FOUND)
    async def discover(self, call: Call,
                       op: Annotated[str, Arg("only agents offering this op (all ops if empty)")] = "",
                       resources: Annotated[list[str], Arg("only agents holding these resources,"
                                                           " their ancestors or descendants")] = (),  # type: ignore[assignment]
                       after: Annotated[str, Arg("a page: only agents whose JID sorts after this one (the last"
                                                 " of the page before)")] = "",
                       limit: Annotated[int, Arg("a page: at most this many agents (0: all of them)", min=0,
                                                 max=protocol.MAX_ITEMS)] = 0,
                       ) -> list:
        """Find the live agents that offer an op on resources."""
        try:
            wanted = [check_resource(r) for r in resources]
        except BadResource as exc:
            raise BadArguments(str(exc), argument="resources") from None
        # Only what a caller needs to address and scope each target, in JID order; a page that is
        # shorter than ``limit`` is the last (docs/protocol.md 5.1).
        found = [{"jid": e.jid, "resources": self.directory.held(e, wanted)}
                 for e in self.directory.discover(op or None, wanted, after=after, limit=limit)]
        if not limit and len(found) > DISCOVER_UNPAGED:
            try:
                protocol.encode(found)
            except TooLarge as exc:
                raise TooLarge(f"{len(found):,} agents match, more than one answer holds ({exc}): ask for them"
                               " a page at a time (limit, and after = the last JID of the page before)") from None
        return found

    @op("mesh.agents", effect="read", deadline=5, result=_AGENT)
    async def agents(self, call: Call) -> list:
        """List every live agent with its kind, ops and resources."""
        return [e.to_dict() for e in self.directory.entries()]

    # -- presence and caps -------------------------------------------------------------------

    def _take_presence(self, xml: Any) -> bool:
        """An admitted agent's presence, read off the element the parser produced (the actor's stream
        counts it for XEP-0198): in a login storm the broker reads one or two
        per agent, and slixmpp's stanza object, roster and handler matching cost ~3 times what filing
        one does (bench/README.md). False, for slixmpp's own path: anything else (a caps hash to learn,
        a refusal to log, a sibling broker instance, an agent whose job a workflow watches)."""
        sender, kind = xml.get("from", ""), xml.get("type")
        if kind not in (None, "unavailable") or self.vertebra.watches(sender):
            return False
        bare, _, resource = sender.partition("/")
        admission = self.roster.get(bare.lower())
        if admission is None or not resource or bare.lower() == self.jid.bare.lower():
            return False
        try:
            jid = str(JID(sender))  # as slixmpp writes it (prepared), the directory's key
        except InvalidJID:
            return False
        if kind is None:
            c = xml.find(_CAPS)
            if c is None or len(c.get("node", "")) > MAX_NODE:
                return False
            caps = self.directory.caps.get(c.get("ver") or "")
            if caps is None:
                return False
            self._present.add(jid)
            self._file(jid, jid.split("/", 1)[0].lower(), admission, caps)
        elif len(xml):  # the server's own says nothing more; a stanza too deep is dropped the slow way
            return False
        else:
            self._gone(jid)
        return True

    def _on_available(self, pres: Presence) -> None:
        jid = str(pres["from"])
        ver = pres["caps"]["ver"]
        if pres["from"].bare == self.jid.bare:
            if jid != str(self.jid):
                self.leadership.sibling_seen(jid, available=True)
            return
        if not ver:
            return
        bare = pres["from"].bare.lower()
        admission = self.roster.get(bare)
        if admission is None:
            # Before any query: an account configuration does not name costs one log line at most.
            self._refuse(jid, bare, "the mesh file's agents: names no agent with this account (add it there"
                                    " if it is one)")
            return
        node = pres["caps"]["node"]
        if len(ver) > MAX_VER or len(node) > MAX_NODE:
            self._refuse(jid, bare, f"its caps hash or node is too long (at most {MAX_VER} and {MAX_NODE}"
                                    " characters)")
            return
        self._present.add(jid)
        caps = self.directory.caps.get(ver)
        if caps is not None:
            self._file(jid, bare, admission, caps)
        else:
            self.spawn(self._learn_and_file(jid, bare, admission, node, ver, pres["caps"]["hash"]),
                       name=f"learning the caps of {jid}")

    async def _learn_and_file(self, jid: str, bare: str, admission: Admission, node: str, ver: str,
                              hash_name: str) -> None:
        caps = await self._learn(jid, bare, node, ver, hash_name)
        if caps is not None and jid in self._present:  # still there once its caps are known
            self._file(jid, bare, admission, caps)

    def _file(self, jid: str, bare: str, admission: Admission, caps: Capabilities) -> None:
        """List an agent whose advertisement ``caps`` stands for, if its admission allows."""
        refusal = admission.refusal(caps, self.known_kinds)
        if refusal is not None:
            if self.directory.remove(jid):
                log.warning("agent %s left the directory: its new advertisement is refused", jid)
            self._refuse(jid, bare, refusal)
            return
        if self.directory.add(jid, caps):
            # Our presence back acknowledges the agent (it stops repeating its own) and makes the
            # server tell the agent when this broker goes.
            self._acknowledge(jid)
            self.on_join(jid)
        self._refused.pop(bare)
        self._known.add(jid.split("/", 1)[0])

    def _refuse(self, jid: str, bare: str, why: str) -> None:
        """Log a refused advertisement: at WARNING the first time (and when the reason changes or
        REFUSAL_MEMORY has passed), so an account that keeps announcing does not flood the log."""
        now = asyncio.get_running_loop().time()
        last = self._refused.get(bare)
        if last is not None and last[0] == why and now - last[1] < REFUSAL_MEMORY:
            log.debug("refused %s again: %s", jid, why)
            return
        self._refused[bare] = (why, now)
        log.warning("refused the agent advertisement of %s: %s; it is not listed and gets no"
                    " acknowledgement, policy or requests", jid, why)

    def _on_unavailable(self, pres: Presence) -> None:
        jid = str(pres["from"])
        if pres["from"].bare == self.jid.bare and jid != str(self.jid):
            self.leadership.sibling_seen(jid, available=False)
            return
        self._gone(jid)

    def _gone(self, jid: str) -> None:
        self._present.discard(jid)
        if self.directory.remove(jid):
            log.info("agent %s left the directory", jid)

    async def _learn(self, jid: str, bare: str, node: str, ver: str, hash_name: str) -> Capabilities | None:
        """One disco#info query per caps hash, however many agents present it at once; within the
        bounds above, beyond which an announcement is ignored (an agent repeats its own until a
        broker answers, 4.4 of docs/protocol.md)."""
        pending = self._learning.get(ver)
        if pending is not None:
            return await asyncio.shield(pending)
        now = asyncio.get_running_loop().time()
        if self._bad_caps.get((bare, ver), 0.0) > now:
            return None  # an agent repeating a bad announcement costs no new query
        if len(self._learning) >= LEARNING_LIMIT or self._querying.get(bare, 0) >= QUERIES_PER_SENDER:
            log.debug("not asking %s about caps %s now: too many queries in flight", jid, ver)
            return None
        allowed, warn = self._query_budget.take(bare)
        if not allowed:
            if warn:
                log.warning("%s announces new caps hashes faster than %g a second; the broker asks about"
                            " them no faster than that", bare, QUERY_RATE)
            return None
        fut: asyncio.Future[Capabilities | None] = asyncio.get_running_loop().create_future()
        self._learning[ver] = fut
        self._querying[bare] = self._querying.get(bare, 0) + 1
        caps: Capabilities | None = None
        try:
            caps = await self._query(jid, node, ver, hash_name)
        except _NotThere as exc:
            log.info("disco#info of %s not delivered (%s); asked again at its next announcement", jid, exc)
        else:
            if caps is None:
                self._bad_caps[(bare, ver)] = now + BAD_CAPS_MEMORY
        finally:
            del self._learning[ver]
            self._querying[bare] -= 1
            if not self._querying[bare]:
                del self._querying[bare]
            fut.set_result(caps)
        if caps is not None:
            self.directory.caps[ver] = caps
        return caps

    async def _query(self, jid: str, node: str, ver: str, hash_name: str) -> Capabilities | None:
        """The capabilities ``jid``'s disco#info proves for ``ver``, or None when they are not proved
        (remembered as bad). Raises _NotThere when the server found no session to deliver the query
        to: that says nothing of the hash. On an ejabberd cluster a new session reaches the other
        nodes' tables a moment after its presence can reach a broker there, and the query then
        bounces; remembered as bad, the agent would go unlisted for BAD_CAPS_MEMORY, where its next
        announcement (within a second) is asked about again, within the query budget."""
        try:
            # A str, as slixmpp's code takes it (its annotation says JID): its own JID is answered locally.
            iq = await self.xmpp.plugin["xep_0030"].get_info(jid=jid, node=f"{node}#{ver}",  # type: ignore[arg-type]
                                                             timeout=DISCO_TIMEOUT)
        except (IqError, IqTimeout) as exc:
            if isinstance(exc, IqError) and exc.iq["error"]["condition"] in NO_SESSION:
                raise _NotThere(exc.iq["error"]["condition"]) from None
            log.warning("disco#info of %s failed: %s", jid, exc)
            return None
        info = iq["disco_info"]
        if entity_caps.verstring(info, hash_name) != ver:  # None for a hash name it does not take
            log.warning("%s presented caps %s that do not match its disco#info; ignored", jid, ver)
            return None
        form_class = self.xmpp.plugin["xep_0004"].stanza.Form
        form = next((f for f in info["substanzas"] if isinstance(f, form_class)
                     and AGENT_FORM in _values(f.get_values().get("FORM_TYPE"))), None)
        if form is None:
            return None  # not a Vertebra agent
        values = form.get_values()
        features = frozenset(info["features"])
        ops = frozenset(f[len(OP_FEATURE_PREFIX):] for f in features if f.startswith(OP_FEATURE_PREFIX))
        return Capabilities(kind=str(values.get("kind") or "agent"), ops=ops,
                            resources=tuple(_values(values.get("resources"))),
                            features=frozenset(f for f in features if f.startswith("urn:vertebra:")
                                               and not f.startswith(OP_FEATURE_PREFIX)))


class _NotThere(Exception):
    """The server had no session to deliver a disco#info query to (its error condition)."""


def _advertised_resources(kind: str, resources: Iterable[str], settings: Mapping[str, Any]) -> list[str]:
    """The resources an agent so configured advertises: its configured ones and, for a fencing
    agent, one per node its settings give it to fence (as agents/fencing/agent.py adds them)."""
    out = list(resources)
    if kind != "fencing":
        return out
    from agents.fencing.settings import configured_nodes

    return out + [r for r in configured_nodes(settings) if r not in out]


def _values(value: Any) -> list[str]:
    """A form field's values as a list, whichever shape slixmpp returns them in."""
    if value is None:
        return []
    return value.splitlines() if isinstance(value, str) else [str(v) for v in value]
