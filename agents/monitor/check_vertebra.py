"""check_vertebra: the Nagios plugin that asks the mesh instead of NRPE.

    check_vertebra -H HOST -c CHECK [-a NAME=VALUE ...] [-t SECONDS[:STATE]]
    check_vertebra -R RESOURCE -c CHECK [-a NAME=VALUE ...] [-t SECONDS[:STATE]]

``-H`` runs the check on the agent holding ``/host/HOST`` and prints its plugin output unchanged,
exiting with its state. ``-R`` runs it on every agent under a resource and prints one aggregate
(worst state, ``2 OK, 1 CRITICAL (db2)``, each host's line, all perfdata). Mesh problems (no
agent, denied, timeout, unreachable) are UNKNOWN with a line that says which; a timeout may be
given another state with ``-t 10:CRITICAL``. ``-h`` and ``-V`` exit 3, as the Monitoring Plugins
guidelines want. The mesh is found by ``agents.home.site_paths``: ``--home``, else ``$VERTEBRA_HOME``,
else the system location (/etc/vertebra/mesh.yaml, state in /var/lib/vertebra), never the working
directory (Nagios runs plugins in /tmp, where anyone may put a ``.vertebra``); a state directory, mesh
file or socket others could have written is refused (``agents.home.check_safe``). The mesh is reached
through the local gateway, or a direct login when none runs.

Nagios starts this program for every check, so its start is most of its cost. The common command
lines (``-H``/``-R``, ``-c``, ``-a``, ``-t SECONDS``, ``--home``, ``--mesh``, ``--account``) take a
lean path when a gateway runs: no argparse, no asyncio, no YAML parser; a plain socket to the gateway.
What the call needs from the mesh file (domain, operator, password files, policy) is kept in
``HOME/run/check_vertebra.cache`` by ``agents.fastpath``, keyed by the mesh file's exact bytes, its
path, the state directory and the mesh-file parser's own file, so an edited mesh file is always
parsed again; the password itself is read every time. Anything else (``-h``, ``-V``, ``-t 10:CRITICAL``, odd
spellings, usage errors, no gateway) goes the full way, with the same answers.

Each shortcut is kept by a measurement (a loaded 2-core machine; 30 interleaved runs through a live
gateway, or 60 fresh interpreters for one import): a check through the lean path took 43 ms median,
the full path 130 ms; the full parser (argparse) instead of the lean reading adds 5 ms to a start,
the mesh file's parser 80 ms, ``agents.resources`` 3-4 ms, pathlib 5 ms. Run as Nagios runs it (user
nagios, through the gateway as its own identity), check_vertebra's p50 was 0.37-0.47x check_nrpe's
(TLS) at load 1.1-2.5, against a target of 0.5x (bench/checks.py); of its ~23 ms, the interpreter's
start is ~15 ms, imports ~4 ms, the call ~5 ms. Tests hold the lean command-line reading to
the full parser and the lean resource check (agents.plain_names) to the path rules, case by case.
On a slower machine (2026-12-07, quiet) the lean path took 45 ms, 0.57x check_nrpe: 17 ms of it was
the interpreter, 11 ms imports, 6 ms the call. enum (for the states and agents.errors) and the msgpack
library (datetime, collections) were ~8 ms of the imports, so the lean path now loads neither: it
writes its states from ``agents.monitor.exit_codes`` (whose names a test holds to ``State``'s) and
calls through ``agents.gateway_client``, whose frames ``agents.lean_msgpack`` packs and reads. After
it, 29 ms, 0.40x.
"""

from __future__ import annotations

import os
import sys
from agents.monitor.exit_codes import NAMES, UNKNOWN, plain_text

TYPE_CHECKING = False  # typing itself costs a plugin start milliseconds; annotations are strings here
if TYPE_CHECKING:
    import argparse
    from typing import Any, NoReturn, Sequence

    from agents.monitor.states import State

