"""fence_vertebra: a fence agent, by the Fence Agent API, that fences nodes through the Vertebra mesh.

Pacemaker (or any RHCS-style cluster manager) runs it like any `fence_*` program: `key=value` lines on
stdin, or command-line options. `metadata` and `validate-all` are answered here; off, on, reboot,
status, list and monitor go to the mesh through `perform`: the mesh file in `vertebra_home` (else
$VERTEBRA_HOME, else /etc/vertebra/mesh.yaml with its state in /var/lib/vertebra:
``agents.home.site_paths``; never the working directory, and never a state directory, mesh file or
socket others could have written: ``agents.home.check_safe``), the local gateway (else a direct
login) as `identity` or `account`, a fencing agent that can fence the node on
/cluster/{cluster}/node/{node}. It finishes inside the `timeout` parameter (default 50 s, inside
Pacemaker's 60 s) and fails rather than run out of time; off/on/reboot exit 0 only when the mesh
confirms the new power state.

Pacemaker starts it for every action, so plain stdin requests take a lean path when a gateway runs
(``lean_request``, then the blocking gateway client), without ``fence_api``: that module adds about
15 ms to a start of 17 ms (measured over 60 fresh interpreters). The API's constants come from
``agents.fencing.names``, as ``fence_api``'s own do; a test holds the lean reading to ``fence_api``'s.
"""

from __future__ import annotations

import os
import sys
import time

from agents.fencing.names import (
    EXIT_FAILURE as FAILURE,
    EXIT_SUCCESS as SUCCESS,
    NODE_KEYS,
    STATUS_EXIT,
    TARGET_ACTIONS,
    StdinError,
    is_segment,
    node_resource,
    read_stdin,
)

TYPE_CHECKING = False  # typing itself costs a fencing start milliseconds; annotations are strings here
if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Mapping, Sequence
    from pathlib import Path
    from typing import Any

    from agents.config import MeshConfig
    from agents.fencing import fence_api

NAME = "fence_vertebra"
DEFAULT_TIMEOUT = "50"
MAX_TIMEOUT = 600.0
# Kept back from the timeout so the mesh's own answer (even a timeout) arrives before we give up.
ANSWER_MARGIN = 1.0
CACHE_NAME = "fence_vertebra.cache"  # HOME/run/CACHE_NAME: see agents/fastpath.py
HOT_ACTIONS = ("off", "on", "reboot", "status", "list", "monitor")

_parameters_cache: tuple[fence_api.Parameter, ...] = ()


def parameters() -> tuple[fence_api.Parameter, ...]:
    """The parameters fence_vertebra declares (metadata, options, checks), built on first use."""
    global _parameters_cache
    if _parameters_cache:
        return _parameters_cache
    from agents.fencing.fence_api import Parameter

    _parameters_cache = (
        Parameter("action", "Fencing action", required=True, short="o", value_hint="action"),
        Parameter("plug", "Node to fence, as the mesh names it", short="n", value_hint="id",
                  obsoletes="port"),
        Parameter("port", "Node to fence, as the mesh names it", deprecated=True, alias_of="plug"),
        Parameter("nodename", "Cluster node name of the node to fence (used when no plug is given)",
                  value_hint="name"),
        Parameter("cluster", "Name of the cluster this fencing request acts for",
                  value_hint="name"),
        Parameter("vertebra_home",
                  "Vertebra state directory, holding mesh.yaml (default: $VERTEBRA_HOME, then /var/lib/vertebra"
                  " with the mesh file /etc/vertebra/mesh.yaml)",
                  value_hint="dir"),
        Parameter("account", "Mesh account to fence as (default: the mesh file's operator); its "
                  "password is read from the state directory", value_hint="name"),
        Parameter("identity", "Person or service of the mesh file to fence as (e.g. fence-c1), instead of "
                  "account: the local gateway reads its password", value_hint="name"),
        Parameter("timeout", "Seconds to wait for the mesh before reporting failure",
                  type="second", default=DEFAULT_TIMEOUT, value_hint="seconds"),
        Parameter("verbose", "Verbose mode", type="boolean", short="v"),
        Parameter("version", "Display version information and exit", type="boolean", short="V"),
        Parameter("help", "Display help and exit", type="boolean", short="h"),
    )
    return _parameters_cache


