"""`vertebra`: run a mesh and drive it from the command line.

    vertebra up                      private server, broker and every agent of the mesh file
    vertebra server start|stop|status
    vertebra broker | agent NAME     run one actor in the foreground
    vertebra agents [--json]         the live agents, their ops and resources
    vertebra call OP [--on RESOURCE ...] [--scope all|one] [--to JID ...] [--timeout S] [--json|--yaml] key=value ...
    vertebra help [OP]               an op's arguments, as a live agent offering it describes them
    vertebra policy check FILE       lint an authorization policy and check its examples, offline
    vertebra policy reload           the broker re-reads the mesh's policy file and pushes it to every agent
    vertebra workflow run|approve|perform|status|list|cancel ... [--follow]   the broker's durable workflows
    vertebra job show|wait ID [--to AGENT]   a long op's job by the id `call` printed: how it stands, or its end
    vertebra audit verify|show       check the agents' audit logs against the broker's anchors, or read them
    vertebra account list|add|remove|passwd [NAME]   the accounts of the mesh file's people and services

Exit codes of `call` and `agents`: 0 every target ok; 1 some target failed; 2 bad command line or
arguments (nothing was sent); 3 denied; 4 timeout; 5 unreachable (an agent, the broker or the
server); 6 not discovered (no live agent offers the op there). With several outcomes the highest
code wins. `server status`: 0 running, 7 stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from . import config as meshconf
from .errors import BadArguments, CallInterrupted, ConnectError, Outcome
from .report import EXIT_CODES, EXIT_USAGE, CallReport, TargetResult
from .gateway import Gateway
from .ops import OpSpec, Result
from .progress_view import WORKFLOW_ENDS, ProgressView, follow_workflow
from .render import render
from .session import mesh_call
from .pairs import parse_pairs
from . import kinds

EXIT_UNREACHABLE = 5
DESCRIBE_TIMEOUT = 5.0  # seconds to learn an op's arguments from the mesh before a call


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # Options and key=value pairs mix in any order (`call OP --on RES key=value`, the form `help`
    # prints): argparse ends a positional list at the first option, so pairs after one come back unknown.
    ns, rest = parser.parse_known_args(argv)
    stray = [w for w in rest if not (ns.command == "call" and "=" in w and not w.startswith("-"))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        ns.pairs = [*ns.pairs, *rest]
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if ns.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if ns.command == "policy" and ns.action == "check":
            if not ns.file:
                parser.error("policy check needs the FILE to check")
            return _policy_check(ns.file)
        # Commands that start agents check those agents' settings first: a typo stops them here, naming
        # the mesh file's line, before anything has started.
        check: bool | list[str] = True if ns.command == "up" else [ns.name] if ns.command == "agent" else False
        mesh = meshconf.load(ns.mesh, ns.home, check_settings=check)
        return COMMANDS[ns.command](mesh, ns)
    except meshconf.ConfigError as exc:
        print(f"vertebra: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader stopped reading (`| head`): not an error to report. Python would complain again
        # when it flushes stdout at exit, so stdout goes nowhere from here.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _seconds(text: str) -> float:
    """A --timeout: a finite number of seconds above zero (0, negative or NaN would end a call before
    it could answer, while what it sent may still run)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, such as 30 or 2.5, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _moment(text: str) -> float:
    """An --since/--until: epoch seconds, ISO 8601 (UTC without a zone), or a time ago such as 10m, 2h, 3d."""
    from datetime import UTC, datetime

    words = text.strip()
    try:
        if words[-1:].lower() in _UNITS and words[:-1].replace(".", "", 1).isdigit():
            return time.time() - float(words[:-1]) * _UNITS[words[-1].lower()]
        try:
            return float(words)
        except ValueError:
            moment = datetime.fromisoformat(words)
            return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a time ago (30s, 10m, 2h, 3d, 1w), epoch seconds or ISO 8601"
                                         f" such as 2026-01-31T14:00:00, got {text!r}") from None


def _request_id(text: str) -> str:
    """A --request-id: what an agent takes as a request's id (1-128 characters), without spaces or control
    characters, so that it can be copied from the line that printed it."""
    if not 1 <= len(text) <= 128 or not text.isprintable() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"must be 1 to 128 characters without spaces, such as the id an earlier"
                                         f" call printed; got {text[:140]!r}")
    return text


_REQUEST_ID_HELP = ("the request's id (default: a new one). The id of an earlier call retries it safely: an agent"
                    " (or the broker, whichever of its instances is asked) that saw it answers with its first"
                    " outcome and does not run it again, also after a restart (for 24 hours). An op that changes"
                    " state prints the id it used on stderr")


