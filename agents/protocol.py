"""The Vertebra wire protocol as a slixmpp plugin, in the shape of slixmpp's own XEP plugins.

A request is an IQ-set carrying ``<op xmlns="urn:vertebra:1" name=... rid=... timeout=...>``
whose text is base64 msgpack arguments. A quick op's answer is an IQ-result with ``<outcome>``; a
long op's is an IQ-result with ``<accepted job=.../>``, followed by ``<progress seq=...>`` messages
and exactly one ``<outcome job=...>`` message. Errors are stanza errors with an application
condition in the same namespace (see ``errors``). docs/protocol.md is the written specification.

Limits are checked on the raw text before anything is decoded; msgpack's own decoder then bounds
container nesting (it refuses more than 1,024 levels before building anything) and ``decode``
refuses anything deeper than ``MAX_DEPTH``. A map that names a key twice is refused (bad-payload).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from typing import Any, Callable, Iterable

import msgpack
from slixmpp import JID, Iq, Message
from slixmpp.jid import InvalidJID
from slixmpp.plugins import BasePlugin, register_plugin
from slixmpp.xmlstream import ElementBase, ET, register_stanza_plugin

from .errors import BadPayload, OpError, TooLarge

NS = "urn:vertebra:1"
log = logging.getLogger(__name__)

# Decoded msgpack bytes per request or outcome: as base64 (4/3 larger) plus the envelope, it still fits
# the private server's 256 KiB stanza limit, and a discovery answer naming 1,000 agents fits in it.
MAX_PAYLOAD = 160 * 1024
MAX_TEXT = (MAX_PAYLOAD * 4) // 3 + 4  # the same limit, as base64 characters
MAX_DEPTH = 32
MAX_ITEMS = 10_000  # elements of any one array or map
#: How far an agent's wall clock may lag or lead a sender's before a request's ``deadline`` is
#: misjudged: an agent starts a request until this long after its deadline by the agent's clock.
#: NTP keeps hosts within milliseconds; two seconds also covers a host that has lost its time source
#: for a while, and is still far below any op's useful time (docs/protocol.md section 9).
CLOCK_SKEW_ALLOWANCE = 2.0
_DEADLINE = re.compile(r"[1-9][0-9]{0,15}")


class OpRequest(ElementBase):
    """``<op name rid timeout deadline on for term>`` — a request to run an op; the text is the arguments,
    ``on`` the space-separated resources the caller addressed, ``for`` the bare JID a delegate acts
    for. ``timeout`` is the caller's remaining budget in milliseconds, ``deadline`` the same moment as
    the sender's wall clock (Unix time in milliseconds), so a request held up on the way is not
    started late (docs/protocol.md section 9). ``term`` is the fencing token of the leading broker
    instance that sends a workflow step (section 6)."""

    name = "op"
    namespace = NS
    plugin_attrib = "vertebra_op"
    interfaces = {"name", "rid", "timeout", "deadline", "on", "for", "term"}


class Outcome(ElementBase):
    """``<outcome status job rid condition>`` — the one terminal result of a request. Its text is the
    result when status is ``ok``, else the error sentence; ``condition`` names the error."""

    name = "outcome"
    namespace = NS
    plugin_attrib = "vertebra_outcome"
    interfaces = {"status", "job", "rid", "condition"}


class Accepted(ElementBase):
    """``<accepted job>`` — a long op was admitted and runs as job ``job``."""

    name = "accepted"
    namespace = NS
    plugin_attrib = "vertebra_accepted"
    interfaces = {"job"}


class Progress(ElementBase):
    """``<progress job rid seq>`` — one progress report of a long op; the text is its payload."""

    name = "progress"
    namespace = NS
    plugin_attrib = "vertebra_progress"
    interfaces = {"job", "rid", "seq"}


def encode(obj: Any, what: str = "payload") -> str:
    """Encode a payload; raises TooLarge when it exceeds what a receiver accepts, so the sender says
    so instead of the receiver failing to read it."""
    raw = msgpack.packb(obj, use_bin_type=True)
    if len(raw) > MAX_PAYLOAD:
        raise TooLarge(f"{what} is {len(raw)} bytes encoded; the limit is {MAX_PAYLOAD}:"
                       " send large data out of band")
    return base64.b64encode(raw).decode("ascii")


def decode(text: str | None) -> Any:
    """Decode a payload, enforcing the size limit before decoding and the depth limit after."""
    text = text or ""
    if len(text) > MAX_TEXT:
        raise TooLarge(f"payload is {len(text)} characters; the limit is {MAX_TEXT}"
                       f" (about {MAX_PAYLOAD // 1024} KiB decoded): send large data out of band")
    if not text:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=False, object_pairs_hook=_unique_keys,
                              max_array_len=MAX_ITEMS, max_map_len=MAX_ITEMS)
    except DuplicateKey as exc:
        raise BadPayload(f"payload is not valid: {exc}; each key may appear once in a map") from None
    except msgpack.StackError:
        raise TooLarge(f"payload nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        if "exceeds max_" in str(exc):
            raise TooLarge(f"payload has a list or map of more than {MAX_ITEMS} items") from None
        raise BadPayload(f"payload is not base64 msgpack ({exc.__class__.__name__}: {exc})") from None
    except (binascii.Error, TypeError, msgpack.UnpackException) as exc:
        raise BadPayload(f"payload is not base64 msgpack ({exc.__class__.__name__}: {exc})") from None
    _check_depth(obj)
    return obj


class DuplicateKey(ValueError):
    """A msgpack map names a key twice."""


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    # A map naming a key twice is refused, not read as its last value: a sender, a relay and a
    # receiver (or a check and its action) that keep different values would see different requests.
    # It costs one Python call per map (about 0.3 us; a request's arguments are a map or two).
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[Any] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise DuplicateKey(f"a map names the key {dup!r:.80} more than once")
    return out


def _check_depth(obj: Any) -> None:
    level: list[Any] = [obj]
    for _ in range(MAX_DEPTH + 1):
        nxt: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                nxt.extend(item.keys())
                nxt.extend(item.values())
            elif isinstance(item, list):
                nxt.extend(item)
        if not nxt:
            return
        level = nxt
    raise TooLarge(f"payload nests deeper than {MAX_DEPTH} levels")


def parse_deadline(text: str) -> float | None:
    """A request's ``deadline`` attribute as Unix time in seconds; None when absent (an older sender:
    its relative ``timeout`` alone applies). Anything else than a positive decimal integer of
    milliseconds is refused: a sender that states a deadline must be held to it, not ignored."""
    if not text:
        return None
    if not _DEADLINE.fullmatch(text):
        raise BadPayload(f"'deadline' must be the sender's wall-clock time in milliseconds since 1970 as a"
                         f" positive decimal integer, got {text[:40]!r}")
    return int(text) / 1000.0


def caller_deadline(req: Any, default: float) -> float:
    """When the caller stops waiting, wall clock: the request's ``deadline``, else now plus its
    ``timeout`` (older senders), else plus the op's ``default``; what a job keeps to know how long to
    resend its outcome."""
    return parse_deadline(req.get("deadline", "")) or time.time() + budget(req.get("timeout", ""), default)


def budget(text: str, default: float) -> float:
    """The caller's remaining time in seconds, from the request's ``timeout`` (milliseconds)."""
    try:
        value = int(text) / 1000.0
    except (TypeError, ValueError):
        return default
    return value if value > 0 else default


# The stanzas of an op's round trip are built and read as elements, not through slixmpp's stanza
# interfaces: each ``iq["..."]`` is a lookup through the stanza's plugins and interfaces, and building
# an Iq with make_iq_* and then setting its fields runs them again. Profiled (callgrind), a round trip
# made 35 interface reads, 12 writes and 5 Iq set-ups that way: the largest share of Vertebra's own
# instructions per op (bench/README.md). slixmpp still sends what is built here (XEP-0198 counts it).

def request(xmpp: Any, to: str, attrs: dict[str, str], text: str, iq_id: str | None = None) -> Iq:
    """The IQ-set carrying ``<op ATTRS>TEXT</op>`` to ``to``, with id ``iq_id`` (default: a new one)."""
    xml = ET.Element(_IQ, {"type": "set", "id": iq_id or xmpp.new_id(), "to": to})
    ET.SubElement(xml, _OP, attrs).text = text
    return Iq(xmpp, xml=xml)


def result(iq: Iq, tag: str, attrs: dict[str, str], text: str | None = None) -> Iq:
    """The IQ result answering ``iq`` with one Vertebra element ``<TAG ATTRS>TEXT</TAG>``."""
    xml = ET.Element(_IQ, {"type": "result", "id": iq.xml.get("id", "")})
    sender = iq.xml.get("from")
    if sender:
        xml.set("to", sender)
    ET.SubElement(xml, f"{{{NS}}}{tag}", attrs).text = text
    return Iq(iq.stream, xml=xml)


def op_of(iq: Iq) -> Any:
    """The ``<op>`` element of a request IQ (its attributes read with ``.get(name, "")``)."""
    return iq.xml.find(_OP)


def error_reply(iq: Iq, error: OpError) -> Iq:
    """Build the stanza error answering ``iq`` for ``error``, with its application condition."""
    xmpp: Any = iq.stream  # the client the request came in on
    reply = xmpp.make_iq_error(iq["id"], type=error.stanza_type, condition=error.stanza_condition,
                               text=error.text[:1000], ito=iq["from"])
    reply["error"].xml.append(ET.Element(f"{{{NS}}}{error.condition}"))
    return reply


def app_condition(stanza: Iq | Message) -> str | None:
    """The Vertebra application condition of an error stanza, if any."""
    for child in stanza["error"].xml:
        if child.tag.startswith("{" + NS + "}"):
            return child.tag.split("}", 1)[1]
    return None


#: Deepest element nesting a stanza may have, the stanza itself being level 1 (docs/protocol.md 3.2).
#: Vertebra's own stanzas are 2 deep, a disco#info answer with its form 5; slixmpp walks and copies
#: stanzas recursively, so a few thousand levels from any account would overflow Python's stack.
#: The plugin's ``max_stanza_depth`` setting; this is its default.
MAX_STANZA_DEPTH = 32
# Marks the empty stand-in for a stanza that was too deep (``XEP_Vertebra.incoming``).
_OVER_DEEP = f"{{{NS}#internal}}over-deep"
_IQ = "{jabber:client}iq"
_MESSAGE = "{jabber:client}message"
_OP = f"{{{NS}}}op"
_PRESENCE = "{jabber:client}presence"
_JOB_TAGS = {f"{{{NS}}}progress", f"{{{NS}}}outcome"}
_OUTCOME = f"{{{NS}}}outcome"
#: ``<session id>`` in every presence a broker sends: a new id per broker session (docs/protocol.md 4.5).
BROKER_SESSION = f"{{{NS}}}session"
RECEIPTS = "urn:xmpp:receipts"  # XEP-0184: an outcome message asks for one; its receipt says it arrived
_RECEIPT_REQUEST = f"{{{RECEIPTS}}}request"
_RECEIPT = f"{{{RECEIPTS}}}received"


def _same_address(sender: str, to: str) -> bool:
    """Whether ``sender`` is the address ``to``, as written or once both are prepared as JIDs."""
    if sender == to:
        return True
    try:
        return str(JID(sender)) == str(JID(to))
    except InvalidJID:
        return False


def nested_deeper_than(xml: Any, limit: int) -> bool:
    """Whether an element tree has more than ``limit`` levels, found level by level without recursion."""
    level, depth = [xml], 1
    while level:
        if depth > limit:
            return True
        level = [child for element in level for child in element]
        depth += 1
    return False


class XEP_Vertebra(BasePlugin):
    """The Vertebra protocol on one stream: its stanzas, the ops this actor serves (disco features
    added at every session bind), the replies it waits for and the job reports it follows.

    Its handler is an input filter (registered in ``plugin_init``, after XEP-0198's, which counts
    every stanza) that reads raw attributes and hands Vertebra's own stanzas straight to where they
    go: a reply to the future of its pending request, a request to the actor's op handler, a job's
    progress or outcome to the queue of whoever watches that job. slixmpp would test every stanza
    against every registered Callback (twenty-odd here), which profiling showed to be the largest
    single cost of an op's round trip. Every other stanza passes on to slixmpp's handlers.
    """

    name = "vertebra"
    description = "Vertebra ops over IQ (urn:vertebra:1)"
    dependencies = {"xep_0030"}
    default_config = {"max_stanza_depth": MAX_STANZA_DEPTH}

    def plugin_init(self) -> None:
        register_stanza_plugin(Iq, OpRequest)
        register_stanza_plugin(Iq, Outcome)
        register_stanza_plugin(Iq, Accepted)
        register_stanza_plugin(Message, Outcome)
        register_stanza_plugin(Message, Progress)
        # IQ id -> (who waits, the index of the addressee in its ``targets``): a call of agents.fanout,
        # or a _Reply for one IQ of send_iq's
        self.pending: dict[str, tuple[Any, int]] = {}
        # (agent, rid) -> the queue of its progress and outcome messages, and of the agent's presence:
        # a plain _Inbox until a job is accepted (most requests are quick; an asyncio.Queue per target
        # would cost a call to 50,000 agents more than its list)
        self.jobs: dict[tuple[str, str], asyncio.Queue[Any] | _Inbox] = {}
        self._watched: dict[str, set[str]] = {}  # agent full JID -> rids watched there
        self.receipts: dict[str, asyncio.Future[bool]] = {}  # outcome message id -> arrived (True) or bounced
        self.features: tuple[str, ...] = ()  # the disco features of the ops served
        self._serve_op: Callable[[Iq], None] | None = None
        self.xmpp.add_filter("in", self._dispatch)

    def plugin_end(self) -> None:
        self.xmpp.del_filter("in", self._dispatch)
        for feature in self.features:
            self.xmpp.plugin["xep_0030"].del_feature(feature=feature)

    def session_bind(self, jid: Any) -> None:
        disco = self.xmpp.plugin["xep_0030"]
        for feature in self.features:
            disco.add_feature(feature)

    def serve(self, handler: Callable[[Iq], None], features: Iterable[str]) -> None:
        """Hand every op request to ``handler``, and advertise ``features`` (one per op served)."""
        self._serve_op = handler
        self.features = tuple(features)
        if self.xmpp.session_bind_event.is_set():
            self.session_bind(self.xmpp.boundjid.full)

    def incoming(self, xml: Any) -> Any:
        """Every top-level element the parser completes, before slixmpp builds a stanza of it (the
        stream's ``incoming_filter`` calls this). One nested deeper than ``max_stanza_depth`` is
        replaced by an empty stand-in of the same kind: it is still counted for XEP-0198 (a stanza
        never counted would sit in the server's resend queue) and then dropped by the input filter. A
        request (IQ get or set) is answered with a plain error built afresh, never a copy of what was
        sent."""
        limit = self.config["max_stanza_depth"]
        if not nested_deeper_than(xml, limit):
            return xml
        sender, kind = xml.get("from"), xml.get("type")
        log.warning("dropped a %s from %s nested deeper than %d levels", xml.tag.rpartition("}")[2], sender, limit)
        if xml.tag == _IQ and kind in ("get", "set"):
            self.xmpp.make_iq_error(xml.get("id", ""), type="modify", condition="bad-request", ito=sender,
                                    text=f"stanza nested deeper than {limit} levels; nothing was done").send()
        stand_in = type(xml)(xml.tag, {name: value for name, value in xml.attrib.items()
                                       if name in ("from", "to", "id", "type")})
        stand_in.append(type(xml)(_OVER_DEEP))
        return stand_in

    def expect_reply(self, iq: Iq) -> asyncio.Future[Any]:
        """The future the reply to ``iq`` will be set on (its raw element); only its addressee may answer
        it. The caller removes it with :meth:`forget_reply` whatever happens."""
        waiter = _Reply(iq.xml.get("to", ""))
        self.pending[iq.xml.get("id", "")] = (waiter, 0)
        return waiter.fut

    def forget_reply(self, iq_id: str) -> None:
        self.pending.pop(iq_id, None)

    def fail_pending(self, error: BaseException | None) -> None:
        """End every request still waiting for its reply: with ``error``, or cancelled when None."""
        for waiter, index in list(self.pending.values()):
            waiter.failed(index, error)

    def take_reply(self, xml: Any) -> bool:
        """Hand the IQ result or error ``xml`` to the request waiting for it, straight from the element
        the parser produced (the actor's stream calls this before slixmpp builds a stanza object of
        it, and counts what it takes for XEP-0198); False when it answers no pending request."""
        if xml.tag != _IQ:
            return False
        iq_id = xml.get("id")
        entry = self.pending.get(iq_id)
        if entry is None or xml.get("type") not in ("result", "error") or (len(xml) and xml[-1].tag == _OVER_DEEP):
            return False
        waiter, index = entry
        # Only the addressee (or the server bouncing on its behalf, which uses the same address) answers:
        # the address as sent, or as the server prepared it (case, and the like).
        if _same_address(xml.get("from", ""), waiter.targets[index]):
            del self.pending[iq_id]
            waiter.reply(index, xml)
        return True

    def watch_job(self, agent: str, rid: str) -> None:
        """Keep the progress and outcome messages of request ``rid``, accepted only from ``agent``, and
        every presence ``agent`` sends us meanwhile (the agent directs its presence to whoever waits on
        its jobs, so that the server tells them when its session ends), until :meth:`job_queue` is asked
        for them or :meth:`unwatch_job`."""
        self.jobs[(agent, rid)] = _Inbox()
        self._watched.setdefault(agent, set()).add(rid)

    def job_queue(self, agent: str, rid: str) -> asyncio.Queue[Any]:
        """The queue of what :meth:`watch_job` keeps for ``(agent, rid)``, with what arrived so far."""
        kept = self.jobs.get((agent, rid))
        if isinstance(kept, asyncio.Queue):
            return kept
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for item in kept or ():
            queue.put_nowait(item)
        self.jobs[(agent, rid)] = queue
        self._watched.setdefault(agent, set()).add(rid)
        return queue

    def watches(self, agent: str) -> bool:
        """Whether a job of ``agent`` (a full JID) is watched, so its presences are kept too."""
        return agent in self._watched

    def unwatch_job(self, agent: str, rid: str) -> None:
        self.jobs.pop((agent, rid), None)
        rids = self._watched.get(agent)
        if rids is not None:
            rids.discard(rid)
            if not rids:
                del self._watched[agent]

    def expect_receipt(self, msg_id: str) -> asyncio.Future[bool]:
        """The future that says whether the message ``msg_id`` arrived (its XEP-0184 receipt: True) or
        was bounced by the server (False: its addressee is gone). The caller removes it with
        :meth:`forget_receipt`."""
        fut = self.receipts.get(msg_id)
        if fut is None or fut.done():
            fut = self.receipts[msg_id] = asyncio.get_running_loop().create_future()
        return fut

    def forget_receipt(self, msg_id: str) -> None:
        self.receipts.pop(msg_id, None)

    def _dispatch(self, stanza: Any) -> Any:
        xml = stanza.xml
        if len(xml) and xml[-1].tag == _OVER_DEEP:  # refused by ``incoming``, already counted
            return None
        if xml.tag == _IQ:
            kind = xml.get("type")
            if kind in ("result", "error") and self.take_reply(xml):  # a stream of another kind
                return None
            if kind == "set" and self._serve_op is not None and xml.find(_OP) is not None:
                self._serve_op(stanza)
                return None
        elif xml.tag == _MESSAGE:
            if self.receipts and self._on_receipt_or_bounce(xml):
                return None
            if any(child.tag in _JOB_TAGS for child in xml):
                self._on_job_message(stanza)
                return None
        elif xml.tag == _PRESENCE and xml.get("from") in self._watched:
            for rid in self._watched[xml.get("from")]:
                self.jobs[(xml.get("from"), rid)].put_nowait(stanza)
        return stanza

    def _on_receipt_or_bounce(self, xml: Any) -> bool:
        receipt = xml.find(_RECEIPT)
        if receipt is not None:
            fut = self.receipts.get(receipt.get("id", ""))
            arrived = True
        elif xml.get("type") == "error":
            fut = self.receipts.get(xml.get("id", ""))
            arrived = False
        else:
            return False
        if fut is not None and not fut.done():
            fut.set_result(arrived)
        return fut is not None

    def _on_job_message(self, msg: Message) -> None:
        sender = str(msg["from"])
        if msg.xml.find(_RECEIPT_REQUEST) is not None and msg.xml.find(_OUTCOME) is not None \
                and msg.xml.get("type") != "error":
            # Acknowledged whether or not anyone still waits for it: it arrived, so the agent may stop
            # sending it again (XEP-0184).
            ack = self.xmpp.make_message(mto=sender)
            ET.SubElement(ack.xml, _RECEIPT, id=msg["id"])
            ack.send()
        for child in msg.xml:
            if child.tag in _JOB_TAGS:
                # Keyed by sender too: only the agent that accepted the request may report on it.
                queue = self.jobs.get((sender, child.get("rid", "")))
                if queue is not None:
                    queue.put_nowait(msg)
                return


class _Inbox(list[Any]):
    """What arrives for a watched request before anyone asks for its queue (a job's acceptance)."""

    put_nowait = list.append


class _Reply:
    """The one reply ``send_iq`` waits for, as ``pending`` holds it."""

    __slots__ = ("fut", "targets")

    def __init__(self, to: str) -> None:
        self.fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.targets = (to,)

    def reply(self, _index: int, xml: Any) -> None:
        if not self.fut.done():
            self.fut.set_result(xml)

    def failed(self, _index: int, error: BaseException | None) -> None:
        if not self.fut.done():
            if error is None:
                self.fut.cancel()
            else:
                self.fut.set_exception(error)


register_plugin(XEP_Vertebra)
