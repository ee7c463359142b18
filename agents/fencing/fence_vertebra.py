"""fence_vertebra: a fence agent, by the Fence Agent API, that fences nodes through the Vertebra mesh.

Pacemaker (or any RHCS-style cluster manager) runs it like any `fence_*` program: `key=value` lines on
stdin, or command-line options. `metadata` and `validate-all` are answered here; off, on, reboot,
status, list and monitor go to the mesh through `perform`: the mesh file in `vertebra_home`, the
local gateway (else a direct login) as `account`, a fencing agent that can fence the node on
/cluster/{cluster}/node/{node}. It finishes inside the `timeout` parameter (default 50 s, inside
Pacemaker's 60 s) and fails rather than run out of time; off/on/reboot exit 0 only when the mesh
confirms the new power state.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agents.fencing import fence_api
from agents.fencing.fence_api import ExitCode, FenceApiError, Parameter
from agents.fencing.settings import SEGMENT, node_resource

if TYPE_CHECKING:
    from agents.report import CallReport
    from agents.config import MeshConfig

NAME = "fence_vertebra"
DEFAULT_TIMEOUT = "50"
MAX_TIMEOUT = 600.0
DEFAULT_HOME = "/var/lib/vertebra"
# Kept back from the timeout so the mesh's own answer (even a timeout) arrives before we give up.
ANSWER_MARGIN = 1.0

PARAMETERS: tuple[Parameter, ...] = (
    Parameter("action", "Fencing action", required=True, short="o", value_hint="action"),
    Parameter("plug", "Node to fence, as the mesh names it", short="n", value_hint="id",
              obsoletes="port"),
    Parameter("port", "Node to fence, as the mesh names it", deprecated=True, alias_of="plug"),
    Parameter("nodename", "Cluster node name of the node to fence (used when no plug is given)",
              value_hint="name"),
    Parameter("cluster", "Name of the cluster this fencing request acts for",
              value_hint="name"),
    Parameter("vertebra_home",
              "Vertebra state directory (default: $VERTEBRA_HOME, then /var/lib/vertebra)",
              value_hint="dir"),
    Parameter("account", "Mesh account to fence as (default: the mesh file's operator); its "
              "password is read from the state directory", value_hint="name"),
    Parameter("timeout", "Seconds to wait for the mesh before reporting failure",
              type="second", default=DEFAULT_TIMEOUT, value_hint="seconds"),
    Parameter("verbose", "Verbose mode", type="boolean", short="v"),
    Parameter("version", "Display version information and exit", type="boolean", short="V"),
    Parameter("help", "Display help and exit", type="boolean", short="h"),
)


class MeshUnavailableError(RuntimeError):
    """fence_vertebra could not get an answer from the mesh."""


def metadata() -> str:
    return fence_api.metadata_xml(
        name=NAME,
        shortdesc="Fence agent for nodes managed through the Vertebra mesh",
        longdesc="fence_vertebra routes a fencing request through the Vertebra agent mesh to the "
                 "fencing agent that can reach the node's real fence devices. Off, on and reboot "
                 "succeed only when the device's status confirms the new power state.",
        vendor_url="https://github.com/engineyard/vertebra",
        parameters=PARAMETERS,
    )


def vertebra_home(options: Mapping[str, str]) -> Path:
    return Path(options.get("vertebra_home") or os.environ.get("VERTEBRA_HOME") or DEFAULT_HOME)


def load_mesh(options: Mapping[str, str]) -> MeshConfig:
    """The mesh file in the state directory; never creates one (a fence agent must not guess)."""
    # The mesh runtime (slixmpp and all) loads only when the mesh is asked: metadata and
    # validate-all, which Pacemaker runs often, stay quick.
    from agents import config

    home = vertebra_home(options)
    path = home / "mesh.yaml"
    if not path.is_file():
        raise MeshUnavailableError(f"no mesh file at {path}: set vertebra_home= (or $VERTEBRA_HOME) to"
                                   " the Vertebra state directory of this host")
    try:
        return config.load(path, home)
    except config.ConfigError as error:
        raise MeshUnavailableError(str(error)) from None


def validate(request: fence_api.FenceRequest) -> list[str]:
    """Problems with a request's options; empty when it could be carried out."""
    problems = fence_api.check_values(request.options, PARAMETERS)
    timeout = request.options.get("timeout")
    if timeout is not None and not problems and not 0 < float(timeout) <= MAX_TIMEOUT:
        problems.append(f"timeout={timeout} must be more than 0 and at most {MAX_TIMEOUT:g} seconds")
    value = request.options.get("vertebra_home")
    if value is not None and not os.path.isabs(value):
        problems.append(f"vertebra_home={value!r} must be an absolute path")
    for key in ("cluster", "account"):
        value = request.options.get(key)
        if value is not None and not re.fullmatch(SEGMENT, value):
            problems.append(f"{key}={value!r} is not a valid name (letters, digits and _ . : @ + -)")
    if request.node is not None and not re.fullmatch(SEGMENT, request.node):
        problems.append(f"node {request.node!r} is not a valid node name (letters, digits and _ . : @ + -)")
    home = os.environ.get("VERTEBRA_HOME")
    if "vertebra_home" not in request.options and home and not os.path.isabs(home):
        problems.append(f"$VERTEBRA_HOME={home!r} must be an absolute path")
    if request.action in fence_api.TARGET_ACTIONS and request.node is None:
        problems.append(f"action {request.action} needs the node: pass plug=, port= or nodename=")
    return problems