def _announce_rid(spec: OpSpec | None, given: str | None) -> str:
    """The request id to send under; for an op that changes state (or one not described) it is printed
    before the request leaves, so a call that hangs or is cut off can be retried too."""
    rid = given or uuid.uuid4().hex
    if spec is None or spec.changes_state:
        print(f"vertebra: request id {rid}; to retry this call without running it twice, give --request-id {rid}",
              file=sys.stderr)
    return rid


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vertebra", description="An agent mesh for managing infrastructure over XMPP.",
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", help="state directory (default: $VERTEBRA_HOME, else ./.vertebra)")
    p.add_argument("--mesh", help="mesh file (default: HOME/mesh.yaml, created from deploy/mesh.example.yaml)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the runtime does")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    srv = sub.add_parser("server", help="manage the mesh's private XMPP server")
    srv.add_argument("action", choices=("start", "stop", "status"))
    srv.add_argument("--engine", choices=("prosody", "ejabberd"), help="overrides the mesh file's server.engine")
    srv.add_argument("--cluster-join", metavar="NODE", help="ejabberd: join the cluster of this Erlang node")
    sub.add_parser("up", help="start the server, the broker and every agent; Ctrl-C stops them all")
    brk = sub.add_parser("broker", help="run the broker (one of its instances) in the foreground")
    brk.add_argument("--instance", type=int, default=1, metavar="N",
                     help="on a cluster, the instance by the N-th node of server.nodes (1: server.host)")
    ag = sub.add_parser("agent", help="run one agent of the mesh file in the foreground")
    ag.add_argument("name")
    lst = sub.add_parser("agents", help="list the live agents with their ops and resources")
    lst.add_argument("--json", action="store_true")
    lst.add_argument("--timeout", type=_seconds, default=10.0)
    call = sub.add_parser("call", help="call an op on the agents that offer it")
    call.add_argument("op")
    call.add_argument("pairs", nargs="*", metavar="key=value")
    call.add_argument("--on", action="append", default=[], metavar="RESOURCE",
                      help="only agents holding this resource, an ancestor or a descendant (repeatable)")
    call.add_argument("--scope", choices=("all", "one"), default=None,
                      help="all: every match; one: one match that accepts, exactly once (default: what the"
                           " op declares, usually all)")
    call.add_argument("--to", action="append", default=[], metavar="JID",
                      help="send to these agents directly, without discovery (repeatable)")
    call.add_argument("--timeout", type=_seconds, default=30.0, help="seconds for the whole call (default 30)")
    call.add_argument("--json", action="store_true", help="print the results as JSON")
    call.add_argument("--yaml", action="store_true", help="print the results as YAML")
    call.add_argument("--request-id", type=_request_id, metavar="ID", help=_REQUEST_ID_HELP)
    job = sub.add_parser("job", help="a long op's job by its id, from any terminal: show how it stands, or wait"
                                     " for its end (exit code as call's, from how it ended)")
    job.add_argument("action", choices=("show", "wait"))
    job.add_argument("job", metavar="ID", help="the job id `vertebra call` printed when the agent accepted the call")
    job.add_argument("--to", action="append", default=[], metavar="AGENT",
                     help="the agent running it (default: ask every agent)")
    job.add_argument("--timeout", type=_seconds, default=None,
                     help="seconds to wait for its end (wait; default 3600), or for the answer (show; default 10)")
    job.add_argument("--json", action="store_true")
    job.add_argument("--yaml", action="store_true")
    hlp = sub.add_parser("help", help="show an op's arguments, or list every op (asks the running mesh)")
    hlp.add_argument("op", nargs="?")
    hlp.add_argument("--timeout", type=_seconds, default=10.0)
    pol = sub.add_parser("policy", help="check a policy file offline, or have the broker reload and push it")
    pol.add_argument("action", choices=("check", "reload"))
    pol.add_argument("file", nargs="?", help="check: the policy file")
    pol.add_argument("--timeout", type=_seconds, default=60.0)
    wf = sub.add_parser("workflow", help="run, approve and follow the broker's workflows",
                        description="Shorthand for the broker's workflow.* ops: words without '=' fill the op's"
                                    " arguments in order; for run, NAME=VALUE words are the workflow's"
                                    " parameters. `vertebra help workflow.run` shows each op.")
    wf.add_argument("action", choices=("run", "approve", "perform", "status", "list", "cancel"))
    wf.add_argument("words", nargs="*", metavar="WORD", help="e.g. run masked-copy source=db; approve ID STEP")
    wf.add_argument("--timeout", type=_seconds, default=90.0)
    wf.add_argument("--request-id", type=_request_id, metavar="ID", help=_REQUEST_ID_HELP)
    wf.add_argument("--json", action="store_true")
    wf.add_argument("--yaml", action="store_true")
    wf.add_argument("--follow", action="store_true",
                    help="with status, run, approve or perform: then follow the instance step by step until it"
                         " ends (exit 0 done, 1 failed or cancelled); Ctrl-C stops following, not the workflow")
    aud = sub.add_parser("audit", help="verify or show the audit logs of this machine's agents")
    aud.add_argument("action", choices=("verify", "show"))
    aud.add_argument("--agent", action="append", default=[], metavar="NAME",
                     help="only this agent's log (repeatable; default: every log under HOME/state)")
    aud.add_argument("--caller", help="show: only this caller's records (bare JID)")
    aud.add_argument("--op", help="show: only this op's records")
    aud.add_argument("--since", type=_moment, metavar="TIME",
                     help="show: from this time: a time ago (10m, 2h, 3d), epoch seconds or ISO 8601 (UTC unless"
                          " it names a zone)")
    aud.add_argument("--until", type=_moment, metavar="TIME", help="show: until this time (as --since)")
    where = aud.add_mutually_exclusive_group()
    where.add_argument("--anchors", metavar="PATH", help="verify: read the anchors from this broker anchor database"
                       " (HOME/state/BROKER/audit-anchors.sqlite) instead of asking the broker")
    where.add_argument("--no-anchors", action="store_true",
                       help="verify: check the chains alone (a cut or a rewrite with the key goes unnoticed)")
    aud.add_argument("--timeout", type=_seconds, default=30.0, help="verify: seconds to wait for the broker")
    acc = sub.add_parser("account", help="list, add, remove or rotate the password of the mesh file's accounts",
                         description="The mesh file names people and services (people:, services:) besides its"
                                     " actors; each has an account on the private server with a random password"
                                     " in HOME/secrets/NAME.password (0600).")
    acc.add_argument("action", choices=("list", "add", "remove", "passwd"))
    acc.add_argument("name", nargs="?", help="add, remove: a person or service of the mesh file; passwd: any of"
                                             " its accounts")
    return p


# -- accounts ------------------------------------------------------------------------------------

def _account_kinds(mesh: meshconf.MeshConfig) -> dict[str, tuple[str, str | None]]:
    """Every account of the mesh file: its kind and the Unix user mapped to it."""
    kinds_of: dict[str, tuple[str, str | None]] = {mesh.broker: ("broker", None), mesh.operator: ("operator", None)}
    kinds_of.update({a.name: (f"agent ({a.kind})", None) for a in mesh.agents})
    if mesh.chat:
        kinds_of[mesh.chat.account] = ("chat bot", None)
    kinds_of.update({i.name: (i.kind, i.unix_user) for i in mesh.identities})
    return kinds_of


