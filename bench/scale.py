#!/usr/bin/env python3
"""Tens of thousands of agents on an ejabberd cluster: one call answered by every one, measured.

The agents are light simulations, not the runtime's Agent: each is one asyncio connection (on uvloop,
which costs the cores they share with the server less than asyncio's own loop) speaking
docs/protocol.md directly (STARTTLS, SCRAM-SHA-1, bind; caps presence to the broker, disco#info with
the agent form, the ``bench.echo`` op answered with an ``<outcome>``), parsed with the standard
library's incremental XML parser, a few tens of KiB each and thousands per worker process. The
broker (the project's Broker, its roster naming every simulated agent) runs in a process of its own
so its memory and CPU are its own; the caller is the project's Client, in this process.

Measured at each size N (agents spread evenly over the nodes):

1. the logins: time until the broker lists all N;
2. ``mesh.discover`` latency with N advertised agents, paged as the client pages it (for the echo op
   every agent offers, and for an op none offers: the directory scan alone), and the broker's RSS;
3. one call answered by all N: ``Client.call(op, args, to=[...all N])``, wall time (median of 3),
   the caller's CPU per answer (``time.process_time``), the server's CPU (beam.smp utime+stime of
   every node) and the agents' worker processes' CPU; and the same call with discovery through the
   broker (``scope="all"``, no ``to``), once, with what it returned;

and at the largest N only: with ``--one-to-many``, the server's CPU per answer when the requests are
sent as N IQs and when they are sent as XEP-0033 multicast messages (one stanza to the server's
mod_multicast service naming up to 4,000 agents, which the server copies to each), both from a raw
client, alternated; the login storm after restarting every ejabberd node (time until the
broker lists all N again), and a cProfile of the caller (one call) and of the broker (during the
storm and the discovery calls), written to bench/results/ (ignored by git).

Every bench account shares one password and one SCRAM salt (registered with a fixed salt), so each
worker derives the salted password once and a login costs the client HMACs, not 4,096 PBKDF2
rounds: the figures measure the server and the mesh, not the simulation's key derivation.

Usage::

    python bench/scale.py                 # N = 10,000, 20,000 and 50,000
    python bench/scale.py --quick         # smoke run: N = 2,000
    python bench/scale.py --agents 1000,2000
    python bench/scale.py --agents 20000 --no-storm --one-to-many

Every node, their epmd, the broker process, every worker and the temporary home are removed at
the end, also on Ctrl-C or error; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import hashlib
import hmac
import io
import json
import logging
import math
import os
import pstats
import random
import resource
import shutil
import signal
import ssl
import statistics
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import msgpack  # noqa: E402
import uvloop  # noqa: E402  (the simulated agents' event loop)

import roundtrip as rt  # noqa: E402  (Worker plumbing, rss_kib, raise_nofile, coordinator)
import verdicts  # noqa: E402
from rawxmpp import scram_final, scram_keys  # noqa: E402  (the tests' raw client's SCRAM)

DOMAIN = rt.DOMAIN
OP = rt.OP
KIND = "bench"
SIM_PASSWORD = "bench-pw-simulated-agent"
SIM_RESOURCE = "sim"
BROKER_USER = "broker"
CALLER_USER = "bench"
PROBE_USER = "bench-raw"   # --one-to-many's raw client
MULTICAST = f"multicast.{DOMAIN}"
PER_MULTICAST = 4_000      # addressees per XEP-0033 stanza: ~200 KiB, under the nodes' max_stanza_size
FIXED_SALT = b"vertebra-bench-salt"
# The container's hard RLIMIT_NOFILE is 20,000 and cannot be raised: one ejabberd node holds fewer
# sessions than that, so larger sizes get more nodes.
SESSIONS_PER_NODE = 18_000
PER_WORKER = 2_500  # small enough that the workers can be spread over the nodes within their limit
RESULTS = ROOT / "bench" / "results"

NS_CLIENT = "jabber:client"
NS_STREAM = "http://etherx.jabber.org/streams"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_VERTEBRA = "urn:vertebra:1"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_CAPS = "http://jabber.org/protocol/caps"
NS_PING = "urn:xmpp:ping"
AGENT_FORM = "urn:vertebra:1#agent"
CAPS_NODE = "https://vertebra.invalid/bench-simulated-agent"
IQ, PRESENCE, MESSAGE = f"{{{NS_CLIENT}}}iq", f"{{{NS_CLIENT}}}presence", f"{{{NS_CLIENT}}}message"
OP_TAG, INFO_TAG, PING_TAG = f"{{{NS_VERTEBRA}}}op", f"{{{NS_DISCO_INFO}}}query", f"{{{NS_PING}}}ping"
BROKER_SESSION = f"{{{NS_VERTEBRA}}}session"  # in every presence a broker sends (docs/protocol.md 4.5)


# -- what every simulated agent advertises (docs/protocol.md 4.1-4.3) ----------------------------------

IDENTITY = ("automation", "rpc", "", f"vertebra {KIND} agent")
FEATURES = sorted([f"urn:vertebra:op:{OP}", NS_DISCO_INFO, "jabber:x:data", NS_CAPS, NS_PING])
FORM_FIELDS = {"kind": [KIND]}  # no resources: the field is omitted, never sent empty (4.2)


def caps_ver() -> str:
    """XEP-0115 section 5.1 over the identity, the features and the agent form."""
    s = "/".join(IDENTITY) + "<" + "".join(f + "<" for f in FEATURES) + AGENT_FORM + "<"
    for var in sorted(FORM_FIELDS):
        s += var + "<" + "".join(v + "<" for v in sorted(FORM_FIELDS[var]))
    return base64.b64encode(hashlib.sha1(s.encode()).digest()).decode()


def info_children() -> str:
    cat, typ, _lang, name = IDENTITY
    fields = "".join(f"<field var={quoteattr(v)} type='text-single'><value>{vals[0]}</value></field>"
                     for v, vals in FORM_FIELDS.items())
    return (f"<identity category='{cat}' type='{typ}' name={quoteattr(name)}/>"
            + "".join(f"<feature var={quoteattr(f)}/>" for f in FEATURES)
            + f"<x xmlns='jabber:x:data' type='result'><field var='FORM_TYPE' type='hidden'>"
              f"<value>{AGENT_FORM}</value></field>{fields}</x>")


_derived: dict[str, tuple[str, str, str]] = {}


def fixed_salt_scram(password: str) -> tuple[str, str, str]:
    """(StoredKey, ServerKey, salt) as agents.ejabberd registers them, with one salt for every bench
    account: the key is derived once per password, and a worker's logins can share it too."""
    if password not in _derived:
        from agents.server import ITERATIONS

        salted = hashlib.pbkdf2_hmac("sha1", password.encode(), FIXED_SALT, ITERATIONS)
        stored = hashlib.sha1(hmac.new(salted, b"Client Key", hashlib.sha1).digest()).digest()
        server = hmac.new(salted, b"Server Key", hashlib.sha1).digest()
        _derived[password] = tuple(base64.b64encode(v).decode() for v in (stored, server, FIXED_SALT))  # type: ignore[assignment]
    return _derived[password]