def __getattr__(name: str) -> object:
    if name == "PARAMETERS":
        return parameters()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MeshUnavailableError(RuntimeError):
    """fence_vertebra could not get an answer from the mesh."""


def metadata() -> str:
    from agents.fencing import fence_api

    return fence_api.metadata_xml(
        name=NAME,
        shortdesc="Fence agent for nodes managed through the Vertebra mesh",
        longdesc="fence_vertebra routes a fencing request through the Vertebra agent mesh to the "
                 "fencing agent that can reach the node's real fence devices. Off, on and reboot "
                 "succeed only when the device's status confirms the new power state.",
        vendor_url="https://github.com/engineyard/vertebra",
        parameters=parameters(),
    )


def site(options: Mapping[str, str]) -> tuple[str, str]:
    """The state directory and mesh file (``agents.home.site_paths``); UnsafePath when either, or the
    gateway socket in it, could have been written by someone other than root and its owner."""
    from agents.home import check_safe, site_paths

    home, mesh = site_paths(options.get("vertebra_home") or None)
    for path, what in ((home, "state directory"), (mesh, "mesh file"),
                       (os.path.join(home, "run", "gateway.sock"), "gateway socket")):
        try:
            check_safe(path, what)
        except FileNotFoundError:
            pass  # what is missing, load_mesh names
    return home, mesh


def vertebra_home(options: Mapping[str, str]) -> Path:
    from pathlib import Path

    from agents.home import site_paths

    return Path(site_paths(options.get("vertebra_home") or None)[0])


def load_mesh(options: Mapping[str, str]) -> MeshConfig:
    """The mesh file in the state directory; never creates one (a fence agent must not guess)."""
    # The mesh runtime (slixmpp and all) loads only when the mesh is asked: metadata and
    # validate-all, which Pacemaker runs often, stay quick.
    from agents import config
    from agents.home import UnsafePath

    try:
        home, path = site(options)
    except UnsafePath as error:
        raise MeshUnavailableError(str(error)) from None
    if not os.path.isfile(path):
        raise MeshUnavailableError(f"no mesh file at {path}: set vertebra_home= (or $VERTEBRA_HOME) to"
                                   " the Vertebra state directory of this host")
    try:
        return config.load(path, home)
    except config.ConfigError as error:
        raise MeshUnavailableError(str(error)) from None


def validate(request: fence_api.FenceRequest) -> list[str]:
    """Problems with a request's options; empty when it could be carried out."""
    from agents.fencing import fence_api

    problems = fence_api.check_values(request.options, parameters())
    timeout = request.options.get("timeout")
    if timeout is not None and not problems and not 0 < float(timeout) <= MAX_TIMEOUT:
        problems.append(f"timeout={timeout} must be more than 0 and at most {MAX_TIMEOUT:g} seconds")
    value = request.options.get("vertebra_home")
    if value is not None and not os.path.isabs(value):
        problems.append(f"vertebra_home={value!r} must be an absolute path")
    if request.options.get("identity") and request.options.get("account"):
        problems.append("identity= and account= both name who to fence as: give one of them")
    for key in ("cluster", "account", "identity"):
        value = request.options.get(key)
        if value is not None and not is_segment(value):
            problems.append(f"{key}={value!r} is not a valid name (letters, digits and _ . : @ + -)")
    if request.node is not None and not is_segment(request.node):
        problems.append(f"node {request.node!r} is not a valid node name (letters, digits and _ . : @ + -)")
    home = os.environ.get("VERTEBRA_HOME")
    if "vertebra_home" not in request.options and home and not os.path.isabs(home):
        problems.append(f"$VERTEBRA_HOME={home!r} must be an absolute path")
    if request.action in fence_api.TARGET_ACTIONS and request.node is None:
        problems.append(f"action {request.action} needs the node: pass plug=, port= or nodename=")
    return problems


# -- what an action asks the mesh, for both paths ------------------------------------------------