def cmd_account(mesh: meshconf.MeshConfig, ns: argparse.Namespace) -> int:
    from .identities import replace_password
    from .server import ServerError

    server = _server(mesh)
    kinds_of = _account_kinds(mesh)
    if ns.action == "list":
        rows = [("NAME", "KIND", "UNIX USER", "ACCOUNT")]
        for name, (kind, user) in kinds_of.items():
            try:
                exists = "exists" if server.has_account(name) else "missing"
            except ServerError:
                exists = "unknown (server not running)"
            rows.append((mesh.jid(name), kind, user or "-", exists))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
        return 0
    if not ns.name:
        print(f"vertebra: account {ns.action} needs the NAME of an account", file=sys.stderr)
        return EXIT_USAGE
    name = ns.name
    if (ns.action == "passwd" and name not in kinds_of) or (ns.action != "passwd" and mesh.identity(name) is None):
        what = "an account" if ns.action == "passwd" else "a person or service"
        print(f"vertebra: {name} is not {what} of the mesh file {mesh.path}: add it under people: or services:"
              " there first (an account the mesh file does not name is not trusted: the gateway maps no Unix user"
              " to it and the server reads it at the limited rate)", file=sys.stderr)
        return EXIT_USAGE
    try:
        if ns.action == "add":
            server.register_many(mesh.ensure_passwords([name]))
            print(f"{mesh.jid(name)}: account ready; its password is in {mesh.password_file(name)}")
        elif ns.action == "remove":
            existed = server.unregister(name)
            mesh.password_file(name).unlink(missing_ok=True)
            print(f"{mesh.jid(name)}: {'account removed' if existed else 'had no account'}; it is still listed in"
                  f" {mesh.path}, so `vertebra server start` creates it again unless you remove it there too")
        else:
            password = meshconf.new_password()
            server.register_many({name: password})  # the server first: a file never holds a password it refuses
            replace_password(mesh.password_file(name), password)
            note = ("" if kinds_of[name][0] in ("operator", "person", "service")
                    else f"; restart the {kinds_of[name][0]}: it logs in again with the password it read at its start")
            print(f"{mesh.jid(name)}: new password in {mesh.password_file(name)}{note}")
    except ServerError as exc:
        print(f"vertebra: {exc}", file=sys.stderr)
        return 1
    return 0


# -- help ----------------------------------------------------------------------------------------

def cmd_help(mesh: meshconf.MeshConfig, ns: argparse.Namespace) -> int:
    """An op's arguments, or every op, as the broker and the live agents describe them
    (``mesh.describe``): nothing of any kind's code is loaded here."""
    from .describe import spec_of

    report = _call_broker(mesh, "mesh.describe", {"op": ns.op or ""}, ns.timeout)
    if not report.ok:
        result = report.results[0]
        if ns.op and _no_such_op(ns.op, report):
            print(_unknown_op(mesh, ns.op, ns.timeout), file=sys.stderr)
            return EXIT_USAGE
        print(f"vertebra: help comes from the running mesh, and the broker did not give it"
              f" ({result.outcome.value}: {result.error}); start the mesh (`vertebra up`), ask for mesh.describe"
              " if it was denied, or read the ops in docs/protocol.md", file=sys.stderr)
        return report.exit_code
    answer = report.results[0].result
    if ns.op:
        text = spec_of(answer).help_text()
        if answer.get("broker"):  # the broker's own op: not found by discovery, sent to the broker
            text = text.replace(f"vertebra call {ns.op} [--on RESOURCE ...]",
                                f"vertebra call {ns.op} --to {mesh.broker}")
        print(text)
        return 0
    width = max((len(o["name"]) for o in answer), default=0)
    for o in answer:
        print(f"{o['name']:<{width}}  {o['summary']}")
    return 0


def _policy_check(path: str) -> int:
    from rbac.lint import check_file

    problems = check_file(path)
    for line in problems:
        print(line)
    if not problems:
        print(f"{path}: policy is valid and every example holds")
    return 1 if problems else 0


# -- audit -----------------------------------------------------------------------------------------

def cmd_workflow(mesh: meshconf.MeshConfig, ns: argparse.Namespace) -> int:
    started = time.monotonic()
    spec, described = _describe(mesh, f"workflow.{ns.action}", ns.timeout)
    if spec is None:
        _print_report(described, ns.json)
        return described.exit_code
    positional = [w for w in ns.words if "=" not in w]
    pairs = [w for w in ns.words if "=" in w]
    if ns.action == "run":
        pairs = [f"param={p}" for p in pairs]  # NAME=VALUE words are the workflow's own parameters
    try:
        if len(positional) > len(spec.params):
            raise BadArguments(f"{spec.name} takes at most {len(spec.params)} arguments in order"
                               f" ({', '.join(p.name for p in spec.params)}), got {len(positional)}")
        args = spec.parse_pairs([f"{p.name}={v}" for p, v in zip(spec.params, positional)] + pairs)
    except BadArguments as exc:
        print(f"vertebra: {exc} (see `vertebra help {spec.name}`)", file=sys.stderr)
        return EXIT_USAGE
    if ns.follow and ns.action not in ("run", "approve", "perform", "status"):
        print("vertebra: --follow follows one instance: give it to workflow status, run, approve or perform",
              file=sys.stderr)
        return EXIT_USAGE
    if ns.follow and ns.action != "status" and any(p.name == "wait" for p in spec.params):
        args["wait"] = 0.0  # the follower shows what happens from here on: no silent wait first
    rid = _announce_rid(spec, ns.request_id)
    sent = time.monotonic()
    report = _call_broker(mesh, spec.name, args, _left(ns.timeout, started), rid=rid)
    if ns.follow and report.ok:
        iid = report.results[0].result["instance"]
        followed = follow_workflow(report.results[0].result, lambda wait, since: _call_broker(
            mesh, "workflow.status", {"instance": iid, "wait": wait, "since": since}, wait + ns.timeout), sys.stderr)
        if isinstance(followed, CallReport):
            report = followed
        else:
            report.results[0].result = followed
    _print_report(report, ns.json, spec.result, time.monotonic() - sent, as_yaml=ns.yaml)
    if report.ok and (ns.follow or ns.action in ("run", "approve", "perform")):
        # A workflow that failed (or was cancelled) did not do what was asked, though the op answered.
        return WORKFLOW_ENDS.get(report.results[0].result.get("state"), 0)
    return report.exit_code