PROG = "check_vertebra"
GRACE = 5.0  # beyond -t, for the program's own last-resort guard
CACHE_NAME = "check_vertebra.cache"
DEFAULT_TIMEOUT = 30.0


class _Usage(Exception):
    pass


def _timeout(text: str) -> tuple[float, "State"]:
    import argparse

    from agents.monitor.states import State

    seconds, _, state = text.partition(":")
    try:
        value = float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SECONDS[:STATE], got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"timeout must be between 0 and 3600 seconds, got {seconds}")
    try:
        return value, State.parse(state) if state else State.UNKNOWN
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> "argparse.ArgumentParser":
    import argparse

    from agents import __version__
    from agents.monitor.states import State

    class _Parser(argparse.ArgumentParser):
        # A plugin's usage errors are UNKNOWN (3), not argparse's 2.
        def error(self, message: str) -> NoReturn:
            raise _Usage(message)

    p = _Parser(prog=PROG, add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Run a named check on monitor agents through the Vertebra mesh.",
                epilog="Exit codes: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (also for -h, -V and mesh problems).")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-H", "--hostname", metavar="HOST", help="the agent holding resource /host/HOST")
    where.add_argument("-R", "--resource", metavar="RESOURCE",
                       help="every agent under RESOURCE (e.g. /cluster/c1), aggregated")
    p.add_argument("-c", "--check", metavar="CHECK", help="the check to run (see `vertebra call monitor.list`)")
    p.add_argument("-a", "--arg", action="append", default=[], metavar="NAME=VALUE",
                   help="an argument the check declares (repeatable)")
    p.add_argument("-t", "--timeout", type=_timeout, default=(DEFAULT_TIMEOUT, State.UNKNOWN),
                   metavar="SECONDS[:STATE]",
                   help="give up after SECONDS (default 30); the state for a timeout (default UNKNOWN)")
    p.add_argument("--home", help="mesh state directory (default: $VERTEBRA_HOME, else /var/lib/vertebra)")
    p.add_argument("--mesh", help="mesh file (default: HOME/mesh.yaml, or /etc/vertebra/mesh.yaml when no"
                                  " state directory is named)")
    p.add_argument("--account", help="account to call as (default: the mesh file's operator)")
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit (3)")
    p.add_argument("-V", "--version", action="version", version=f"{PROG} v{__version__} (vertebra)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    lean = lean_args(words)
    if lean is not None:
        try:
            answer = _lean_run(lean)
        except Exception as exc:  # whatever broke, a plugin answers UNKNOWN with one line
            answer = _unknown(f"{exc.__class__.__name__}: {exc}")
        if answer is not None:
            print(answer[0])
            return answer[1]
    return _full_main(words)


def _full_main(words: list[str]) -> int:

    parser = _parser()
    try:
        ns = parser.parse_args(words)
    except _Usage as exc:
        print(plain_text(f"{PROG}: {exc}\n{parser.format_usage().strip()}"))
        return UNKNOWN
    except SystemExit:  # -V printed the version
        return UNKNOWN
    if ns.help:
        print(plain_text(parser.format_help()), end="")
        return UNKNOWN
    if not ns.check or not (ns.hostname or ns.resource):
        print(plain_text(f"{PROG}: -c CHECK and one of -H HOST or -R RESOURCE are required\n"
                         f"{parser.format_usage().strip()}"))
        return UNKNOWN
    try:
        output, state = _run(ns)
    except Exception as exc:  # whatever broke, a plugin answers UNKNOWN with one line
        output, state = _unknown(f"{exc.__class__.__name__}: {exc}")
    print(output)
    return state


# -- the lean path -------------------------------------------------------------------------------

_LEAN_OPTIONS = {"-H": "hostname", "--hostname": "hostname", "-R": "resource", "--resource": "resource",
                 "-c": "check", "--check": "check", "-a": "arg", "--arg": "arg", "-t": "timeout",
                 "--timeout": "timeout", "--home": "home", "--mesh": "mesh", "--account": "account"}


def lean_args(words: Sequence[str]) -> dict[str, Any] | None:
    """The command line as the full parser would read it, for the plain spellings only: each option
    a separate word followed by its value, none repeated but ``-a``, values that do not start with
    ``-``, a timeout in plain seconds, ``-c`` and exactly one of ``-H``/``-R``. Anything else is
    None, and the full parser takes it (with its help, errors and all)."""
    out: dict[str, Any] = {"arg": []}
    i = 0
    while i < len(words):
        key = _LEAN_OPTIONS.get(words[i])
        if key is None or i + 1 >= len(words):
            return None
        value = words[i + 1]
        if not value or value.startswith("-"):
            return None
        if key == "arg":
            out["arg"].append(value)
        elif key in out:
            return None
        else:
            out[key] = value
        i += 2
    if "check" not in out or ("hostname" in out) == ("resource" in out):
        return None
    if "timeout" in out:
        try:
            seconds = float(out["timeout"])
        except ValueError:
            return None
        if ":" in out["timeout"] or not 0 < seconds <= 3600:
            return None
        out["timeout"] = seconds
    else:
        out["timeout"] = DEFAULT_TIMEOUT
    return out


def _site(home: str | None, mesh: str | None) -> tuple[str, str]:
    """The state directory and mesh file (``agents.home.site_paths``), each refused (UnsafePath) when
    others could have written it, as is the gateway socket in it."""
    from agents.home import check_safe, site_paths

    found, mesh_file = site_paths(home, mesh)
    for path, what in ((found, "state directory"), (mesh_file, "mesh file"),
                       (os.path.join(found, "run", "gateway.sock"), "gateway socket")):
        try:
            check_safe(path, what)
        except FileNotFoundError:
            pass  # what is missing, the full path names
    return found, mesh_file


def _lean_run(o: dict[str, Any]) -> tuple[str, int] | None:
    """Run the call through the gateway; None when the full path must do it (no gateway, a mesh
    file that does not load, a password missing: the full path says what is wrong)."""
    from agents.connect_errors import ConnectError
    from agents.gateway_client import GatewayRefused, GatewayUnavailable, call_via_gateway_blocking
    from agents.home import UnsafePath
    from agents.plain_names import is_resource

    try:
        home, mesh = _site(o.get("home"), o.get("mesh"))
    except UnsafePath as exc:
        return _unknown(str(exc))
    socket_path = os.path.join(home, "run", "gateway.sock")
    if not os.path.exists(socket_path):
        return None
    target = f"/host/{o['hostname']}" if "hostname" in o else o["resource"]
    if not is_resource(target):
        return None  # the full path checks it and says what is wrong
    identity = _identity(o, home, mesh)
    if identity is None:
        return None
    seconds = o["timeout"]
    call = {"op": "monitor.check", "args": {"check": o["check"], "args": o["arg"]}, "on": [target],
            "scope": "one" if "hostname" in o else "all", "to": [], "timeout": seconds, "rid": None}
    try:
        # Without a password of its own (nagios), the gateway knows the caller by its Unix user.
        report = call_via_gateway_blocking(socket_path, identity[0], identity[1], call, limit=seconds + GRACE,
                                           as_identity=o.get("account") if identity[1] is None else None)
    except GatewayUnavailable:
        return None  # nothing was sent: the full path logs in directly
    except GatewayRefused as exc:
        return _unknown(str(exc))
    except (ConnectError, OSError, TimeoutError) as exc:
        return _unknown(f"mesh unreachable: {exc}")
    if "resource" in o:
        from agents.report import CallReport

        return _aggregate(CallReport.from_dict(report), target)
    return _one(report, target, UNKNOWN)


def _identity(o: dict[str, Any], home: str, mesh: str) -> tuple[str, str] | tuple[None, None] | None:
    """The caller's JID and password, from the cache or, when it does not match, the mesh file;
    (None, None) when the gateway is to know the caller by its Unix user (``fastpath.identity``)."""
    from agents import fastpath

    return fastpath.identity(mesh, home, o.get("account"), CACHE_NAME)


# -- answers -------------------------------------------------------------------------------------

def _unknown(message: str) -> tuple[str, int]:
    """check_vertebra's own UNKNOWN line; a bar in it (a caller's value echoed back) is not perfdata."""
    return plain_text(f"UNKNOWN - {PROG}: {message}"), UNKNOWN


def _problem(outcome: str, where: str, error: str | None, state: int) -> tuple[str, int]:
    return plain_text(f"{NAMES[state]} - {PROG}: {outcome} on {where}: {error or 'no detail'}"), state


def _one(report: dict[str, Any], target: str, timeout_state: int) -> tuple[str, int]:
    """The answer for -H from a report (as ``CallReport.to_dict`` gives it): the agent's output and
    state, or UNKNOWN (the timeout state for a timeout) with a line saying what went wrong."""
    results = report["results"]
    answered = [r for r in results if r["outcome"] != "not-discovered"] or results
    if not answered:
        return _problem("not-discovered", target, f"no monitor agent holds {target}", UNKNOWN)
    res = answered[-1]
    if res["outcome"] != "ok" or not isinstance(res.get("result"), dict):
        where = res["target"] if res["target"].startswith("/") else res["target"].split("/")[0]
        return _problem(res["outcome"], where, res.get("error"), timeout_state if res["outcome"] == "timeout"
                        else UNKNOWN)
    code = res["result"]["code"]
    if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 3:
        from agents.monitor.states import State

        code = int(State.parse(code))
    return str(res["result"]["output"]), code


def _aggregate(report: Any, target: str) -> tuple[str, int]:
    from agents.errors import Outcome
    from agents.monitor.aggregate import aggregate

    if not report.results or all(r.outcome is Outcome.NOT_DISCOVERED for r in report.results):
        return _problem("not-discovered", target, f"no monitor agent offers monitor.check under {target}", UNKNOWN)
    agg = aggregate(report)
    return agg.render(), int(agg.worst)


# -- the full path -------------------------------------------------------------------------------

def _run(ns: "argparse.Namespace") -> tuple[str, int]:
    import asyncio

    from agents import config as meshconf, resources
    from agents.errors import ConnectError
    from agents.gateway import GatewayRefused
    from agents.home import UnsafePath
    from agents.session import mesh_call

    seconds, timeout_state = ns.timeout
    try:
        home, mesh_file = _site(ns.home, ns.mesh)
    except UnsafePath as exc:
        return _unknown(str(exc))
    if not os.path.isfile(mesh_file):
        return _unknown(f"no mesh file at {mesh_file}: give --home (the state directory) or --mesh, or set"
                        f" $VERTEBRA_HOME; {PROG} never looks in the working directory")
    try:
        mesh = meshconf.load(mesh_file, home)
        target = resources.check(f"/host/{ns.hostname}" if ns.hostname else ns.resource)
    except (meshconf.ConfigError, resources.BadResource) as exc:
        return _unknown(str(exc))

    async def call():  # type: ignore[no-untyped-def]
        async with asyncio.timeout(seconds + GRACE):
            return await mesh_call(mesh, "monitor.check", {"check": ns.check, "args": ns.arg}, on=[target],
                                   scope="one" if ns.hostname else "all", timeout=seconds, account=ns.account)
    try:
        report = asyncio.run(call())
    except GatewayRefused as exc:
        return _unknown(str(exc))
    except (ConnectError, OSError, TimeoutError, meshconf.ConfigError) as exc:
        return _unknown(f"mesh unreachable: {exc}")

    if ns.resource:
        return _aggregate(report, target)
    return _one(report.to_dict(), target, int(timeout_state))


if __name__ == "__main__":
    sys.exit(main())
