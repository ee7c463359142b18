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

Every error names the field and says what was expected; a bad catalogue stops the agent at start,
never at the first call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agents.monitor.checks import (CheckArgumentError, CheckConfigError, CheckSpec, checks_from_config,
                                   default_checks)

__all__ = ["MonitorSettings", "ScheduledCheck", "BridgeSettings", "SettingsError", "parse_settings"]

DEFAULT_MAX_CONCURRENT = 8
DEFAULT_INTERVAL = 60.0
DEFAULT_JITTER = 0.1
DEFAULT_REPEATS = 3


class SettingsError(ValueError):
    """The monitor settings are wrong; the message names the field."""


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


def parse_settings(raw: Mapping[str, Any] | None) -> MonitorSettings:
    raw = dict(raw or {})
    unknown = sorted(set(raw) - {"checks", "max_concurrent", "schedule", "publish_to", "nagios"})
    if unknown:
        raise SettingsError(f"monitor settings: unknown key {unknown[0]!r}; allowed keys: checks,"
                            " max_concurrent, nagios, publish_to, schedule")
    try:
        checks = checks_from_config(raw["checks"]) if "checks" in raw else default_checks()
    except CheckConfigError as exc:
        raise SettingsError(f"monitor settings: checks: {exc}") from None
    limit = raw.get("max_concurrent", DEFAULT_MAX_CONCURRENT)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1024:
        raise SettingsError(f"monitor settings: max_concurrent: expected an integer from 1 to 1024, got {limit!r}")
    schedule = tuple(_scheduled(name, spec, checks) for name, spec in _mapping(raw.get("schedule"), "schedule").items())
    publish_to = raw.get("publish_to", [])
    if not isinstance(publish_to, list) or not all(isinstance(p, str) and p for p in publish_to):
        raise SettingsError("monitor settings: publish_to: expected a list of account names or JIDs")
    bridge = _bridge(raw["nagios"]) if "nagios" in raw else None
    return MonitorSettings(checks, limit, schedule, tuple(publish_to), bridge)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SettingsError(f"monitor settings: {where}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise SettingsError(f"monitor settings: {where}: expected a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _scheduled(name: Any, spec: Any, checks: Mapping[str, CheckSpec]) -> ScheduledCheck:
    where = f"schedule.{name}"
    if not isinstance(name, str) or not name:
        raise SettingsError(f"monitor settings: schedule: entry names must be text, got {name!r}")
    spec = _mapping(spec, where)
    unknown = sorted(set(spec) - {"check", "args", "interval", "jitter", "repeats"})
    if unknown:
        raise SettingsError(f"monitor settings: {where}: unknown key {unknown[0]!r}; allowed keys:"
                            " args, check, interval, jitter, repeats")
    check = spec.get("check", name)
    if check not in checks:
        raise SettingsError(f"monitor settings: {where}.check: no check named {check!r}; this agent has"
                            f" {', '.join(sorted(checks))}")
    args = _mapping(spec.get("args"), f"{where}.args")
    try:
        checks[check].argv(args)  # refuse bad arguments now, not at every run
    except CheckArgumentError as exc:
        raise SettingsError(f"monitor settings: {where}.args: {exc}") from None
    repeats = spec.get("repeats", DEFAULT_REPEATS)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or not 1 <= repeats <= 100:
        raise SettingsError(f"monitor settings: {where}.repeats: expected an integer from 1 to 100, got {repeats!r}")
    return ScheduledCheck(name, check, args,
                          interval=_number(spec.get("interval", DEFAULT_INTERVAL), f"{where}.interval", 0.05, 86400),
                          jitter=_number(spec.get("jitter", DEFAULT_JITTER), f"{where}.jitter", 0, 0.5),
                          repeats=repeats)


def _bridge(value: Any) -> BridgeSettings:
    spec = _mapping(value, "nagios")
    unknown = sorted(set(spec) - {"command_file", "check_result_path", "hosts", "services"})
    if unknown:
        raise SettingsError(f"monitor settings: nagios: unknown key {unknown[0]!r}; allowed keys:"
                            " command_file or check_result_path, hosts, services")
    if ("command_file" in spec) == ("check_result_path" in spec):
        raise SettingsError("monitor settings: nagios: give exactly one of command_file (Nagios' external command"
                            " file) and check_result_path (its check result directory)")
    command_file, spool = spec.get("command_file"), spec.get("check_result_path")
    if command_file is not None and (not isinstance(command_file, str) or not command_file.startswith("/")):
        raise SettingsError("monitor settings: nagios.command_file: expected the absolute path of Nagios'"
                            f" external command file, got {command_file!r}")
    if spool is not None and (not isinstance(spool, str) or not spool.startswith("/")):
        raise SettingsError("monitor settings: nagios.check_result_path: expected the absolute path of Nagios'"
                            f" check result directory (check_result_path in nagios.cfg), got {spool!r}")
    hosts = _names(spec.get("hosts"), "nagios.hosts")
    if not hosts:
        raise SettingsError("monitor settings: nagios.hosts: map each publishing agent to its Nagios host name;"
                            " results from agents not listed are dropped")
    return BridgeSettings(command_file, hosts, _names(spec.get("services"), "nagios.services"), spool)


def _names(value: Any, where: str) -> dict[str, str]:
    out = _mapping(value, where)
    for key, name in out.items():
        # ';' and line ends would break the external command's fields.
        if not isinstance(name, str) or not name or any(c in name for c in ";\n\r"):
            raise SettingsError(f"monitor settings: {where}.{key}: expected a Nagios name without ';' or"
                                f" line ends, got {name!r}")
    return out
