"""fence_vertebra: a fence agent, by the Fence Agent API, that fences nodes through the Vertebra mesh.

Pacemaker (or any RHCS-style cluster manager) runs it like any `fence_*` program: `key=value` lines on
stdin, or command-line options. `metadata` and `validate-all` are answered here; off, on, reboot,
status, list and monitor go to the mesh through `perform`, which finishes inside the `timeout`
parameter (default 50 s, inside Pacemaker's 60 s) and fails rather than run out of time.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from agents.fencing import fence_api
from agents.fencing.fence_api import ExitCode, FenceApiError, Parameter

NAME = "fence_vertebra"
DEFAULT_TIMEOUT = "50"
MAX_TIMEOUT = 600.0
DEFAULT_HOME = "/var/lib/vertebra"
SOCKET_NAME = "gateway.sock"

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
    Parameter("socket", f"Local gateway socket (default: <vertebra_home>/{SOCKET_NAME})",
              value_hint="path"),
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


def gateway_socket(options: Mapping[str, str]) -> Path:
    return Path(options.get("socket") or vertebra_home(options) / SOCKET_NAME)


def validate(request: fence_api.FenceRequest) -> list[str]:
    """Problems with a request's options; empty when it could be carried out."""
    problems = fence_api.check_values(request.options, PARAMETERS)
    timeout = request.options.get("timeout")
    if timeout is not None and not problems and not 0 < float(timeout) <= MAX_TIMEOUT:
        problems.append(f"timeout={timeout} must be more than 0 and at most {MAX_TIMEOUT:g} seconds")
    for key in ("vertebra_home", "socket"):
        value = request.options.get(key)
        if value is not None and not os.path.isabs(value):
            problems.append(f"{key}={value!r} must be an absolute path")
    home = os.environ.get("VERTEBRA_HOME")
    if "vertebra_home" not in request.options and home and not os.path.isabs(home):
        problems.append(f"$VERTEBRA_HOME={home!r} must be an absolute path")
    if request.action in fence_api.TARGET_ACTIONS and request.node is None:
        problems.append(f"action {request.action} needs the node: pass plug=, port= or nodename=")
    return problems


async def perform(action: str, node: str | None, options: Mapping[str, str]) -> int:
    """Carry out off/on/reboot/status/list/monitor through the mesh; the Fence Agent API exit code.

    The mesh client is not written yet, so this refuses clearly instead of pretending.
    """
    raise MeshUnavailableError(
        f"fence_vertebra cannot reach the mesh yet: the mesh client is not implemented "
        f"(would ask the gateway at {gateway_socket(options)} to {action} {node or 'the mesh'})")


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