async def perform(action: str, node: str | None, options: Mapping[str, str]) -> int:
    """Carry out off/on/reboot/status/list/monitor through the mesh; the Fence Agent API exit code.

    One request per action, under one request id, and no retries here: Pacemaker retries a failed
    device action itself (with a fresh run), and a retry of ours could not reuse the request id
    through the session API, so it might run twice. Every wait ends ANSWER_MARGIN before `timeout`.
    """
    from agents.config import ConfigError
    from agents.errors import Outcome
    from agents.session import mesh_call

    loop = asyncio.get_running_loop()
    end = loop.time() + float(options.get("timeout", DEFAULT_TIMEOUT)) - ANSWER_MARGIN
    mesh = load_mesh(options)
    account = options.get("account") or None

    async def ask(op: str, args: dict[str, str], on: list[str], scope: str) -> CallReport:
        remaining = end - loop.time()
        if remaining <= 0:
            raise MeshUnavailableError(f"no time left to ask the mesh for {op}")
        try:
            return await mesh_call(mesh, op, args, on=on, scope=scope, timeout=remaining,
                                   account=account)
        except ConfigError as error:  # e.g. no password file for the account
            raise MeshUnavailableError(str(error)) from None

    if action in ("list", "monitor"):
        cluster = options.get("cluster") or ""
        report = await ask("fence.list", {"cluster": cluster},
                           [node_resource_prefix(cluster)] if cluster else [], "all")
        answered = [r for r in report.results if r.outcome is Outcome.OK]
        for r in report.results:
            if r.outcome is not Outcome.OK:
                (_error if not answered else _warn)(f"{r.target}: {r.outcome.value}: {r.error}")
        if not answered:
            return ExitCode.FAILURE
        if action == "list":
            nodes = sorted({n for r in answered for names in r.result["clusters"].values() for n in names})
            for name in nodes:
                print(f"{name},")  # plug,alias as fencing.py prints it; no aliases here
        return ExitCode.SUCCESS

    assert node is not None  # validate() made sure of it
    cluster = options.get("cluster") or await _cluster_of(node, ask)
    report = await ask(f"fence.{action}", {"cluster": cluster, "node": node},
                       [node_resource(cluster, node)], "one")
    return _exit_code(action, node, report)


def node_resource_prefix(cluster: str) -> str:
    return f"/cluster/{cluster}"


async def _cluster_of(node: str, ask) -> str:
    """The one cluster whose fencing agents list `node`; used when no cluster= was given."""
    from agents.errors import Outcome

    report = await ask("fence.list", {"cluster": ""}, [], "all")
    found = sorted({c for r in report.results if r.outcome is Outcome.OK
                    for c, names in r.result["clusters"].items() if node in names})
    if len(found) == 1:
        return found[0]
    if found:
        raise MeshUnavailableError(f"node {node} is in clusters {', '.join(found)}: pass cluster=NAME")
    errors = "; ".join(f"{r.target}: {r.outcome.value}" for r in report.results
                       if r.outcome is not Outcome.OK)
    raise MeshUnavailableError(f"no fencing agent in the mesh can fence node {node}"
                               + (f" ({errors})" if errors else ""))


