"""A monitor agent's ``settings:`` from the mesh file, read and validated in one place.

::

    settings:
      max_concurrent: 8                 # plugins running at once
      checks: {NAME: {plugin: ..., args: [...], arguments: {...}}}   # default: default_checks()
      schedule:                         # checks run on their own, results published, alerts raised
        root-disk: {check: disk, args: {warn: "20%"}, interval: 60, jitter: 0.1, repeats: 3}
      publish_to: [nagios1]             # accounts (or JIDs) whose bridge receives scheduled results
      nagios: {command_file: ..., hosts: {...}, services: {...}}   # this agent bridges (or, instead of
                                        # command_file, check_result_path: Nagios' spool directory)

Every error names the field and says what was expected (agents/schema.py: the mesh file's line too,
when the mesh file is loaded); a bad catalogue stops the agent at start, never at the first call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agents.monitor.checks import (CheckArgumentError, CheckConfigError, CheckSpec, checks_from_config,
                                   default_checks)
from agents.schema import Fields, SchemaError

__all__ = ["BridgeSettings", "MonitorSettings", "ScheduledCheck", "SettingsError", "parse_settings"]

DEFAULT_MAX_CONCURRENT = 8
DEFAULT_INTERVAL = 60.0
DEFAULT_JITTER = 0.1
DEFAULT_REPEATS = 3


class SettingsError(SchemaError):
    """The monitor settings are wrong; the message names the field (and, read from the mesh file, its line)."""


@dataclass(frozen=True)
class ScheduledCheck:
    """One check run on a timer. ``repeats``: results in a new state before the change counts
    (Nagios' max_check_attempts: 1 makes every change hard at once)."""

    name: str
    check: str
    args: dict[str, Any]
    interval: float = DEFAULT_INTERVAL
    jitter: float = DEFAULT_JITTER  # fraction of the interval, either way
    repeats: int = DEFAULT_REPEATS


@dataclass(frozen=True)
class BridgeSettings:
    """Where published results go into Nagios, and under which Nagios names.

    Exactly one of ``command_file`` (Nagios' external command file) and ``check_result_path`` (its
    check result spool directory) is set. ``hosts`` maps a publishing agent (account name or bare
    JID) to a Nagios host name; ``services`` maps a scheduled check's name to a Nagios service
    description (default: the same name)."""

    command_file: str | None
    hosts: dict[str, str]
    services: dict[str, str] = field(default_factory=dict)
    check_result_path: str | None = None


@dataclass(frozen=True)
class MonitorSettings:
    checks: dict[str, CheckSpec]
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    schedule: tuple[ScheduledCheck, ...] = ()
    publish_to: tuple[str, ...] = ()
    bridge: BridgeSettings | None = None


def parse_settings(raw: Mapping[str, Any] | None, where: Fields | None = None) -> MonitorSettings:
    """Check a monitor agent's settings; ``where`` places them in the mesh file (default: errors name
    ``monitor settings`` and the field)."""
    where = where or Fields("monitor settings", SettingsError)
    raw = where.mapping(raw, "", {"checks", "max_concurrent", "schedule", "publish_to", "nagios"})
    if "checks" in raw and not isinstance(raw["checks"], Mapping):
        raise where.error("checks", f"expected a mapping of check names, got {type(raw['checks']).__name__}")
    checks = default_checks() if "checks" not in raw else {}
    for name, spec in (raw.get("checks") or {}).items():
        try:  # one at a time, so that an error is at its check's line
            checks.update(checks_from_config({name: spec}))
        except CheckConfigError as exc:
            raise where.error(f"checks.{name}", str(exc)) from None
    limit = where.integer(raw.get("max_concurrent", DEFAULT_MAX_CONCURRENT), "max_concurrent", 1, 1024)
    schedule = tuple(_scheduled(where, name, spec, checks)
                     for name, spec in where.mapping(raw.get("schedule"), "schedule", None).items())
    publish_to = raw.get("publish_to", [])
    if not isinstance(publish_to, list) or not all(isinstance(p, str) and p for p in publish_to):
        raise where.error("publish_to", "expected a list of account names or JIDs")
    bridge = _bridge(where, raw["nagios"]) if "nagios" in raw else None
    return MonitorSettings(checks, limit, schedule, tuple(publish_to), bridge)


def _scheduled(where: Fields, name: Any, spec: Any, checks: Mapping[str, CheckSpec]) -> ScheduledCheck:
    f = f"schedule.{name}"
    if not isinstance(name, str) or not name:
        raise where.error("schedule", f"entry names must be text, got {name!r}")
    spec = where.mapping(spec, f, {"check", "args", "interval", "jitter", "repeats"})
    check = spec.get("check", name)
    if check not in checks:
        raise where.error(f"{f}.check", f"no check named {check!r}; this agent has {', '.join(sorted(checks))}",
                          at=f"{f}.check" if "check" in spec else f)
    args = dict(where.mapping(spec.get("args"), f"{f}.args", None))
    try:
        checks[check].argv(args)  # refuse bad arguments now, not at every run
    except CheckArgumentError as exc:
        raise where.error(f"{f}.args", str(exc)) from None
    return ScheduledCheck(name, check, args,
                          interval=where.number(spec.get("interval", DEFAULT_INTERVAL), f"{f}.interval", 0.05, 86400),
                          jitter=where.number(spec.get("jitter", DEFAULT_JITTER), f"{f}.jitter", 0, 0.5),
                          repeats=where.integer(spec.get("repeats", DEFAULT_REPEATS), f"{f}.repeats", 1, 100))


def _bridge(where: Fields, value: Any) -> BridgeSettings:
    spec = where.mapping(value, "nagios", {"command_file", "check_result_path", "hosts", "services"})
    if ("command_file" in spec) == ("check_result_path" in spec):
        raise where.error("nagios", "give exactly one of command_file (Nagios' external command file) and"
                                    " check_result_path (its check result directory)")
    command_file, spool = spec.get("command_file"), spec.get("check_result_path")
    if command_file is not None and (not isinstance(command_file, str) or not command_file.startswith("/")):
        raise where.error("nagios.command_file", "expected the absolute path of Nagios' external command file,"
                                                 f" got {command_file!r}")
    if spool is not None and (not isinstance(spool, str) or not spool.startswith("/")):
        raise where.error("nagios.check_result_path", "expected the absolute path of Nagios' check result"
                                                      f" directory (check_result_path in nagios.cfg), got {spool!r}")
    hosts = _names(where, spec.get("hosts"), "nagios.hosts")
    if not hosts:
        raise where.error("nagios.hosts", "map each publishing agent to its Nagios host name; results from"
                                          " agents not listed are dropped")
    return BridgeSettings(command_file, hosts, _names(where, spec.get("services"), "nagios.services"), spool)


def _names(where: Fields, value: Any, f: str) -> dict[str, str]:
    out = dict(where.mapping(value, f, None))
    for key, name in out.items():
        # ';' and line ends would break the external command's fields.
        if not isinstance(name, str) or not name or any(c in name for c in ";\n\r"):
            raise where.error(f"{f}.{key}", f"expected a Nagios name without ';' or line ends, got {name!r}")
    return out