def cmd_policy_reload(mesh: meshconf.MeshConfig, ns: argparse.Namespace) -> int:
    report = _call_broker(mesh, "policy.reload", {}, ns.timeout)
    _print_report(report, False)
    return report.exit_code


def cmd_audit(mesh: meshconf.MeshConfig, ns: argparse.Namespace) -> int:
    from . import audit

    state = mesh.home / "state"
    logs = ([state / name / "audit.sqlite" for name in ns.agent] if ns.agent
            else sorted(state.glob("*/audit.sqlite")))
    missing = [path.parent.name for path in logs if not path.exists()]
    if missing:
        have = ", ".join(sorted(p.parent.name for p in state.glob("*/audit.sqlite"))) or "none"
        print(f"vertebra: no audit log for {', '.join(missing)} under {state} (the logs there: {have});"
              " --agent takes an actor's name as the mesh file gives it", file=sys.stderr)
        return EXIT_USAGE
    if not logs:
        print(f"vertebra: no audit logs under {state}", file=sys.stderr)
        return EXIT_USAGE
    worst = 0
    agents = {a.name for a in mesh.agents}
    for path in logs:
        if ns.action == "verify":
            name = path.parent.name
            anchors, problem = None, None
            if name not in agents:  # the broker's and the chat bot's own logs
                problem = f"{name} is not an agent of the mesh file, so its log has no anchors: the chain alone" \
                          " was checked"
            elif not ns.no_anchors:
                anchors, problem = _audit_anchors(mesh, mesh.jid(name), ns)
            code, message = audit.audit_verify(path, anchors=anchors)
            print(message)
            if problem:
                print(f"  warning: {problem}")
            # Anchors asked for and not had: what they would have caught is unchecked, so not "intact".
            worst = max(worst, code, 2 if name in agents and anchors is None and not ns.no_anchors else 0)
        else:
            print(f"== {path.parent.name}")
            for line in audit.audit_show(path, caller=ns.caller, op=ns.op, since=ns.since, until=ns.until):
                print(line)
    return worst


def _audit_anchors(mesh: meshconf.MeshConfig, jid: str, ns: argparse.Namespace) -> tuple[list[Any] | None, str | None]:
    """(anchors, None), or (None, why they could not be had): from the anchor database ``--anchors``
    names, else from the broker a page at a time (``mesh.audit.anchors``)."""
    from .audit import Anchor

    if ns.anchors:
        import sqlite3

        broker_class: Any = kinds.agent_class("broker")
        read_anchors = broker_class.read_anchors  # the broker's database, read as it writes it

        try:
            return [Anchor(*a) for a in read_anchors(ns.anchors, jid)], None
        except (OSError, sqlite3.Error) as exc:
            return None, f"cannot read the anchors of {jid} from {ns.anchors}: {exc}; the chain alone was checked"
    anchors: list[Any] = []
    while True:
        report = _call_broker(mesh, "mesh.audit.anchors", {"agent": jid, "after": anchors[-1].seq if anchors else 0},
                              ns.timeout)
        if not report.ok:
            why = "; ".join(f"{r.outcome.value}: {r.error}" for r in report.results)
            return None, (f"could not get the anchors of {jid} from the broker ({why}); the chain alone was checked:"
                          " start the mesh, or give --anchors PATH")
        page = report.results[0].result
        anchors += [Anchor(*a) for a in page["anchors"]]
        if not page["more"] or not page["anchors"]:
            return anchors, None


# -- calling ---------------------------------------------------------------------------------------

def _run_call(mesh: meshconf.MeshConfig, op: str, args: dict[str, Any], timeout: float, **kw: Any) -> CallReport:
    async def run() -> CallReport:
        # A last guard: whatever happens inside, the command ends.
        async with asyncio.timeout(timeout + 30.0):
            return await mesh_call(mesh, op, args, timeout=timeout, **kw)
    try:
        return asyncio.run(run())
    except (CallInterrupted, TimeoutError) as exc:  # the call may have gone out: not "unreachable"
        return CallReport(op, [TargetResult(mesh.server.host, Outcome.TIMEOUT, error=f"call interrupted: {exc}")])
    except (ConnectError, OSError) as exc:
        return CallReport(op, [TargetResult(mesh.server.host, Outcome.UNREACHABLE, error=f"mesh unreachable: {exc}")])


def _call_broker(mesh: meshconf.MeshConfig, op: str, args: dict[str, Any], timeout: float,
                 rid: str | None = None) -> CallReport:
    """An op of the broker itself: any of its instances will do (workflows go on to the leading one)."""
    return _run_call(mesh, op, args, timeout, to=mesh.broker_jids, scope="one", rid=rid)


def _full_jid(mesh: meshconf.MeshConfig, target: str) -> str:
    """Accept `storage1`, `storage1@domain` or a full JID for --to."""
    if "@" not in target:
        target = mesh.jid(target)
    if "/" not in target:
        target += "/" + ("broker" if target.split("@")[0] == mesh.broker else "agent")
    return target


def _describe(mesh: meshconf.MeshConfig, op: str, timeout: float) -> tuple[OpSpec | None, CallReport]:
    """The op as the broker or a live agent describes it (``mesh.describe``), and the report of asking:
    how the CLI knows an op's arguments without importing any kind's code."""
    from .describe import spec_of

    report = _call_broker(mesh, "mesh.describe", {"op": op}, min(DESCRIBE_TIMEOUT, timeout / 2))
    return (spec_of(report.results[0].result) if report.ok else None), report


