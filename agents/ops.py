"""Op declarations: one decorated coroutine per op, from which everything else is derived.

An op is declared once, where it is implemented::

    @op("storage.snapshot.create", effect="change", deadline=60,
        resources=("/volume/{volume}",))
    async def snapshot_create(self, call: Call,
                              volume: Annotated[str, Arg("volume to snapshot")],
                              name: Annotated[str, Arg("snapshot name")] = "") -> dict:
        "Take a read-only snapshot of a volume."

``effect`` says what running the op does to the world: ``"read"`` (changes nothing), ``"change"``
(makes or alters something) or ``"destructive"`` (destroys, rolls back, powers off: the two-person
rule in workflows, the durable record of its outcome, the policy-age check). The default is
``"change"``, so an op whose author forgot to say fails closed: a fenced node's identities may run
only reads (``agents/fenced.py``).

Who may send it (``sender``, ``sender_kinds``), whether only the leading broker instance serves it
(``leader``) and whether a person's direct call needs approval (``approval``) are declared here
too: authorization (``agents/authz.py``) and the broker read them from the declaration, so no table
elsewhere repeats an op's name.

The typed signature is the schema. From the resulting :class:`OpSpec` the runtime derives argument
validation (``OpSpec.validate``), the disco feature it advertises (``OpSpec.feature``), the CLI's and
chat's ``key=value`` parsing (``OpSpec.parse_pairs``), help text (``OpSpec.help_text``) and a
JSON-able description for forms and documentation (``OpSpec.describe``). Nothing about an op is
written twice.

What an op answers is declared with it too, for people to read (``agents/render.py``)::

    @op("storage.volume.list", effect="read",
        result=Result(Field("name", "Volume"), Field("used_bytes", "Used", "bytes"), ...))

A result that is a list is shown as a table with these columns, a map as a block of labelled lines;
``Result(..., summary="state")`` makes the summary line count that field's values (a check's OK,
WARNING, CRITICAL) instead of "ok".
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal, Mapping, Sequence

from .errors import BadArguments
from .pairs import parse_pairs

#: Every op is advertised as a disco#info feature with this prefix.
OP_FEATURE_PREFIX = "urn:vertebra:op:"

_OP_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_ARG_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_MISSING = inspect.Parameter.empty

# Scalar types an argument may have; lists of them are allowed too.
_SCALARS: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_TRUE = {"true", "yes", "on", "1"}

#: What an op does to the world, from least to most harm.
Effect = Literal["read", "change", "destructive"]
EFFECTS: tuple[str, ...] = typing.get_args(Effect)
#: Who may send an op; see ``OpSpec.sender``.
Sender = Literal["anyone", "broker", "agent", "live agent"]
SENDERS: tuple[str, ...] = typing.get_args(Sender)
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class Arg:
    """Metadata for one argument, attached with ``typing.Annotated``."""

    help: str = ""
    pattern: str | None = None  # a full-match regex for strings
    min: float | None = None
    max: float | None = None
    secret: bool = False  # never echoed in help, logs or audit


@dataclass(frozen=True)
class Param:
    """One argument of an op, as derived from the declaration's signature."""

    name: str
    kind: str  # string | integer | number | boolean
    many: bool  # a list of `kind`
    required: bool
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    pattern: str | None = None
    min: float | None = None
    max: float | None = None
    secret: bool = False

    @property
    def type_name(self) -> str:
        base = "|".join(map(str, self.choices)) if self.choices else self.kind
        return f"list of {base}" if self.many else base

    def check(self, value: Any) -> Any:
        """Return ``value`` as this parameter's type, or raise BadArguments saying what is expected."""
        if self.many:
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                value = [value]
            return [self._check_one(v) for v in value]
        return self._check_one(value)

    def _check_one(self, value: Any) -> Any:
        expected = f"argument {self.name!r} expects {self.type_name}"
        kind = self.kind
        if kind == "boolean":
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                value = value.lower() in _TRUE
            if not isinstance(value, bool):
                raise BadArguments(f"{expected}, got {value!r}", argument=self.name)
        elif kind in ("integer", "number"):
            if isinstance(value, str):
                try:
                    value = int(value) if kind == "integer" else float(value)
                except ValueError:
                    raise BadArguments(f"{expected}, got {value!r}", argument=self.name) from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadArguments(f"{expected}, got {value!r}", argument=self.name)
            if kind == "integer" and not float(value).is_integer():
                raise BadArguments(f"{expected}, got {value!r}", argument=self.name)
            value = int(value) if kind == "integer" else float(value)
            if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
                bound = (f"between {self.min:g} and {self.max:g}" if self.min is not None and self.max is not None
                         else f"at least {self.min:g}" if self.min is not None else f"at most {self.max:g}")
                raise BadArguments(f"argument {self.name!r} must be {bound}, got {value}", argument=self.name)
        else:
            if not isinstance(value, str):
                raise BadArguments(f"{expected}, got {value!r}", argument=self.name)
            if self.pattern and not re.fullmatch(self.pattern, value):
                # In words, as the argument's help gives its rule (a storage name's characters and length):
                # a regular expression is no explanation to a person.
                raise BadArguments(f"argument {self.name!r} must match the form it takes, got {value!r}"
                                   + (f": {self.help}" if self.help else ""), argument=self.name)
        if self.choices is not None and value not in self.choices:
            raise BadArguments(f"argument {self.name!r} must be one of {', '.join(map(str, self.choices))};"
                               f" got {value!r}", argument=self.name)
        return value


