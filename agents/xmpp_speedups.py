"""Two of slixmpp's pure-Python hot spots replaced by the same functions computed in C.

slixmpp derives SCRAM keys in a Python HMAC loop (70-120 ms of CPU per login) and escapes XML text
one character at a time in a generator (about 5 ms for a 64 KiB payload). :func:`install` puts
``hashlib.pbkdf2_hmac`` (RFC 5802's Hi() is PBKDF2) and ``str.translate`` in their place: logins
cost 3-4 times less and a large payload is escaped in microseconds, with the same output.

Both replace functions of one slixmpp release range (``SLIXMPP_RANGE``, pinned in pyproject.toml).
``ORIGINALS`` records a hash of the source of every slixmpp function the project stands in for, as
that release has it: the two replaced here, and those whose work agents/fanout.py repeats or whose
hooks it and the actor's stream rely on. The unit test ``tests/unit/test_xmpp_speedups.py`` fails when
an upgrade changes any of them, so whoever upgrades looks at what changed before these stand in for
it again.
"""

from __future__ import annotations

import hashlib
import importlib
from typing import Any

from slixmpp.util.sasl import mechanisms as _sasl

#: The slixmpp releases these replacements were checked against (the same range pyproject.toml pins).
SLIXMPP_RANGE = ">=1.17,<1.18"

# The package re-exports the function under the module's name; the module itself is needed here.
_tostring = importlib.import_module("slixmpp.xmlstream.tostring")

#: slixmpp's own functions, kept to compare against and for the cases not replaced (CDATA escaping).
ORIGINAL_HI = _sasl.SCRAM.Hi
ORIGINAL_ESCAPE = _tostring.escape

#: SHA-256 of ``inspect.getsource`` of each slixmpp function stood in for, in the pinned release.
ORIGINALS = {
    # replaced by install()
    "slixmpp.util.sasl.mechanisms.SCRAM.Hi": "1b6657b124370691650dfbf2ebd0b91c7d757b76ac205c991b84d045ab14f1ca",
    "slixmpp.xmlstream.tostring.escape": "de7d468beadbf5411f7bad639a8ab816c9d33cbeaa637d5231399a1ea7ea2fe0",
    # agents/fanout.py's write_stanzas counts outgoing stanzas as this filter does
    "slixmpp.plugins.xep_0198.stream_management.XEP_0198._handle_outgoing":
        "8bb062fc6301c50fd4e95400c13e9618a7ee9be222eac5abcd5d4a1c1051b150",
    # the actor's stream counts the stanzas it takes off the raw element as this filter does
    "slixmpp.plugins.xep_0198.stream_management.XEP_0198._handle_incoming":
        "0f984a00061958860b96fafbd53c777cfb748dfbf1fab8eb96d9283f871d18c5",
    # the actor's stream takes replies off the raw element in its own copy of this method
    "slixmpp.xmlstream.xmlstream.XMLStream._spawn_event":
        "32ff8007eafb24e31bfe5f59528b6d74d32b6f6d3d99d8685f022c38f19658b4",
    # what slixmpp's send path does with a stanza object (filters, then tostring and send_raw)
    "slixmpp.xmlstream.xmlstream.XMLStream.run_filters":
        "4c60fe00f01f5fb326ccb242d62cef99d14682f3868cfcdeef50a1b4bee658e1",
    # enabling XEP-0198 on a new session after a reconnect keeps the old stream's count of stanzas
    # sent and of the last ack; the actor resets both at resource binding (Actor._on_session_bind)
    "slixmpp.plugins.xep_0198.stream_management.XEP_0198._handle_sm_feature":
        "98f19a3893f870ee6ded4ce4ed8f2f82065463ae69f77aacf0a03cb1ef9e37b5",
    # the one 'out' filter a stream has besides XEP-0198's: it looks at presences only (the broker's
    # greetings and acknowledgements pass it by on purpose: agents/fanout.py says why)
    "slixmpp.roster.multi.Roster._save_last_status":
        "243f2a48c1f7445f331331181ffb25fa843bafb1a4db977aa75c18db9cf7a01c",
}

_XML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;", '"': "&quot;"})


def scram_hi(self: Any, text: Any, salt: bytes, iterations: int) -> bytes:
    """SCRAM's Hi(): PBKDF2-HMAC with the mechanism's hash, in C."""
    return hashlib.pbkdf2_hmac(self.hash().name, bytes(text), salt, iterations)


def escape(text: str, use_cdata: bool = False) -> str:
    """XML escaping of text and attribute values as slixmpp does it; the CDATA form (which no Vertebra
    stanza uses) is slixmpp's."""
    return ORIGINAL_ESCAPE(text, use_cdata) if use_cdata else text.translate(_XML_ESCAPES)


def install() -> None:
    """Put the replacements in place (idempotent). ``agents.actor`` calls it on import."""
    _sasl.SCRAM.Hi = scram_hi  # type: ignore[method-assign]
    _tostring.escape = escape  # type: ignore[attr-defined]
