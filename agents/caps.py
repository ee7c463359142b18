"""XEP-0115 entity capabilities, as much of them as Vertebra uses: the hash an actor states on the
presences it sends itself, computed over its own disco#info, and the check of another actor's hash
against the disco#info it answers (the broker's, broker/service.py).

slixmpp's caps plugin is not loaded. It adds caps to every outgoing presence through an async output
filter, which slixmpp runs in a task of its own for every stanza sent (each reply would pay several
loop turns for it), and it disco-queries every new hash any sender puts in a presence and keeps each
answer, and each sender's hash, for as long as the process runs. An actor here states its own hash
(``stamp``) and answers disco#info on its caps node (``advertise``); the broker asks about the hashes
of the agents the mesh file admits itself.

The hash is XEP-0115 section 5.1's, over the identities, the features and every extended form that
has a FORM_TYPE (docs/protocol.md 4.3).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import slixmpp
from slixmpp import Iq, Presence
from slixmpp.plugins.xep_0004.stanza import Form
from slixmpp.plugins.xep_0115.stanza import Capabilities
from slixmpp.xmlstream import register_stanza_plugin

NAMESPACE = Capabilities.namespace
#: The node URI actors state (XEP-0115 leaves it to the implementation); the one slixmpp's plugin used.
NODE = f"http://slixmpp.com/ver/{slixmpp.__version__}"
HASH = "sha-1"
#: The hash names a stated hash is checked with; XEP-0115 names more (sha-256, sha-512), not yet taken.
HASHES = {"sha-1": hashlib.sha1}

# Presences carry <c/> (read by the broker, written by every actor that advertises).
register_stanza_plugin(Presence, Capabilities)


def verstring(info: Any, hash_name: str = HASH) -> str | None:
    """The verification string of a disco#info answer (XEP-0115 5.1), or None for a hash name not in
    ``HASHES``."""
    algorithm = HASHES.get(hash_name)
    if algorithm is None:
        return None
    text = "".join(f"{'/'.join(part or '' for part in identity)}<"
                   for identity in sorted(info["identities"], key=lambda i: tuple(p or "" for p in i)))
    text += "".join(f"{feature}<" for feature in sorted(info["features"]))
    forms: list[tuple[str, dict[str, Any]]] = []
    for form in info["substanzas"]:
        fields = form.get_fields() if isinstance(form, Form) else {}
        if "FORM_TYPE" in fields:  # a form without one is left out (XEP-0115 5.4)
            types = _values(fields["FORM_TYPE"])
            forms.append((types[0] if types else "", fields))
    for form_type, fields in sorted(forms, key=lambda f: f[0]):
        text += f"{form_type}<"
        for var in sorted(v for v in fields if v != "FORM_TYPE"):
            text += f"{var}<" + "".join(f"{value}<" for value in sorted(_values(fields[var])))
    return base64.b64encode(algorithm(text.encode()).digest()).decode()


def _values(field: Any) -> list[str]:
    raw = field.get_value(convert=False)
    if raw is None:
        return []
    return [str(v) for v in raw] if isinstance(raw, list) else [str(raw)]


async def advertise(xmpp: Any) -> str:
    """List caps among this session's features, answer disco#info on the caps node, and return the
    hash to state on presence (call after the features and the form are in place, per session)."""
    disco = xmpp.plugin["xep_0030"]
    disco.add_feature(NAMESPACE)
    info = await disco.get_info(local=True)
    if isinstance(info, Iq):
        info = info["disco_info"]
    ver = verstring(info)
    assert ver is not None  # HASH is among HASHES
    await disco.set_info(node=f"{NODE}#{ver}", info=info)
    return ver


def stamp(presence: Presence, ver: str) -> None:
    """Put the caps hash ``ver`` on a presence this actor sends."""
    presence["caps"]["node"], presence["caps"]["hash"], presence["caps"]["ver"] = NODE, HASH, ver