#: How a result field is shown: as text; a byte count in human units; an epoch time as local ISO
#: time; seconds as a duration; a check state (OK, WARNING, CRITICAL, UNKNOWN); a list of values;
#: a list of maps as a table of ``columns``.
Display = Literal["text", "bytes", "time", "duration", "state", "list", "table"]
DISPLAYS: tuple[str, ...] = typing.get_args(Display)


@dataclass(frozen=True)
class Field:
    """One field of an op's result, as people see it: its key, its label and how it is shown."""

    name: str  # its key in the result; a dotted name reaches into nested maps ("spool.transfers")
    label: str = ""  # the column or line heading; the name when empty
    display: Display = "text"
    columns: tuple["Field", ...] = ()  # with display "table": the columns of each row

    def __post_init__(self) -> None:
        if self.display not in DISPLAYS:
            raise ValueError(f"result field {self.name!r}: display must be one of {', '.join(DISPLAYS)},"
                             f" got {self.display!r}")
        if self.columns and self.display != "table":
            raise ValueError(f"result field {self.name!r}: only a display='table' field has columns")

    @property
    def heading(self) -> str:
        return self.label or self.name

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "label": self.label, "display": self.display}
        if self.columns:
            out["columns"] = [c.describe() for c in self.columns]
        return out

    @classmethod
    def from_description(cls, data: Mapping[str, Any]) -> "Field":
        return cls(str(data["name"]), str(data.get("label") or ""), data.get("display") or "text",
                   tuple(cls.from_description(c) for c in data.get("columns") or ()))


class Result:
    """What an op answers, for people: its fields (a list result is a table of them, a map a block),
    ``summary``, the field whose values the summary line counts instead of "ok", and ``empty``, what
    an empty list reads as ("no alerts")."""

    __slots__ = ("fields", "summary", "empty")

    def __init__(self, *fields: Field, summary: str = "", empty: str = "") -> None:
        if summary and summary not in {f.name for f in fields}:
            raise ValueError(f"result summary {summary!r} must be one of the declared fields")
        self.fields: tuple[Field, ...] = fields
        self.summary = summary
        self.empty = empty

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Result) and ((self.fields, self.summary, self.empty)
                                              == (other.fields, other.summary, other.empty))

    def __hash__(self) -> int:
        return hash((self.fields, self.summary, self.empty))

    def __repr__(self) -> str:
        return f"Result{(*self.fields,)!r}" + (f" summary={self.summary!r}" if self.summary else "")

    def describe(self) -> dict[str, Any]:
        out = {"fields": [f.describe() for f in self.fields], "summary": self.summary}
        return out | ({"empty": self.empty} if self.empty else {})

    @classmethod
    def from_description(cls, data: Mapping[str, Any] | None) -> "Result | None":
        if not data:
            return None
        return cls(*(Field.from_description(f) for f in data.get("fields") or ()), summary=data.get("summary") or "",
                   empty=str(data.get("empty") or ""))


