"""The Fence Agent API's rules, in one place, for both directions.

The fencing agent speaks it to real fence agents (``driver``) and ``fence_vertebra`` answers it to
Pacemaker. Here live: the ``key=value`` stdin format (reading and writing), command-line options,
the ``port``/``plug``/``nodename`` aliases, action names, exit-code meanings, the deprecated
``option=`` key, and metadata XML generated from a parameter declaration list.

References: ClusterLabs fence-agents ``doc/FenceAgentAPI.md`` and its ``fencing.py`` library; the
real fence_dummy (tests/integration/test_fence_agent.py) and Pacemaker's fencer
(tests/integration/test_pacemaker_fencer.py) check these rules on this platform.
"""

from __future__ import annotations

import getopt
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

# The API's plain constants live in names.py (fence_vertebra's lean path reads them without this module).
from .names import ACTIONS, EXIT_FAILURE, EXIT_STATUS_OFF, EXIT_SUCCESS, NODE_KEYS, STATUS_EXIT, StdinError
from .names import is_key, read_stdin
from .names import TARGET_ACTIONS as TARGET_ACTIONS

# Keys only the caller of a fence agent may set: the driver refuses them in device parameters.
RESERVED_KEYS: frozenset[str] = frozenset({"action", "option", *NODE_KEYS})

_TRUE = frozenset({"1", "yes", "on", "true"})
_FALSE = frozenset({"0", "no", "off", "false"})


class ExitCode(IntEnum):
    """Exit codes as callers of a fence agent read them.

    off/on/reboot: 0 done and verified, 1 failed or not verified (reboot: 0 once the off part worked).
    status: 0 on, 2 off, 1 unreachable or unknown. Everything else also exits 1 on failure.
    """

    SUCCESS = EXIT_SUCCESS
    FAILURE = EXIT_FAILURE
    STATUS_OFF = EXIT_STATUS_OFF

    STATUS_ON = EXIT_SUCCESS
    UNREACHABLE = EXIT_FAILURE


PowerState = Literal["on", "off", "unknown"]


def state_from_status_exit(code: int | None) -> PowerState:
    """Map a status action's exit code to a power state; anything but 0 or 2 is 'unknown'."""
    if code == ExitCode.STATUS_ON:
        return "on"
    if code == ExitCode.STATUS_OFF:
        return "off"
    return "unknown"


def status_exit_for(state: PowerState) -> int:
    """The exit code a fence agent's status action returns for a power state."""
    return ExitCode(STATUS_EXIT.get(state, ExitCode.UNREACHABLE))


class FenceApiError(ValueError):
    """Input that breaks the Fence Agent API; the message says what and how to fix it."""


# ---------------------------------------------------------------------------------------------
# Parameter declarations (drive metadata, command-line parsing and value checks)

ContentType = Literal["string", "boolean", "second", "integer", "select"]


@dataclass(frozen=True)
class Parameter:
    """One parameter a fence agent accepts, declared once for metadata, options and checks."""

    name: str
    shortdesc: str
    type: ContentType = "string"
    default: str | None = None
    required: bool = False
    short: str | None = None          # single-letter getopt name, e.g. "o" for -o
    choices: tuple[str, ...] = ()      # for type "select"
    deprecated: bool = False
    obsoletes: str | None = None
    alias_of: str | None = None        # shares another parameter's command-line option
    value_hint: str = "value"          # shown in the getopt text: --name=[hint]

    def __post_init__(self) -> None:
        if not is_key(self.name):
            raise ValueError(f"parameter name {self.name!r} is not a valid key")
        if self.short is not None and len(self.short) != 1:
            raise ValueError(f"parameter {self.name}: short option must be one letter")
        if self.type == "select" and not self.choices:
            raise ValueError(f"parameter {self.name}: type 'select' needs choices")

    @property
    def longopt(self) -> str:
        return self.name.replace("_", "-")

    def getopt_text(self, by_name: Mapping[str, Parameter]) -> str:
        """The metadata's `getopt mixed` text, e.g. '-o, --action=[action]'."""
        target = by_name[self.alias_of] if self.alias_of else self
        long = f"--{target.longopt}"
        if target.type != "boolean":
            long += f"=[{target.value_hint}]"
        return f"-{target.short}, {long}" if target.short else long