def conversation(action: str, node: str | None, options: Mapping[str, str]
                 ) -> Generator[tuple[str, dict[str, str], list[str], str], dict, int]:
    """The requests an action makes, one at a time: yields (op, args, on, scope), is sent each
    report as the plain mapping ``CallReport.to_dict`` gives, and returns the exit code. The lean
    path drives it with blocking gateway calls, the full path with ``mesh_call``."""
    if action in ("list", "monitor"):
        cluster = options.get("cluster") or ""
        report = yield ("fence.list", {"cluster": cluster}, [node_resource_prefix(cluster)] if cluster else [],
                        "all")
        return _listed(action, report)
    assert node is not None  # validate() made sure of it
    cluster = options.get("cluster") or _cluster_of(node, (yield ("fence.list", {"cluster": ""}, [], "all")))
    report = yield (f"fence.{action}", {"cluster": cluster, "node": node}, [node_resource(cluster, node)], "one")
    return _exit_code(action, node, report)


def _drive(conv: Generator[Any, Any, int], ask: Callable[..., dict]) -> int:
    try:
        request = next(conv)
        while True:
            request = conv.send(ask(*request))
    except StopIteration as stop:
        return stop.value


async def perform(action: str, node: str | None, options: Mapping[str, str], started: float | None = None) -> int:
    """Carry out off/on/reboot/status/list/monitor through the mesh; the Fence Agent API exit code.

    One request per action, under one request id, and no retries here: Pacemaker retries a failed
    device action itself (with a fresh run), and a retry of ours could not reuse the request id
    through the session API, so it might run twice. Every wait ends ANSWER_MARGIN before `timeout`,
    counted from `started` (a time.monotonic(); default now).
    """
    from agents.config import ConfigError
    from agents.session import mesh_call

    start = time.monotonic() if started is None else started
    end = start + float(options.get("timeout", DEFAULT_TIMEOUT)) - ANSWER_MARGIN
    mesh = load_mesh(options)
    account = options.get("identity") or options.get("account") or None

    conv = conversation(action, node, options)
    try:
        request = next(conv)
        while True:
            op, args, on, scope = request
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise MeshUnavailableError(f"no time left to ask the mesh for {op}")
            try:
                report = await mesh_call(mesh, op, args, on=on, scope=scope, timeout=remaining, account=account)
            except ConfigError as error:  # e.g. no password file for the account
                raise MeshUnavailableError(str(error)) from None
            request = conv.send(report.to_dict())
    except StopIteration as stop:
        return stop.value


def node_resource_prefix(cluster: str) -> str:
    return f"/cluster/{cluster}"


def _listed(action: str, report: dict) -> int:
    answered = [r for r in report["results"] if r["outcome"] == "ok"]
    for r in report["results"]:
        if r["outcome"] != "ok":
            (_error if not answered else _warn)(f"{r['target']}: {r['outcome']}: {r.get('error')}")
    if not answered:
        return FAILURE
    if action == "list":
        nodes = sorted({n for r in answered for names in r["result"]["clusters"].values() for n in names})
        for name in nodes:
            print(f"{name},")  # plug,alias as fencing.py prints it; no aliases here
    return SUCCESS


def _cluster_of(node: str, report: dict) -> str:
    """The one cluster whose fencing agents list `node` (from a fence.list of every cluster); used
    when no cluster= was given."""
    results = report["results"]
    found = sorted({c for r in results if r["outcome"] == "ok"
                    for c, names in r["result"]["clusters"].items() if node in names})
    if len(found) == 1:
        return found[0]
    if found:
        raise MeshUnavailableError(f"node {node} is in clusters {', '.join(found)}: pass cluster=NAME")
    errors = "; ".join(f"{r['target']}: {r['outcome']}" for r in results if r["outcome"] != "ok")
    raise MeshUnavailableError(f"no fencing agent in the mesh can fence node {node}"
                               + (f" ({errors})" if errors else ""))


