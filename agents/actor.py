"""One actor, one XMPP connection: the base every agent, the broker and every client stand on.

An actor logs in with SASL SCRAM over STARTTLS, trusting exactly the certificate it is given (never
plaintext), keeps its stream with XEP-0198 where the server offers it, answers and sends XEP-0199
pings, and reconnects with jittered exponential backoff when the connection drops. Replies to its
requests are matched by IQ id in one dictionary, instead of slixmpp's one handler per pending IQ,
which costs a scan of every pending request for every stanza that arrives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import slixmpp
from slixmpp import Iq, Message

from . import protocol, xmpp_speedups
from .errors import ConnectError, OpError, Outcome, UNREACHABLE_CONDITIONS, error_for
from .report import ProgressFn, TargetResult

log = logging.getLogger(__name__)


xmpp_speedups.install()  # SCRAM and XML escaping in C (see that module)


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach the XMPP service: one server, or the nodes of a cluster serving one
    domain (``alternates``), any of which will do."""

    host: str
    port: int
    domain: str
    ssl_context: ssl.SSLContext
    alternates: tuple[tuple[str, int], ...] = ()
    # False: start at a random node (clients and agents spread over a cluster); True: at host:port
    # first (a broker instance belongs to one node).
    first: bool = False

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(self.host, self.port), *self.alternates]

    def starting_at(self, index: int) -> "Endpoint":
        """The same service, tried from its ``index``-th node on (then the others, in order)."""
        nodes = self.addresses
        (host, port), *rest = nodes[index % len(nodes):] + nodes[:index % len(nodes)]
        return dataclasses.replace(self, host=host, port=port, alternates=tuple(rest), first=True)

    @classmethod
    def pinned(cls, host: str, port: int, domain: str, cert_path: str,
               alternates: tuple[tuple[str, int], ...] = ()) -> "Endpoint":
        """An endpoint that trusts exactly the certificate at ``cert_path`` (the private server's)."""
        ctx = ssl.create_default_context(cafile=cert_path)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return cls(host, port, domain, ctx, alternates)


class Backoff:
    """Exponential backoff with equal jitter, so that a server's restart does not bring every actor
    back in the same instant."""

    def __init__(self, base: float = 0.2, cap: float = 15.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** self.attempt)
        self.attempt += 1
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0


# Deepest element nesting a stanza may have, the stanza itself being level 1 (docs/protocol.md 3.2).
# Vertebra's own stanzas are 2 deep, a disco#info answer with its form 5; slixmpp walks and copies
# stanzas recursively, so a few thousand levels from any account would overflow Python's stack.
MAX_STANZA_DEPTH = 32
# Marks the empty stand-in for a stanza that was too deep (``_Stream.incoming_filter``).
_OVER_DEEP = "{urn:vertebra:1#internal}over-deep"


def nested_deeper_than(xml: Any, limit: int) -> bool:
    """Whether an element tree has more than ``limit`` levels, found level by level without recursion."""
    level, depth = [xml], 1
    while level:
        if depth > limit:
            return True
        level = [child for element in level for child in element]
        depth += 1
    return False


class _Stream(slixmpp.ClientXMPP):
    """slixmpp's client, with its fixed connect-retry schedule replaced by jittered backoff that
    moves on to the next server of the endpoint at each attempt, and with stanzas nested too deep
    refused before slixmpp turns them into stanza objects."""

    backoff: Backoff
    next_address: Callable[[], tuple[str, int]]

    def incoming_filter(self, xml: Any) -> Any:
        """Every top-level element the parser completes passes here before slixmpp builds a stanza of
        it. One nested too deep is replaced by an empty stand-in of the same kind: it is still counted
        for XEP-0198 (a stanza never counted would sit in the server's resend queue) and then dropped
        by ``Actor._dispatch``. A request (IQ get or set) is answered with a plain error built afresh,
        never a copy of what was sent."""
        if not nested_deeper_than(xml, MAX_STANZA_DEPTH):
            return xml
        sender, kind = xml.get("from"), xml.get("type")
        log.warning("dropped a %s from %s nested deeper than %d levels", xml.tag.rpartition("}")[2], sender,
                    MAX_STANZA_DEPTH)
        if xml.tag == _IQ and kind in ("get", "set"):
            self.make_iq_error(xml.get("id", ""), type="modify", condition="bad-request", ito=sender,
                               text=f"stanza nested deeper than {MAX_STANZA_DEPTH} levels; nothing was"
                                    " done").send()
        stand_in = type(xml)(xml.tag, {name: value for name, value in xml.attrib.items()
                                       if name in ("from", "to", "id", "type")})
        stand_in.append(type(xml)(_OVER_DEEP))
        return stand_in

    def reschedule_connection_attempt(self) -> asyncio.Future | None:
        if self._current_connection_attempt is None:
            return None
        self.custom_address = self.next_address()
        self._connect_loop_wait = self.backoff.next()
        self._current_connection_attempt = asyncio.ensure_future(self._connect_loop(), loop=self.loop)
        return self._current_connection_attempt