def _exit_code(action: str, node: str, report: CallReport) -> int:
    """Success only for exactly one ok answer that confirms what was asked."""
    from agents.errors import Outcome

    if not report.results or not all(r.outcome is Outcome.OK for r in report.results) \
            or len(report.results) != 1:
        for r in report.results:
            if r.outcome is not Outcome.OK:
                _error(f"Failed: {action} {node} via {r.target}: {r.outcome.value}: {r.error}")
        if action != "status":
            _error(f"Failed: {node} is NOT known to be {'off' if action != 'on' else 'on'}")
        return ExitCode.FAILURE
    result = report.results[0].result
    state = result.get("state") if isinstance(result, dict) else None
    if action == "status":
        if state in ("on", "off"):
            print(f"Status: {state.upper()}")
            return fence_api.status_exit_for(state)
        _error(f"Failed: the mesh reported no power state for {node}")
        return ExitCode.UNREACHABLE
    confirmed = isinstance(result, dict) and result.get("ok") is True and (
        state == action or (action == "reboot" and result.get("devices")))
    if not confirmed:
        _error(f"Failed: the mesh answered {action} {node} without confirming it: {result!r}")
        return ExitCode.FAILURE
    if action == "reboot" and result.get("on_error"):
        _warn(f"{node} was fenced, but did not power back on: {result['on_error']}")
    print(f"Success: {result.get('message', action)}")
    return ExitCode.SUCCESS


def _error(message: str) -> None:
    print(f"{NAME}: ERROR: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"{NAME}: WARNING: {message}", file=sys.stderr)


def usage() -> str:
    lines = [f"Usage: {NAME} [options]  (or key=value lines on stdin)", "Options:"]
    table = {p.name: p for p in PARAMETERS}
    for p in PARAMETERS:
        if not p.alias_of:
            lines.append(f"  {p.getopt_text(table):<32} {p.shortdesc}")
    return "\n".join(lines)


def run(argv: Sequence[str], stdin_text: str | None) -> int:
    """The whole program, minus process plumbing: returns the exit code."""
    try:
        pairs = (fence_api.parse_argv(argv, PARAMETERS) if argv
                 else fence_api.parse_stdin(stdin_text or ""))
        if fence_api.is_true(pairs.get("help")):
            print(usage())
            return ExitCode.SUCCESS
        if fence_api.is_true(pairs.get("version")):
            from agents import __version__
            print(f"{NAME} {__version__}")
            return ExitCode.SUCCESS
        request = fence_api.build_request(pairs, PARAMETERS)
    except FenceApiError as error:
        _error(str(error))
        return ExitCode.FAILURE
    for warning in request.warnings:
        _warn(warning)

    if request.action == "metadata":
        sys.stdout.write(metadata())
        return ExitCode.SUCCESS

    problems = validate(request)
    unknown = [f"unknown parameter {key!r} (see -o metadata)" for key in request.unknown]
    if request.action == "validate-all":
        # Validation is the moment to catch a misspelt parameter that would otherwise be ignored.
        for problem in problems + unknown:
            _error(problem)
        return ExitCode.FAILURE if problems or unknown else ExitCode.SUCCESS
    for message in unknown:
        _warn(message + ", ignored")
    if problems:
        for problem in problems:
            _error(problem)
        return ExitCode.FAILURE

    timeout = float(request.options.get("timeout", DEFAULT_TIMEOUT))
    try:
        code = asyncio.run(asyncio.wait_for(
            perform(request.action, request.node, request.options), timeout))
    except asyncio.TimeoutError:
        _error(f"Failed: no answer from the mesh within {timeout:g}s; the node is NOT known to be "
               "fenced")
        return ExitCode.FAILURE
    except MeshUnavailableError as error:
        _error(f"Failed: {error}")
        return ExitCode.FAILURE
    except Exception as error:  # whatever went wrong, the cluster must read "not fenced"
        _error(f"Failed: unexpected error while asking the mesh: {error!r}")
        return ExitCode.FAILURE
    allowed = {0, 1, 2} if request.action == "status" else {0, 1}
    if code not in allowed:
        _error(f"Failed: the mesh answered with exit code {code!r}, which {request.action} "
               "cannot return")
        return ExitCode.FAILURE
    return code


def main() -> None:
    """Console-script entry point."""
    argv = sys.argv[1:]
    # Like fencing.py: with any command-line argument, stdin is not read.
    stdin_text = None if argv else sys.stdin.read()
    sys.exit(run(argv, stdin_text))


if __name__ == "__main__":
    main()
