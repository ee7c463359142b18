"""The check catalogue: named checks, each a plugin with fixed argv and typed caller arguments.

A caller never supplies a command line. It names a check and sets arguments the check declares;
each value is validated by its type (a Nagios range, an integer, a number, text matching a pattern,
a choice, a flag) and placed in argv where the declaration says, so there is no way to pass an
option the check did not declare (the NRPE ``dont_blame_nrpe`` hole does not exist here).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.monitor.ranges import State, parse_range
from agents.schema import SchemaError

__all__ = ["ArgSpec", "CheckSpec", "CheckConfigError", "CheckArgumentError", "ARG_TYPES",
           "PLUGIN_DIR", "default_checks", "checks_from_config"]

PLUGIN_DIR = "/usr/lib/nagios/plugins"
ARG_TYPES = ("range", "int", "float", "str", "choice", "flag")
DEFAULT_TIMEOUT = 10.0
MAX_VALUE_LENGTH = 1024

_CHECK_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_ARG_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_OPTION = re.compile(r"-[A-Za-z0-9]|--[A-Za-z0-9][A-Za-z0-9-]*")
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


class CheckConfigError(SchemaError):
    """A check's configuration is wrong; the message names the check and the field."""


class CheckArgumentError(ValueError):
    """A caller's arguments for a check are refused; the message names the argument."""


@dataclass(frozen=True)
class ArgSpec:
    """One argument a caller may set. ``option`` None means a positional argument."""

    name: str
    type: str
    option: str | None = None
    default: Any = None
    required: bool = False
    help: str = ""
    pattern: str | None = None
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    allow_dash: bool = False

    def __post_init__(self) -> None:
        if self.type not in ARG_TYPES:
            raise ValueError(f"argument {self.name!r}: type {self.type!r} is not one of {', '.join(ARG_TYPES)}")
        if self.type == "str" and self.pattern is None:
            raise ValueError(f"argument {self.name!r}: type str needs a pattern")
        if self.type == "choice" and not self.choices:
            raise ValueError(f"argument {self.name!r}: type choice needs choices")
        if self.type == "flag" and self.option is None:
            raise ValueError(f"argument {self.name!r}: a flag needs an option")

    def coerce(self, value: Any) -> str | bool:
        """The argv text for ``value`` (a bool for flags); CheckArgumentError says why not."""
        where = f"argument {self.name!r}"
        if self.type == "flag":
            return _to_bool(value, where)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise CheckArgumentError(f"{where}: expected {self.type}, got {type(value).__name__}")
        text = value if isinstance(value, str) else str(value)
        if len(text) > MAX_VALUE_LENGTH:
            raise CheckArgumentError(f"{where}: value longer than {MAX_VALUE_LENGTH} characters")
        if self.type == "int":
            number: float = _to_int(value, where)
            text = str(number)
        elif self.type == "float":
            number = _to_float(value, where)
            text = str(value).strip() if isinstance(value, str) else repr(float(value))
        elif self.type == "range":
            try:
                parse_range(text)
            except ValueError as exc:
                raise CheckArgumentError(f"{where}: {exc}") from None
            text = text.strip()
        elif self.type == "choice":
            if text not in self.choices:
                raise CheckArgumentError(f"{where}: {text!r} is not one of {', '.join(self.choices)}")
        elif self.type == "str":
            if not re.fullmatch(self.pattern or "", text):
                raise CheckArgumentError(f"{where}: {text!r} does not match {self.pattern!r}")
        if self.type in ("int", "float"):
            if self.min is not None and number < self.min:
                raise CheckArgumentError(f"{where}: {text} is below the minimum {self.min:g}")
            if self.max is not None and number > self.max:
                raise CheckArgumentError(f"{where}: {text} is above the maximum {self.max:g}")
        # getopt reads a leading '-' as an option where no value is expected (positionals,
        # optional-argument options): refuse it unless the check declares it safe.
        if text.startswith("-") and not self.allow_dash:
            raise CheckArgumentError(f"{where}: value {text!r} may not start with '-'")
        return text

    def describe(self) -> dict[str, Any]:
        """What ``monitor.list`` shows a caller about this argument."""
        info: dict[str, Any] = {"name": self.name, "type": self.type, "help": self.help,
                                "required": self.required}
        if self.default is not None:
            info["default"] = self.default
        if self.pattern is not None:
            info["pattern"] = self.pattern
        if self.choices:
            info["choices"] = list(self.choices)
        if self.min is not None:
            info["min"] = self.min
        if self.max is not None:
            info["max"] = self.max
        return info


