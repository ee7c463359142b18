#!/usr/bin/env python3
"""Vertebra's overhead against bare slixmpp, on one private Prosody, in one run.

Measured, each time against a bare slixmpp baseline on the same server:

1. sequential round trips: a tiny custom IQ-get answered by a plain slixmpp Callback, vs a
   Vertebra op (Client.request to an Agent's one-argument op: validation, msgpack, the
   authorization hook, dedup and the audit log all run) — p50, p95, ratio of p50s (target <= 1.3x);
2. throughput with 100 requests in flight (target >= 0.7x bare), and at the same load each side's
   p99/p50 and p99.9/p50: Vertebra's over bare's (target p99 <= 1.1x; p99.9 for information);
3. a text command through the operators' chat bot: a plain slixmpp client account sends
   ``call bench.echo n=N`` to a ChatBot (broker/chat.py, in this process as `vertebra broker` runs
   it: discovery through the broker, the bot's own authorization and audit log, the relay on the
   operator's behalf) and waits for the final result message, vs the same op through the CLI's
   client library, ``Client.call(op, args)`` with discovery through the same broker — p50, p95,
   ratio of p50s (target <= 1.5x);
4. scatter/gather to N agents hosted by worker processes (many agents per event loop): a bare IQ
   fan-out (each agent also answers the bare IQ) vs ``Client.call(op, args, to=[...])`` (target
   <= 1.5x bare), plus, for information, the same call with discovery through a Broker.

Usage::

    python bench/roundtrip.py              # N = 100 and 1,000
    python bench/roundtrip.py --quick      # smoke run: N = 100, fewer iterations
    python bench/roundtrip.py --agents 100,500

The server, every worker and the temporary home are removed at the end, also on Ctrl-C or error;
every wait has a timeout. The exit status is 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import slixmpp  # noqa: E402
import verdicts  # noqa: E402
from slixmpp import Iq  # noqa: E402
from slixmpp.xmlstream import ElementBase, register_stanza_plugin  # noqa: E402
from slixmpp.xmlstream.handler import Callback  # noqa: E402
from slixmpp.xmlstream.matcher import StanzaPath  # noqa: E402
from slixmpp.xmlstream.matcher.base import MatcherBase  # noqa: E402

from agents.actor import Endpoint  # noqa: E402  (also swaps in the C PBKDF2 for SCRAM logins)
from agents.agent import Agent, Call  # noqa: E402
from agents.authz import AdminsOnly  # noqa: E402
from agents.errors import Outcome  # noqa: E402
from agents.intake import IntakeLimits  # noqa: E402
from agents.ops import Arg, op  # noqa: E402
from agents.ports import free_port  # noqa: E402  (the other benches import it from here)

DOMAIN = "vertebra.test"
BENCH_NS = "urn:vertebra:bench:0"
OP = "bench.echo"
PASSWORD_PREFIX = "bench-pw-"

log = logging.getLogger("bench")


# -- what runs on both sides -----------------------------------------------------------------------


class BenchPing(ElementBase):
    """``<ping xmlns="urn:vertebra:bench:0" n="..."/>``: the bare IQ's payload, echoed in the result."""

    name = "ping"
    namespace = BENCH_NS
    plugin_attrib = "bench_ping"
    interfaces = {"n"}


register_stanza_plugin(Iq, BenchPing)


UNLIMITED_RATE = IntakeLimits(burst=10**9, per_second=1e9)


class BenchAgent(Agent):
    """One trivial op with one argument, so every stage of the runtime's path runs."""

    kind = "bench"

    @op(OP, effect="read", deadline=10)
    async def echo(self, call: Call, n: Annotated[int, Arg("a number to send back")]) -> int:
        """Send the number back."""
        return n


def answer_bare_pings(xmpp: slixmpp.BaseXMPP) -> None:
    """Answer the bench IQ with a plain slixmpp Callback: the reply echoes the child element."""

    def on_ping(iq: Iq) -> None:
        iq.reply(clear=False).send()

    xmpp.register_handler(Callback("bench ping", StanzaPath("iq@type=get/bench_ping"), on_ping))