def _exit_code(action: str, node: str, report: dict) -> int:
    """Success only for exactly one ok answer that confirms what was asked."""
    results = report["results"]
    if len(results) != 1 or results[0]["outcome"] != "ok":
        for r in results:
            if r["outcome"] != "ok":
                _error(f"Failed: {action} {node} via {r['target']}: {r['outcome']}: {r.get('error')}")
        if action != "status":
            _error(f"Failed: {node} is NOT known to be {'off' if action != 'on' else 'on'}")
        return FAILURE
    result = results[0].get("result")
    state = result.get("state") if isinstance(result, dict) else None
    if action == "status":
        if state in ("on", "off"):
            print(f"Status: {state.upper()}")
            return STATUS_EXIT[state]
        _error(f"Failed: the mesh reported no power state for {node}")
        return FAILURE
    confirmed = isinstance(result, dict) and result.get("ok") is True and (
        state == action or (action == "reboot" and result.get("devices")))
    if not confirmed:
        _error(f"Failed: the mesh answered {action} {node} without confirming it: {result!r}")
        return FAILURE
    if action == "reboot" and result.get("on_error"):
        _warn(f"{node} was fenced, but did not power back on: {result['on_error']}")
    print(f"Success: {result.get('message', action)}")
    return SUCCESS