@dataclass(frozen=True)
class CheckSpec:
    """A named check: a plugin by absolute path, fixed argv, and the arguments a caller may set."""

    name: str
    plugin: str
    fixed_args: tuple[str, ...] = ()
    arguments: tuple[ArgSpec, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    timeout_state: State = State.UNKNOWN
    description: str = ""
    _by_name: dict[str, ArgSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {a.name: a for a in self.arguments})

    @classmethod
    def from_config(cls, name: str, mapping: Mapping[str, Any]) -> CheckSpec:
        """Build a check from its configuration mapping (as read from the mesh YAML file).

        Keys: ``plugin`` (absolute path, required), ``args`` (fixed argv list), ``arguments``
        (name -> {type, option, default, required, help, pattern, choices, min, max,
        allow_dash}), ``timeout`` (seconds), ``timeout_state``, ``description``.
        """
        where = f"check {name!r}"
        if not isinstance(name, str) or not _CHECK_NAME.fullmatch(name):
            raise CheckConfigError(f"{where}: name must be lower-case letters, digits, '_', '.' or '-'")
        if not isinstance(mapping, Mapping):
            raise CheckConfigError(f"{where}: expected a mapping, got {type(mapping).__name__}")
        _no_unknown_keys(mapping, {"plugin", "args", "arguments", "timeout", "timeout_state",
                                   "description"}, where)
        plugin = mapping.get("plugin")
        if not isinstance(plugin, str) or not os.path.isabs(plugin):
            raise CheckConfigError(f"{where}: field 'plugin' must be an absolute path, got {plugin!r}")
        fixed = mapping.get("args", [])
        if isinstance(fixed, str) or not isinstance(fixed, Sequence) or not all(
            isinstance(a, str) and "\0" not in a for a in fixed
        ):
            raise CheckConfigError(f"{where}: field 'args' must be a list of strings")
        timeout = mapping.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            math.isfinite(timeout) and timeout > 0
        ):
            raise CheckConfigError(f"{where}: field 'timeout' must be a positive number of seconds")
        try:
            timeout_state = State.parse(mapping.get("timeout_state", "UNKNOWN"))
        except ValueError as exc:
            raise CheckConfigError(f"{where}: field 'timeout_state': {exc}") from None
        description = mapping.get("description", "")
        if not isinstance(description, str):
            raise CheckConfigError(f"{where}: field 'description' must be text")
        declared = mapping.get("arguments", {}) or {}
        if not isinstance(declared, Mapping):
            raise CheckConfigError(f"{where}: field 'arguments' must map names to argument specs")
        arguments = tuple(_arg_from_config(where, arg_name, spec) for arg_name, spec in declared.items())
        return cls(name, plugin, tuple(fixed), arguments, float(timeout), timeout_state, description)

    def argv(self, args: Mapping[str, Any] | None = None) -> list[str]:
        """The full argv for a run with the caller's ``args``; refuses anything not declared."""
        given = dict(args or {})
        unknown = sorted(set(given) - set(self._by_name))
        if unknown:
            offered = ", ".join(self._by_name) or "none"
            raise CheckArgumentError(
                f"check {self.name!r} does not take argument(s) {', '.join(map(repr, unknown))} "
                f"(it takes: {offered})"
            )
        argv = [self.plugin, *self.fixed_args]
        skipped_positional: str | None = None
        for spec in self.arguments:
            value = given.get(spec.name, spec.default)
            if value is None:
                if spec.required:
                    raise CheckArgumentError(f"check {self.name!r} needs argument {spec.name!r}")
                if spec.option is None:
                    skipped_positional = spec.name
                continue
            try:
                text = spec.coerce(value)
            except CheckArgumentError as exc:
                raise CheckArgumentError(f"check {self.name!r}: {exc}") from None
            if spec.type == "flag":
                if text:
                    argv.append(spec.option)  # type: ignore[arg-type]  # flags always have one
            elif spec.option is None:
                if skipped_positional:
                    raise CheckArgumentError(
                        f"check {self.name!r}: argument {spec.name!r} needs {skipped_positional!r} "
                        "before it"
                    )
                argv.append(text)  # type: ignore[arg-type]
            else:
                argv += [spec.option, text]  # type: ignore[list-item]
        return argv

    def describe(self) -> dict[str, Any]:
        """What ``monitor.list`` shows a caller about this check (never the fixed argv's secrets)."""
        return {
            "name": self.name,
            "description": self.description,
            "timeout": self.timeout,
            "arguments": [a.describe() for a in self.arguments],
        }


