#!/usr/bin/env python3
"""Another sender's op round trip, quiet and while one account floods the same agent.

One agent (bench/roundtrip.py's BenchAgent, default request limits) on a private Prosody started the
way the product starts it (agents/server.py with the mesh's read limit: the accounts the mesh names
are read at full speed, every other account at ``ReadLimit.bytes_per_second``). An admin calls the
agent's op one request at a time through the project's Client and we take p50 and p99 of the round
trip, first quiet, then while a second account (in a process of its own, so its own work does not
share the agent's event loop) sends bursts of 5,000 requests in one write each.

Two floods are measured:

- from an account the mesh file does not name (any account of the server): the target is
  "another sender's p99 stays within 2x of its quiet value"; each burst lasts until it is answered
  or ``--round-seconds`` have passed (the server reads such an account slowly, so most of a burst is
  still unread when its round ends and the flooder's connection is closed at the end);
- from an account the mesh file names (a person, read at full speed): only the agent's fair intake
  (round robin over senders, per-sender rate and queue limits) stands between the flood and the
  admin. Printed for information, without a target: the mesh trusts its named people to fan out.

The flood's answers are counted too: served, refused ``resource-constraint``, other, unanswered.

Usage::

    python bench/flood.py              # 5 floods of 5,000 from each account
    python bench/flood.py --quick      # 2 floods
    python bench/flood.py --flood 10000 --rounds 3

The exit status is 0 when the target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import roundtrip as rt  # noqa: E402  (BenchAgent, the plain slixmpp client, percentile, free_port)
import verdicts  # noqa: E402
from agents.actor import Endpoint  # noqa: E402
from agents.authz import AdminsOnly  # noqa: E402
from agents.errors import Outcome  # noqa: E402
from agents.intake import IntakeLimits  # noqa: E402
from agents.server import ReadLimit  # noqa: E402

TARGET = 2.0
_ERR_NS = "{urn:ietf:params:xml:ns:xmpp-stanzas}"


async def flooder_main(host: str, port: int, jid: str, password: str, to: str, count: int, seconds: float) -> None:
    """The flooding account (a child process): on each line "go" from stdin, send ``count`` requests
    in one write, and print "done SERVED REFUSED OTHER UNANSWERED" once every one was answered or
    ``seconds`` have passed."""
    import ssl

    from agents import protocol
    ctx = ssl.create_default_context(cafile=sys.argv[sys.argv.index("--cert") + 1])
    xmpp = rt.plain_client(jid, password, ctx)
    answers: dict[str, int] = {"served": 0, "refused": 0, "other": 0}
    wanted: set[str] = set()
    all_in = asyncio.Event()

    def count_answer(stanza: Any) -> Any:
        xml = stanza.xml
        if xml.tag == "{jabber:client}iq" and xml.get("id") in wanted:
            wanted.discard(xml.get("id"))
            if xml.get("type") == "result":
                answers["served"] += 1
            elif xml.find(f"{{jabber:client}}error/{_ERR_NS}resource-constraint") is not None:
                answers["refused"] += 1
            else:
                answers["other"] += 1
            if not wanted:
                all_in.set()
            return None
        return stanza

    xmpp.add_filter("in", count_answer)
    await rt.start_plain(xmpp, host, port)
    payload = protocol.encode({"n": 1})
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    round_no = 0
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "go":
        round_no += 1
        ids = [f"f{round_no}-{i}" for i in range(count)]
        wanted.update(ids)
        all_in.clear()
        for key in answers:
            answers[key] = 0
        xmpp.send_raw("".join(
            f"<iq type='set' id='{iq_id}' to='{to}'><op xmlns='{protocol.NS}' name='{rt.OP}' rid='{iq_id}'"
            f" timeout='30000'>{payload}</op></iq>" for iq_id in ids))
        try:
            await asyncio.wait_for(all_in.wait(), seconds)
        except TimeoutError:
            pass
        unanswered = len(wanted)
        wanted.clear()  # answers to this round's requests that come later are not counted
        print(f"done {answers['served']} {answers['refused']} {answers['other']} {unanswered}", flush=True)
    await rt.stop_plain(xmpp)


class Flood:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.server: Any = None
        self.home: Path | None = None
        self.actors: list[Any] = []
        self.flooders: list[asyncio.subprocess.Process] = []
        self.ok = False

    async def round_trips(self, client: Any, to: str, until: asyncio.Future | None, at_least: int) -> list[float]:
        """Sequential round trips (ms): ``at_least`` of them, and on until ``until`` is done."""
        samples: list[float] = []
        while len(samples) < at_least or (until is not None and not until.done()):
            t = time.perf_counter()
            res = await client.request(to, rt.OP, {"n": len(samples)}, timeout=10)
            samples.append((time.perf_counter() - t) * 1000)
            if res.outcome is not Outcome.OK:
                raise RuntimeError(f"the admin's call failed: {res.outcome.value} {res.error}")
        return samples

    async def start_flooder(self, jid: str, password: str, to: str, seconds: float) -> asyncio.subprocess.Process:
        assert self.server is not None
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--flooder", self.server.host, str(self.server.port), jid, password, to,
            str(self.args.flood), str(seconds), "--cert", str(self.server.cert_path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self.flooders.append(proc)
        assert proc.stdout is not None
        if (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() != b"ready":
            raise RuntimeError(f"the flooding process of {jid} did not log in")
        return proc

    async def flood(self, flooder: asyncio.subprocess.Process, client: Any, to: str,
                    name: str) -> tuple[list[float], list[int]]:
        """The admin's round trips during ``rounds`` bursts from ``flooder``, and the flood's answers."""
        assert flooder.stdin is not None and flooder.stdout is not None
        during: list[float] = []
        counts = [0, 0, 0, 0]
        for r in range(self.args.rounds):
            flooder.stdin.write(b"go\n")
            await flooder.stdin.drain()
            answered = asyncio.ensure_future(asyncio.wait_for(flooder.stdout.readline(), 180))
            during += await self.round_trips(client, to, answered, 1)
            line = (await answered).decode().split()
            if not line or line[0] != "done":
                raise RuntimeError(f"the flooding process stopped: {line}")
            counts = [c + int(x) for c, x in zip(counts, line[1:])]
            print(f"{name} flood {r + 1}/{self.args.rounds}: {' / '.join(line[1:])} served / refused / other /"
                  f" unanswered; {len(during)} admin round trips so far", flush=True)
        flooder.kill()  # what it sent and the server has not read yet goes with its connection
        await flooder.wait()
        return during, counts

    async def run(self) -> None:
        from agents.client import Client
        from agents.server import PrivateServer

        args = self.args
        self.home = Path(tempfile.mkdtemp(prefix="vertebra-bench-flood-"))
        port = rt.free_port()
        users = {u: rt.PASSWORD_PREFIX + u for u in ("admin", "echo", "member", "stranger")}
        jid = {u: f"{u}@{rt.DOMAIN}" for u in users}
        # As the product configures it: the mesh's agents and people are read at full speed.
        limit = ReadLimit(unlimited=(jid["admin"], jid["echo"], jid["member"]))
        self.server = PrivateServer(self.home, domain=rt.DOMAIN, port=port, read_limit=limit)
        print(f"private Prosody on 127.0.0.1:{port}, home {self.home}; accounts the mesh does not name read at"
              f" {limit.bytes_per_second:,} B/s", flush=True)
        self.server.start()
        self.server.register_many(users)
        (self.home / "echo").mkdir()  # an agent as deployed: audit log and request log on disk
        endpoint = Endpoint(self.server.host, self.server.port, rt.DOMAIN, self.server.ssl_context())
        # Both flooders may call the op too: what the intake takes is served, so the flood costs its most.
        defaults = IntakeLimits()
        limits = IntakeLimits(burst=args.burst or defaults.burst, per_second=args.per_second or defaults.per_second,
                              queued=args.queued or defaults.queued, running=defaults.running)
        print(f"agent's request limits per sender: burst {limits.burst}, {limits.per_second:g}/s, {limits.queued}"
              f" queued", flush=True)
        agent = rt.BenchAgent(jid["echo"], users["echo"], endpoint, requests=limits,
                              authorizer=AdminsOnly([jid["admin"], jid["member"], jid["stranger"]]),
                              state_dir=self.home / "echo")
        client = Client(jid["admin"], users["admin"], endpoint, broker="")
        for actor in (agent, client):
            await actor.start(timeout=20)
            self.actors.append(actor)
        to = str(agent.jid)

        stranger = await self.start_flooder(jid["stranger"], users["stranger"], to, args.round_seconds)
        await self.round_trips(client, to, None, 100)  # warm-up
        quiet = await self.round_trips(client, to, None, args.samples)
        during, counts = await self.flood(stranger, client, to, "unnamed account's")
        member = await self.start_flooder(jid["member"], users["member"], to, 180)
        during_member, counts_member = await self.flood(member, client, to, "named account's")

        q50, q99 = rt.percentile(quiet, 0.5), rt.percentile(quiet, 0.99)
        f50, f99 = rt.percentile(during, 0.5), rt.percentile(during, 0.99)
        m50, m99 = rt.percentile(during_member, 0.5), rt.percentile(during_member, 0.99)
        ratio = f99 / q99
        self.ok = verdicts.record("admin op p99 during an unnamed account's flood / quiet p99", f"{ratio:.2f}x",
                                  f"<= {TARGET:g}x", ratio <= TARGET)
        rounds = f"{args.rounds} x {args.flood:,} requests"
        rows = [("measurement", "samples", "p50 ms", "p99 ms", "p99 / quiet p99", "target", ""),
                ("admin op round trip, quiet", str(len(quiet)), f"{q50:.2f}", f"{q99:.2f}", "", "", ""),
                (f"admin op round trip, during {rounds} from an account the mesh does not name",
                 str(len(during)), f"{f50:.2f}", f"{f99:.2f}", f"{ratio:.2f}x", f"<= {TARGET:g}x",
                 "MET" if self.ok else "MISS"),
                (f"admin op round trip, during {rounds} from a person the mesh names",
                 str(len(during_member)), f"{m50:.2f}", f"{m99:.2f}", f"{m99 / q99:.2f}x", "(none)", "")]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        print()
        for k, row in enumerate(rows):
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
            if k == 0:
                print("  ".join("-" * w for w in widths))
        for name, c in (("unnamed account", counts), ("named person", counts_member)):
            print(f"- the {name}'s {sum(c):,} requests: {c[0]:,} served, {c[1]:,} refused resource-constraint,"
                  f" {c[2]:,} other, {c[3]:,} unanswered when its round ended")

    async def close(self) -> None:
        for proc in self.flooders:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        for actor in reversed(self.actors):
            try:
                await asyncio.wait_for(actor.stop(), 5)
            except BaseException:
                pass

    def cleanup_sync(self) -> None:
        rt.stop_server(self.server, self.home, self.args.keep)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--flooder":
        host, port, jid, password, to, count, seconds = argv[1:8]
        asyncio.run(flooder_main(host, int(port), jid, password, to, int(count), float(seconds)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 floods")
    parser.add_argument("--flood", type=int, default=5000, help="requests per flood (default 5,000)")
    parser.add_argument("--rounds", type=int, default=None, help="floods (default 5, --quick 2)")
    parser.add_argument("--round-seconds", type=float, default=10.0,
                        help="how long a burst from the unnamed account may take to be answered (default 10)")
    parser.add_argument("--samples", type=int, default=1000, help="quiet round trips (default 1,000)")
    parser.add_argument("--burst", type=int, help="the agent's per-sender burst (default: the agents' default)")
    parser.add_argument("--per-second", type=float, help="the agent's per-sender rate (default: the agents' default)")
    parser.add_argument("--queued", type=int, help="the agent's per-sender queue (default: the agents' default)")
    parser.add_argument("--time-limit", type=float, default=600, help="abort the whole run after this many s")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home (logs) afterwards")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    verdicts.begin()
    bench = Flood(args)
    try:
        asyncio.run(rt.coordinator(bench))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted; cleaning up", file=sys.stderr)
    except BaseException as exc:
        print(f"\nbenchmark failed: {exc.__class__.__name__}: {exc}", file=sys.stderr)
    finally:
        bench.cleanup_sync()
        verdicts.save()
    print(f"\n{'target met' if bench.ok else 'target NOT met'}")
    return 0 if bench.ok else 1


if __name__ == "__main__":
    sys.exit(main())
