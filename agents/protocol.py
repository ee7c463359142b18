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

import base64
import binascii
import re
from typing import Any

import msgpack
from slixmpp import Iq, Message
from slixmpp.plugins import BasePlugin, register_plugin
from slixmpp.xmlstream import ElementBase, ET, register_stanza_plugin

from .errors import BadPayload, OpError, TooLarge

NS = "urn:vertebra:1"

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
    """``<op name rid timeout deadline on for>`` — a request to run an op; the text is the arguments,
    ``on`` the space-separated resources the caller addressed, ``for`` the bare JID a delegate acts
    for. ``timeout`` is the caller's remaining budget in milliseconds, ``deadline`` the same moment as
    the sender's wall clock (Unix time in milliseconds), so a request held up on the way is not
    started late (docs/protocol.md section 9)."""

    name = "op"
    namespace = NS
    plugin_attrib = "vertebra_op"
    interfaces = {"name", "rid", "timeout", "deadline", "on", "for"}


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
        nxt = []
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


def error_reply(iq: Iq, error: OpError) -> Iq:
    """Build the stanza error answering ``iq`` for ``error``, with its application condition."""
    reply = iq.stream.make_iq_error(iq["id"], type=error.stanza_type, condition=error.stanza_condition,
                                    text=error.text[:1000], ito=iq["from"])
    reply["error"].xml.append(ET.Element(f"{{{NS}}}{error.condition}"))
    return reply


def app_condition(stanza: Iq | Message) -> str | None:
    """The Vertebra application condition of an error stanza, if any."""
    for child in stanza["error"].xml:
        if child.tag.startswith("{" + NS + "}"):
            return child.tag.split("}", 1)[1]
    return None


class XEP_Vertebra(BasePlugin):
    """Registers the Vertebra stanzas; handlers are registered by the agent and client."""

    name = "vertebra"
    description = "Vertebra ops over IQ (urn:vertebra:1)"
    dependencies = {"xep_0030"}

    def plugin_init(self) -> None:
        register_stanza_plugin(Iq, OpRequest)
        register_stanza_plugin(Iq, Outcome)
        register_stanza_plugin(Iq, Accepted)
        register_stanza_plugin(Message, Outcome)
        register_stanza_plugin(Message, Progress)


register_plugin(XEP_Vertebra)