def checks_from_config(mapping: Mapping[str, Any]) -> dict[str, CheckSpec]:
    """A catalogue from a ``{check name: check mapping}`` configuration section."""
    if not isinstance(mapping, Mapping):
        raise CheckConfigError(f"checks: expected a mapping of check names, got {type(mapping).__name__}")
    return {name: CheckSpec.from_config(name, spec) for name, spec in mapping.items()}


def _arg_from_config(where: str, name: Any, spec: Any) -> ArgSpec:
    if not isinstance(name, str) or not _ARG_NAME.fullmatch(name):
        raise CheckConfigError(f"{where}: argument name {name!r} must be a lower-case identifier")
    field_name = f"arguments.{name}"
    if not isinstance(spec, Mapping):
        raise CheckConfigError(f"{where}: field {field_name!r} must be a mapping")
    _no_unknown_keys(spec, {"type", "option", "default", "required", "help", "pattern", "choices",
                            "min", "max", "allow_dash"}, f"{where}: field {field_name!r}")
    kind = spec.get("type")
    if kind not in ARG_TYPES:
        raise CheckConfigError(
            f"{where}: field '{field_name}.type' is {kind!r}, expected one of {', '.join(ARG_TYPES)}"
        )
    option = spec.get("option")
    if option is not None and (not isinstance(option, str) or not _OPTION.fullmatch(option)):
        raise CheckConfigError(f"{where}: field '{field_name}.option' must look like -x or --name")
    if kind == "flag" and option is None:
        raise CheckConfigError(f"{where}: field '{field_name}.option' is required for a flag")
    pattern = spec.get("pattern")
    if kind == "str":
        if not isinstance(pattern, str):
            raise CheckConfigError(f"{where}: field '{field_name}.pattern' is required for type str")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise CheckConfigError(f"{where}: field '{field_name}.pattern' is not a regex: {exc}") from None
    elif pattern is not None:
        raise CheckConfigError(f"{where}: field '{field_name}.pattern' only applies to type str")
    choices = spec.get("choices", ())
    if kind == "choice":
        if isinstance(choices, str) or not isinstance(choices, Sequence) or not choices or not all(
            isinstance(c, str) for c in choices
        ):
            raise CheckConfigError(f"{where}: field '{field_name}.choices' must be a list of strings")
    elif choices:
        raise CheckConfigError(f"{where}: field '{field_name}.choices' only applies to type choice")
    bounds = {}
    for key in ("min", "max"):
        bound = spec.get(key)
        if bound is not None and (kind not in ("int", "float") or isinstance(bound, bool)
                                  or not isinstance(bound, (int, float))):
            raise CheckConfigError(f"{where}: field '{field_name}.{key}' must be a number on int or float")
        bounds[key] = bound
    for key in ("required", "allow_dash"):
        if not isinstance(spec.get(key, False), bool):
            raise CheckConfigError(f"{where}: field '{field_name}.{key}' must be true or false")
    help_text = spec.get("help", "")
    if not isinstance(help_text, str):
        raise CheckConfigError(f"{where}: field '{field_name}.help' must be text")
    arg = ArgSpec(
        name=name, type=kind, option=option, default=spec.get("default"),
        required=spec.get("required", False), help=help_text, pattern=pattern,
        choices=tuple(choices), min=bounds["min"], max=bounds["max"],
        allow_dash=spec.get("allow_dash", False),
    )
    if arg.default is not None:
        try:
            arg.coerce(arg.default)
        except CheckArgumentError as exc:
            raise CheckConfigError(f"{where}: field '{field_name}.default': {exc}") from None
    return arg