def _by_name(parameters: Iterable[Parameter]) -> dict[str, Parameter]:
    table: dict[str, Parameter] = {}
    for p in parameters:
        if p.name in table:
            raise ValueError(f"parameter {p.name!r} declared twice")
        table[p.name] = p
    return table


# ---------------------------------------------------------------------------------------------
# Reading and writing key=value lines

def parse_stdin(text: str) -> dict[str, str]:
    """Parse the Fence Agent API's stdin (names.read_stdin: one `key=value` per line, `#` comments,
    blank lines, keys normalised to underscores, one pair of surrounding quotes removed). Lines the API
    does not allow are errors rather than being skipped: a skipped `action = off` line would leave the
    caller guessing what was asked."""
    try:
        return read_stdin(text)
    except StdinError as exc:
        raise FenceApiError(str(exc)) from None


def format_stdin(pairs: Mapping[str, str]) -> str:
    """Write `key=value` lines for a fence agent's stdin.

    A newline in a value would smuggle in another line (say `action=reboot`), so keys and values are
    checked, not escaped: the API has no escaping.
    """
    lines = []
    for key, value in pairs.items():
        if not is_key(key):
            raise FenceApiError(f"{key!r} is not a valid fence agent parameter name")
        if any(c in value for c in "\r\n\0"):
            raise FenceApiError(
                f"the value of {key} contains a line break or NUL, which the Fence Agent API "
                "cannot carry")
        lines.append(f"{key}={value}\n")
    return "".join(lines)


def parse_argv(argv: Sequence[str], parameters: Iterable[Parameter]) -> dict[str, str]:
    """Parse command-line options declared by `parameters` into the same pairs stdin gives.

    Booleans become "1". Like fencing.py, a caller that passes any argument is taken to have passed
    everything that way (stdin is not read).
    """
    table = _by_name(parameters)
    shorts, longs = "", []
    owner: dict[str, str] = {}
    for p in table.values():
        if p.alias_of:
            continue
        takes_value = p.type != "boolean"
        if p.short:
            shorts += p.short + (":" if takes_value else "")
            owner["-" + p.short] = p.name
        longs.append(p.longopt + ("=" if takes_value else ""))
        owner["--" + p.longopt] = p.name
    try:
        found, rest = getopt.gnu_getopt(list(argv), shorts, longs)
    except getopt.GetoptError as error:
        raise FenceApiError(f"command line: {error.msg} (see --help)") from None
    if rest:
        raise FenceApiError(f"command line: unexpected argument(s) {' '.join(rest)!r}")
    pairs: dict[str, str] = {}
    for opt, value in found:
        name = owner[opt]
        value = "1" if table[name].type == "boolean" else value
        if name in pairs and pairs[name] != value:
            raise FenceApiError(f"command line: {opt} is given twice with different values")
        pairs[name] = value
    return pairs


# ---------------------------------------------------------------------------------------------
# From pairs to a request

@dataclass(frozen=True)
class FenceRequest:
    """What a caller asked a fence agent to do."""

    action: str
    node: str | None
    options: dict[str, str] = field(default_factory=dict)   # every other key, by declared name
    unknown: tuple[str, ...] = ()                            # keys no parameter declares
    warnings: tuple[str, ...] = ()


def normalise_action(value: str) -> str:
    """Lower-case and check an action name (fencing.py accepts `STATUS` too)."""
    action = value.strip().lower()
    if action not in ACTIONS:
        raise FenceApiError(
            f"unknown action {value!r}; expected one of: {', '.join(ACTIONS)}")
    return action


def build_request(pairs: Mapping[str, str], parameters: Iterable[Parameter] = ()) -> FenceRequest:
    """Resolve the action, the node and the remaining options from parsed pairs.

    The deprecated `option=` key is read as `action` with a warning. fencing.py ignores it and runs
    its default, reboot; here a conflicting or missing action is an error instead, because guessing
    an action is how a status query turns into a power cycle.
    """
    table = _by_name(parameters)
    pairs = dict(pairs)
    warnings: list[str] = []

    action_value = pairs.pop("action", None)
    option_value = pairs.pop("option", None)
    if option_value is not None:
        if action_value is not None and normalise_action(action_value) != normalise_action(option_value):
            raise FenceApiError(
                f"conflicting action={action_value!r} and deprecated option={option_value!r}; "
                "send action= only")
        warnings.append(
            f"the 'option' key is deprecated; read option={option_value} as action={option_value}")
        action_value = action_value if action_value is not None else option_value
    if action_value is None:
        raise FenceApiError(
            "no action given: pass action=<" + "|".join(ACTIONS) + "> (on stdin) or -o ACTION; "
            "this agent never assumes reboot")
    action = normalise_action(action_value)

    named = {k: pairs.pop(k) for k in NODE_KEYS if k in pairs and pairs[k] != ""}
    if "plug" in named and "port" in named and named["plug"] != named["port"]:
        raise FenceApiError(
            f"plug={named['plug']!r} and port={named['port']!r} name different targets; give one")
    node = next((named[k] for k in NODE_KEYS if k in named), None)

    options = {k: v for k, v in pairs.items() if not table or k in table}
    unknown = tuple(sorted(k for k in pairs if table and k not in table))
    return FenceRequest(action=action, node=node, options=options, unknown=unknown,
                        warnings=tuple(warnings))