def plain_client(jid: str, password: str, ctx: ssl.SSLContext) -> slixmpp.ClientXMPP:
    """A stock slixmpp client, configured only as needed to log in to the private server."""
    xmpp = slixmpp.ClientXMPP(jid, password, ssl_context=ctx)
    xmpp.enable_direct_tls = False
    xmpp.enable_starttls = True
    xmpp.enable_plaintext = False
    return xmpp


async def start_plain(xmpp: slixmpp.ClientXMPP, host: str, port: int, timeout: float = 20.0) -> None:
    started = asyncio.Event()
    xmpp.add_event_handler("session_start", lambda _e: started.set())
    xmpp.connect(host, port)
    try:
        await asyncio.wait_for(started.wait(), timeout)
    except TimeoutError:
        xmpp.abort()
        raise RuntimeError(f"{xmpp.boundjid}: no session within {timeout:g}s") from None


async def stop_plain(xmpp: slixmpp.ClientXMPP) -> None:
    with contextlib.suppress(Exception):
        xmpp.cancel_connection_attempt()
        if xmpp.transport is not None:
            await asyncio.wait_for(xmpp.disconnect(wait=1.0), 3.0)
    with contextlib.suppress(Exception):
        if xmpp.transport is not None:
            xmpp.abort()


class KeyedReplies(MatcherBase):
    """One handler for every pending bare IQ, keyed by id (what Iq.send() does with one handler each)."""

    def __init__(self, xmpp: slixmpp.BaseXMPP) -> None:
        super().__init__(None)
        self.xmpp = xmpp
        self.pending: dict[str, asyncio.Future] = {}
        xmpp.register_handler(Callback("bench keyed replies", self, self.resolve))

    def match(self, stanza: Any) -> bool:
        xml = stanza.xml
        return xml.get("type") in ("result", "error") and xml.get("id") in self.pending

    def resolve(self, iq: Iq) -> None:
        fut = self.pending.pop(iq["id"], None)
        if fut is not None and not fut.done():
            fut.set_result(iq)

    async def send(self, iq: Iq, timeout: float) -> Iq:
        fut = asyncio.get_running_loop().create_future()
        self.pending[iq["id"]] = fut
        try:
            self.xmpp.send(iq)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop(iq["id"], None)