def _no_such_op(op: str, described: CallReport) -> bool:
    """Whether the broker answered ``mesh.describe`` that nothing offers ``op`` (not that the agents
    offering it did not describe it in time: then the call still goes out)."""
    result = described.results[0] if described.results else None
    return (result is not None and result.outcome is Outcome.FAILED
            and f"offers an op named {op!r}" in (result.error or ""))


def _unknown_op(mesh: meshconf.MeshConfig, op: str, timeout: float) -> str:
    """What to tell someone who named an op nothing offers: the offered ops it is close to, if any."""
    import difflib

    listing = _call_broker(mesh, "mesh.describe", {"op": ""}, min(DESCRIBE_TIMEOUT, timeout))
    names = [o["name"] for o in listing.results[0].result] if listing.ok else []
    scored = sorted(((difflib.SequenceMatcher(None, op, name).ratio(), name) for name in names), reverse=True)
    # The closest, and those about as close (fence.of: fence.off or fence.on), not every name that is a bit alike.
    close = [name for score, name in scored[:3] if score >= max(0.6, scored[0][0] - 0.1)]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return (f"vertebra: no op named {op!r} is offered by the broker or a live agent{hint} (`vertebra help` lists"
            " those that are)")


def _left(timeout: float, started: float) -> float:
    """What is left of a command's ``timeout`` after what it spent since ``started`` (never nothing)."""
    return max(timeout - (time.monotonic() - started), min(timeout, 1.0))


def cmd_call(mesh: meshconf.MeshConfig, ns: argparse.Namespace) -> int:
    started = time.monotonic()
    spec, described = _describe(mesh, ns.op, ns.timeout)
    if spec is None and described.results and described.results[0].outcome is Outcome.DENIED:
        print(f"vertebra: warning: you may not read {ns.op}'s description (mesh.describe), so its arguments"
              " go unchecked to the agent, and an op that says where it goes is sent to every agent offering"
              " it unless --on says where: ask for mesh.describe where you have mesh.discover", file=sys.stderr)
    if spec is None and not ns.to and _no_such_op(ns.op, described):
        print(_unknown_op(mesh, ns.op, ns.timeout), file=sys.stderr)
        return EXIT_CODES[Outcome.NOT_DISCOVERED]
    to = [_full_jid(mesh, t) for t in ns.to]
    if spec is not None and not ns.on and not to and described.results[0].result.get("broker"):
        to = mesh.broker_jids  # the broker's own op (mesh.alerts): its instances, not discovery
        ns.scope = ns.scope or "one"  # any one of them answers for the broker
    try:
        if spec is not None:
            args = spec.parse_pairs(ns.pairs)
        else:  # an op no live agent describes (or the broker did not answer): the agent validates it
            args = parse_pairs(ns.pairs, ns.op)
        on = [meshconf.paths.check(r) for r in ns.on]
        if spec is not None and spec.address and not on and not ns.to:
            # The op says where it goes (e.g. the agent holding /volume/db), not every agent offering it.
            on = [meshconf.paths.check(spec.address.format(**args))]
    except (BadArguments, meshconf.paths.BadResource) as exc:
        print(f"vertebra: {exc}", file=sys.stderr)
        if spec is not None:
            print(f"(see `vertebra help {spec.name}`)", file=sys.stderr)
        return EXIT_USAGE

    # Progress on stderr, so stdout holds the result alone: a bar on a terminal, plain lines elsewhere.
    view = ProgressView.for_stream(sys.stderr)
    scope = ns.scope or (spec.scope if spec is not None else "all")
    rid = _announce_rid(spec, ns.request_id)
    def job_event(target: str, job: str, event: str) -> None:
        view.note(_job_event_line(target, job, event))

    sent = time.monotonic()
    try:
        report = _run_call(mesh, ns.op, args, _left(ns.timeout, started), on=on, scope=scope,
                           to=to, progress=view.report, answered=view.answered,
                           rid=rid, job_events=job_event)
    finally:
        view.close()
    _print_report(report, ns.json, spec.result if spec is not None else None, time.monotonic() - sent,
                  as_yaml=ns.yaml)
    return report.exit_code


def _job_event_line(target: str, job: str, event: str) -> str:
    """What becomes of a long op's job, as the command says it on stderr (stdout keeps the result alone)."""
    agent = target.split("/", 1)[0]
    line = {"accepted": f"{target} accepted the call as job {job}; from another terminal:"
                        f" vertebra job wait {job} --to {agent}",
            "offline": f"unreachable: the agent went offline while running job {job} ({target}); waiting a while for"
                       " it to come back",
            "back": f"{target} is back; waiting for the outcome of job {job}"}.get(event, f"job {job}: {event}")
    return f"vertebra: {line}"


def cmd_job(mesh: meshconf.MeshConfig, ns: argparse.Namespace) -> int:
    """`job show|wait ID`: ask the agent running the job (``--to``, else every agent) with ``job.status``;
    wait asks again, each time waiting there for the end, until the job ended or the timeout is spent, and
    rides out the agent's restart (unreachable, it asks again)."""
    from .agent import JOB_STATUS_OP
    from .errors import error_for
    from .report import EXIT_CODES

    timeout = ns.timeout or (3600.0 if ns.action == "wait" else 10.0)
    end = time.monotonic() + timeout
    to = [_full_jid(mesh, t) for t in ns.to]
    pause = 0.5
    while True:
        left = end - time.monotonic()
        wait = max(0.0, min(left - 5.0, 590.0)) if ns.action == "wait" else 0.0
        report = _run_call(mesh, JOB_STATUS_OP, {"job": ns.job, "wait": round(wait, 1)}, wait + min(left, 10.0),
                           to=to)
        found = [r for r in report.results if r.outcome is Outcome.OK]
        if found and (ns.action == "show" or found[0].result["state"] == "ended"):
            break
        gone = any(r.outcome in (Outcome.UNREACHABLE, Outcome.TIMEOUT) for r in report.results)
        if time.monotonic() >= end or not (found or gone) or ns.action == "show":
            if not found:
                print(f"vertebra: no agent told how job {ns.job} stands", file=sys.stderr)
            _print_report(report, ns.json, as_yaml=ns.yaml)
            return report.exit_code or EXIT_CODES[Outcome.TIMEOUT]
        if not found:  # its agent is away (restarting?): ask again shortly
            time.sleep(min(pause, max(0.0, end - time.monotonic())))
            pause = min(pause * 2, 5.0)
    report.results = found[:1]
    _print_report(report, ns.json, as_yaml=ns.yaml)
    status = found[0].result
    if status["state"] != "ended" or status["status"] == "ok":
        return 0
    return EXIT_CODES[error_for(status["condition"], "").outcome]