_IQ = "{jabber:client}iq"
_MESSAGE = "{jabber:client}message"
_OP = f"{{{protocol.NS}}}op"
_JOB_TAGS = {f"{{{protocol.NS}}}progress", f"{{{protocol.NS}}}outcome"}


@dataclass(frozen=True)
class Timeouts:
    discover: float = 5.0  # asking the broker who offers an op
    reply_margin: float = 0.25  # kept back from the agent's budget for its answer to travel


class Actor:
    """A participant of the mesh on one XMPP connection.

    Subclasses override :meth:`on_session` to advertise themselves each time a session starts
    (first login, and after every reconnect that could not resume the old stream).
    """

    resource = "vertebra"

    def __init__(self, jid: str, password: str, endpoint: Endpoint, *, resource: str | None = None,
                 timeouts: Timeouts = Timeouts()) -> None:
        self.endpoint = endpoint
        self.timeouts = timeouts
        self.xmpp = _Stream(f"{jid}/{resource or self.resource}", password, ssl_context=endpoint.ssl_context)
        self.xmpp.backoff = Backoff()
        # Each actor starts at a random server of a cluster, so a node's clients do not all land on
        # the same other node when it goes away.
        self._addresses = endpoint.addresses
        self._address = 0 if endpoint.first else random.randrange(len(self._addresses))
        self.xmpp.next_address = self._next_address
        # Explicit, because with a given host and port slixmpp would try direct TLS first.
        self.xmpp.enable_direct_tls = False
        self.xmpp.enable_starttls = True
        self.xmpp.enable_plaintext = False
        # SCRAM only: never send a password (PLAIN), even over TLS, whatever the server offers.
        self.xmpp.plugin["feature_mechanisms"].use_mechs = {"SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-512"}
        self.xmpp.register_plugin("xep_0030")
        # Ask the server for an ack every 50 stanzas, not every 5: each request is its own packet.
        self.xmpp.register_plugin("xep_0198", {"window": 50})
        self.xmpp.register_plugin("xep_0199", {"keepalive": True, "interval": 30, "timeout": 10})
        self.xmpp.register_plugin(protocol.XEP_Vertebra.name)
        self._pending: dict[str, tuple[asyncio.Future[Iq], str]] = {}  # IQ id -> (reply, addressee)
        self._jobs: dict[tuple[str, str], asyncio.Queue[Message]] = {}
        self._stopping = False
        self._online = asyncio.Event()
        self._auth_failed: str | None = None
        self._serve_op: Callable[[Iq], None] | None = None  # set by actors that serve ops
        # After XEP-0198's own input filter (registered with the plugin), which counts every stanza.
        self.xmpp.add_filter("in", self._dispatch)
        self.xmpp.add_event_handler("session_start", self._on_session_start)
        self.xmpp.add_event_handler("session_resumed", self._on_session_resumed)
        self.xmpp.add_event_handler("disconnected", self._on_disconnected)
        self.xmpp.add_event_handler("failed_all_auth", self._on_failed_auth)

    @property
    def jid(self) -> slixmpp.JID:
        return self.xmpp.boundjid

    @property
    def online(self) -> bool:
        return self._online.is_set()

    async def start(self, timeout: float = 15.0) -> None:
        """Connect and wait for a session. Raises ConnectError saying what failed."""
        self._stopping = False
        self.xmpp.connect(*self._addresses[self._address])
        try:
            await asyncio.wait_for(self._online.wait(), timeout)
        except asyncio.TimeoutError:
            reason = self._auth_failed or (
                f"no session with {' or '.join(f'{h}:{p}' for h, p in self._addresses)} within {timeout:g}s"
                " (is the server running? `vertebra server status`)")
            await self.stop()
            raise ConnectError(f"{self.xmpp.boundjid.bare}: {reason}") from None

    async def stop(self) -> None:
        self._stopping = True
        self._online.clear()
        self.xmpp.cancel_connection_attempt()
        if self.xmpp.transport is not None:
            try:
                await self.xmpp.disconnect(wait=1.0)
            except Exception:  # a broken transport is already as closed as we need it
                self.xmpp.abort()
        for fut, _to in self._pending.values():
            if not fut.done():
                fut.cancel()

    def _next_address(self) -> tuple[str, int]:
        self._address = (self._address + 1) % len(self._addresses)
        return self._addresses[self._address]

    @property
    def server_address(self) -> tuple[str, int]:
        """The server this actor is (or was last) connected to."""
        return self._addresses[self._address]

    async def on_session(self) -> None:
        """Called on every new session; subclasses advertise themselves here."""

    async def _on_session_start(self, _event: Any) -> None:
        self.xmpp.backoff.reset()
        await self.on_session()
        self._online.set()

    def _on_session_resumed(self, _event: Any) -> None:
        # Back in business: the next drop starts again from the shortest wait, instead of each drop
        # (an attack could cause them) waiting longer than the one before, up to the cap.
        self.xmpp.backoff.reset()
        self._online.set()

    def _on_failed_auth(self, _event: Any) -> None:
        self._auth_failed = "login refused (not-authorized): check the account's password file"
        self._stopping = True  # retrying a wrong password only locks the account out

    async def _on_disconnected(self, _event: Any) -> None:
        self._online.clear()
        for fut, _to in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection to the XMPP server lost"))
        if self._stopping:
            return
        delay = self.xmpp.backoff.next()
        log.info("%s: disconnected; reconnecting in %.2fs", self.xmpp.boundjid, delay)
        await asyncio.sleep(delay)
        if not self._stopping and self.xmpp.transport is None:
            self.xmpp.connect(*self._next_address())

    # -- requests ------------------------------------------------------------------------------

    async def send_iq(self, iq: Iq, timeout: float) -> Iq:
        """Send an IQ and return its reply (result or error). Raises asyncio.TimeoutError."""
        fut: asyncio.Future[Iq] = asyncio.get_running_loop().create_future()
        iq_id = iq["id"]
        self._pending[iq_id] = (fut, str(iq["to"]))
        try:
            self.xmpp.send(iq)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(iq_id, None)

    def _dispatch(self, stanza: Any) -> Any:
        """Hand Vertebra's own stanzas straight to their handler, reading raw attributes; pass the
        rest on. slixmpp tests every stanza against every registered handler (twenty-odd here), which
        profiling showed to be the largest single cost of an op's round trip."""
        xml = stanza.xml
        if len(xml) and xml[-1].tag == _OVER_DEEP:  # refused by _Stream.incoming_filter, already counted
            return None
        if xml.tag == _IQ:
            kind = xml.get("type")
            if kind in ("result", "error") and xml.get("id") in self._pending:
                self._on_reply(stanza)
                return None
            if kind == "set" and self._serve_op is not None and xml.find(_OP) is not None:
                self._serve_op(stanza)
                return None
        elif xml.tag == _MESSAGE and any(child.tag in _JOB_TAGS for child in xml):
            self._on_job_message(stanza)
            return None
        return stanza

    def _on_reply(self, iq: Iq) -> None:
        fut, to = self._pending[iq["id"]]
        # Only the addressee (or the server bouncing on its behalf, which uses the same address) answers.
        if str(iq["from"]) == to and not fut.done():
            fut.set_result(iq)

    def watch_job(self, agent: str, rid: str) -> asyncio.Queue[Message]:
        """Queue for the progress and outcome messages of request ``rid``, accepted only from ``agent``."""
        queue: asyncio.Queue[Message] = asyncio.Queue()
        self._jobs[(agent, rid)] = queue
        return queue

    def unwatch_job(self, agent: str, rid: str) -> None:
        self._jobs.pop((agent, rid), None)

    def _on_job_message(self, msg: Message) -> None:
        sender = str(msg["from"])
        for child in msg.xml:
            if child.tag in _JOB_TAGS:
                # Keyed by sender too: only the agent that accepted the request may report on it.
                queue = self._jobs.get((sender, child.get("rid", "")))
                if queue is not None:
                    queue.put_nowait(msg)
                return

    def on(self, event: str, handler: Callable[..., Any]) -> None:
        self.xmpp.add_event_handler(event, handler)

    # -- calling ops ---------------------------------------------------------------------------

    async def request(self, target: str, op: str, args: dict[str, Any], *, on: Sequence[str] = (),
                      timeout: float, rid: str | None = None, progress: ProgressFn | None = None,
                      behalf: str | None = None) -> TargetResult:
        """Send one request to one agent and wait for its one outcome, at most ``timeout`` seconds.

        ``behalf`` names the person this actor acts for (the broker running a workflow step, the chat
        bot relaying an operator); agents honour it only from the delegates they are configured with."""
        if not timeout > 0:  # a request sent now would reach its agent already expired, or be run late
            return TargetResult(target, Outcome.TIMEOUT, error=f"no time was left to send {op}; nothing was sent")
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        rid = rid or uuid.uuid4().hex
        iq = self.xmpp.make_iq_set(ito=target)
        req = iq["vertebra_op"]
        req["name"], req["rid"] = op, rid
        budget_ms = max(1, int((timeout - self.timeouts.reply_margin) * 1000))
        req["timeout"] = str(budget_ms)
        # The same moment on our wall clock: an agent that gets the request only after it (stopped,
        # or the request held up on the way) never starts it (docs/protocol.md section 9).
        req["deadline"] = str(int(time.time() * 1000) + budget_ms)
        if on:
            req["on"] = " ".join(on)
        if behalf:
            req["for"] = behalf
        try:
            req.xml.text = protocol.encode(args, what=f"the arguments of {op}")
        except OpError as exc:  # nothing was sent: this target's failure, not the whole call's
            return TargetResult(target, exc.outcome, error=f"{exc.condition}: {exc.text}")
        jobs = self.watch_job(target, rid)  # before sending: progress may follow the ack at once
        try:
            try:
                reply = await self.send_iq(iq, max(0.0, end - loop.time()))
            except asyncio.TimeoutError:
                return TargetResult(target, Outcome.TIMEOUT, error=f"no answer within {timeout:g}s")
            except ConnectionError as exc:
                # The request may have arrived and run: that is not "unreachable", which would let
                # scope one try the next target.
                return TargetResult(target, Outcome.TIMEOUT, error=f"{exc} before an answer came; the op may have run")
            if reply["type"] == "error":
                return _from_error(target, reply)
            if reply.xml.find(f"{{{protocol.NS}}}accepted") is None:
                return _from_outcome(target, reply["vertebra_outcome"])
            while True:
                try:
                    msg = await asyncio.wait_for(jobs.get(), max(0.0, end - loop.time()))
                except asyncio.TimeoutError:
                    return TargetResult(target, Outcome.TIMEOUT,
                                        error=f"accepted, but no outcome within {timeout:g}s")
                if msg.xml.find(f"{{{protocol.NS}}}outcome") is not None:
                    return _from_outcome(target, msg["vertebra_outcome"])
                if progress is not None:
                    p = msg["vertebra_progress"]
                    try:
                        progress(target, int(p["seq"] or 0), protocol.decode(p.xml.text))
                    except (ValueError, OpError):  # a garbled report is skipped; the outcome still counts
                        pass
        finally:
            self.unwatch_job(target, rid)