@dataclass(frozen=True)
class OpSpec:
    """Everything the mesh knows about one op, derived from its declaration."""

    name: str
    summary: str
    description: str
    params: tuple[Param, ...]
    effect: Effect  # read | change | destructive; see the module docstring
    deadline: float  # seconds the executor gives the op before it ends as timeout
    progress: bool  # long op: answers with an ack and a job id, then progress, then one outcome
    resources: tuple[str, ...]  # templates formatted with the arguments, e.g. "/volume/{volume}"
    func: Callable[..., Awaitable[Any]] = field(repr=False, compare=False)
    # Where a call that addresses nothing itself goes: this template filled with the arguments (the
    # agent holding that volume), instead of every agent offering the op.
    address: str | None = None
    scope: str = "all"  # a call's scope unless the caller says: "one" for an op that makes something once
    # Who may send it (the first rules authorization walks, agents/authz.py): "anyone" the policy
    # allows; "broker": this agent's broker alone, whatever a policy says (the pushes that keep an
    # agent current, and what only the broker may read); "agent" or "live agent": an agent the mesh
    # file configures (of ``sender_kinds``, when given), for itself and never on someone's behalf,
    # whatever a policy says ("live agent": listed in the broker's directory now, its advertisement
    # accepted).
    sender: str = "anyone"
    # With sender "anyone": live agents of these configured kinds may send it whatever the policy
    # says, everyone else as the policy says. With "agent" or "live agent": only agents of these kinds.
    sender_kinds: tuple[str, ...] = ()
    # With sender "agent" or "live agent": the resources it acts on must be among those the mesh file
    # configures for the sender; the words say what it may not do otherwise ("fence that node").
    own_resources: str = ""
    # Served by the broker instance that leads (broker/leadership.py); the others forward it there.
    leader: bool = False
    # Where the agent's settings ask for it, a person's direct call is refused: it runs as a step of
    # this workflow, which two others approve (agents/fencing/guard.py). "" when it needs no approval.
    approval: str = ""
    # What it answers, for people to read (agents/render.py); None: shown as labelled lines of its keys.
    result: Result | None = None
    # The ops room's topic for a person's call of it relayed by the chat bot ("fencing": every outcome is
    # told; "replication": its failures); the room (broker/room.py) says what each topic tells. "": none.
    announce: str = ""
    # Resources it makes or removes when it succeeds (one of its ``resources`` templates, "/volume/{clone}"),
    # and a path under which resources may have come or gone whatever its outcome, so the agent reads them
    # again ("/volume"): how an agent keeps what it holds current (agents/storage/locations.py).
    makes: str = ""
    removes: str = ""
    rereads: str = ""
    # Sent by agents to one another, whoever the policy lets send it (a source agent opening the target's
    # inbox): not offered to people, as an op only the broker or agents may send is not (``internal``).
    for_agents: bool = False

    @property
    def internal(self) -> bool:
        """Whether the op is for the mesh's own actors, not people: `vertebra help`, `vertebra agents` and
        the chat bot do not offer it (a person the policy allows may still call it)."""
        return self.for_agents or self.sender != "anyone"

    @property
    def destructive(self) -> bool:
        return self.effect == "destructive"

    @property
    def effect_text(self) -> str:
        """The effect in words, as help and forms show it."""
        return _EFFECT_WORDS[self.effect]

    @property
    def changes_state(self) -> bool:
        """Whether the op makes, alters or destroys anything (every effect but read)."""
        return self.effect != "read"

    @property
    def feature(self) -> str:
        return OP_FEATURE_PREFIX + self.name

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def validate(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Check and convert arguments; fill defaults. Raises BadArguments naming the argument."""
        if not isinstance(args, Mapping):
            raise BadArguments(f"{self.name}: arguments must be a map of name to value")
        known = {p.name for p in self.params}
        unknown = sorted(str(k) for k in args if k not in known)
        if unknown:
            hint = f"; it takes {', '.join(sorted(known))}" if known else "; it takes no arguments"
            raise BadArguments(f"{self.name}: unknown argument {', '.join(map(repr, unknown))}{hint}",
                               argument=unknown[0])
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in args and args[p.name] is not None:
                out[p.name] = p.check(args[p.name])
            elif p.required:
                raise BadArguments(f"{self.name}: missing required argument {p.name!r} ({p.type_name}:"
                                   f" {p.help or 'no help'})", argument=p.name)
            else:
                out[p.name] = p.default
        return out

    def parse_pairs(self, pairs: Sequence[str]) -> dict[str, Any]:
        """Turn ``key=value`` words (CLI, chat) into an argument map; repeated keys make lists."""
        return self.validate(parse_pairs(pairs, self.name, many={p.name for p in self.params if p.many}))

    def resources_for(self, args: Mapping[str, Any]) -> list[str]:
        return [t.format(**args) for t in self.resources]

    def describe(self) -> dict[str, Any]:
        """A JSON-able schema: what forms, docs and remote help are generated from."""
        return {
            "name": self.name, "summary": self.summary, "description": self.description,
            "effect": self.effect, "destructive": self.destructive, "deadline": self.deadline,
            "progress": self.progress, "resources": list(self.resources), "address": self.address, "scope": self.scope,
            "sender": self.sender, "announce": self.announce, "makes": self.makes, "removes": self.removes,
            "rereads": self.rereads,
            "result": self.result.describe() if self.result else None,
            "params": [{"name": p.name, "type": p.kind, "many": p.many, "required": p.required,
                        "default": None if p.secret else p.default, "help": p.help,
                        "choices": list(p.choices) if p.choices else None, "pattern": p.pattern,
                        "min": p.min, "max": p.max, "secret": p.secret} for p in self.params],
        }

    def help_text(self) -> str:
        lines = [f"{self.name} - {self.summary}"]
        if self.description:
            lines += ["", self.description]
        flags = [self.effect_text, f"deadline {self.deadline:g}s"]
        if self.progress:
            flags.append("long-running, reports progress")
        lines += ["", "(" + ", ".join(flags) + ")"]
        if self.resources:
            lines.append("acts on: " + " ".join(self.resources))
        if self.address:
            lines.append(f"without --on, goes to the agent holding {self.address}")
        elif self.scope == "one":
            lines.append("without --scope, goes to one agent that offers it")
        if self.result is not None and self.result.fields:
            lines.append("answers: " + ", ".join(f.heading for f in self.result.fields))
        lines += ["", "arguments:" if self.params else "arguments: none"]
        width = max((len(p.name) + len(p.type_name) for p in self.params), default=0) + 1
        for p in self.params:
            default = "required" if p.required else f"default: {'(secret)' if p.secret else p.default!r}"
            lines.append(f"  {p.name + '=' + p.type_name:<{width}}  {p.help} ({default})")
        example = " ".join(f"{p.name}=..." for p in self.params if p.required)
        lines += ["", f"usage: vertebra call {self.name} [--on RESOURCE ...] {example}".rstrip()]
        return "\n".join(lines)


_EFFECT_WORDS = {"read": "read-only", "change": "changes state", "destructive": "destructive"}


def op(name: str, *, effect: Effect = "change", deadline: float = 30.0, progress: bool = False,
       resources: Sequence[str] = (), address: str | None = None, scope: Literal["all", "one"] = "all",
       destructive: bool | None = None, sender: Sender = "anyone", sender_kinds: Sequence[str] = (),
       own_resources: str = "", leader: bool = False, approval: str = "", result: Result | None = None,
       announce: str = "", makes: str = "", removes: str = "", rereads: str = "", for_agents: bool = False
       ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Declare a method as an op. Its docstring's first line is the summary; its typed keyword
    parameters after ``call`` are the arguments."""
    if not _OP_NAME.match(name):
        raise ValueError(f"op name {name!r} must be dotted lowercase words, e.g. storage.snapshot.create")
    if destructive is not None:  # the flag ``effect`` replaced: one way to say it, not two that disagree
        raise TypeError(f"op {name}: say effect='destructive' (or 'change', 'read') instead of destructive=")
    if effect not in EFFECTS:
        raise ValueError(f"op {name}: effect must be one of {', '.join(EFFECTS)}, got {effect!r}")
    if scope not in ("all", "one"):
        raise ValueError(f"op {name}: scope must be 'all' or 'one', got {scope!r}")
    if sender not in SENDERS:
        raise ValueError(f"op {name}: sender must be one of {', '.join(map(repr, SENDERS))}, got {sender!r}")
    if sender == "broker" and sender_kinds:
        raise ValueError(f"op {name}: an op only the broker sends has no sender_kinds")
    if announce and not re.fullmatch(r"[a-z]+", announce):
        raise ValueError(f"op {name}: announce names an ops room topic in lowercase letters, got {announce!r}")
    for fact, template in (("makes", makes), ("removes", removes)):
        if template and template not in resources:
            raise ValueError(f"op {name}: {fact}={template!r} must be one of its resources ({', '.join(resources)})")
    if rereads and not rereads.startswith("/"):
        raise ValueError(f"op {name}: rereads is a resource path such as '/volume', got {rereads!r}")
    if own_resources and (sender not in ("agent", "live agent") or not resources):
        raise ValueError(f"op {name}: own_resources limits an op on resources that agents send"
                         " (sender='agent' or 'live agent', and resources=...)")

    def decorate(func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(f"op {name}: {func.__qualname__} must be an async def")
        doc = inspect.getdoc(func) or ""
        summary, _, description = doc.partition("\n")
        func.__vertebra_op__ = OpSpec(  # type: ignore[attr-defined]
            name=name, summary=summary.strip() or name, description=description.strip(),
            params=tuple(_params_of(name, func)), effect=effect, deadline=float(deadline),
            progress=progress, resources=tuple(resources), func=func, address=address, scope=scope,
            sender=sender, sender_kinds=tuple(sender_kinds), own_resources=own_resources, leader=leader,
            approval=approval, result=result, announce=announce, makes=makes, removes=removes, rereads=rereads,
            for_agents=for_agents)
        return func

    return decorate


def ops_of(cls: type) -> dict[str, OpSpec]:
    """The ops a class declares (its own and inherited), and those of the components it is made of
    (the classes in its ``components``, each declaring ops of its own), by name."""
    found: dict[str, OpSpec] = {}
    for part in getattr(cls, "components", ()):
        found.update(ops_of(part))
    for klass in reversed(cls.__mro__):
        for attr in vars(klass).values():
            spec = getattr(attr, "__vertebra_op__", None)
            if spec is not None:
                found[spec.name] = spec
    return found


def _params_of(op_name: str, func: Callable[..., Any]) -> list[Param]:
    hints = typing.get_type_hints(func, include_extras=True)
    sig = inspect.signature(func)
    names = list(sig.parameters)
    if names[:2] != ["self", "call"]:
        raise TypeError(f"op {op_name}: signature must start with (self, call, ...)")
    params = []
    for pname in names[2:]:
        sp = sig.parameters[pname]
        if not _ARG_NAME.match(pname):
            raise TypeError(f"op {op_name}: argument name {pname!r} must be lowercase")
        hint = hints.get(pname)
        meta = Arg()
        if typing.get_origin(hint) is typing.Annotated:
            hint, *extras = typing.get_args(hint)
            meta = next((e for e in extras if isinstance(e, Arg)), meta)
        optional = False
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = len(members) < len(typing.get_args(hint))
            if len(members) != 1:
                raise TypeError(f"op {op_name}: argument {pname} has an unsupported union type")
            hint = members[0]
        many = typing.get_origin(hint) is list
        if many:
            (hint,) = typing.get_args(hint)
        choices = None
        if typing.get_origin(hint) is Literal:
            choices = typing.get_args(hint)
            hint = type(choices[0])
        if hint not in _SCALARS:
            raise TypeError(f"op {op_name}: argument {pname} has unsupported type {hint!r}")
        default = None if sp.default is _MISSING else sp.default
        params.append(Param(
            name=pname, kind=_SCALARS[hint], many=many, required=sp.default is _MISSING and not optional,
            default=list(default) if many and default is not None else default, help=meta.help,
            choices=choices, pattern=meta.pattern, min=meta.min, max=meta.max, secret=meta.secret))
    return params