def cmd_agents(mesh: meshconf.MeshConfig, ns: argparse.Namespace) -> int:
    report = _call_broker(mesh, "mesh.agents", {}, ns.timeout)
    if report.ok and not ns.json:
        agents = report.results[0].result
        # The ops offered to people (`vertebra help`'s listing), not those agents send one another.
        listing = _call_broker(mesh, "mesh.describe", {"op": ""}, min(DESCRIBE_TIMEOUT, ns.timeout))
        offered = {o["name"] for o in listing.results[0].result} if listing.ok else None
        for a in agents:
            print(f"{a['jid']}  ({a['kind']})")
            print(f"    resources: {' '.join(a['resources']) or '-'}")
            print(f"    ops:       {' '.join(o for o in a['ops'] if offered is None or o in offered)}")
        print(f"{len(agents)} live agent{'s' * (len(agents) != 1)}")
    elif report.ok:
        print(json.dumps({"agents": report.results[0].result}, indent=2))
    else:
        _print_report(report, ns.json)
    return report.exit_code


def _print_report(report: CallReport, as_json: bool, result: Result | None = None, elapsed: float | None = None,
                  *, as_yaml: bool = False) -> None:
    """The report as JSON or YAML when asked, else as people read it: the op's declared ``result``
    fields as a table or a block per target, the failures, and a summary line (agents/render.py)."""
    if as_json or as_yaml:
        data = {"results": [r.to_dict() for r in report.results]}
        if as_json:
            print(json.dumps(data, indent=2, default=str))
        else:
            import yaml  # only for --yaml

            # Plain types first (a result may hold what only JSON's default=str can write).
            print(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False, allow_unicode=True),
                  end="")
        return
    print(render(report, result, elapsed))


# -- running actors --------------------------------------------------------------------------------

EXIT_SERVER_STOPPED = 7  # `server status`: no server runs (not a code of the call table)
ENGINE_FILE = "server-engine"  # under HOME/run: the engine of the server started there and not yet stopped


def _server(mesh: meshconf.MeshConfig, engine: str | None = None, cluster_join: str | None = None) -> Any:
    """This machine's private XMPP server: Prosody, or an ejabberd node (possibly joining a cluster); the
    engine given, else the one the state directory's running server was started with (`server start
    --engine`), else the mesh file's."""
    s = mesh.server
    if (engine or _started_engine(mesh.home) or s.engine) == "ejabberd":
        from .ejabberd import PrivateEjabberd
        return PrivateEjabberd(mesh.home, domain=s.domain, host=s.host, port=s.port, node_name=s.node_name,
                               dist_port=s.dist_port, epmd_port=s.epmd_port,
                               cluster_join=cluster_join or s.cluster_join, read_limit=mesh.read_limit(),
                               room_creators=mesh.room_creators)
    from .server import PrivateServer
    return PrivateServer(mesh.home, domain=s.domain, host=s.host, port=s.port, read_limit=mesh.read_limit(),
                         room_creators=mesh.room_creators)


def _started_engine(home: Path) -> str | None:
    try:
        engine = (home / "run" / ENGINE_FILE).read_text().strip()
    except OSError:
        return None
    return engine if engine in ("prosody", "ejabberd") else None


def start_server(mesh: meshconf.MeshConfig, server: Any = None) -> Any:
    """Start the private server (if it is not running) and make sure every account exists; the state
    directory remembers its engine, so that `server status|stop` find it whatever the mesh file says."""
    from .db import private_dir

    server = server or _server(mesh)
    server.start()
    (private_dir(mesh.home / "run") / ENGINE_FILE).write_text(server.status()["engine"] + "\n")
    server.register_many(mesh.ensure_passwords())
    return server


def cmd_server(mesh: meshconf.MeshConfig, ns: argparse.Namespace) -> int:
    from .server import ServerError
    server = _server(mesh, ns.engine, ns.cluster_join)
    try:
        if ns.action == "start":
            start_server(mesh, server)
            print(f"private {type(server).__name__.removeprefix('Private')} running on {mesh.server.host}:"
                  f"{mesh.server.port} for {mesh.server.domain} (state in {server.dir})")
        elif ns.action == "stop":
            print("stopped" if server.stop() else "was not running")
            (mesh.home / "run" / ENGINE_FILE).unlink(missing_ok=True)
        else:
            st = server.status()
            what = f"private {st['engine'].capitalize()}" + (f" node {st['node']}" if st.get("node") else "")
            if not st["running"]:
                print(f"stopped: no {what} runs for {mesh.home} (`vertebra server start` or `vertebra up` starts"
                      " it)")
                return EXIT_SERVER_STOPPED
            print(f"running: {what} (pid {st['pid']}) on {st['host']}:{st['port']} for {st['domain']},"
                  f" state in {server.dir}")
    except ServerError as exc:
        print(f"vertebra: {exc}", file=sys.stderr)
        return 1
    return 0