def _from_error(target: str, reply: Iq) -> TargetResult:
    err = reply["error"]
    condition = protocol.app_condition(reply)
    text = err["text"] or err["condition"]
    if condition is None and err["condition"] in UNREACHABLE_CONDITIONS:
        return TargetResult(target, Outcome.UNREACHABLE, error=f"{target} is not connected ({err['condition']})")
    if condition is None and err["condition"] == "recipient-unavailable":
        return TargetResult(target, Outcome.TIMEOUT, error=f"{target} went away before answering; the op may"
                                                           " have run (recipient-unavailable)")
    if condition is None:
        return TargetResult(target, Outcome.FAILED, error=f"{err['condition']}: {text}")
    return TargetResult(target, error_for(condition, text).outcome, error=f"{condition}: {text}")


def _from_outcome(target: str, outcome: Any) -> TargetResult:
    try:
        payload = protocol.decode(outcome.xml.text)
    except Exception as exc:  # an agent's malformed answer is that agent's failure, not ours
        return TargetResult(target, Outcome.FAILED, error=f"unreadable outcome: {exc}")
    if outcome["status"] == "ok":
        return TargetResult(target, Outcome.OK, result=payload)
    condition = outcome["condition"] or "failed"
    return TargetResult(target, error_for(condition, str(payload)).outcome, error=f"{condition}: {payload}")