# -- the simulated agent ----------------------------------------------------------------------------------


def reply_head(el: ET.Element, kind: str = "result") -> str:
    """The opening tag of the IQ that answers the stanza ``el``."""
    return f"<iq type='{kind}' id={quoteattr(el.get('id', ''))} to={quoteattr(el.get('from', ''))}>"


class StreamClosed(Exception):
    pass


class SimAgent:
    """One agent: logs in, announces itself to the broker (4.4), answers disco#info and the echo op,
    and logs in again with jittered backoff whenever its stream ends."""

    def __init__(self, pool: "SimPool", user: str, host: str, port: int) -> None:
        self.pool, self.user, self.host, self.port = pool, user, host, port
        self.writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None
        self.parser: ET.XMLPullParser | None = None
        self.root: ET.Element | None = None
        self.depth = 0
        self.brokers: dict[str, str] = {}  # broker full JID -> its session (docs/protocol.md 4.4)
        self.announcing: asyncio.Task[None] | None = None
        self.online = False
        self.logins = 0

    async def live(self) -> None:
        backoff = 0.5
        while not self.pool.stopping:
            try:
                async with self.pool.gate:
                    await asyncio.wait_for(self.login(), 60)
                backoff = 0.5
                self.logins += 1
                self.online = True
                self.pool.logged_in(self)
                self.send(f"<presence><c xmlns='{NS_CAPS}' hash='sha-1' node='{CAPS_NODE}'"
                          f" ver='{self.pool.ver}'/></presence>")
                self.announce()
                await self.serve()
            except (OSError, EOFError, StreamClosed, TimeoutError, ET.ParseError, ssl.SSLError, KeyError,
                    ValueError) as exc:
                self.pool.failures += 1
                self.pool.last_failure = f"{exc.__class__.__name__}: {exc}"
            finally:
                self.online = False
                self.brokers.clear()
                if self.announcing is not None:
                    self.announcing.cancel()
                if self.writer is not None:
                    self.writer.close()
                    self.writer = None
            if self.pool.stopping:
                return
            await asyncio.sleep(backoff / 2 + random.random() * backoff / 2)  # equal jitter
            backoff = min(backoff * 2, 10.0)

    # -- the stream ------------------------------------------------------------------------------

    def send(self, text: str) -> None:
        if self.writer is not None:
            self.writer.write(text.encode())

    def open_stream(self) -> None:
        self.parser = ET.XMLPullParser(events=("start", "end"))
        self.depth = 0
        self.root = None
        self.send(f"<?xml version='1.0'?><stream:stream xmlns='{NS_CLIENT}' xmlns:stream='{NS_STREAM}'"
                  f" to='{DOMAIN}' version='1.0'>")

    def stanzas(self) -> list[ET.Element]:
        assert self.parser is not None
        out = []
        for event, element in self.parser.read_events():
            if event == "start":
                self.depth += 1
                if self.depth == 1:
                    self.root = element
            else:
                self.depth -= 1
                if self.depth == 1:
                    out.append(element)
                    assert self.root is not None
                    self.root.remove(element)  # the stream's root must not keep every stanza
                elif self.depth == 0:
                    raise StreamClosed("the server closed the stream")
        return out

    async def element(self) -> ET.Element:
        """The next stanza during login."""
        assert self.reader is not None and self.parser is not None
        while True:
            got = self.stanzas()
            if got:
                return got[0]
            data = await self.reader.read(65536)
            if not data:
                raise StreamClosed("the server closed the connection")
            self.parser.feed(data)

    async def features(self) -> ET.Element:
        self.open_stream()
        features = await self.element()
        if features.tag != f"{{{NS_STREAM}}}features":
            raise StreamClosed(f"expected stream features, got {features.tag}")
        return features

    async def login(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        await self.features()
        self.send(f"<starttls xmlns='{NS_TLS}'/>")
        if (await self.element()).tag != f"{{{NS_TLS}}}proceed":
            raise StreamClosed("STARTTLS refused")
        await self.writer.start_tls(self.pool.ssl, server_hostname=DOMAIN)
        await self.features()
        await self.scram()
        await self.features()
        self.send(f"<iq type='set' id='bind'><bind xmlns='{NS_BIND}'><resource>{SIM_RESOURCE}</resource>"
                  "</bind></iq>")
        reply = await self.element()
        if reply.get("type") != "result":
            raise StreamClosed("resource binding failed")

    async def scram(self) -> None:
        # RFC 5802 without channel binding; the salted password comes from the pool's cache.
        nonce = base64.b64encode(os.urandom(18)).decode()
        bare = f"n={self.user},r={nonce}"
        self.send(f"<auth xmlns='{NS_SASL}' mechanism='SCRAM-SHA-1'>"
                  f"{base64.b64encode(('n,,' + bare).encode()).decode()}</auth>")
        challenge = await self.element()
        if challenge.tag != f"{{{NS_SASL}}}challenge":
            raise StreamClosed(f"SASL: expected a challenge, got {challenge.tag}")
        server_first = base64.b64decode(challenge.text or "").decode()
        try:
            final = scram_final(bare, server_first, nonce, self.pool.keys)
        except ValueError as exc:
            raise StreamClosed(f"SASL: {exc}") from None
        self.send(f"<response xmlns='{NS_SASL}'>{base64.b64encode(final.encode()).decode()}</response>")
        if (await self.element()).tag != f"{{{NS_SASL}}}success":
            raise StreamClosed(f"SASL failed for {self.user}")

    async def serve(self) -> None:
        assert self.reader is not None and self.parser is not None
        while True:
            data = await self.reader.read(65536)
            if not data:
                return
            self.parser.feed(data)
            for stanza in self.stanzas():
                self.handle(stanza)

    # -- what an agent answers ---------------------------------------------------------------------

    def handle(self, el: ET.Element) -> None:
        if el.tag == IQ:
            kind = el.get("type")
            if kind not in ("get", "set"):
                return
            child = el[0] if len(el) else None
            head = reply_head(el)
            if child is not None and child.tag == OP_TAG and kind == "set":
                self.answer(head, child)
            elif child is not None and child.tag == INFO_TAG and kind == "get":
                node = child.get("node")
                at = f" node={quoteattr(node)}" if node else ""
                self.send(f"{head}<query xmlns='{NS_DISCO_INFO}'{at}>{self.pool.info}</query></iq>")
            elif child is not None and child.tag == PING_TAG:
                self.send(f"{head[:-1]}/>")
            else:
                self.send(f"{reply_head(el, 'error')}<error type='cancel'>"
                          "<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
        elif el.tag == MESSAGE and (child := el.find(OP_TAG)) is not None:
            # A request the server fanned out (XEP-0033, --one-to-many): answered as the IQ would be.
            self.answer(reply_head(el), child)
        elif el.tag == PRESENCE:
            sender = el.get("from", "")
            if sender.split("/", 1)[0] != self.pool.broker or "/" not in sender:
                return
            if el.get("type") == "unavailable":
                self.brokers.pop(sender, None)
                if not self.brokers:
                    self.announce()
                return
            marker = el.find(BROKER_SESSION)
            session = marker.get("id", "") if marker is not None else ""
            hello = marker is not None and marker.get("hello") == "1"
            if el.get("type") is None and (hello or sender not in self.brokers or "/" not in el.get("to", "/")
                                           or self.brokers[sender] != session):
                # A broker, or a broker session, not answered yet; or a hello (4.4).
                self.brokers[sender] = session
                self.send(f"<presence to={quoteattr(sender)}>{self.pool.caps}</presence>")
                if self.announcing is not None:
                    self.announcing.cancel()

    def answer(self, head: str, op: ET.Element) -> None:
        """The echo op's answer: the IQ result opened by ``head``, with the argument ``n`` as its result."""
        args = msgpack.unpackb(base64.b64decode(op.text or ""), raw=False) if op.text else {}
        result = base64.b64encode(msgpack.packb(args.get("n"), use_bin_type=True)).decode()
        self.pool.answered += 1
        self.send(f"{head}<outcome xmlns='{NS_VERTEBRA}' status='ok'>{result}</outcome></iq>")

    def announce(self) -> None:
        if self.announcing is None or self.announcing.done():
            self.announcing = asyncio.get_running_loop().create_task(self._announce())

    async def _announce(self) -> None:
        backoff = 0.5
        while not self.brokers and self.writer is not None:
            self.send(f"<presence to='{self.pool.broker}'>{self.pool.caps}</presence>")
            await asyncio.sleep(backoff / 2 + random.random() * backoff / 2)
            backoff = min(backoff * 2, 10.0)


class SimPool:
    """The agents of one worker process."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.ssl = ssl.create_default_context(cafile=cfg["cert"])
        self.broker = f"{BROKER_USER}@{DOMAIN}"
        self.ver = cfg["ver"]
        self.caps = f"<c xmlns='{NS_CAPS}' hash='sha-1' node='{CAPS_NODE}' ver='{self.ver}'/>"
        self.info = info_children()
        self.gate = asyncio.Semaphore(cfg["concurrency"])
        self.stopping = False
        self.failures = 0
        self.last_failure = ""
        self.answered = 0
        self.first_logins = 0
        self.all_in = asyncio.Event()
        self._keys: dict[tuple[str, int], tuple[bytes, bytes]] = {}
        self.agents = [SimAgent(self, u, cfg["host"], cfg["port"]) for u in cfg["agents"]]

    def keys(self, salt: str, iterations: int) -> tuple[bytes, bytes]:
        """(ClientKey, StoredKey) for the shared password and this salt: derived once."""
        if (salt, iterations) not in self._keys:
            self._keys[(salt, iterations)] = scram_keys(SIM_PASSWORD, salt, iterations)
        return self._keys[(salt, iterations)]

    def logged_in(self, agent: SimAgent) -> None:
        if agent.logins == 1:
            self.first_logins += 1
            if self.first_logins == len(self.agents):
                self.all_in.set()

    def status(self) -> dict[str, Any]:
        return {"online": sum(a.online for a in self.agents), "agents": len(self.agents),
                "failures": self.failures, "last_failure": self.last_failure, "answered": self.answered,
                # online and holding a broker session they answered or were acknowledged by (4.4)
                "seen": sum(a.online and bool(a.brokers) for a in self.agents)}


async def pool_main() -> None:
    await child_main(run_pool)


async def run_pool(cfg: dict[str, Any], emit: Any, commands: asyncio.Queue) -> None:
    base_rss = rt.rss_kib()
    pool = SimPool(cfg)
    tasks = [asyncio.get_running_loop().create_task(a.live()) for a in pool.agents]
    try:
        try:
            await asyncio.wait_for(pool.all_in.wait(), cfg["start_timeout"])
        except TimeoutError:
            emit(event="error", error=f"agents not all online within {cfg['start_timeout']:g}s: {pool.status()}")
            return
        emit(event="ready", jids=[f"{a.user}@{DOMAIN}/{SIM_RESOURCE}" for a in pool.agents], pid=os.getpid(),
             rss_kib=rt.rss_kib(), base_rss_kib=base_rss)
        while True:
            cmd = await commands.get()
            if cmd in ("", "stop"):
                return
            if cmd == "status":
                emit(event="status", rss_kib=rt.rss_kib(), **pool.status())
    finally:
        pool.stopping = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- the broker, in a process of its own -------------------------------------------------------------------


async def broker_main() -> None:
    await child_main(run_broker)


async def run_broker(cfg: dict[str, Any], emit: Any, commands: asyncio.Queue) -> None:
    from agents.actor import Endpoint
    from agents.authz import AdminsOnly
    from agents.kinds import agent_class

    class CountingBroker(agent_class("broker")):  # type: ignore[misc,valid-type]
        """The broker, counting its new sessions (each clears the directory)."""

        sessions = 0

        async def on_session(self) -> None:
            type(self).sessions += 1
            await super().on_session()

    ctx = ssl.create_default_context(cafile=cfg["cert"])
    broker = CountingBroker(f"{BROKER_USER}@{DOMAIN}", cfg["password"],
                            Endpoint(cfg["host"], cfg["port"], DOMAIN, ctx), authorizer=AdminsOnly(cfg["admins"]))
    for user in cfg["agents"]:  # as a mesh file's agents: would name them (no resources)
        broker.admit(f"{user}@{DOMAIN}", KIND, ())
    broker.xmpp.plugin["xep_0199"].timeout = cfg["ping_timeout"]
    logging.getLogger("agents.actor").setLevel(logging.INFO)  # its reconnects, with the reason
    logging.getLogger("slixmpp.plugins.xep_0199.ping").setLevel(logging.DEBUG)  # a keepalive that timed out
    await broker.start(timeout=60)
    profile: cProfile.Profile | None = None
    stall = [0.0]  # the longest the broker's loop went without running a timer, since the last status

    async def watch_stalls() -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.1)
            stall[0] = max(stall[0], loop.time() - before - 0.1)
    watching = asyncio.get_running_loop().create_task(watch_stalls())
    try:
        emit(event="ready", jid=str(broker.jid), pid=os.getpid(), rss_kib=rt.rss_kib())
        while True:
            cmd = await commands.get()
            if cmd in ("", "stop"):
                return
            if cmd == "status":
                emit(event="status", listed=len(broker.directory), sessions=CountingBroker.sessions,
                     rss_kib=rt.rss_kib(), stall=stall[0])
                stall[0] = 0.0
            elif cmd == "profile":
                profile = cProfile.Profile()
                profile.enable()
                emit(event="profiling")
            elif cmd.startswith("profiled "):
                if profile is not None:
                    profile.disable()
                    profile.dump_stats(cmd.split(" ", 1)[1])
                profile = None
                emit(event="profiled")
    finally:
        watching.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.stop(), 10)


# -- a child process's plumbing: one JSON config line in, commands in, JSON events out ---------------------


async def child_main(body: Any) -> None:
    rt.die_with_parent()
    rt.raise_nofile()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    commands: asyncio.Queue[str] = asyncio.Queue()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, commands.put_nowait, "stop")

    def emit(**event: Any) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    cfg = json.loads(await asyncio.wait_for(reader.readline(), 60))

    async def read_commands() -> None:
        while True:
            line = await reader.readline()
            commands.put_nowait(line.decode().strip())
            if not line:
                return
    reading = loop.create_task(read_commands())
    try:
        await body(cfg, emit, commands)
    except Exception as exc:
        emit(event="error", error=f"{exc.__class__.__name__}: {exc}")
    finally:
        reading.cancel()
        emit(event="stopped")


class Child(rt.Worker):
    """A worker process of this benchmark (``--pool`` or ``--broker``), asked questions line by line."""

    def __init__(self, name: str, mode: str, cfg: dict[str, Any], log_dir: Path) -> None:
        super().__init__(name, cfg, log_dir)
        self.mode = mode
        self.lock = asyncio.Lock()

    async def spawn(self) -> None:
        with open(self.log_path, "wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), self.mode,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                start_new_session=True, limit=64 * 1024 * 1024)
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(self.cfg) + "\n").encode())
        await self.proc.stdin.drain()

    async def ask(self, command: str, timeout: float = 120.0) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        async with self.lock:
            self.proc.stdin.write(command.encode() + b"\n")
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"{self.name} exited: {self.tail()}")
        event: dict[str, Any] = json.loads(line)
        if event.get("event") == "error":
            raise RuntimeError(f"{self.name}: {event.get('error')}")
        return event


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def top_of(path: Path, lines: int = 30) -> str:
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(lines)
    return out.getvalue()


# -- the coordinator --------------------------------------------------------------------------------------


class ScaleBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.home = Path(tempfile.mkdtemp(prefix="vertebra-scale-"))
        self.nodes: list[Any] = []
        self.workers: list[Child] = []
        self.broker: Child | None = None
        self.client: Any = None
        self.rows: list[dict[str, str]] = []
        self.notes: list[str] = []

    # -- the cluster (blocking) ------------------------------------------------------------------

    def start_cluster(self) -> None:
        from agents.ejabberd import PrivateEjabberd, ejabberd_installed

        if not ejabberd_installed():
            raise SystemExit("ejabberd is not installed: run `apt-get install -y ejabberd`")
        self.render_with_ack_queue()
        if self.args.one_to_many:  # XEP-0033 for the measurement; the product does not load it
            self.edit_config("  mod_disco: {}\n", f"  mod_disco: {{}}\n  mod_multicast:\n    host: \"{MULTICAST}\"\n"
                             "    limits:\n      local:\n        message: infinite\n")
        count = self.args.nodes or max(2, math.ceil(max(self.args.sizes) / SESSIONS_PER_NODE))
        epmd = rt.free_port()  # a private epmd, never the machine's own on 4369
        # The nodes share this machine's cores, as in the field each would have a machine's: each gets
        # its share of schedulers. With one per core each, three nodes on two cores spent ~10% more CPU
        # per call (measured at 20,000: 4.73 s of server CPU a call, against 4.36 s with one each).
        schedulers = max(1, (os.cpu_count() or 1) // count)
        first = PrivateEjabberd(self.home, DOMAIN, port=rt.free_port(), node_name="scale1@127.0.0.1",
                                epmd_port=epmd, log_level=self.args.ejabberd_log, schedulers=schedulers)
        self.nodes = [first] + [
            PrivateEjabberd(self.home, DOMAIN, port=rt.free_port(), node_name=f"scale{i}@127.0.0.1", epmd_port=epmd,
                            cluster_join=first.node_name, tls_from=first.dir, log_level=self.args.ejabberd_log,
                            schedulers=schedulers)
            for i in range(2, count + 1)]
        t = time.monotonic()
        for node in self.nodes:
            node.start(timeout=120)
        print(f"{count}-node ejabberd cluster on 127.0.0.1 ports {', '.join(str(n.port) for n in self.nodes)}"
              f" ({time.monotonic() - t:.1f}s, {schedulers} scheduler{'s' * (schedulers > 1)} each),"
              f" home {self.home}", flush=True)
        if count > 2 and not self.args.nodes:
            self.notes.append(f"{count} ejabberd nodes, not 2: this container's hard limit of"
                              f" {resource.getrlimit(resource.RLIMIT_NOFILE)[1]:,} open files per process"
                              f" (not raisable here) caps a node below that many sessions")

    @staticmethod
    def edit_config(line: str, replacement: str) -> None:
        """Every node's config rendered with its first ``line`` replaced (the product's deploy/ejabberd.yml.in
        otherwise)."""
        from agents.ejabberd import PrivateEjabberd

        render = PrivateEjabberd._render_config

        def rendered(node: Any) -> str:
            text = render(node)
            if line not in text:
                raise RuntimeError(f"deploy/ejabberd.yml.in no longer has the line {line!r} that this benchmark"
                                   " edits: update bench/scale.py")
            return text.replace(line, replacement, 1)
        PrivateEjabberd._render_config = rendered  # type: ignore[method-assign]

    def render_with_ack_queue(self) -> None:
        """Every node's config with mod_stream_mgmt's max_ack_queue set to ``--ack-queue``, when given
        (the product's deploy/ejabberd.yml.in sets it to infinity)."""
        queue = self.args.ack_queue
        if queue is None:
            return
        self.edit_config("    max_ack_queue: infinity\n", f"    max_ack_queue: {queue}\n")
        self.notes.append(
            f"the nodes run with mod_stream_mgmt max_ack_queue: {queue} (the product's config: infinity;"
            " ejabberd's default: 5,000, at which a session sent more than 5,000 stanzas it has not yet"
            " acknowledged is closed for policy-violation, \"Too many unacked stanzas\": the broker reading"
            " 10,000 agents' presences, the caller reading 6,000 answers)")

    def stop_cluster(self) -> None:
        for node in reversed(self.nodes):
            try:
                node.stop(timeout=30)
            except Exception as exc:
                print(f"warning: stopping {node.node_name}: {exc}", file=sys.stderr)
        if not self.args.keep:
            shutil.rmtree(self.home, ignore_errors=True)

    def server_cpu(self) -> float:
        return sum(cpu_seconds(n.status()["pid"] or 0) for n in self.nodes)

    def server_rss_mib(self) -> float:
        return sum(rt.rss_kib(n.status()["pid"] or 0) for n in self.nodes) / 1024

    # -- helpers -----------------------------------------------------------------------------------

    async def broker_status(self) -> dict[str, Any]:
        assert self.broker is not None
        return await self.broker.ask("status")

    async def wait_listed(self, n: int, timeout: float, sessions: int = 0) -> float:
        """Seconds until the broker (in a session after ``sessions``) lists ``n`` agents."""
        t = time.monotonic()
        last = 0.0
        while True:
            st = await self.broker_status()
            if st["listed"] >= n and st["sessions"] > sessions:
                return time.monotonic() - t
            if time.monotonic() - t > timeout:
                raise RuntimeError(f"the broker lists {st['listed']:,} of {n:,} agents after {timeout:g}s")
            if time.monotonic() - last > 15:
                last = time.monotonic()
                pools = [await w.ask("status") for w in self.workers]
                online, seen = sum(p["online"] for p in pools), sum(p["seen"] for p in pools)
                print(f"    {time.monotonic() - t:5.0f}s: {online:,} agents online ({seen:,} answered by a broker),"
                      f" broker lists {st['listed']:,} (session {st['sessions']}, loop stalled up to"
                      f" {st['stall']:.1f}s)", flush=True)
            await asyncio.sleep(0.5)

    async def spawn(self, users: list[str]) -> list[str]:
        """Start ``users`` as simulated agents, PER_WORKER to a process, the processes spread over
        the nodes; their full JIDs once all are logged in."""
        made = []
        start_timeout = 120 + 0.02 * len(users)
        for i in range(0, len(users), self.args.per_worker):
            node = min(self.nodes, key=self.agents_on)  # the least loaded, to stay within its open files
            w = Child(f"pool{len(self.workers)}", "--pool", {
                "host": node.host, "port": node.port, "cert": str(self.nodes[0].cert_path), "ver": caps_ver(),
                "agents": users[i:i + self.args.per_worker], "concurrency": self.args.login_concurrency,
                "start_timeout": start_timeout}, self.home)
            self.workers.append(w)
            made.append(w)
            await w.spawn()
        await asyncio.gather(*(w.wait_ready(start_timeout + 30) for w in made))
        return [j for w in made for j in w.ready["jids"]]

    def agents_on(self, node: Any) -> int:
        return sum(len(w.cfg["agents"]) for w in self.workers if w.cfg["port"] == node.port)

    async def discover_ms(self, op: str) -> tuple[float, str]:
        """One discovery as the client makes it: a page at a time (agents/client.py discover_all)."""
        from agents.client import discover_all

        t = time.perf_counter()
        res = await discover_all(self.client, self.broker_jid, op, [], timeout=30)
        ms = (time.perf_counter() - t) * 1e3
        what = f"{len(res.result):,} agents" if res.outcome.value == "ok" else f"{res.outcome.value}: {res.error}"
        return ms, what

    async def one_call(self, jids: list[str] | None, n: int) -> dict[str, float | str]:
        """One call answered by ``jids`` (by discovery when None): wall s, CPU of caller, server, agents."""
        workers = [w.proc.pid for w in self.workers if w.proc is not None]
        sent0 = await self.agents_answered()
        cpu0, srv0, ag0 = time.process_time(), self.server_cpu(), sum(cpu_seconds(p) for p in workers)
        t = time.perf_counter()
        report = await self.client.call(OP, {"n": 1}, to=jids or (), timeout=max(60.0, n / 250))
        wall = time.perf_counter() - t
        cpu, srv = time.process_time() - cpu0, self.server_cpu() - srv0
        agents = sum(cpu_seconds(p) for p in workers) - ag0
        counts = report.counts()
        errors = sorted({(r.error or "")[:160] for r in report.results if r.error})[:2]
        if counts.get("ok", 0) < n:
            # Where the missing answers were lost: agents that never got the request, or answers sent
            # that never reached the caller.
            sent = await self.agents_answered() - sent0
            errors.append(f"the agents sent {sent:,} answers, the caller got {counts.get('ok', 0):,}")
            errors.append(await self.server_received())
            errors.append(self.where_unanswered([r.target for r in report.results if r.outcome.value != "ok"]))
        return {"wall": wall, "cpu": cpu, "server": srv, "agents": agents, "ok": counts.get("ok", 0),
                "counts": ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())), "errors": "; ".join(errors)}

    def where_unanswered(self, targets: list[str]) -> str:
        """Which node and which worker process the unanswered targets are logged in to."""
        users = {t.split("@", 1)[0] for t in targets}
        caller_port = self.nodes[0].port  # the caller logs in to the first node
        by_node: dict[str, int] = {}
        by_worker: dict[str, int] = {}
        for w in self.workers:
            lost = len(users.intersection(w.cfg["agents"]))
            if lost:
                node = "the caller's node" if w.cfg["port"] == caller_port else f"node :{w.cfg['port']}"
                by_node[node] = by_node.get(node, 0) + lost
                by_worker[w.name] = lost
        return (f"unanswered targets by node: {by_node}; by worker process (of {self.args.per_worker:,}"
                f" agents each): {by_worker}")

    async def server_received(self) -> str:
        """Whether the caller's server acknowledges (XEP-0198) every stanza the caller sent it."""
        assert self.client is not None
        sm = self.client.xmpp.plugin["xep_0198"]
        sm.request_ack()
        end = time.monotonic() + 10
        while sm.last_ack != sm.seq and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return ("the server acknowledged every stanza the caller sent" if sm.last_ack == sm.seq else
                f"the server acknowledged stanzas up to {sm.last_ack} of {sm.seq} within 10 s")

    async def agents_answered(self) -> int:
        """How many op requests the simulated agents have answered so far, all workers together."""
        return sum([int((await w.ask("status"))["answered"]) for w in self.workers])

    # -- the run -------------------------------------------------------------------------------------

    async def run(self) -> None:
        from agents import ejabberd
        from agents.actor import Endpoint
        from agents.client import Client

        args = self.args
        sizes = args.sizes
        users = [f"s{i:05d}" for i in range(max(sizes))]
        # One salt for every account (see the module docstring): registration derives one key per password.
        ejabberd._scram_sha1 = fixed_salt_scram
        accounts = {BROKER_USER: rt.PASSWORD_PREFIX + BROKER_USER, CALLER_USER: rt.PASSWORD_PREFIX + CALLER_USER}
        accounts.update({u: SIM_PASSWORD for u in users})
        if args.one_to_many:
            accounts[PROBE_USER] = SIM_PASSWORD
        t = time.monotonic()
        items = list(accounts.items())
        for i in range(0, len(items), 10_000):
            await asyncio.to_thread(self.nodes[0].register_many, dict(items[i:i + 10_000]), 600.0)
        print(f"registered {len(accounts):,} accounts (one shared SCRAM salt) in {time.monotonic() - t:.1f}s",
              flush=True)
        self.notes.append("every simulated agent shares one password and SCRAM salt (registered so): each worker"
                          " derives the salted password once, so a login costs the agents HMACs, not 4,096 PBKDF2"
                          " rounds; the server's side of SCRAM is unchanged")

        first = self.nodes[0]
        self.client_jid = f"{CALLER_USER}@{DOMAIN}"
        self.broker_jid = f"{BROKER_USER}@{DOMAIN}/broker"
        self.broker = Child("broker", "--broker", {
            "host": first.host, "port": first.port, "cert": str(first.cert_path), "agents": users,
            "password": accounts[BROKER_USER], "admins": [self.client_jid], "ping_timeout": args.ping_timeout},
            self.home)
        await self.broker.spawn()
        await self.broker.wait_ready(90)
        endpoint = Endpoint(first.host, first.port, DOMAIN, first.ssl_context())
        self.client = Client(self.client_jid, accounts[CALLER_USER], endpoint, broker=self.broker_jid)
        self.client.xmpp.plugin["xep_0199"].timeout = args.ping_timeout
        await self.client.start(timeout=30)
        if args.ping_timeout != 10:
            self.notes.append(f"the broker's and the caller's keepalive ping timeout is {args.ping_timeout:g} s"
                              " here, not the runtime's 10 s (--ping-timeout)")

        online: list[str] = []
        for n in sizes:
            add = users[len(online):n]
            print(f"\n[N = {n:,}] starting {len(add):,} more simulated agents", flush=True)
            t = time.monotonic()
            # In steps: 30,000 logins at once kept the broker from answering its own keepalive ping
            # for 120 s here, and it lost its session (see the notes).
            for i in range(0, len(add), args.step):
                online += await self.spawn(add[i:i + args.step])
                logged = time.monotonic() - t
                await self.wait_listed(len(online), 300 + n / 50)
            listed = time.monotonic() - t
            print(f"  all {n:,} logged in after {logged:.1f}s, listed by the broker after {listed:.1f}s", flush=True)
            row: dict[str, str] = {"N": f"{n:,}", "logins (s, to listed)": f"{listed:.1f}"}

            disc, absent = [], []
            for _ in range(5):
                ms, what = await self.discover_ms(OP)
                disc.append(ms)
                absent.append((await self.discover_ms("bench.absent"))[0])
            row["discover all (ms)"] = f"{statistics.median(disc):,.0f}"
            row["discover answer"] = what
            row["discover none (ms)"] = f"{statistics.median(absent):,.1f}"
            st = await self.broker_status()
            row["broker RSS (MiB)"] = f"{st['rss_kib'] / 1024:,.0f}"
            print(f"  mesh.discover {OP}: {statistics.median(disc):,.0f} ms ({what}); an op none offers:"
                  f" {statistics.median(absent):,.1f} ms; broker RSS {st['rss_kib'] / 1024:,.0f} MiB",
                  flush=True)

            warm = await self.one_call(online, n)  # warm-up: first contact with each agent
            if warm["ok"] < n:
                print(f"  warm-up call to all {n:,}: {warm['wall']:.2f}s, {warm['counts']}; {warm['errors']}",
                      flush=True)
            runs = []
            for _ in range(3):
                r = await self.one_call(online, n)
                runs.append(r)
                print(f"  call to all {n:,}: {r['wall']:.2f}s, {r['counts']}; caller CPU {r['cpu']:.2f}s,"
                      f" server CPU {r['server']:.2f}s, agents' CPU {r['agents']:.2f}s"
                      + (f"; {r['errors']}" if r["errors"] else ""), flush=True)
            mid = sorted(runs, key=lambda r: r["wall"])[1]
            row["call to=[N] (ms)"] = f"{mid['wall'] * 1e3:,.0f}"
            row["answered"] = f"{mid['ok']:,}"
            row["caller CPU/answer (us)"] = f"{mid['cpu'] / n * 1e6:,.0f}"
            row["server CPU (s)"] = f"{mid['server']:.2f}"
            row["agents CPU (s)"] = f"{mid['agents']:.2f}"
            d = await self.one_call(None, n)
            row["call scope=all via discovery"] = f"{d['wall'] * 1e3:,.0f} ms, {d['counts']}"
            print(f"  call with discovery (scope all): {d['wall'] * 1e3:,.0f} ms, {d['counts']}"
                  + (f"; {d['errors']}" if d["errors"] else ""), flush=True)
            row["ejabberd RSS (MiB)"] = f"{self.server_rss_mib():,.0f}"
            wrss = [(await w.ask("status"))["rss_kib"] - w.ready["base_rss_kib"] for w in self.workers]
            row["sim agent RSS (KiB each)"] = f"{sum(wrss) / n:,.0f}"
            self.rows.append(row)
            if n == max(sizes):
                verdicts.record(f"one call answered by {n:,} agents (measured, to=[...])",
                                f"{mid['wall'] * 1e3:,.0f} ms", "<= 10,000 ms, measured",
                                n >= 50_000 and mid["ok"] == n and mid["wall"] <= 10.0)
                if self.args.one_to_many:
                    await self.one_to_many(online, n)
                await self.profile_caller(online, n)
                if not self.args.no_storm:
                    await self.storm(n)

    async def one_to_many(self, online: list[str], n: int) -> None:
        """The server's CPU per answer with the requests sent as ``n`` IQs and as XEP-0033 multicast
        messages, from one raw client (the same op element, the same answers: IQ results), alternated."""
        first = self.nodes[0]
        pool = SimPool({"cert": str(first.cert_path), "ver": caps_ver(), "concurrency": 1, "agents": [],
                        "host": first.host, "port": first.port})
        me = SimAgent(pool, PROBE_USER, first.host, first.port)
        await asyncio.wait_for(me.login(), 60)
        assert me.reader is not None and me.writer is not None and me.parser is not None
        answers = [0]

        async def read() -> None:
            assert me.reader is not None and me.parser is not None
            while data := await me.reader.read(1 << 18):
                me.parser.feed(data)
                answers[0] += sum(el.tag == IQ and el.get("type") == "result" for el in me.stanzas())
        reading = asyncio.get_running_loop().create_task(read())
        workers = [w.proc.pid for w in self.workers if w.proc is not None]
        text = base64.b64encode(msgpack.packb({"n": 1})).decode()

        async def call(multicast: bool) -> tuple[float, float, float]:
            assert me.writer is not None
            rid = uuid.uuid4().hex
            op = (f'<op xmlns="{NS_VERTEBRA}" name="{OP}" rid="{rid}" timeout="60000"'
                  f' deadline="{int(time.time() * 1000) + 60000}">{text}</op>')
            answers[0] = 0
            srv0, ag0 = self.server_cpu(), sum(cpu_seconds(p) for p in workers)
            t = time.perf_counter()
            step = PER_MULTICAST if multicast else 1_000
            for i in range(0, n, step):
                part = online[i:i + step]
                if multicast:
                    addresses = "".join(f"<address type='bcc' jid={quoteattr(j)}/>" for j in part)
                    me.send(f"<message to='{MULTICAST}' id='{rid}-{i}'><addresses"
                            f" xmlns='http://jabber.org/protocol/address'>{addresses}</addresses>{op}</message>")
                else:
                    me.send("".join(f'<iq type="set" id="{rid}-{i + k}" to={quoteattr(j)}>{op}</iq>'
                                    for k, j in enumerate(part)))
                await me.writer.drain()
            end = t + max(60.0, n / 250)
            while answers[0] < n and time.perf_counter() < end:
                await asyncio.sleep(0.005)
            wall = time.perf_counter() - t
            if answers[0] < n:
                raise RuntimeError(f"--one-to-many: {answers[0]:,} of {n:,} answered"
                                   f" ({'multicast' if multicast else 'IQs'})")
            await asyncio.sleep(1.0)  # the server's CPU for the last answers' acknowledgements too
            return wall, self.server_cpu() - srv0, sum(cpu_seconds(p) for p in workers) - ag0

        try:
            got: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
            for multicast in (False, True) * 4:
                got[multicast].append(await call(multicast))
        finally:
            reading.cancel()
            me.writer.close()
        for multicast, name in ((False, "N IQs"), (True, "XEP-0033 multicast")):
            wall, srv, ag = (statistics.median(r[k] for r in got[multicast]) for k in range(3))
            line = (f"requests as {name}: call {wall * 1e3:,.0f} ms, server CPU {srv:.2f} s"
                    f" ({srv / n * 1e6:,.0f} us an answer), agents' CPU {ag:.2f} s (medians of 4)")
            print(f"  {line}", flush=True)
            self.notes.append(f"at {n:,}, from a raw client: {line}")

    async def profile_caller(self, online: list[str], n: int) -> None:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"scale-caller-{n}.pstats"
        prof = cProfile.Profile()
        prof.enable()
        await self.client.call(OP, {"n": 1}, to=online, timeout=max(60.0, n / 250))
        prof.disable()
        prof.dump_stats(str(path))
        (RESULTS / f"scale-caller-{n}.txt").write_text(top_of(path))
        assert self.broker is not None
        bpath = RESULTS / f"scale-broker-discover-{n}.pstats"
        await self.broker.ask("profile")
        for _ in range(3):
            await self.discover_ms(OP)
        await self.broker.ask(f"profiled {bpath}")
        (RESULTS / f"scale-broker-discover-{n}.txt").write_text(top_of(bpath))
        print(f"  profiles: {RESULTS}/scale-caller-{n}.txt, scale-broker-discover-{n}.txt", flush=True)

    async def storm(self, n: int) -> None:
        """Restart every node; time until the broker lists all ``n`` agents again."""
        assert self.broker is not None
        print(f"\n[login storm] restarting all {len(self.nodes)} ejabberd nodes with {n:,} agents online", flush=True)
        before = (await self.broker_status())["sessions"]
        bpath = RESULTS / f"scale-broker-storm-{n}.pstats"
        await self.broker.ask("profile")
        t = time.monotonic()
        for node in reversed(self.nodes):  # the first node last down, first up (it has every table)
            await asyncio.to_thread(node.stop, 60)
        down = time.monotonic() - t
        for node in self.nodes:
            await asyncio.to_thread(node.start, 180)
        up = time.monotonic() - t
        print(f"  nodes down after {down:.1f}s, accepting clients again after {up:.1f}s", flush=True)
        # Who spent the CPU while the agents came back: which of the server, the agents' logins and
        # the broker is the limit (the restarted nodes are new processes: counted from here).
        workers = [w.proc.pid for w in self.workers if w.proc is not None]
        broker_pid = self.broker.proc.pid if self.broker.proc is not None else 0
        cpu0 = (self.server_cpu(), sum(cpu_seconds(p) for p in workers), cpu_seconds(broker_pid))
        try:
            back = await self.wait_listed(n, self.args.storm_timeout, sessions=before)
        except (RuntimeError, TimeoutError) as exc:  # a broker too busy to answer is a result too
            exc = exc if str(exc) else RuntimeError("the broker or a worker did not answer a status query in 120 s")
            print(f"  {exc}", flush=True)
            self.notes.append(f"login storm at {n:,}: not all listed again: {exc} after the nodes were up")
            self.rows[-1]["storm: listed again (s)"] = "not within limit"
            await self.broker.ask(f"profiled {bpath}", timeout=120)
            (RESULTS / f"scale-broker-storm-{n}.txt").write_text(top_of(bpath))
            return
        total = up + back
        srv, ag, br = (b - a for a, b in zip(cpu0, (self.server_cpu(), sum(cpu_seconds(p) for p in workers),
                                                   cpu_seconds(broker_pid))))
        print(f"  CPU from the nodes being up to all listed ({back:.0f}s, {os.cpu_count()} cores): ejabberd"
              f" {srv:.0f}s, simulated agents {ag:.0f}s, broker {br:.0f}s (profiled)", flush=True)
        self.rows[-1]["storm CPU: server, agents, broker (s)"] = f"{srv:.0f}, {ag:.0f}, {br:.0f}"
        await self.broker.ask(f"profiled {bpath}", timeout=120)
        (RESULTS / f"scale-broker-storm-{n}.txt").write_text(top_of(bpath))
        print(f"  all {n:,} listed again {back:.1f}s after the nodes were up ({total:.1f}s after the restart began)",
              flush=True)
        self.notes.append(f"login storm at {n:,}: every node restarted (down in {down:.1f}s, up again after"
                          f" {up:.1f}s); all {n:,} agents back and listed {back:.1f}s after the nodes were up,"
                          f" {total:.1f}s after the restart began")
        self.rows[-1]["storm: listed again (s)"] = f"{back:.1f}"
        self.notes.append(f"the broker had {(await self.broker_status())['sessions']} XMPP sessions in the whole run"
                          " (each new one clears its directory): one at the start, one after the restart")

    def children(self) -> list[Any]:
        """The processes this bench started: the simulated agents' pools and the broker."""
        return self.workers + ([self.broker] if self.broker else [])

    async def close(self) -> None:
        if self.client is not None:
            await rt.quietly(self.client.stop(), 5)
        await rt.stop_workers(self.children(), grace=30, timeout=40)

    def cleanup_sync(self) -> None:
        for w in self.children():
            w.kill()
        self.stop_cluster()

    def table(self) -> None:
        if not self.rows:
            return
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        print()
        for k in keys:
            print(f"{k:<32}" + "".join(f"{r.get(k, ''):>24}" for r in self.rows))
        for note in self.notes:
            print(f"- {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 2,000")
    parser.add_argument("--agents", default="10000,20000,50000", help="comma-separated sizes")
    parser.add_argument("--nodes", type=int, default=0,
                        help=f"ejabberd nodes (default: 2, or as many as hold {SESSIONS_PER_NODE:,} sessions each)")
    parser.add_argument("--per-worker", type=int, default=PER_WORKER, help="simulated agents per process")
    parser.add_argument("--login-concurrency", type=int, default=64, help="logins in flight per process")
    parser.add_argument("--ping-timeout", type=float, default=10.0,
                        help="the broker's and the caller's keepalive ping timeout, s (default: the runtime's)")
    parser.add_argument("--step", type=int, default=5_000, help="agents started at once, at most")
    parser.add_argument("--storm-timeout", type=float, default=600.0,
                        help="how long to wait for every agent to be listed again after the restart, s")
    parser.add_argument("--no-storm", action="store_true",
                        help="skip the login storm after the largest N (measures the calls only)")
    parser.add_argument("--ack-queue", default=None,
                        help="the nodes' mod_stream_mgmt max_ack_queue instead of the product's infinity"
                             " (ejabberd's default: 5000)")
    parser.add_argument("--one-to-many", action="store_true",
                        help="at the largest N, the server's CPU with the requests as N IQs and as XEP-0033"
                             " multicast (loads mod_multicast on the nodes)")
    parser.add_argument("--ejabberd-log", default="warning", help="the nodes' log level (info says why sessions end)")
    parser.add_argument("--time-limit", type=float, default=3600, help="abort the whole run after this many s")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home (logs) afterwards")
    parser.add_argument("--pool", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--broker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pool or args.broker:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        with contextlib.suppress(KeyboardInterrupt):
            if args.pool:
                # The simulated agents share the server's cores, which in the field they would not: on
                # uvloop's TLS they take ~17-25% less CPU per answer than on asyncio's (bench/README.md).
                uvloop.run(pool_main())
            else:
                asyncio.run(broker_main())
        return 0
    args.sizes = [2000] if args.quick else sorted({int(x) for x in args.agents.split(",") if x.strip()})
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    rt.raise_nofile()
    verdicts.begin()
    bench = ScaleBench(args)
    t = time.monotonic()
    ok = rt.drive(bench, bench.children, start=bench.start_cluster)
    bench.table()
    verdicts.save()
    print(f"\n{'done' if ok else 'FAILED'} ({time.monotonic() - t:.0f}s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