def build_actor(mesh: meshconf.MeshConfig, name: str, instance: int = 1) -> Any:
    """The actor the mesh file describes under ``name`` (the broker's account, or an agent's); for
    the broker, its ``instance``-th instance, which belongs to the server's ``instance``-th node."""
    authorizer = mesh.authorizer()
    if name == mesh.broker:
        resources = mesh.broker_resources
        if not 1 <= instance <= len(resources):
            raise meshconf.ConfigError(f"broker instance {instance}: the mesh file's server has {len(resources)}"
                                       f" node(s), so instances 1 to {len(resources)}")
        own = name if instance == 1 else f"{name}-{instance}"
        broker_class: Any = kinds.agent_class("broker")  # its own arguments and admit(), beyond an Agent's
        broker = broker_class(mesh.jid(name), mesh.password(name), mesh.endpoint().starting_at(instance - 1),
                              resource=resources[instance - 1], authorizer=authorizer,
                              state_dir=_state_dir(mesh, own), shared_dir=_state_dir(mesh, name),
                              state=mesh.broker_state, name=name,
                              settings=mesh.broker_settings(), delegates=mesh.delegates)
        # The mesh file, not what an account advertises, says who is an agent of the mesh.
        for bare, agent in mesh.roster().items():
            broker.admit(bare, agent.kind, agent.resources, agent.settings)
        return broker
    cfg = mesh.agent(name)
    return kinds.agent_class(cfg.kind)(mesh.jid(name), mesh.password(name), mesh.endpoint(),
                                 resources=cfg.resources, broker=mesh.jid(mesh.broker), authorizer=authorizer,
                                 settings=cfg.settings, name=name, state_dir=_state_dir(mesh, name),
                                 delegates=mesh.delegates, requests=cfg.requests)


def _state_dir(mesh: meshconf.MeshConfig, name: str) -> Path:
    """An actor's state directory, private to this user (0700, and HOME/state too): its audit log and
    request log name every caller and op."""
    from .db import private_dir

    return private_dir(private_dir(mesh.state_dir(name).parent) / name)


async def serve(mesh: meshconf.MeshConfig, name: str, instance: int = 1) -> None:
    """Run one actor until SIGINT or SIGTERM."""
    actor = build_actor(mesh, name, instance)
    gateway = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await actor.start(timeout=30.0)
    # What else runs in this actor's process (the chat bot beside the broker): its kind registers it.
    companions = [c for start in kinds.companions(actor.kind) if (c := await start(mesh, actor, instance))]
    if name != mesh.broker and mesh.agent(name).gateway:
        gateway = Gateway(mesh.gateway_socket, mesh.endpoint(), mesh.broker_jids, mesh=mesh)
        await gateway.start()
    logging.getLogger("vertebra").info("%s online as %s", name, actor.jid)
    await stop.wait()
    if gateway:
        await gateway.stop()
    for companion in reversed(companions):
        await companion.stop()
    await actor.stop()


def cmd_broker(mesh: meshconf.MeshConfig, ns: argparse.Namespace) -> int:
    return _serve_cmd(mesh, mesh.broker, ns.instance)


def cmd_agent(mesh: meshconf.MeshConfig, ns: argparse.Namespace) -> int:
    mesh.agent(ns.name)  # a clear error before any connection
    return _serve_cmd(mesh, ns.name)