def _no_unknown_keys(mapping: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in set(mapping) - allowed)
    if unknown:
        raise CheckConfigError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(sorted(allowed))})"
        )


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise CheckArgumentError(f"{where}: expected true or false, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d{1,18}", value.strip()):
        return int(value)
    raise CheckArgumentError(f"{where}: expected an integer, got {value!r}")


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    if isinstance(value, str) and re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?", value.strip()):
        return float(value)
    raise CheckArgumentError(f"{where}: expected a number, got {value!r}")


_LOAD_TRIPLE = r"\d+(\.\d+)?(,\d+(\.\d+)?){0,2}"
_DISK_THRESHOLD = r"\d+(\.\d+)?%?"
_NAME = r"[A-Za-z0-9_.+:@][A-Za-z0-9_.+:@-]{0,63}"

_DEFAULT_CONFIG: dict[str, dict[str, Any]] = {
    "load": {
        "plugin": f"{PLUGIN_DIR}/check_load",
        "description": "Load average over 1, 5 and 15 minutes",
        "arguments": {
            "warn": {"type": "str", "option": "-w", "pattern": _LOAD_TRIPLE, "default": "15,10,5",
                     "help": "warning load averages WLOAD1[,WLOAD5[,WLOAD15]]"},
            "crit": {"type": "str", "option": "-c", "pattern": _LOAD_TRIPLE, "default": "30,25,20",
                     "help": "critical load averages CLOAD1[,CLOAD5[,CLOAD15]]"},
            "per_cpu": {"type": "flag", "option": "-r", "help": "divide the load by the number of CPUs"},
        },
    },
    "disk": {
        "plugin": f"{PLUGIN_DIR}/check_disk",
        "description": "Free space on a mounted file system",
        # check_disk applies thresholds to the paths that follow them: keep warn/crit first.
        "arguments": {
            "warn": {"type": "str", "option": "-w", "pattern": _DISK_THRESHOLD, "default": "20%",
                     "help": "warn when free space is below this many MiB, or percent with %"},
            "crit": {"type": "str", "option": "-c", "pattern": _DISK_THRESHOLD, "default": "10%",
                     "help": "critical when free space is below this many MiB, or percent with %"},
            "path": {"type": "str", "option": "-p", "pattern": r"/[^\x00-\x1f]{0,4095}", "default": "/",
                     "help": "mount point or device path"},
        },
    },
    "procs": {
        "plugin": f"{PLUGIN_DIR}/check_procs",
        "description": "Number of processes, optionally of one command or user",
        "arguments": {
            "warn": {"type": "range", "option": "-w", "help": "warning range for the process count"},
            "crit": {"type": "range", "option": "-c", "help": "critical range for the process count"},
            "command": {"type": "str", "option": "-C", "pattern": _NAME, "help": "only this command name"},
            "user": {"type": "str", "option": "-u", "pattern": _NAME, "help": "only this user"},
        },
    },
    "users": {
        "plugin": f"{PLUGIN_DIR}/check_users",
        "description": "Number of logged-in users",
        "arguments": {
            "warn": {"type": "int", "option": "-w", "min": 0, "default": 5, "help": "warn above this many"},
            "crit": {"type": "int", "option": "-c", "min": 0, "default": 10, "help": "critical above this many"},
        },
    },
    "dummy": {
        "plugin": f"{PLUGIN_DIR}/check_dummy",
        "description": "Returns the state and text it is given (for testing the path end to end)",
        "timeout": 5,
        "arguments": {
            "state": {"type": "int", "min": 0, "max": 3, "default": 0, "help": "state to return, 0-3"},
            "text": {"type": "str", "pattern": r"[^\x00-\x1f|]{0,256}", "help": "text to return"},
        },
    },
}


def default_checks() -> dict[str, CheckSpec]:
    """A small catalogue over Debian's monitoring-plugins-basic: load, disk, procs, users, dummy."""
    return checks_from_config(_DEFAULT_CONFIG)
