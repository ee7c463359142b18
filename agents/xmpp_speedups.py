"""Two of slixmpp's pure-Python hot spots replaced by the same functions computed in C.

slixmpp derives SCRAM keys in a Python HMAC loop (70-120 ms of CPU per login) and escapes XML text
one character at a time in a generator (about 5 ms for a 64 KiB payload). :func:`install` puts
``hashlib.pbkdf2_hmac`` (RFC 5802's Hi() is PBKDF2) and ``str.translate`` in their place: logins
cost 3-4 times less and a large payload is escaped in microseconds, with the same output.

Both replace functions of one slixmpp release range (``SLIXMPP_RANGE``, pinned in pyproject.toml).
``ORIGINALS`` records a hash of each replaced function's source as that release has it; the unit
test ``tests/unit/test_xmpp_speedups.py`` fails when an upgrade changes either, so whoever upgrades
looks at what changed before these stand in for it again.
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

#: SHA-256 of ``inspect.getsource`` of each replaced function in the pinned slixmpp release.
ORIGINALS = {
    "slixmpp.util.sasl.mechanisms.SCRAM.Hi": "1b6657b124370691650dfbf2ebd0b91c7d757b76ac205c991b84d045ab14f1ca",
    "slixmpp.xmlstream.tostring.escape": "de7d468beadbf5411f7bad639a8ab816c9d33cbeaa637d5231399a1ea7ea2fe0",
}

_XML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;", '"': "&quot;"})


def scram_hi(self: Any, text: Any, salt: bytes, iterations: int) -> bytes:
    """SCRAM's Hi(): PBKDF2-HMAC with the mechanism's hash, in C."""
    return hashlib.pbkdf2_hmac(self.hash().name, bytes(text), salt, iterations)


def escape(text: str, use_cdata: bool = False) -> str:
    """XML text escaping as slixmpp does it; the CDATA form (which no Vertebra stanza uses) is slixmpp's."""
    return ORIGINAL_ESCAPE(text, use_cdata) if use_cdata else text.translate(_XML_ESCAPES)


def install() -> None:
    """Put the replacements in place (idempotent). ``agents.actor`` calls it on import."""
    _sasl.SCRAM.Hi = scram_hi  # type: ignore[method-assign]
    _tostring.escape = escape  # type: ignore[attr-defined]