def rss_kib(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- worker processes: many actors on one event loop -------------------------------------------------


def die_with_parent() -> None:
    """Linux: get SIGTERM if the coordinator dies without cleaning up."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)


async def worker_main() -> None:
    die_with_parent()
    raise_nofile()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def emit(**event: Any) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    cfg = json.loads(await asyncio.wait_for(reader.readline(), 30))
    ctx = ssl.create_default_context(cafile=cfg["cert"])  # one context for every actor here
    endpoint = Endpoint(cfg["host"], cfg["port"], cfg["domain"], ctx)
    authorizer = AdminsOnly(cfg["admins"])
    base_rss = rss_kib()
    actors: list[Any] = []
    plains: list[slixmpp.ClientXMPP] = []
    gate = asyncio.Semaphore(cfg["concurrency"])

    async def start_agent(user: str) -> None:
        # One caller drives every measurement: its per-sender rate (2,000/s by default, which the
        # throughput phase outruns) would measure the limit, not the path. Queue and running bounds stay.
        # The round-trip agent keeps its audit log and request log, as every deployed agent does
        # (state): the figures include them. The fan-out's many agents go without.
        state_dir = Path(cfg["state"]) / user if cfg.get("state") else None
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        agent = BenchAgent(f"{user}@{cfg['domain']}", PASSWORD_PREFIX + user, endpoint,
                           broker=cfg["broker"], authorizer=authorizer, delegates=cfg.get("delegates", ()),
                           requests=UNLIMITED_RATE, state_dir=state_dir)
        answer_bare_pings(agent.xmpp)
        async with gate:
            await agent.start(timeout=60)
        actors.append(agent)

    async def start_bare(user: str) -> None:
        xmpp = plain_client(f"{user}@{cfg['domain']}/bare", PASSWORD_PREFIX + user, ctx)
        answer_bare_pings(xmpp)
        async with gate:
            await start_plain(xmpp, cfg["host"], cfg["port"], timeout=60)
        plains.append(xmpp)

    async def shutdown() -> None:
        async def one(a: Any) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(a.stop(), 3)
        await asyncio.wait_for(asyncio.gather(*(one(a) for a in actors), *(stop_plain(x) for x in plains),
                                              return_exceptions=True), 15)

    try:
        t0 = time.monotonic()
        starting = asyncio.gather(*(start_agent(u) for u in cfg["agents"]),
                                  *(start_bare(u) for u in cfg.get("bare", [])))
        waiter = loop.create_task(stop.wait())
        done, _ = await asyncio.wait({starting, waiter}, timeout=cfg["start_timeout"],
                                     return_when=asyncio.FIRST_COMPLETED)
        if starting not in done:
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
            emit(event="error", error=f"agents not all online within {cfg['start_timeout']}s"
                                      f" ({len(actors)}/{len(cfg['agents'])})")
            return
        waiter.cancel()
        starting.result()  # raise a ConnectError, if any
        emit(event="ready", jids=[str(a.jid) for a in actors], bare=[str(x.boundjid) for x in plains],
             seconds=time.monotonic() - t0, rss_kib=rss_kib(), base_rss_kib=base_rss, pid=os.getpid())

        # Wait for "stop", stdin closing (the coordinator went) or a signal.
        async def read_until_stop() -> None:
            while True:
                line = await reader.readline()
                if not line or line.strip() == b"stop":
                    return
                if line.strip() == b"rss":
                    emit(event="rss", rss_kib=rss_kib())
        reading = loop.create_task(read_until_stop())
        waiter = loop.create_task(stop.wait())
        await asyncio.wait({reading, waiter}, return_when=asyncio.FIRST_COMPLETED)
        reading.cancel()
        waiter.cancel()
    except Exception as exc:
        emit(event="error", error=f"{exc.__class__.__name__}: {exc}")
    finally:
        with contextlib.suppress(BaseException):
            await shutdown()
        emit(event="stopped")


# -- the coordinator's side of the workers ------------------------------------------------------------


class Worker:
    def __init__(self, name: str, cfg: dict[str, Any], log_dir: Path) -> None:
        self.name = name
        self.cfg = cfg
        self.log_path = log_dir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}

    async def spawn(self) -> None:
        with open(self.log_path, "wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "--worker",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                start_new_session=True,  # a Ctrl-C reaches only the coordinator, which stops us in order
                limit=16 * 1024 * 1024)
        self.proc.stdin.write((json.dumps(self.cfg) + "\n").encode())
        await self.proc.stdin.drain()

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"worker {self.name} exited early: {self.tail()}")
        event = json.loads(line)
        if event.get("event") != "ready":
            raise RuntimeError(f"worker {self.name}: {event.get('error')} {self.tail()}")
        self.ready = event
        return event

    async def rss(self) -> int:
        if self.proc is None or self.proc.returncode is not None:
            return 0
        return rss_kib(self.proc.pid)

    def tail(self, lines: int = 8) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
            return ("\n  " + "\n  ".join(text)) if text else ""
        return ""

    async def stop(self, timeout: float = 20.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            proc.stdin.write(b"stop\n")
            await proc.stdin.drain()
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
            return
        except Exception:  # timed out, or already gone
            pass
        self.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)


# -- measuring ------------------------------------------------------------------------------------------


class CallFailed(RuntimeError):
    pass


def percentile(samples: list[float], p: float) -> float:
    s = sorted(samples)
    if not s:
        return math.nan
    k = (len(s) - 1) * p
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[tuple[str, str, str, str, str, str]] = []
        self.notes: list[str] = []
        self.bare: slixmpp.ClientXMPP | None = None
        self.keyed: KeyedReplies | None = None
        self.client: Any = None
        self.broker: Any = None
        self.bot: Any = None
        self._chat_reply: asyncio.Future | None = None
        self.workers: list[Worker] = []
        self.server: Any = None
        self.home: Path | None = None

    def row(self, name: str, bare: str, vert: str, ratio: float | None, target: str,
            ok: bool | None) -> None:
        verdict = "" if ok is None else ("PASS" if ok else "FAIL")
        if ok is not None:
            verdicts.record(name, f"{ratio:.2f}x" if ratio is not None else vert, target, ok)
        self.rows.append((name, bare, vert, "" if ratio is None else f"{ratio:.2f}x", target, verdict))
        print(f"  {name}: bare {bare}  vertebra {vert}  ratio {'' if ratio is None else f'{ratio:.2f}x'}"
              f"  {verdict}", flush=True)

    # The bare side: slixmpp's normal Iq.send().
    async def bare_rt(self, to: str, n: int) -> None:
        iq = self.bare.make_iq_get(ito=to)
        iq["bench_ping"]["n"] = str(n)
        reply = await iq.send(timeout=10)
        if reply["bench_ping"]["n"] != str(n):
            raise RuntimeError(f"bare reply from {to} did not echo {n}")

    async def bare_keyed_rt(self, to: str, n: int) -> None:
        iq = self.bare.make_iq_get(ito=to)
        iq["bench_ping"]["n"] = str(n)
        reply = await self.keyed.send(iq, 10)
        if reply["bench_ping"]["n"] != str(n):
            raise RuntimeError(f"bare reply from {to} did not echo {n}")

    async def vert_rt(self, to: str, n: int) -> None:
        res = await self.client.request(to, OP, {"n": n}, timeout=10)
        if res.outcome is not Outcome.OK or res.result != n:
            raise RuntimeError(f"vertebra request to {to}: {res.outcome.value} {res.error}")

    async def sequential(self, bare_to: str, vert_to: str) -> None:
        count, rounds = (300, 3) if self.args.quick else (1000, 5)
        for i in range(50):  # warm-up
            await self.bare_rt(bare_to, i)
            await self.vert_rt(vert_to, i)
        bare_s: list[float] = []
        vert_s: list[float] = []
        clock = time.perf_counter
        for _ in range(rounds):  # interleaved, so drift hits both sides alike
            for samples, rt, to in ((bare_s, self.bare_rt, bare_to), (vert_s, self.vert_rt, vert_to)):
                for i in range(count):
                    t = clock()
                    await rt(to, i)
                    samples.append(clock() - t)
        b50, b95 = percentile(bare_s, .5) * 1e3, percentile(bare_s, .95) * 1e3
        v50, v95 = percentile(vert_s, .5) * 1e3, percentile(vert_s, .95) * 1e3
        self.row("sequential round trip p50", f"{b50:.2f} ms", f"{v50:.2f} ms", v50 / b50, "<= 1.30x",
                 v50 / b50 <= 1.3)
        self.row("sequential round trip p95", f"{b95:.2f} ms", f"{v95:.2f} ms", v95 / b95, "(info)", None)

    async def throughput(self, bare_to: str, vert_to: str, in_flight: int = 100) -> None:
        total, rounds = (2000, 3) if self.args.quick else (5000, 5)

        clock = time.perf_counter

        async def run(rt: Callable[[str, int], Any], to: str, n: int, latencies: list[float]) -> float:
            counter = iter(range(n))

            async def lane() -> None:
                for i in counter:
                    t = clock()
                    await rt(to, i)
                    latencies.append(clock() - t)
            t = clock()
            await asyncio.wait_for(asyncio.gather(*(lane() for _ in range(in_flight))), 120)
            return n / (clock() - t)

        await run(self.bare_rt, bare_to, 500, [])
        await run(self.vert_rt, vert_to, 500, [])
        bare_r, vert_r = [], []
        bare_l: list[float] = []
        vert_l: list[float] = []
        for _ in range(rounds):
            bare_r.append(await run(self.bare_rt, bare_to, total, bare_l))
            vert_r.append(await run(self.vert_rt, vert_to, total, vert_l))
        b, v = statistics.median(bare_r), statistics.median(vert_r)
        self.row(f"throughput, {in_flight} in flight", f"{b:,.0f}/s", f"{v:,.0f}/s", v / b, ">= 0.70x",
                 v / b >= 0.7)
        # Tail latency under load: how far each side's p99 and p99.9 stray from its own p50, so that the
        # ratio says what Vertebra adds to the tail, not how much slower each request is.
        for q, name in ((.99, "p99"), (.999, "p99.9")):
            bq, vq = percentile(bare_l, q) / percentile(bare_l, .5), percentile(vert_l, q) / percentile(vert_l, .5)
            self.row(f"{name}/p50 at {in_flight} in flight", f"{bq:.2f} ({percentile(bare_l, q) * 1e3:.1f} ms)",
                     f"{vq:.2f} ({percentile(vert_l, q) * 1e3:.1f} ms)", vq / bq,
                     "<= 1.10x" if name == "p99" else "(info)", vq / bq <= 1.1 if name == "p99" else None)

    async def fan_out(self, jids: list[str], reps: int) -> None:
        n = len(jids)

        async def bare(rt: Callable[[str, int], Any] = self.bare_rt) -> float:
            t = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(rt(j, 1) for j in jids)), 120)
            return time.perf_counter() - t

        async def vert(to: list[str] | None) -> float:
            t = time.perf_counter()
            report = await self.client.call(OP, {"n": 1}, to=to or (), timeout=60)
            elapsed = time.perf_counter() - t
            counts = report.counts()
            if counts != {"ok": n} or len(report.results) != n:
                errors = sorted({r.error or "" for r in report.results if r.error})[:2]
                raise CallFailed(f"call to {n} agents{' with discovery' if not to else ''}: {counts}"
                                 f" {'; '.join(e[:300] for e in errors)}")
            return elapsed

        async def discovered() -> float | None:
            try:
                return await vert(None)
            except CallFailed as exc:
                if f"FAILED: {exc}" not in self.notes:
                    self.notes.append(f"FAILED: {exc}")
                return None

        await bare()  # warm-up: first contact with each agent
        await vert(jids)
        await discovered()
        await bare(self.bare_keyed_rt)
        bare_t, keyed_t, vert_t, disc_t = [], [], [], []
        for _ in range(reps):
            bare_t.append(await bare())
            keyed_t.append(await bare(self.bare_keyed_rt))
            vert_t.append(await vert(jids))
            disc_t.append(await discovered())
        b, k, v = (statistics.median(x) * 1e3 for x in (bare_t, keyed_t, vert_t))
        ok_disc = [x for x in disc_t if x is not None]
        d = statistics.median(ok_disc) * 1e3 if ok_disc else math.nan
        self.row(f"scatter/gather to {n:,} agents", f"{b:,.0f} ms", f"{v:,.0f} ms", v / b, "<= 1.50x",
                 v / b <= 1.5)
        self.row("  vs bare with an id-keyed correlator", f"{k:,.0f} ms", f"{v:,.0f} ms", v / k, "(info)", None)
        self.row("  vertebra with broker discovery", f"{b:,.0f} ms",
                 f"{d:,.0f} ms" if ok_disc else "failed", d / b if ok_disc else None, "(info)", None)

    # A text command through the chat bot vs the CLI's client library, both with discovery.
    async def call_rt(self, n: int) -> None:
        report = await self.client.call(OP, {"n": n}, timeout=10)
        if report.counts() != {"ok": 1} or report.results[0].result != n:
            raise RuntimeError(f"Client.call {OP}: {report.counts()} {[r.error for r in report.results]}")

    def on_chat(self, msg: Any) -> None:
        waiter = self._chat_reply
        if msg["type"] == "chat" and msg["from"].bare == self.bot_jid and msg["body"] \
                and waiter is not None and not waiter.done():
            waiter.set_result(msg["body"])

    async def chat_rt(self, n: int) -> None:
        """Send ``call OP n=N`` from the plain client account; wait for the bot's final result."""
        self._chat_reply = asyncio.get_running_loop().create_future()
        try:
            self.bare.send_message(mto=self.bot_to, mbody=f"call {OP} n={n}", mtype="chat")
            body = await asyncio.wait_for(self._chat_reply, 10)
        finally:
            self._chat_reply = None
        if not body.startswith(f"echo: {n}\n{OP}: 1 of 1 ok in "):  # agents/render.py's block and summary
            raise RuntimeError(f"the chat bot answered `call {OP} n={n}` with {body!r}")

    async def chat(self) -> None:
        count, rounds = (100, 3) if self.args.quick else (300, 5)
        for i in range(20):  # warm-up
            await self.call_rt(i)
            await self.chat_rt(i)
        call_s: list[float] = []
        chat_s: list[float] = []
        clock = time.perf_counter
        for _ in range(rounds):  # interleaved, so drift hits both sides alike
            for samples, rt in ((call_s, self.call_rt), (chat_s, self.chat_rt)):
                for i in range(count):
                    t = clock()
                    await rt(i)
                    samples.append(clock() - t)
        c50, c95 = percentile(call_s, .5) * 1e3, percentile(call_s, .95) * 1e3
        t50, t95 = percentile(chat_s, .5) * 1e3, percentile(chat_s, .95) * 1e3
        self.row("chat command p50 (bare = Client.call)", f"{c50:.2f} ms", f"{t50:.2f} ms", t50 / c50, "<= 1.50x",
                 t50 / c50 <= 1.5)
        self.row("chat command p95 (bare = Client.call)", f"{c95:.2f} ms", f"{t95:.2f} ms", t95 / c95, "(info)", None)
        self.notes.append("chat command: 4 stanzas through the server per command (the message, the op"
                          " request and its answer, the reply message; the bot reads the broker's directory"
                          " in-process) vs 4 for Client.call (discover, op); bot, broker and both callers"
                          " share this process")

    # -- set-up and tear-down ------------------------------------------------------------------

    async def spawn_workers(self, users: list[str], nworkers: int, bare: list[str] | None = None,
                            state: Path | None = None) -> list[Worker]:
        chunks = [users[i::nworkers] for i in range(nworkers)]
        start_timeout = 60 + 0.25 * max(len(c) for c in chunks)
        return await start_workers(self.workers, [{
            "host": self.server.host, "port": self.server.port, "domain": DOMAIN,
            "cert": str(self.server.cert_path), "admins": [self.client_jid], "broker": self.broker_jid,
            "delegates": [self.bot_jid],
            "agents": chunk, "bare": bare if i == 0 and bare else [],
            "concurrency": self.args.login_concurrency, "start_timeout": start_timeout,
            "state": str(state) if state else None,
        } for i, chunk in enumerate(chunks)], self.home)

    async def wait_directory(self, n: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while len(self.broker.directory) < n:
            if time.monotonic() > end:
                raise RuntimeError(f"broker lists {len(self.broker.directory)} of {n} agents after {timeout:g}s")
            await asyncio.sleep(0.1)

    async def run(self) -> None:
        from agents.client import Client
        from agents.kinds import agent_class, catalogue
        from agents.ops import ops_of
        from broker.chat import ChatBot, RateLimit
        from agents.server import PrivateServer

        args = self.args
        sizes = sorted({int(x) for x in args.agents.split(",") if x.strip()})
        if args.quick:
            sizes = [min(sizes)] if args.agents_given else [100]
        self.home = Path(tempfile.mkdtemp(prefix="vertebra-bench-"))
        port = free_port()
        self.server = PrivateServer(self.home, domain=DOMAIN, port=port)
        print(f"private Prosody on 127.0.0.1:{port}, home {self.home}", flush=True)
        self.server.start()

        users = {u: PASSWORD_PREFIX + u for u in ["bench", "broker", "echo", "plain", "chatbot"]}
        agent_users = [f"a{i:05d}" for i in range(max(sizes))]
        users.update({u: PASSWORD_PREFIX + u for u in agent_users})
        t = time.monotonic()
        self.server.register_many(users)
        print(f"registered {len(users):,} accounts in {time.monotonic() - t:.1f}s", flush=True)

        self.client_jid = f"bench@{DOMAIN}"
        self.broker_jid = f"broker@{DOMAIN}"
        self.bot_jid = f"chatbot@{DOMAIN}"
        ctx = self.server.ssl_context()
        endpoint = Endpoint(self.server.host, self.server.port, DOMAIN, ctx)
        # The broker and the agents take the chat bot's on-behalf-of assertion (its `for`).
        self.broker = agent_class("broker")(self.broker_jid, PASSWORD_PREFIX + "broker", endpoint,
                                            authorizer=AdminsOnly([self.client_jid]), delegates=[self.bot_jid])
        # Every agent the workers will run, as a mesh file's agents: would name them (no resources).
        for user in ["echo", *agent_users]:
            self.broker.admit(f"{user}@{DOMAIN}", BenchAgent.kind, ())
        await self.broker.start(timeout=20)
        # The operators' chat bot as `vertebra broker` runs it (same process, its own audit log), with
        # a rate limit that a benchmark's one operator does not reach.
        (self.home / "chatbot").mkdir()
        self.bot = ChatBot(self.bot_jid, PASSWORD_PREFIX + "chatbot", endpoint,
                           broker=f"{self.broker_jid}/{self.broker.resource}",
                           authorizer=AdminsOnly([self.client_jid]), ops={**catalogue(), **ops_of(BenchAgent)},
                           state_dir=self.home / "chatbot", rate=RateLimit(burst=1000, rate=1e6))
        self.bot.directory = self.broker.directory  # as `vertebra broker` wires it (agents/cli.py)
        await self.bot.start(timeout=20)
        self.bot_to = str(self.bot.jid)
        self.client = Client(self.client_jid, PASSWORD_PREFIX + "bench", endpoint,
                             broker=f"{self.broker_jid}/{self.broker.resource}")
        await self.client.start(timeout=20)
        self.bare = plain_client(f"{self.client_jid}/bare-{uuid.uuid4().hex[:6]}", PASSWORD_PREFIX + "bench", ctx)
        await start_plain(self.bare, self.server.host, self.server.port)
        self.keyed = KeyedReplies(self.bare)
        self.bare.add_event_handler("message", self.on_chat)

        # 1 and 2: one responder of each kind, alone in a worker process of their own.
        print("\n[1,2] one caller, one responder", flush=True)
        (pair,) = await self.spawn_workers(["echo"], 1, bare=["plain"], state=self.home / "agents")
        bare_to, vert_to = pair.ready["bare"][0], pair.ready["jids"][0]
        await self.sequential(bare_to, vert_to)
        await self.throughput(bare_to, vert_to)
        # Where the difference comes from: the same bare IQ, but between the Vertebra connections.
        same: list[float] = []
        saved, self.bare = self.bare, self.client.xmpp
        try:
            for i in range(300 if args.quick else 1000):
                t0 = time.perf_counter()
                await self.bare_rt(vert_to, i)
                same.append(time.perf_counter() - t0)
        finally:
            self.bare = saved
        self.notes.append(f"bare IQ between the Vertebra client's and agent's own connections"
                          f" (XEP-0198, caps, ping plugins loaded): p50 {percentile(same, .5) * 1e3:.2f} ms")

        # 3: the same op as a text command through the chat bot vs Client.call, both via discovery.
        print("\n[3] a text command through the chat bot vs Client.call", flush=True)
        await self.wait_directory(1, 30)
        await self.chat()
        await pair.stop()
        self.workers.remove(pair)

        # 4: scatter/gather, growing the agent population size by size.
        online: list[str] = []
        agent_workers: list[Worker] = []
        reps = 3 if args.quick else 5
        for n in sizes:
            add = agent_users[len(online):n]
            if add:
                nworkers = max(args.workers, math.ceil(len(add) / args.per_worker))
                print(f"\n[4] starting {len(add):,} more agents in {nworkers} worker processes", flush=True)
                t = time.monotonic()
                made = await self.spawn_workers(add, nworkers)
                agent_workers += made
                for w in made:
                    online += w.ready["jids"]
                print(f"  {len(online):,} agents online after {time.monotonic() - t:.1f}s", flush=True)
                await self.wait_directory(len(online), 60 + len(add) * 0.05)
                print(f"  broker lists {len(self.broker.directory):,} agents", flush=True)
            await self.fan_out(online[:n], reps)
            worker_rss = [await w.rss() for w in agent_workers]
            base = [w.ready.get("base_rss_kib", 0) for w in agent_workers]
            per_agent = (sum(worker_rss) - sum(base)) / max(1, len(online))
            prosody_rss = rss_kib(self.server.status()["pid"] or 0)
            self.notes.append(
                f"{len(online):,} agents in {len(agent_workers)} processes: RSS {sum(worker_rss) / 1024:,.0f} MiB"
                f" in all ({statistics.mean(worker_rss) / 1024:,.0f} MiB per process),"
                f" ~{per_agent:,.0f} KiB per agent above an idle interpreter;"
                f" Prosody {prosody_rss / 1024:,.0f} MiB")

    async def close(self) -> None:
        await stop_workers(self.workers)
        if self.client is not None:
            await quietly(self.client.stop(), 5)
        if self.bot is not None:
            await quietly(self.bot.stop(), 5)
        if self.broker is not None:
            await quietly(self.broker.stop(), 5)
        if self.bare is not None:
            await quietly(stop_plain(self.bare), 5)

    def cleanup_sync(self) -> None:
        for w in self.workers:
            w.kill()
        stop_server(self.server, self.home, self.args.keep)

    def table(self) -> bool:
        verdicts.print_table(("measurement", "bare", "vertebra", "ratio", "target", ""), self.rows, self.notes)
        return all(r[5] != "FAIL" for r in self.rows)


async def start_workers(workers: list[Worker], configs: list[dict[str, Any]], log_dir: Path) -> list[Worker]:
    """A worker process per config (named after how many ``workers`` there are; each is added to
    them), started one after the other and then waited for until each is ready (its config's
    ``start_timeout``, and 15 s more)."""
    made = []
    for cfg in configs:
        w = Worker(f"worker{len(workers)}", cfg, log_dir)
        workers.append(w)
        made.append(w)
        await w.spawn()
    await asyncio.gather(*(w.wait_ready(cfg["start_timeout"] + 15) for w, cfg in zip(made, configs)))
    return made


async def quietly(aw: Awaitable[Any], timeout: float) -> None:
    """Await ``aw`` for at most ``timeout`` s, whatever it raises: closing a benchmark goes on."""
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(aw, timeout)


async def stop_workers(workers: list[Any], grace: float = 20.0, timeout: float = 25.0) -> None:
    """Ask every worker process to stop (``grace`` s each to end by itself, all at once, waited for
    ``timeout`` s at most), then kill what is left."""
    await asyncio.gather(*(quietly(w.stop(grace), timeout) for w in workers), return_exceptions=True)
    for w in workers:
        w.kill()


def stop_server(server: Any, home: Path | None, keep: bool) -> None:
    """Stop a bench's private server (saying so when it would not stop) and remove its temporary home
    unless it is to be kept."""
    if server is not None:
        try:
            server.stop(timeout=10)
        except Exception as exc:
            print(f"warning: stopping the private server: {exc}", file=sys.stderr)
    if home is not None and not keep:
        shutil.rmtree(home, ignore_errors=True)


def drive(bench: Any, processes: Callable[[], list[Any]], start: Callable[[], None] | None = None) -> bool:
    """Run a benchmark: ``start`` it (its servers), run it through :func:`coordinator`, and whatever
    happens, ``bench.cleanup_sync()``. An interruption or a failure is said on stderr, a failure with
    the end of the log of each of ``processes()``. True when it ran to its end."""
    try:
        if start is not None:
            start()
        asyncio.run(coordinator(bench))
        return True
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted; cleaning up", file=sys.stderr)
    except BaseException as exc:
        print(f"\nbenchmark failed: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        for w in processes():
            tail = w.tail()
            if tail:
                print(f"{w.name} log:{tail}", file=sys.stderr)
    finally:
        bench.cleanup_sync()
    return False


async def coordinator(bench: Any) -> None:
    """Run a benchmark (``run``, ``close``, ``args.time_limit``) to its end or its time limit; SIGTERM
    cancels it, and it is closed whatever happened (bench/cluster.py runs its own through this too)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await asyncio.wait_for(bench.run(), bench.args.time_limit)
    finally:
        await asyncio.shield(bench.close())


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark whose agents run in worker processes."""
    parser.add_argument("--per-worker", type=int, default=250, help="at most this many agents per worker")
    parser.add_argument("--login-concurrency", type=int, default=8, help="logins in flight per worker")
    parser.add_argument("--time-limit", type=float, default=1800, help="abort the whole run after this many s")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home (logs) afterwards")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: N=100 only, fewer iterations")
    parser.add_argument("--agents", default=None, help="comma-separated fan-out sizes (default 100,1000)")
    parser.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 2),
                        help="at least this many worker processes per batch of agents")
    add_worker_options(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.worker:
        try:
            asyncio.run(worker_main())
        except KeyboardInterrupt:
            pass
        return 0
    args.agents_given = args.agents is not None
    args.agents = args.agents or "100,1000"
    raise_nofile()
    verdicts.begin()
    bench = Bench(args)
    t = time.monotonic()
    ran = drive(bench, lambda: bench.workers)
    ok = bench.table() and ran
    verdicts.save()
    print(f"\n{'all targets met' if ok else 'NOT all targets met'} ({time.monotonic() - t:.0f}s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