def read_request(argv: Sequence[str], stdin_text: str | None,
                 parameters: Sequence[Parameter]) -> FenceRequest:
    """Read a request the way fence agents do: options if any were given, else stdin."""
    pairs = parse_argv(argv, parameters) if argv else parse_stdin(stdin_text or "")
    return build_request(pairs, parameters)


def check_values(options: Mapping[str, str], parameters: Iterable[Parameter]) -> list[str]:
    """Problems with option values against their declared types; empty when all is well."""
    problems = []
    for name, p in _by_name(parameters).items():
        value = options.get(name)
        if value is None:
            if p.required and p.name not in RESERVED_KEYS:
                problems.append(f"{name} is required")
            continue
        if p.type == "second":
            try:
                seconds = float(value)
            except ValueError:
                seconds = -1.0
            if not seconds >= 0 or seconds == float("inf"):
                problems.append(f"{name}={value!r} is not a valid time in seconds")
        elif p.type == "integer" and not re.fullmatch(r"-?\d+", value):
            problems.append(f"{name}={value!r} is not an integer")
        elif p.type == "boolean" and value.lower() not in _TRUE | _FALSE:
            problems.append(f"{name}={value!r} is not a boolean (use 1/0, yes/no, on/off, true/false)")
        elif p.type == "select" and value not in p.choices:
            problems.append(f"{name}={value!r} is not one of: {', '.join(p.choices)}")
    return problems


def is_true(value: str | None) -> bool:
    """A boolean option's value as the Fence Agent API spells it."""
    return value is not None and value.lower() in _TRUE


# ---------------------------------------------------------------------------------------------
# Metadata

def metadata_xml(*, name: str, shortdesc: str, longdesc: str, vendor_url: str,
                 parameters: Sequence[Parameter], actions: Sequence[str] = ACTIONS) -> str:
    """The `<resource-agent>` metadata document, valid against the cluster metadata.rng schema."""
    table = _by_name(parameters)
    if not table:
        raise ValueError("metadata needs at least one parameter (the schema says oneOrMore)")
    for a in actions:
        if a not in ACTIONS:
            raise ValueError(f"unknown action {a!r} in metadata")
    root = ET.Element("resource-agent", {"name": name, "shortdesc": shortdesc})
    ET.SubElement(root, "longdesc").text = longdesc
    ET.SubElement(root, "vendor-url").text = vendor_url
    params_el = ET.SubElement(root, "parameters")
    for p in table.values():
        attrs = {"name": p.name, "unique": "0", "required": "1" if p.required else "0"}
        if p.deprecated:
            attrs["deprecated"] = "1"
        if p.obsoletes:
            attrs["obsoletes"] = p.obsoletes
        el = ET.SubElement(params_el, "parameter", attrs)
        ET.SubElement(el, "getopt", {"mixed": p.getopt_text(table)})
        content: dict[str, str] = {"type": p.type}
        if p.default is not None:
            content["default"] = p.default
        content_el = ET.SubElement(el, "content", content)
        for choice in p.choices:
            ET.SubElement(content_el, "option", {"value": choice})
        ET.SubElement(el, "shortdesc", {"lang": "en"}).text = p.shortdesc
    actions_el = ET.SubElement(root, "actions")
    for a in actions:
        # `on` is not an automatic (unfencing) action: fencing restores power only when asked.
        ET.SubElement(actions_el, "action", {"name": a, **({"automatic": "0"} if a == "on" else {})})
    ET.indent(root, space="\t")
    return '<?xml version="1.0" ?>\n' + ET.tostring(root, encoding="unicode") + "\n"
