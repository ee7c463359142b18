"""Ops describe themselves on the wire: each op's arguments and facts as a disco node of its agent.

Every agent answers XEP-0030 disco#info on the node ``urn:vertebra:op#NAME`` for each op it serves,
with an XEP-0004 form (``FORM_TYPE`` ``urn:vertebra:op``) that is the op's argument form: one field
per argument, its XEP-0004 type (``list-single`` with options for a choice, ``text-multi`` or
``list-multi`` for a list, ``boolean``, ``text-private`` for a secret), ``required``, its help as
``desc`` and its default as value, with XEP-0122 validation for the datatype, range and pattern. The
op's own facts (effect, deadline, progress, resources, address, scope, sender, announce: the ops
room's topic for it, makes, removes, rereads) are hidden fields named ``op#FACT``, which no argument name can take
(``op#result``, what the op answers for people to read, is its fields and summary as one JSON text);
the form's title is the op's name, its
instructions the summary and description. disco#items on the node ``urn:vertebra:ops`` lists every
op the agent serves, named by its summary. docs/protocol.md (section 4.7) is the contract.

What is described is what :meth:`agents.ops.OpSpec.describe` returns, and :func:`spec_of` turns
it back into an :class:`~agents.ops.OpSpec` that validates, parses ``key=value`` words and prints help
as the declaration does, so a client needs none of the kind's code. Descriptions change only with an
agent's code, and the ops it serves are in its caps hash, so a reader caches them per caps hash.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import BadArguments, UnknownOp
from .ops import OpSpec, Param, Result

OP_NODE_PREFIX = "urn:vertebra:op#"  # disco#info node of one op: this prefix and the op's name
OPS_NODE = "urn:vertebra:ops"  # disco#items node listing every op served
OP_FORM = "urn:vertebra:op"  # FORM_TYPE of an op's description

# XEP-0122 datatypes of each argument kind, both ways.
_DATATYPES = {"string": "xs:string", "integer": "xs:integer", "number": "xs:double", "boolean": "xs:boolean"}
_KINDS = {v: k for k, v in _DATATYPES.items()}
_FACTS = ("effect", "deadline", "progress", "resources", "address", "scope", "sender", "announce", "makes",
          "removes", "rereads")
_FACT = "op#"  # prefix of the hidden fields holding the op's facts ("#" is never in an argument name)


def op_node(name: str) -> str:
    """The disco node describing the op ``name``."""
    return OP_NODE_PREFIX + name


# -- the agent's side: publishing ------------------------------------------------------------------

def publish(xmpp: Any, ops: Mapping[str, OpSpec]) -> None:
    """Answer disco#info on each op's node and disco#items on ``OPS_NODE`` for ``ops``, from the
    session bind on (the nodes belong to the bound JID)."""
    xmpp.register_plugin("xep_0004")
    xmpp.register_plugin("xep_0122")

    def on_bind(_jid: Any) -> None:
        disco = xmpp.plugin["xep_0030"]
        me = xmpp.boundjid.full
        for spec in ops.values():
            info = disco.stanza.DiscoInfo()
            info.add_identity("automation", "command-node", spec.name)
            info.append(form_of(xmpp, spec))
            disco.set_info(jid=me, node=op_node(spec.name), info=info)
        # The listing offers people the ops for them; each op, internal ones too, is described on its node.
        disco.set_items(jid=me, node=OPS_NODE,
                        items={(me, op_node(spec.name), spec.summary) for spec in ops.values() if not spec.internal})

    xmpp.add_event_handler("session_bind", on_bind)
    if xmpp.session_bind_event.is_set():
        on_bind(xmpp.boundjid)


def form_of(xmpp: Any, spec: OpSpec) -> Any:
    """The XEP-0004 form describing ``spec`` (its arguments as fields, its facts hidden)."""
    form = xmpp.plugin["xep_0004"].make_form(ftype="form", title=spec.name,
                                             instructions=f"{spec.summary}\n\n{spec.description}")
    form.add_field(var="FORM_TYPE", ftype="hidden", value=OP_FORM)
    described = spec.describe()
    for fact in _FACTS:
        value = described[fact]
        if value is None or value == [] or value == "":
            continue
        form.add_field(var=_FACT + fact, ftype="hidden",
                       value=[str(v) for v in value] if isinstance(value, list) else _text(value))
    if spec.result is not None:
        form.add_field(var=_FACT + "result", ftype="hidden",
                       value=json.dumps(described["result"], separators=(",", ":")))
    for p in spec.params:
        field = form.add_field(var=p.name, ftype=_field_type(p), label=p.name, desc=p.help, required=p.required,
                               options=[{"label": str(c), "value": _text(c)} for c in p.choices or ()] or None)
        default = p.default if not p.secret else None
        if default is not None and default != []:
            field["value"] = [_text(v) for v in default] if p.many else _text(default)
        validate = field["validate"]
        validate["datatype"] = _DATATYPES[p.kind]
        if p.pattern:
            validate["regex"] = p.pattern
        elif p.min is not None or p.max is not None:
            validate.set_range(True, minimum="" if p.min is None else _text(p.min),
                               maximum="" if p.max is None else _text(p.max))
    return form


def _field_type(p: Param) -> str:
    if p.secret:
        return "text-private"
    if p.choices:
        return "list-multi" if p.many else "list-single"
    if p.many:
        return "text-multi"
    return "boolean" if p.kind == "boolean" else "text-single"


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return repr(value)  # "30.0": read back as a number, not an integer
    return str(value)


# -- a reader's side -------------------------------------------------------------------------------

def description_of(form: Any) -> dict[str, Any]:
    """What :meth:`OpSpec.describe` returned on the agent, read back from its form."""
    fields = form.get_fields()
    facts = {var[len(_FACT):]: fields[var] for var in fields if var.startswith(_FACT)}
    # One <instructions/> element a line (slixmpp splits them so), an empty line one with no text.
    lines = [e.text or "" for e in form.xml.findall(f"{{{form.namespace}}}instructions")]
    summary, description = (lines[0], "\n".join(lines[2:])) if lines else ("", "")

    def fact(name: str) -> Any:
        values = _values(facts[name]) if name in facts else []
        return values[0] if values else None

    out: dict[str, Any] = {
        "name": form["title"], "summary": summary, "description": description,
        "effect": fact("effect") or "change", "deadline": float(fact("deadline") or 30.0),
        "progress": fact("progress") == "true", "address": fact("address"),
        "resources": _values(facts["resources"]) if "resources" in facts else [],
        "scope": fact("scope") or "all", "sender": fact("sender") or "anyone", "announce": fact("announce") or "",
        "makes": fact("makes") or "", "removes": fact("removes") or "", "rereads": fact("rereads") or "",
        "result": json.loads(fact("result")) if fact("result") else None}
    out["destructive"] = out["effect"] == "destructive"
    params = []
    for var in fields:
        if var == "FORM_TYPE" or var.startswith(_FACT):
            continue
        field = fields[var]
        ftype = field["type"]
        validate = field["validate"]
        kind = _KINDS.get(validate["datatype"], "string")
        many = ftype in ("text-multi", "list-multi")
        values = _values(field)
        default: Any = [_typed(kind, v) for v in values] if many else _typed(kind, values[0]) if values else None
        bounds = validate["range"] or {}
        choices = [_typed(kind, o["value"]) for o in field.get_options()] or None
        params.append({
            "name": var, "type": kind, "many": many, "required": bool(field["required"]),
            "default": default if default != [] or not field["required"] else None, "help": field["desc"] or "",
            "choices": choices, "pattern": validate["regex"] or None,
            "min": _typed("number", bounds["minimum"]) if bounds.get("minimum") else None,
            "max": _typed("number", bounds["maximum"]) if bounds.get("maximum") else None,
            "secret": ftype == "text-private"})
    out["params"] = params
    return out


def _values(field: Any) -> list[str]:
    """A field's values as sent, whatever its type (slixmpp's get_value shapes them by type)."""
    return [e.text or "" for e in field.xml.findall(f"{{{field.namespace}}}value")]


def _typed(kind: str, text: str) -> Any:
    if kind == "boolean":
        return text in ("true", "1")
    if kind == "integer":
        return int(text)
    if kind == "number":
        number = float(text)
        return int(number) if "." not in text and "e" not in text.lower() and number.is_integer() else number
    return text


async def _unserved(*_args: Any, **_kwargs: Any) -> Any:
    raise UnknownOp("this op was described by another agent; it runs there, not here")


def spec_of(description: Mapping[str, Any]) -> OpSpec:
    """An :class:`OpSpec` from a description (``OpSpec.describe()`` or :func:`description_of`): it
    validates, parses ``key=value`` words and prints help; only the agent that described it runs it."""
    try:
        params = tuple(Param(
            name=p["name"], kind=p["type"], many=bool(p["many"]), required=bool(p["required"]),
            default=p["default"], help=p.get("help") or "", choices=tuple(p["choices"]) if p.get("choices") else None,
            pattern=p.get("pattern"), min=p.get("min"), max=p.get("max"), secret=bool(p.get("secret")))
            for p in description["params"])
        return OpSpec(name=description["name"], summary=description["summary"],
                      description=description.get("description") or "", params=params, effect=description["effect"],
                      deadline=float(description["deadline"]), progress=bool(description["progress"]),
                      resources=tuple(description.get("resources") or ()), func=_unserved,
                      address=description.get("address"), scope=description.get("scope") or "all",
                      sender=description.get("sender") or "anyone", announce=description.get("announce") or "",
                      makes=description.get("makes") or "", removes=description.get("removes") or "",
                      rereads=description.get("rereads") or "",
                      result=Result.from_description(description.get("result")))
    except (KeyError, TypeError, ValueError) as exc:
        raise BadArguments(f"an op description that cannot be read: {exc!r}") from None


async def fetch_description(xmpp: Any, jid: str, name: str, timeout: float) -> dict[str, Any]:
    """Ask the agent ``jid`` for its description of the op ``name`` (one disco#info query)."""
    iq = await xmpp.plugin["xep_0030"].get_info(jid=jid, node=op_node(name), timeout=timeout)
    form = _op_form(xmpp, iq["disco_info"]["substanzas"])
    if form is None:
        raise BadArguments(f"{jid} answered for {op_node(name)} without a {OP_FORM} form")
    return description_of(form)


async def fetch_summaries(xmpp: Any, jid: str, timeout: float) -> dict[str, str]:
    """Every op the agent ``jid`` serves and its summary (one disco#items query)."""
    iq = await xmpp.plugin["xep_0030"].get_items(jid=jid, node=OPS_NODE, timeout=timeout)
    return {node[len(OP_NODE_PREFIX):]: name or "" for _jid, node, name in iq["disco_items"]["items"]
            if node and node.startswith(OP_NODE_PREFIX)}


def _op_form(xmpp: Any, substanzas: Iterable[Any]) -> Any:
    form_class = xmpp.plugin["xep_0004"].stanza.Form
    for sub in substanzas:
        if isinstance(sub, form_class) and OP_FORM in _values(sub.get_fields().get("FORM_TYPE", sub)):
            return sub
    return None
