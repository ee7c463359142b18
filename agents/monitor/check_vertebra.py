"""check_vertebra: the Nagios plugin that asks the mesh instead of NRPE.

    check_vertebra -H HOST -c CHECK [-a NAME=VALUE ...] [-t SECONDS[:STATE]]
    check_vertebra -R RESOURCE -c CHECK [-a NAME=VALUE ...] [-t SECONDS[:STATE]]

``-H`` runs the check on the agent holding ``/host/HOST`` and prints its plugin output unchanged,
exiting with its state. ``-R`` runs it on every agent under a resource and prints one aggregate
(worst state, ``2 OK, 1 CRITICAL (db2)``, each host's line, all perfdata). Mesh problems (no
agent, denied, timeout, unreachable) are UNKNOWN with a line that says which; a timeout may be
given another state with ``-t 10:CRITICAL``. ``-h`` and ``-V`` exit 3, as the Monitoring Plugins
guidelines want. The mesh is found as the `vertebra` CLI finds it (--home, $VERTEBRA_HOME,
./.vertebra) and reached through the local gateway, or a direct login when none runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import NoReturn, Sequence

from agents.monitor.ranges import State

UNKNOWN = int(State.UNKNOWN)
PROG = "check_vertebra"
GRACE = 5.0  # beyond -t, for the program's own last-resort guard


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    # A plugin's usage errors are UNKNOWN (3), not argparse's 2.
    def error(self, message: str) -> NoReturn:
        raise _Usage(message)


def _timeout(text: str) -> tuple[float, State]:
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


def _parser() -> _Parser:
    from agents import __version__
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
    p.add_argument("-t", "--timeout", type=_timeout, default=(30.0, State.UNKNOWN), metavar="SECONDS[:STATE]",
                   help="give up after SECONDS (default 30); the state for a timeout (default UNKNOWN)")
    p.add_argument("--home", help="mesh state directory (default: $VERTEBRA_HOME, else ./.vertebra)")
    p.add_argument("--mesh", help="mesh file (default: HOME/mesh.yaml)")
    p.add_argument("--account", help="account to call as (default: the mesh file's operator)")
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit (3)")
    p.add_argument("-V", "--version", action="version", version=f"{PROG} v{__version__} (vertebra)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        ns = parser.parse_args(argv)
    except _Usage as exc:
        print(f"{PROG}: {exc}\n{parser.format_usage().strip()}")
        return UNKNOWN
    except SystemExit:  # -V printed the version
        return UNKNOWN
    if ns.help:
        parser.print_help(sys.stdout)
        return UNKNOWN
    if not ns.check or not (ns.hostname or ns.resource):
        print(f"{PROG}: -c CHECK and one of -H HOST or -R RESOURCE are required\n{parser.format_usage().strip()}")
        return UNKNOWN
    try:
        output, state = _run(ns)
    except Exception as exc:  # whatever broke, a plugin answers UNKNOWN with one line
        output, state = f"UNKNOWN - {PROG}: {exc.__class__.__name__}: {exc}", State.UNKNOWN
    print(output)
    return int(state)


def _run(ns: argparse.Namespace) -> tuple[str, State]:
    from agents import config as meshconf, resources
    from agents.errors import ConnectError
    from agents.errors import Outcome
    from agents.monitor.aggregate import aggregate
    from agents.session import mesh_call

    seconds, timeout_state = ns.timeout
    try:
        mesh = meshconf.load(ns.mesh, ns.home)
        target = resources.check(f"/host/{ns.hostname}" if ns.hostname else ns.resource)
    except (meshconf.ConfigError, resources.BadResource) as exc:
        return f"UNKNOWN - {PROG}: {exc}", State.UNKNOWN

    async def call():  # type: ignore[no-untyped-def]
        async with asyncio.timeout(seconds + GRACE):
            return await mesh_call(mesh, "monitor.check", {"check": ns.check, "args": ns.arg}, on=[target],
                                   scope="one" if ns.hostname else "all", timeout=seconds, account=ns.account)
    try:
        report = asyncio.run(call())
    except (ConnectError, OSError, TimeoutError, meshconf.ConfigError) as exc:
        return f"UNKNOWN - {PROG}: mesh unreachable: {exc}", State.UNKNOWN

    def mesh_problem(outcome: Outcome, where: str, error: str | None) -> tuple[str, State]:
        state = timeout_state if outcome is Outcome.TIMEOUT else State.UNKNOWN
        return f"{state.name} - {PROG}: {outcome.value} on {where}: {error or 'no detail'}", state

    if ns.resource:
        if not report.results or all(r.outcome is Outcome.NOT_DISCOVERED for r in report.results):
            return mesh_problem(Outcome.NOT_DISCOVERED, target, f"no monitor agent offers monitor.check under {target}")
        agg = aggregate(report)
        return agg.render(), agg.worst
    answered = [r for r in report.results if r.outcome is not Outcome.NOT_DISCOVERED] or report.results
    if not answered:
        return mesh_problem(Outcome.NOT_DISCOVERED, target, f"no monitor agent holds {target}")
    res = answered[-1]
    if res.outcome is not Outcome.OK or not isinstance(res.result, dict):
        return mesh_problem(res.outcome, res.target if res.target.startswith("/") else res.target.split("/")[0],
                            res.error)
    return str(res.result["output"]), State.parse(res.result["code"])


if __name__ == "__main__":
    sys.exit(main())