def _serve_cmd(mesh: meshconf.MeshConfig, name: str, instance: int = 1) -> int:
    try:
        asyncio.run(serve(mesh, name, instance))
    except ConnectError as exc:
        print(f"vertebra: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ValueError as exc:  # an agent kind's settings errors (config, checks, devices, drivers) name the field
        print(f"vertebra: {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_up(mesh: meshconf.MeshConfig, ns: argparse.Namespace) -> int:
    from .server import ServerError
    lock = _hold_up_lock(mesh.home)
    if isinstance(lock, str):
        print(f"vertebra: a mesh is already running in {mesh.home} (`vertebra up`, pid {lock}); stop it with"
              f" Ctrl-C in its terminal or `kill {lock}`, then run `vertebra up` again", file=sys.stderr)
        return 1
    try:
        server = _server(mesh)
        was_running = server.status()["running"]
        start_server(mesh)
    except ServerError as exc:
        print(f"vertebra: {exc}", file=sys.stderr)
        return 1
    from .db import private_dir, private_file

    logs = private_dir(mesh.home / "logs")  # each actor's log names every decision it made: 0700, files 0600
    if not mesh.workflows.exists():  # first use: the example workflows, to edit or remove
        shutil.copytree(meshconf.EXAMPLE.parent / "workflows", mesh.workflows)
    # Stop cleanly on TERM as on Ctrl-C, and on INT even when started in the background (which
    # leaves SIGINT ignored, and Python then keeps it so).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    children: list[subprocess.Popen[bytes]] = []
    names: dict[int, str] = {}  # pid -> actor
    failed = False
    base = [sys.executable, "-m", "agents.cli", "--home", str(mesh.home), "--mesh", str(mesh.path), "-v"]
    try:
        brokers = [(mesh.broker if n == 1 else f"{mesh.broker}-{n}", ["broker", "--instance", str(n)])
                   for n in range(1, len(mesh.broker_resources) + 1)]
        for name, cmd in brokers + [(a.name, ["agent", a.name]) for a in mesh.agents]:
            with open(private_file(logs / f"{name}.log"), "ab") as log_file:
                children.append(subprocess.Popen(base + cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent))
            names[children[-1].pid] = name
        report = _wait_for_agents(mesh, len(mesh.agents), children)
        if all(c.poll() is None for c in children):
            demo = _seed_demo(mesh) if report.ok else None
            _print_welcome(mesh, report, demo)
        while all(c.poll() is None for c in children):
            time.sleep(0.5)
        # The mesh is not what the file describes any more (or never was): say who exited and why.
        failed = True
        for c in children:
            if c.poll() is not None:
                log = logs / f"{names[c.pid]}.log"
                print(f"vertebra: {names[c.pid]} exited (status {c.returncode}); the end of {log}:\n"
                      + _tail(log), file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        print("vertebra: stopping...", file=sys.stderr)
        _stop_children(children, names)
        if not was_running:
            server.stop()
            (mesh.home / "run" / ENGINE_FILE).unlink(missing_ok=True)
    return 1 if failed else 0


def _hold_up_lock(home: Path) -> Any:
    """The state directory's `up` lock, held (flock) while this process runs the mesh, so that a second
    `vertebra up` there cannot start duplicate actors; returns the open lock file, or the pid of the
    process holding it."""
    import fcntl

    from .db import private_dir

    lock = open(private_dir(home / "run") / "up.lock", "a+")  # noqa: SIM115 - held open until `up` exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        return holder
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join("  " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "  (no log)"


def _wait_for_agents(mesh: meshconf.MeshConfig, expected: int, children: list[Any]) -> CallReport:
    report = CallReport("mesh.agents")
    for _ in range(60):
        if any(c.poll() is not None for c in children):
            break
        report = _call_broker(mesh, "mesh.agents", {}, 5.0)
        if report.ok and len(report.results[0].result) >= expected:
            break
        time.sleep(0.5)
    return report


DEMO_VOLUME = "demo"
DEMO_SOURCE = meshconf.EXAMPLE.parent / "masking" / "demo-source.sql"


def _seed_demo(mesh: meshconf.MeshConfig) -> str | None:
    """On first use, the demo source for the masked-copy workflow: the volume `demo` on the first storage
    agent that has masking hooks, holding app.db, a small SQLite database with personal data in it
    (deploy/masking/demo-source.sql). Returns a line for the welcome, or None when there is no such agent."""
    agent = next((a for a in mesh.agents if a.kind == "storage" and (a.settings.get("masking") or {}).get("hooks")),
                 None)
    if agent is None:
        return None
    marker = mesh.state_dir(agent.name) / "demo-seeded"
    if marker.exists():  # once: a demo volume destroyed on purpose stays destroyed
        return f"volume {DEMO_VOLUME} on {agent.name} (the masked-copy demo source, see the README)"
    report = _run_call(mesh, "storage.volume.create", {"volume": DEMO_VOLUME}, 30.0,
                       to=[_full_jid(mesh, agent.name)], scope="one")
    if not report.ok:
        error = report.results[0].error if report.results else "no answer"
        if "already exists" in (error or ""):  # made by hand, or before this marker existed: keep it as it is
            return f"volume {DEMO_VOLUME} on {agent.name} (already there; not touched)"
        return f"no demo volume: {error}"
    import sqlite3

    with sqlite3.connect(Path(report.results[0].result["path"]) / "app.db") as db:
        db.executescript(DEMO_SOURCE.read_text())
    db.close()
    marker.write_text("the demo volume was created once; delete this file to have `vertebra up` make it again\n")
    return f"volume {DEMO_VOLUME} on {agent.name}: app.db with personal data, for the masked-copy demo (README)"


def _print_welcome(mesh: meshconf.MeshConfig, report: CallReport, demo: str | None = None) -> None:
    me = "vertebra" if os.environ.get("VIRTUAL_ENV") else ".venv/bin/vertebra"
    home = "" if mesh.home == meshconf.default_home() else f" --home {mesh.home}"
    print(f"Vertebra mesh is up: private {mesh.server.engine.capitalize()} on {mesh.server.host}:{mesh.server.port}"
          f" ({mesh.server.domain}), state in {mesh.home}")
    print(f"  broker    {mesh.broker_jid}")
    agents = report.results[0].result if report.ok else []
    for a in agents:
        print(f"  {a['kind']:<9} {a['jid']}  {' '.join(a['resources'])}")
    if len(agents) < len(mesh.agents):
        print(f"  (only {len(agents)} of {len(mesh.agents)} agents came up; see {mesh.home / 'logs'})")
    if mesh.chat:
        room = f", ops room {mesh.chat.room}" if mesh.chat.room else ""
        print(f"  chat bot  {mesh.jid(mesh.chat.account)} (message it `help` from any XMPP client{room})")
    if demo:
        print(f"  demo      {demo}")
    print("\nTry, in another terminal in this directory:")
    cmds = ["agents", "help", "help monitor.check", "call monitor.check check=load --on /host/localhost",
            "call storage.volume.create volume=db --json", "call fencing.info --scope one"]
    if demo and not demo.startswith("no "):
        cmds.append(f"workflow run masked-copy volume={DEMO_VOLUME} snapshot=s1 developers=alice developers=bob")
    for cmd in cmds:
        print(f"  {me}{home} {cmd}")
    print("\nCtrl-C stops everything this started.", flush=True)


def _die_with_parent() -> None:
    """In a child of `vertebra up`: have the kernel send SIGTERM if `up` itself dies, even by SIGKILL,
    so no agent outlives the command that started it."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


STOP_GRACE = 10.0  # seconds the actors have, together, to stop after TERM before they are killed


def _stop_children(children: list[subprocess.Popen[bytes]], names: dict[int, str]) -> None:
    """TERM every actor, then KILL, and name on stderr, each one still running STOP_GRACE seconds after
    the TERM. One deadline for all: a mesh whose every actor hangs stops in STOP_GRACE, not STOP_GRACE
    per actor one after another."""
    for c in children:
        if c.poll() is None:
            c.terminate()
    deadline = time.monotonic() + STOP_GRACE
    for c in children:
        try:
            c.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"vertebra: {names.get(c.pid, c.pid)} did not stop within {STOP_GRACE:g} s of TERM; killed it"
                  f" (its log may say why)", file=sys.stderr)
            c.kill()
            c.wait()


COMMANDS = {"server": cmd_server, "up": cmd_up, "broker": cmd_broker, "agent": cmd_agent,
            "agents": cmd_agents, "call": cmd_call, "audit": cmd_audit, "policy": cmd_policy_reload,
            "workflow": cmd_workflow, "help": cmd_help, "account": cmd_account, "job": cmd_job}

if __name__ == "__main__":
    sys.exit(main())