def _error(message: str) -> None:
    print(f"{NAME}: ERROR: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"{NAME}: WARNING: {message}", file=sys.stderr)


def usage() -> str:
    lines = [f"Usage: {NAME} [options]  (or key=value lines on stdin)", "Options:"]
    table = {p.name: p for p in parameters()}
    for p in parameters():
        if not p.alias_of:
            lines.append(f"  {p.getopt_text(table):<32} {p.shortdesc}")
    return "\n".join(lines)


# -- the lean path -------------------------------------------------------------------------------

_LEAN_KEYS = frozenset({"action", "plug", "port", "nodename", "cluster", "vertebra_home", "account", "identity",
                        "timeout"})


def lean_request(argv: Sequence[str], stdin_text: str | None) -> tuple[str, str | None, dict[str, str]] | None:
    """(action, node, options) for the plain requests Pacemaker sends, read as the full path reads
    them: stdin only, each known key once, no deprecated or unknown key, a hot action and values the
    full path would accept without a word. Anything else is None, and the full path takes it (with
    its warnings, errors and all)."""
    if argv:
        return None
    try:
        pairs = read_stdin(stdin_text or "")  # the full path's reader (names.py): one way to read stdin
    except StdinError:
        return None
    lines = sum(1 for raw in (stdin_text or "").splitlines() if raw.strip() and not raw.strip().startswith("#"))
    if len(pairs) != lines or not pairs.keys() <= _LEAN_KEYS:  # a key given twice: the full path says so
        return None
    action = pairs.pop("action", "").strip().lower()
    if action not in HOT_ACTIONS:
        return None
    named = {k: pairs.pop(k) for k in NODE_KEYS if k in pairs and pairs[k] != ""}
    if "plug" in named and "port" in named and named["plug"] != named["port"]:
        return None
    node = next((named[k] for k in NODE_KEYS if k in named), None)
    if node is None and action in TARGET_ACTIONS:
        return None
    try:
        if not 0 < float(pairs.get("timeout", DEFAULT_TIMEOUT)) <= MAX_TIMEOUT:
            return None
    except ValueError:
        return None
    home = pairs.get("vertebra_home", os.environ.get("VERTEBRA_HOME") or "/")
    if not os.path.isabs(home):
        return None
    if pairs.get("identity") and pairs.get("account"):
        return None
    names = [pairs[k] for k in ("cluster", "account", "identity") if k in pairs] + ([node] if node is not None else [])
    if not all(is_segment(n) for n in names):
        return None
    return action, node, pairs


def _lean_run(action: str, node: str | None, options: dict[str, str], started: float) -> int | None:
    """The action through the gateway with blocking calls; None when the full path must do it (no
    gateway, a mesh file that does not load, a password missing: the full path says what is wrong).
    None only while no destructive request has gone out: the first request of a node action is a
    read-only fence.list."""
    from agents import fastpath
    from agents.home import UnsafePath

    try:
        home, mesh_path = site(options)
    except UnsafePath:
        return None  # the full path refuses it, with the reason
    socket_path = os.path.join(home, "run", "gateway.sock")
    if not os.path.exists(socket_path) or not os.path.isfile(mesh_path):
        return None
    # identity=NAME: the gateway calls as that identity of the mesh file and reads its password itself.
    as_identity = options.get("identity") or None
    identity = (None, None) if as_identity else fastpath.identity(mesh_path, home, options.get("account") or None,
                                                                  CACHE_NAME)
    if identity is None:
        return None
    from agents.gateway_client import GatewayUnavailable, call_via_gateway_blocking

    timeout = float(options.get("timeout", DEFAULT_TIMEOUT))

    def ask(op: str, args: dict[str, str], on: list[str], scope: str) -> dict:
        now = time.monotonic()
        remaining = started + timeout - ANSWER_MARGIN - now
        if remaining <= 0:
            raise MeshUnavailableError(f"no time left to ask the mesh for {op}")
        call = {"op": op, "args": args, "on": on, "scope": scope, "to": [], "timeout": remaining, "rid": None}
        # The hard bound is the timeout itself, as the full path's wait_for: a failure, not a kill.
        return call_via_gateway_blocking(socket_path, identity[0], identity[1], call,
                                         limit=started + timeout - now, as_identity=as_identity)

    try:
        return _checked(action, timeout, lambda: _drive(conversation(action, node, options), ask))
    except GatewayUnavailable:
        return None  # nothing was sent by this request: the full path logs in directly


def _checked(action: str, timeout: float, carry_out: Callable[[], int]) -> int:
    """Run an action; every failure to get an answer is an error line and exit 1 (never "fenced")."""
    from agents.gateway_client import GatewayUnavailable

    try:
        code = carry_out()
    except GatewayUnavailable:
        raise
    except TimeoutError:  # asyncio.TimeoutError is TimeoutError
        _error(f"Failed: no answer from the mesh within {timeout:g}s; the node is NOT known to be "
               "fenced")
        return FAILURE
    except MeshUnavailableError as error:
        _error(f"Failed: {error}")
        return FAILURE
    except Exception as error:  # whatever went wrong, the cluster must read "not fenced"
        _error(f"Failed: unexpected error while asking the mesh: {error!r}")
        return FAILURE
    allowed = {0, 1, 2} if action == "status" else {0, 1}
    if code not in allowed:
        _error(f"Failed: the mesh answered with exit code {code!r}, which {action} "
               "cannot return")
        return FAILURE
    return code


# -- the program ---------------------------------------------------------------------------------

def run(argv: Sequence[str], stdin_text: str | None) -> int:
    """The whole program, minus process plumbing: returns the exit code."""
    started = time.monotonic()
    lean = lean_request(argv, stdin_text)
    if lean is not None:
        code = _lean_run(*lean, started)
        if code is not None:
            return code
    return _full_run(argv, stdin_text, started)


def _full_run(argv: Sequence[str], stdin_text: str | None, started: float) -> int:
    from agents.fencing import fence_api

    try:
        pairs = (fence_api.parse_argv(argv, parameters()) if argv
                 else fence_api.parse_stdin(stdin_text or ""))
        if fence_api.is_true(pairs.get("help")):
            print(usage())
            return SUCCESS
        if fence_api.is_true(pairs.get("version")):
            from agents import __version__
            print(f"{NAME} {__version__}")
            return SUCCESS
        request = fence_api.build_request(pairs, parameters())
    except fence_api.FenceApiError as error:
        _error(str(error))
        return FAILURE
    for warning in request.warnings:
        _warn(warning)

    if request.action == "metadata":
        sys.stdout.write(metadata())
        return SUCCESS

    problems = validate(request)
    unknown = [f"unknown parameter {key!r} (see -o metadata)" for key in request.unknown]
    if request.action == "validate-all":
        # Validation is the moment to catch a misspelt parameter that would otherwise be ignored.
        for problem in problems + unknown:
            _error(problem)
        return FAILURE if problems or unknown else SUCCESS
    for message in unknown:
        _warn(message + ", ignored")
    if problems:
        for problem in problems:
            _error(problem)
        return FAILURE

    import asyncio

    timeout = float(request.options.get("timeout", DEFAULT_TIMEOUT))
    left = started + timeout - time.monotonic()  # the lean path may have spent some already
    return _checked(request.action, timeout, lambda: asyncio.run(asyncio.wait_for(
        perform(request.action, request.node, request.options, started), left)))


def main() -> None:
    """Console-script entry point."""
    argv = sys.argv[1:]
    # Like fencing.py: with any command-line argument, stdin is not read.
    stdin_text = None if argv else sys.stdin.read()
    sys.exit(run(argv, stdin_text))


if __name__ == "__main__":
    main()
