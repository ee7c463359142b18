"""The fence device registry, built from the mesh file's `fencing:` section.

    fencing:
      devices:
        pdu1:
          agent: fence_apc              # a fence_* name in /usr/sbin, or an absolute path
          params: {ip: 10.0.0.5, username: apc}
          secret_files: {passwd: /etc/vertebra/secrets/pdu1}   # read at use time, never logged
          plugs: {node1: "3", node2: "4"}                      # node -> plug on this device
          timeout: 30                   # seconds one agent run may take (default 30)
      levels:
        node1: [[pdu1], [ipmi-node1]]   # try level 1 (every device in it); if it fails, level 2

A device without `plugs` controls one target, so it may serve only one node. Validation reports
every problem at once, each naming the device or node, the field, and what is expected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.fencing.driver import (
    SECRET_NAMES, AgentProgramError, ParamValue, Secret, resolve_program,
)
from agents.fencing.fence_api import RESERVED_KEYS
from agents.schema import SchemaError

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 600.0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PARAM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_DEVICE_KEYS = frozenset({"agent", "params", "secret_files", "plugs", "timeout"})


class FencingConfigError(SchemaError):
    """The `fencing:` configuration is unusable; `problems` lists each thing to fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid fencing configuration:\n  " + "\n  ".join(self.problems))


class UnknownNodeError(LookupError):
    """A node has no fencing levels configured."""


@dataclass(frozen=True)
class Device:
    """One fence device: which agent drives it, with what parameters, for which nodes' plugs."""

    name: str
    program: str                                   # resolved absolute path
    params: Mapping[str, str] = field(default_factory=dict)
    secret_files: Mapping[str, Path] = field(default_factory=dict, repr=False)
    plugs: Mapping[str, str] | None = None
    timeout: float = DEFAULT_TIMEOUT

    def plug_for(self, node: str) -> str | None:
        """The plug that powers `node`, or None for a single-target device."""
        if self.plugs is None:
            return None
        try:
            return self.plugs[node]
        except KeyError:
            raise UnknownNodeError(f"device {self.name} has no plug for node {node}") from None

    def agent_params(self) -> dict[str, ParamValue]:
        """Parameters for one run, with secrets read from their files now (rotation needs no reload)."""
        params: dict[str, ParamValue] = dict(self.params)
        for name, path in self.secret_files.items():
            try:
                text = path.read_text()
            except OSError as error:
                raise FencingConfigError([
                    f"device {self.name}: secret_files.{name}: cannot read {path} "
                    f"({error.strerror})"]) from None
            # Files written with `echo` end in a newline that is not part of the secret.
            value = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
            if not value or any(c in value for c in "\r\n\0"):
                raise FencingConfigError([
                    f"device {self.name}: secret_files.{name}: {path} must hold the secret on one "
                    "line (it is empty or has several lines)"])
            params[name] = Secret(value)
        return params


@dataclass(frozen=True)
class DeviceRegistry:
    """Devices by name and, per node, the ordered levels of devices that can fence it."""

    devices: Mapping[str, Device]
    levels: Mapping[str, tuple[tuple[str, ...], ...]]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DeviceRegistry:
        """Build and validate a registry from the parsed `fencing:` mapping."""
        return _Loader().load(config)

    def nodes(self) -> list[str]:
        return sorted(self.levels)

    def levels_for(self, node: str) -> tuple[tuple[Device, ...], ...]:
        """The node's levels in order, each a tuple of devices that must all succeed."""
        try:
            levels = self.levels[node]
        except KeyError:
            known = ", ".join(self.nodes()) or "none"
            raise UnknownNodeError(
                f"no fencing levels are configured for node {node!r} (configured: {known})") from None
        return tuple(tuple(self.devices[d] for d in level) for level in levels)


