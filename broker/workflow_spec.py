"""Workflow definitions: the YAML a workflow is written in, checked, and expanded into a run's plan.

A definition names its parameters and its steps; each step is one op on resources, with arguments
templated from the parameters (``"{node}"``), and the constraints it demands before it runs::

    name: fence-verify-release
    params:
      cluster: {help: "the node's cluster"}
      node: {help: "the node to fence"}
    steps:
      - {name: fence, op: fence.off, on: ["/cluster/{cluster}/node/{node}"],
         args: {cluster: "{cluster}", node: "{node}"}, destructive: true,
         rate: {limit: 3, per: 3600, key: "fence:{cluster}"}}
      - {name: verify, op: fence.status, args: {cluster: "{cluster}", node: "{node}"}}
      - parallel:
          - {name: release-a, op: storage.clone.destroy, args: {clone: "{node}-a"}}
          - {name: release-b, op: storage.clone.destroy, args: {clone: "{node}-b"}}

Top-level entries of ``steps`` run in order; the steps of a ``parallel:`` group run together and
the group ends when all of them have. ``for_each: PARAM`` (with ``as: NAME``) turns one step into
one per item of a list parameter, run together, named ``STEP:ITEM`` ("a masked copy for each
developer"). A step's keys: ``name``, ``op``, ``on`` (resources), ``args``, ``destructive`` (the
two-person rule; an op the installation declares destructive is destructive whatever the file
says), ``approvals`` (distinct approvers needed, none of them the requester), ``bound_to`` (binding
of duty: performed by whoever performed that earlier step), ``hold`` (waits until someone performs
it with ``workflow.perform``; that person is its performer), ``rate`` (``limit`` uses of ``key``,
default the op, per ``per`` seconds), ``timeout`` and ``retries``.

A run expands the definition once, with its parameters, into a :class:`Plan` of concrete steps,
which is stored with the instance: editing the file later never changes a run already started.
Parameters are strings (or lists of strings) restricted by default to resource-segment characters,
so a templated value can never smuggle ``/`` or ``..`` into a resource path.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from agents import resources as paths
from agents import schema
from rbac import segments

NAME_PATTERN = r"[a-z][a-z0-9_-]{0,62}"  # a workflow's, a parameter's or a step's name
_NAME = re.compile(NAME_PATTERN + r"\Z")
_OP = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+\Z")
_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")

_TOP_KEYS = {"name", "description", "params", "steps"}
_PARAM_KEYS = {"help", "default", "list", "pattern"}
_STEP_KEYS = {"name", "op", "on", "args", "destructive", "approvals", "bound_to", "hold", "rate", "timeout",
              "retries", "for_each", "as"}
_RATE_KEYS = {"limit", "per", "key"}


class WorkflowError(schema.SchemaError):
    """A definition or a run's parameters that cannot be used; the message names where (the file and
    line, for a definition) and why."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    help: str = ""
    default: Any = None  # None: required
    many: bool = False
    pattern: str = segments.PATTERN

    def check(self, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        if not self.many and isinstance(value, list):
            raise WorkflowError(f"parameter {self.name!r} takes one value, got {len(value)}")
        for v in values:
            if not isinstance(v, str) or not re.fullmatch(self.pattern, v):
                raise WorkflowError(f"parameter {self.name!r} must match {self.pattern}, got {v!r}")
        return list(values) if self.many else value


@dataclass(frozen=True)
class Rate:
    limit: int
    per: float
    key: str  # a template, filled per run


@dataclass(frozen=True)
class StepSpec:
    name: str
    op: str
    on: tuple[str, ...] = ()
    args: Mapping[str, Any] = field(default_factory=dict)
    destructive: bool = False
    approvals: int = 0
    bound_to: str | None = None
    hold: bool = False
    rate: Rate | None = None
    timeout: float = 60.0
    retries: int = 2
    for_each: str | None = None
    each_as: str | None = None
    at: str = field(default="", compare=False, repr=False)  # where it is declared, e.g. steps[2], for errors


@dataclass(frozen=True)
class Step:
    """One concrete step of a run: templates filled, names final. JSON-able through :meth:`to_dict`."""

    name: str  # unique in the run: the declared name, or NAME:ITEM for a for_each expansion
    base: str  # the declared name (what policies grant approval on)
    op: str
    on: list[str]
    args: dict[str, Any]
    destructive: bool
    approvals: int
    bound_to: str | None
    hold: bool
    rate: dict[str, Any] | None  # {"key", "limit", "per"}
    timeout: float
    retries: int

    @property
    def needed(self) -> int:
        return max(self.approvals, 2 if self.destructive else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    stages: list[list[Step]]  # stages run in order; the steps of a stage run together

    def steps(self) -> list[Step]:
        return [s for stage in self.stages for s in stage]

    def step(self, name: str) -> Step | None:
        return next((s for s in self.steps() if s.name == name), None)

    def to_json(self) -> list[list[dict[str, Any]]]:
        return [[s.to_dict() for s in stage] for stage in self.stages]

    @classmethod
    def from_json(cls, data: list[list[dict[str, Any]]]) -> "Plan":
        return cls([[Step(**s) for s in stage] for stage in data])


@dataclass(frozen=True)
class Workflow:
    name: str
    description: str
    params: tuple[ParamSpec, ...]
    stages: tuple[tuple[StepSpec, ...], ...]
    source: str = ""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "source": self.source,
                "params": [{"name": p.name, "help": p.help, "required": p.default is None, "list": p.many}
                           for p in self.params],
                "steps": [[s.name for s in stage] for stage in self.stages]}

    def bind(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Check a run's parameters against the declaration; fill defaults."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise WorkflowError(f"workflow {self.name}: unknown parameter {unknown[0]!r}; it takes"
                                f" {', '.join(sorted(known)) or 'none'}")
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in given:
                out[p.name] = p.check(given[p.name])
            elif p.default is None:
                raise WorkflowError(f"workflow {self.name}: missing parameter {p.name!r}"
                                    f"{' (' + p.help + ')' if p.help else ''}")
            else:
                out[p.name] = p.check(p.default)
        return out

    def plan(self, given: Mapping[str, Any], is_destructive: Callable[[str], bool] = lambda op: False) -> Plan:
        """Expand the definition for one run. ``is_destructive`` says which ops the installation
        declares destructive, so a definition cannot drop the two-person rule by omission."""
        params = self.bind(given)
        stages: list[list[Step]] = []
        for group in self.stages:
            stage: list[Step] = []
            for spec in group:
                items = params[spec.for_each] if spec.for_each else [None]
                for item in items:
                    values = dict(params, **({spec.each_as: item} if spec.each_as else {}))
                    rate = None
                    if spec.rate is not None:
                        rate = {"key": fill(spec.rate.key, values), "limit": spec.rate.limit, "per": spec.rate.per}
                    on = [fill(r, values) for r in spec.on]
                    for r in on:
                        try:
                            paths.check(r)
                        except paths.BadResource as exc:
                            raise WorkflowError(f"workflow {self.name}: step {spec.name}: {exc}") from None
                    stage.append(Step(
                        name=f"{spec.name}:{item}" if item is not None else spec.name, base=spec.name,
                        op=spec.op, on=on, args={k: fill(v, values) for k, v in spec.args.items()},
                        destructive=spec.destructive or is_destructive(spec.op), approvals=spec.approvals,
                        bound_to=spec.bound_to, hold=spec.hold, rate=rate, timeout=spec.timeout,
                        retries=spec.retries))
            stages.append(stage)
        return Plan(stages)


def fill(template: Any, values: Mapping[str, Any]) -> Any:
    """Fill ``{param}`` placeholders. A string that is exactly one placeholder takes the value as it
    is (a list stays a list); lists and maps are filled item by item; other values pass through."""
    if isinstance(template, list):
        return [fill(t, values) for t in template]
    if isinstance(template, dict):
        return {k: fill(v, values) for k, v in template.items()}
    if not isinstance(template, str):
        return template
    whole = _PLACEHOLDER.fullmatch(template)
    if whole:
        return values[whole.group(1)]
    return _PLACEHOLDER.sub(lambda m: _text(values[m.group(1)], m.group(1)), template)


def _text(value: Any, name: str) -> str:
    if isinstance(value, list):
        raise WorkflowError(f"list parameter {name!r} can only fill a whole value, not part of a string")
    return str(value)


def placeholders(template: Any) -> set[str]:
    if isinstance(template, list):
        return set().union(*(placeholders(t) for t in template)) if template else set()
    if isinstance(template, dict):
        return set().union(*(placeholders(v) for v in template.values())) if template else set()
    return set(_PLACEHOLDER.findall(template)) if isinstance(template, str) else set()


# -- loading -----------------------------------------------------------------------------------

def load_file(path: str | Path) -> Workflow:
    path = Path(path)
    return parse(schema.read(path, WorkflowError, name=path.name), path.name)


def load_dir(directory: str | Path) -> tuple[dict[str, Workflow], dict[str, str]]:
    """Every ``*.yaml`` in ``directory``: the good definitions by name, and each bad file's error."""
    good: dict[str, Workflow] = {}
    bad: dict[str, str] = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        try:
            wf = load_file(path)
        except WorkflowError as exc:
            bad[path.name] = str(exc)
            continue
        if wf.name in good:
            bad[path.name] = f"{path.name}: workflow {wf.name!r} is already defined in {good[wf.name].source}"
            continue
        good[wf.name] = wf
    return good, bad


def check_settings(settings: Mapping[str, Any], fields: Any = None) -> dict[str, Workflow]:
    """The broker's settings as loading the mesh file checks them (the broker kind's entry point in
    ``vertebra.settings``, agents/kinds.py): every workflow file in the ``workflows`` directory must
    load, so that a broken one stops `vertebra up` naming its file, line and field, rather than only
    being listed as broken by ``workflow.list`` once the broker runs. Returns the definitions by name."""
    directory = settings.get("workflows")
    if not directory or not Path(directory).is_dir():
        return {}
    good, bad = load_dir(directory)
    if bad:
        raise WorkflowError(f"the broker's workflow files ({directory}) must all load; fix or remove"
                            f" {'this one' if len(bad) == 1 else 'these'}: {'; '.join(bad.values())}")
    return good


def parse(data: Any, source: str = "<workflow>") -> Workflow:
    """Check a definition and return it; every error names the file and the field."""
    where = _Where(source, data)
    top = where.mapping(data, "", _TOP_KEYS)
    name = where.name(top.get("name"), "name")
    params = tuple(_param(where, str(k), v) for k, v in where.mapping(top.get("params"), "params", None).items())
    raw_steps = top.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise where.error("steps", "expected a non-empty list of steps")
    stages: list[tuple[StepSpec, ...]] = []
    for i, entry in enumerate(raw_steps):
        if isinstance(entry, dict) and set(entry) == {"parallel"}:
            group = entry["parallel"]
            if not isinstance(group, list) or not group:
                raise where.error(f"steps[{i}].parallel", "expected a non-empty list of steps")
            stages.append(tuple(_step(where, f"steps[{i}].parallel[{j}]", s) for j, s in enumerate(group)))
        else:
            stages.append((_step(where, f"steps[{i}]", entry),))
    _cross_check(where, params, stages)
    return Workflow(name, str(top.get("description") or ""), params, tuple(stages), source)


def _param(where: "_Where", name: str, raw: Any) -> ParamSpec:
    f = f"params.{name}"
    if not _NAME.match(name) or "-" in name:
        raise where.error(f, "a parameter name is lowercase letters, digits and _")
    p = where.mapping(raw, f, _PARAM_KEYS)
    pattern = p.get("pattern", segments.PATTERN)
    try:
        re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise where.error(f"{f}.pattern", f"not a regular expression: {exc}") from None
    spec = ParamSpec(name, str(p.get("help") or ""), p.get("default"), bool(p.get("list", False)), pattern)
    if spec.default is not None:
        try:
            spec.check(spec.default)
        except WorkflowError as exc:
            raise where.error(f"{f}.default", str(exc)) from None
    return spec


def _step(where: "_Where", f: str, raw: Any) -> StepSpec:
    if isinstance(raw, dict) and True in raw:  # YAML 1.1 reads a bare `on:` key as true
        raw = {("on" if k is True else k): v for k, v in raw.items()}
    s = where.mapping(raw, f, _STEP_KEYS)
    name = where.name(s.get("name"), f"{f}.name")
    op = s.get("op")
    if not isinstance(op, str) or not _OP.match(op):
        raise where.error(f"{f}.op", f"expected an op name such as fence.off, got {op!r}")
    on = s.get("on", [])
    if not isinstance(on, list) or not all(isinstance(r, str) and r.startswith("/") for r in on):
        raise where.error(f"{f}.on", "expected a list of resource paths (templates allowed)")
    args = where.mapping(s.get("args"), f"{f}.args", None)
    rate = None
    if "rate" in s:
        r = where.mapping(s["rate"], f"{f}.rate", _RATE_KEYS)
        limit, per = r.get("limit"), r.get("per")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise where.error(f"{f}.rate.limit", "expected a whole number of uses, at least 1")
        if not isinstance(per, (int, float)) or isinstance(per, bool) or per <= 0:
            raise where.error(f"{f}.rate.per", "expected a period in seconds, e.g. 3600")
        rate = Rate(limit, float(per), str(r.get("key") or op))
    approvals = s.get("approvals", 0)
    if not isinstance(approvals, int) or isinstance(approvals, bool) or not 0 <= approvals <= 10:
        raise where.error(f"{f}.approvals", "expected a number of approvers from 0 to 10")
    timeout, retries = s.get("timeout", 60), s.get("retries", 2)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 3600:
        raise where.error(f"{f}.timeout", "expected seconds, more than 0 and at most 3600")
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 10:
        raise where.error(f"{f}.retries", "expected a number of retries from 0 to 10")
    for key in ("destructive", "hold"):
        if not isinstance(s.get(key, False), bool):
            raise where.error(f"{f}.{key}", "expected true or false")
    if ("for_each" in s) != ("as" in s):
        raise where.error(f, "for_each and as go together: for_each: developers, as: developer")
    return StepSpec(name=name, op=op, on=tuple(on), args=args, destructive=s.get("destructive", False),
                    approvals=approvals, bound_to=s.get("bound_to"), hold=s.get("hold", False), rate=rate,
                    timeout=float(timeout), retries=retries, for_each=s.get("for_each"), each_as=s.get("as"), at=f)


def _cross_check(where: "_Where", params: tuple[ParamSpec, ...], stages: list[tuple[StepSpec, ...]]) -> None:
    """Names unique, templates naming declared parameters, bound_to naming an earlier plain step."""
    declared = {p.name: p for p in params}
    earlier: dict[str, StepSpec] = {}
    for stage in stages:
        for s in stage:
            if s.name in earlier or any(o.name == s.name for o in stage if o is not s):
                raise where.error(f"step {s.name}", "step names must be unique", at=f"{s.at}.name")
        for s in stage:
            usable = set(declared)
            if s.for_each:
                p = declared.get(s.for_each)
                if p is None or not p.many:
                    raise where.error(f"step {s.name}.for_each", f"{s.for_each!r} is not a list parameter",
                                      at=f"{s.at}.for_each")
                if not _NAME.match(s.each_as or "") or s.each_as in declared:
                    raise where.error(f"step {s.name}.as", "expected a new lowercase name for each item",
                                      at=f"{s.at}.as")
                usable.add(s.each_as)  # type: ignore[arg-type]
            rate_key = [s.rate.key] if s.rate else []
            missing = placeholders([list(s.on), dict(s.args), rate_key]) - usable
            if missing:
                raise where.error(f"step {s.name}", f"uses undeclared parameter {sorted(missing)[0]!r}",
                                  at=s.at)
            if s.bound_to is not None:
                target = earlier.get(s.bound_to)
                if target is None:
                    raise where.error(f"step {s.name}.bound_to", f"{s.bound_to!r} is not an earlier step",
                                      at=f"{s.at}.bound_to")
                if target.for_each or s.for_each:
                    raise where.error(f"step {s.name}.bound_to", "binding of duty joins two single steps,"
                                      " not for_each ones", at=f"{s.at}.bound_to")
        earlier.update((s.name, s) for s in stage)


class _Where(schema.Fields):
    """The schema layer's field readers, with workflow errors and workflow names."""

    def __init__(self, source: str, document: Any = None) -> None:
        super().__init__(source, WorkflowError, document=document)

    def name(self, value: Any, f: str) -> str:
        if not isinstance(value, str) or not _NAME.match(value):
            raise self.error(f, f"expected a lowercase name (letters, digits, _ and -), got {value!r}")
        return value