class _Loader:
    """Collects every problem in one pass, so one reload shows the operator all there is to fix."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def load(self, config: Mapping[str, Any]) -> DeviceRegistry:
        if not isinstance(config, Mapping):
            raise FencingConfigError(["fencing: expected a mapping with 'devices' and 'levels'"])
        for key in sorted(set(config) - {"devices", "levels"}):
            self.problems.append(f"fencing.{key}: unknown key (expected 'devices' and 'levels')")
        raw_devices = config.get("devices")
        if not isinstance(raw_devices, Mapping) or not raw_devices:
            self.problems.append("fencing.devices: expected a mapping of device name to device")
            raw_devices = {}
        devices = {}
        for name, raw in raw_devices.items():
            device = self.device(name, raw)
            if device is not None:
                devices[name] = device
        raw_levels = config.get("levels", {})
        if not isinstance(raw_levels, Mapping):
            self.problems.append("fencing.levels: expected a mapping of node to a list of levels")
            raw_levels = {}
        levels = self.levels(raw_levels, raw_devices, devices)
        if self.problems:
            raise FencingConfigError(self.problems)
        return DeviceRegistry(devices=devices, levels=levels)

    def device(self, name: Any, raw: Any) -> Device | None:
        where = f"device {name}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            self.problems.append(f"{where}: the name must be letters, digits, '_', '.' or '-'")
            return None
        if not isinstance(raw, Mapping):
            self.problems.append(f"{where}: expected a mapping with 'agent', 'params', 'plugs'...")
            return None
        count = len(self.problems)
        for key in sorted(set(raw) - _DEVICE_KEYS):
            self.problems.append(
                f"{where}: unknown field {key!r} (expected {', '.join(sorted(_DEVICE_KEYS))})")

        program = ""
        agent = raw.get("agent")
        if not isinstance(agent, str) or not agent:
            self.problems.append(f"{where}: agent: expected a fence_* program name or absolute path")
        else:
            try:
                program = str(resolve_program(agent))
            except AgentProgramError as error:
                self.problems.append(f"{where}: agent: unknown agent program: {error}")

        params = self.params(where, raw.get("params", {}))
        secret_files = self.secret_files(where, raw.get("secret_files", {}), params)
        plugs = self.plugs(where, raw.get("plugs"))

        timeout = raw.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 < timeout <= MAX_TIMEOUT:
            self.problems.append(
                f"{where}: timeout: expected seconds, more than 0 and at most {MAX_TIMEOUT:g}")
            timeout = DEFAULT_TIMEOUT
        if len(self.problems) > count:
            return None
        return Device(name=name, program=program, params=params, secret_files=secret_files,
                      plugs=plugs, timeout=float(timeout))

    def params(self, where: str, raw: Any) -> dict[str, str]:
        if not isinstance(raw, Mapping):
            self.problems.append(f"{where}: params: expected a mapping of parameter to value")
            return {}
        params = {}
        for key, value in raw.items():
            if not isinstance(key, str) or not _PARAM_RE.match(key):
                self.problems.append(f"{where}: params: {key!r} is not a fence agent parameter name")
                continue
            if key.replace("-", "_") in RESERVED_KEYS:
                self.problems.append(
                    f"{where}: params.{key}: the fencing agent sets action and plug itself; "
                    "use 'plugs' to map nodes to plugs")
                continue
            if key in SECRET_NAMES:
                self.problems.append(
                    f"{where}: params.{key}: secrets must not be written in the mesh file; "
                    f"put it in a file and name it under secret_files.{key}")
                continue
            if isinstance(value, bool):
                value = "1" if value else "0"
            if not isinstance(value, (str, int, float)) or any(c in str(value) for c in "\r\n\0"):
                self.problems.append(f"{where}: params.{key}: expected a single-line scalar value")
                continue
            params[key] = str(value)
        return params

    def secret_files(self, where: str, raw: Any, params: Mapping[str, str]) -> dict[str, Path]:
        if not isinstance(raw, Mapping):
            self.problems.append(f"{where}: secret_files: expected a mapping of parameter to file")
            return {}
        files = {}
        for key, value in raw.items():
            if not isinstance(key, str) or not _PARAM_RE.match(key) \
                    or key.replace("-", "_") in RESERVED_KEYS:
                self.problems.append(f"{where}: secret_files: {key!r} is not a usable parameter name")
                continue
            if key in params:
                self.problems.append(
                    f"{where}: secret_files.{key}: also given in params; give it in one place")
                continue
            if not isinstance(value, str) or not os.path.isabs(value):
                self.problems.append(f"{where}: secret_files.{key}: expected an absolute file path")
                continue
            path = Path(value)
            if not path.is_file() or not os.access(path, os.R_OK):
                self.problems.append(
                    f"{where}: secret_files.{key}: unreadable secret file {path} "
                    "(it must exist and be readable by the fencing agent)")
                continue
            files[key] = path
        return files

    def plugs(self, where: str, raw: Any) -> dict[str, str] | None:
        if raw is None:
            return None
        if not isinstance(raw, Mapping) or not raw:
            self.problems.append(f"{where}: plugs: expected a mapping of node name to plug")
            return None
        plugs = {}
        for node, plug in raw.items():
            if isinstance(plug, bool) or not isinstance(plug, (str, int)) or str(plug) == "" \
                    or any(c in str(plug) for c in "\r\n\0"):
                self.problems.append(f"{where}: plugs.{node}: expected a plug name or number")
                continue
            plugs[str(node)] = str(plug)
        return plugs

    def levels(self, raw: Mapping[str, Any], raw_devices: Mapping[str, Any],
               devices: Mapping[str, Device]) -> dict[str, tuple[tuple[str, ...], ...]]:
        levels: dict[str, tuple[tuple[str, ...], ...]] = {}
        single_target_users: dict[str, list[str]] = {}
        for node, node_levels in raw.items():
            where = f"levels.{node}"
            if not isinstance(node_levels, list) or not node_levels:
                self.problems.append(
                    f"{where}: expected a list of levels, each a list of device names")
                continue
            parsed = []
            for index, level in enumerate(node_levels, start=1):
                if isinstance(level, str):
                    level = [level]  # `- pdu1` is a one-device level
                if not isinstance(level, list) or not level \
                        or not all(isinstance(d, str) for d in level):
                    self.problems.append(f"{where} level {index}: expected a list of device names")
                    continue
                if len(set(level)) != len(level):
                    self.problems.append(f"{where} level {index}: a device is listed twice")
                for name in level:
                    if name not in raw_devices:
                        self.problems.append(
                            f"{where} level {index}: unknown device {name!r} "
                            f"(defined: {', '.join(map(str, raw_devices)) or 'none'})")
                    elif name in devices:
                        device = devices[name]
                        if device.plugs is None:
                            single_target_users.setdefault(name, [])
                            if str(node) not in single_target_users[name]:
                                single_target_users[name].append(str(node))
                        elif str(node) not in device.plugs:
                            self.problems.append(
                                f"device {name}: plugs: missing plug for node {node} "
                                f"(used in {where} level {index})")
                parsed.append(tuple(level))
            levels[str(node)] = tuple(parsed)
        for name, nodes in single_target_users.items():
            if len(nodes) > 1:
                self.problems.append(
                    f"device {name}: has no plugs, so it fences one target, but levels use it for "
                    f"nodes {', '.join(nodes)}; add plugs: {{node: plug}}")
        return levels
