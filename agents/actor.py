"""One actor, one XMPP connection: the base every agent, the broker and every client stand on.

An actor logs in with SASL SCRAM over STARTTLS, trusting exactly the certificate it is given (never
plaintext), keeps its stream with XEP-0198 where the server offers it, answers and sends XEP-0199
pings, and reconnects with jittered exponential backoff when the connection drops, to the next server
of its endpoint each time. The Vertebra protocol itself is a slixmpp plugin (``protocol.XEP_Vertebra``):
replies to the actor's requests are matched there by IQ id in one dictionary, instead of slixmpp's one
handler per pending IQ, which costs a scan of every pending request for every stanza that arrives.
Every task an actor starts goes through :meth:`Actor.spawn`, and :meth:`Actor.stop` cancels them all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import ssl
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import slixmpp
from slixmpp.plugins.xep_0198.stream_management import MAX_SEQ
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp import Iq

from . import fanout, protocol, xmpp_speedups
from .errors import ConnectError
from .report import JobEventFn, ProgressFn, TargetResult

log = logging.getLogger(__name__)
T = TypeVar("T")
_PRESENCE = "{jabber:client}presence"


xmpp_speedups.install()  # SCRAM and XML escaping in C (see that module)


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach the XMPP service: one server, or the nodes of a cluster serving one
    domain (``alternates``), any of which will do."""

    host: str
    port: int
    domain: str
    ssl_context: ssl.SSLContext
    alternates: tuple[tuple[str, int], ...] = ()
    # False: start at a random node (clients and agents spread over a cluster); True: at host:port
    # first (a broker instance belongs to one node).
    first: bool = False

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(self.host, self.port), *self.alternates]

    def starting_at(self, index: int) -> Endpoint:
        """The same service, tried from its ``index``-th node on (then the others, in order)."""
        nodes = self.addresses
        (host, port), *rest = nodes[index % len(nodes):] + nodes[:index % len(nodes)]
        return dataclasses.replace(self, host=host, port=port, alternates=tuple(rest), first=True)

    @classmethod
    def pinned(cls, host: str, port: int, domain: str, cert_path: str,
               alternates: tuple[tuple[str, int], ...] = ()) -> Endpoint:
        """An endpoint that trusts exactly the certificate at ``cert_path`` (the private server's)."""
        ctx = ssl.create_default_context(cafile=cert_path)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return cls(host, port, domain, ctx, alternates)


class Backoff:
    """Exponential backoff with equal jitter, so that a server's restart does not bring every actor
    back in the same instant."""

    def __init__(self, base: float = 0.2, cap: float = 15.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** self.attempt)
        self.attempt += 1
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0


class _Stream(slixmpp.ClientXMPP):
    """slixmpp's client, with stanzas nested too deep refused before slixmpp turns them into stanza
    objects (the Vertebra plugin's ``incoming``, through the hook slixmpp leaves for this)."""

    last_received = 0.0  # loop time of the last data read from the server (the keepalive's proof of life)
    # Takes a presence off the raw element and returns True, or returns False to leave it to slixmpp:
    # the broker's, for the presences of thousands of agents.
    take_presence: Callable[[Any], bool] | None = None

    def incoming_filter(self, xml: Any) -> Any:
        return cast(Any, self.plugin)["vertebra"].incoming(xml)  # slixmpp's type names its own plugins only

    def data_received(self, data: bytes | str) -> None:
        self.last_received = self.loop.time()
        super().data_received(data)

    def _spawn_event(self, xml: Any) -> None:
        # slixmpp's own, but for the answers to this actor's requests (agents/fanout.py) and the
        # presences take_presence files: those are taken off the raw element before any stanza object
        # is built of them, and counted for XEP-0198 here, as its input filter (which never sees them)
        # would have counted them.
        vertebra = cast(Any, self.plugin)["vertebra"]
        xml = vertebra.incoming(xml)
        if vertebra.take_reply(xml) or (self.take_presence is not None and xml.tag == _PRESENCE
                                        and self.take_presence(xml)):
            sm = cast(Any, self.plugin).get("xep_0198", None)
            if sm is not None and sm.enabled_in:
                sm.handled = (sm.handled + 1) % MAX_SEQ
            return
        try:
            stanza = self._build_stanza(xml)
        except Exception as exc:
            log.exception("Unable to parse stanza: %s,\n%s", exc, xml)
            return
        self.recv_stanza(stanza)


@dataclass(frozen=True)
class Timeouts:
    discover: float = 5.0  # asking the broker who offers an op
    reply_margin: float = 0.25  # kept back from the agent's budget for its answer to travel
    # How long a caller waits for an agent that went offline while running its job to come back (a
    # restart) before it reports the target unreachable; never beyond the call's own budget.
    offline_grace: float = 30.0
    # How long a target may leave a request unanswered before the caller pings it (XEP-0199), and again
    # after each such wait: a ping the server answers with an error means its session ended with the
    # request in it (agents/fanout.py, Fanout._probe).
    straggler_ping: float = 1.0


class Actor:
    """A participant of the mesh on one XMPP connection.

    Subclasses override :meth:`on_session` to advertise themselves each time a session starts
    (first login, and after every reconnect that could not resume the old stream).
    """

    resource = "vertebra"

    def __init__(self, jid: str, password: str, endpoint: Endpoint, *, resource: str | None = None,
                 timeouts: Timeouts = Timeouts()) -> None:
        self.endpoint = endpoint
        self.timeouts = timeouts
        self.xmpp = _Stream(f"{jid}/{resource or self.resource}", password, ssl_context=endpoint.ssl_context)
        self.backoff = Backoff()
        # Each actor starts at a random server of a cluster, so a node's clients do not all land on
        # the same other node when it goes away.
        self._addresses = endpoint.addresses
        self._address = 0 if endpoint.first else random.randrange(len(self._addresses))
        # Explicit, because with a given host and port slixmpp would try direct TLS first.
        self.xmpp.enable_direct_tls = False
        self.xmpp.enable_starttls = True
        self.xmpp.enable_plaintext = False
        # SCRAM only: never send a password (PLAIN), even over TLS, whatever the server offers.
        self.xmpp.plugin["feature_mechanisms"].use_mechs = {"SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-512"}
        self.xmpp.register_plugin("xep_0030")
        # Ask the server for an ack every 50 stanzas, not every 5: each request is its own packet.
        self.xmpp.register_plugin("xep_0198", {"window": 50})
        # slixmpp's own keepalive is off: the actor runs its own (_keepalive), which forgives a late
        # answer while the server keeps sending. The plugin still answers pings and holds the
        # interval and timeout (30 s and 10 s), which the keepalive reads at each round.
        self.xmpp.register_plugin("xep_0199", {"keepalive": False, "interval": 30, "timeout": 10})
        # After XEP-0198, whose input filter counts every stanza before Vertebra's takes its own.
        self.xmpp.register_plugin(protocol.XEP_Vertebra.name)
        self.vertebra: protocol.XEP_Vertebra = cast(Any, self.xmpp.plugin)[protocol.XEP_Vertebra.name]
        self._tasks: set[asyncio.Task[Any]] = set()  # every task this actor started; stop() cancels them
        self._reconnect: asyncio.Task[None] | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._online = asyncio.Event()
        self._gave_up = asyncio.Event()  # start(once=True) found no server accepting connections
        self._refused_servers: set[tuple[str, int]] | None = None
        self._auth_failed: str | None = None
        self.on_event("session_start", self._on_session_start)
        self.xmpp.add_event_handler("session_bind", self._on_session_bind)
        self.on_event("session_resumed", self._on_session_resumed)
        self.on_event("disconnected", self._on_disconnected)
        self.on_event("connection_failed", self._on_connection_failed)
        self.on_event("failed_all_auth", self._on_failed_auth)

    @property
    def jid(self) -> slixmpp.JID:
        return self.xmpp.boundjid

    @property
    def online(self) -> bool:
        return self._online.is_set()

    async def start(self, timeout: float = 15.0, *, once: bool = False) -> None:
        """Connect and wait for a session. Raises ConnectError saying what failed. ``once``: a program
        that runs one call gives up as soon as every server refused the connection (a stopped server
        answers at once; waiting out the timeout would only keep its user waiting), where an agent
        keeps trying until the timeout."""
        self._stopping = False
        self._refused_servers = set() if once else None
        if self._keepalive_task is None or self._keepalive_task.done():
            self._keepalive_task = self.spawn(self._keepalive(), name=f"keepalive {self.xmpp.boundjid.bare}")
        self.xmpp.connect(*self._addresses[self._address])
        online = asyncio.ensure_future(self._online.wait())
        gave_up = asyncio.ensure_future(self._gave_up.wait())
        try:
            await asyncio.wait((online, gave_up), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            online.cancel()
            gave_up.cancel()
        if not self._online.is_set():
            where = " or ".join(f"{h}:{p}" for h, p in self._addresses)
            reason = self._auth_failed or (
                f"no server accepts connections at {where} (is it running? `vertebra server status`)"
                if self._gave_up.is_set() else
                f"no session with {where} within {timeout:g}s (is the server running? `vertebra server status`)")
            await self.stop()
            raise ConnectError(f"{self.xmpp.boundjid.bare}: {reason}") from None

    async def stop(self) -> None:
        """Close the connection, end every request still waiting, and cancel every task this actor
        started (``spawn``), waiting until they have ended."""
        self._stopping = True
        self._online.clear()
        self.xmpp.cancel_connection_attempt()
        if self.xmpp.transport is not None:
            try:
                await self.xmpp.disconnect(wait=1.0)
            except Exception:  # a broken transport is already as closed as we need it
                self.xmpp.abort()
        self.vertebra.fail_pending(None)
        await self.cancel_tasks()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Run ``coro`` as a task of this actor: kept until it ends, cancelled by :meth:`stop`."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_tasks(self) -> None:
        """Cancel every task this actor started and wait for them to end (a task that catches the
        cancellation and goes on is waited for too: stop means stopped)."""
        current = asyncio.current_task()
        while tasks := [t for t in self._tasks if t is not current and not t.done()]:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _next_address(self) -> tuple[str, int]:
        self._address = (self._address + 1) % len(self._addresses)
        return self._addresses[self._address]

    @property
    def server_address(self) -> tuple[str, int]:
        """The server this actor is (or was last) connected to."""
        return self._addresses[self._address]

    async def on_session(self) -> None:
        """Called on every new session; subclasses advertise themselves here."""

    async def _on_session_start(self, _event: Any) -> None:
        self.backoff.reset()
        await self.on_session()
        self._online.set()

    def _on_session_bind(self, _event: Any) -> None:
        # A new session (a resumed one binds no resource): XEP-0198 on it counts from zero on the
        # server's side, from its <enable/>, but slixmpp (1.17) clears only its queue of unacknowledged
        # stanzas when it enables it again after a reconnect: its count of stanzas sent and of the
        # server's last ack stayed the old stream's, so every ack after a reconnect looked inconsistent
        # (logged as an error each time) and dropped stanzas not yet acknowledged from that queue.
        # Reset before the <enable/> (the session may start, and send, before it is answered).
        sm = cast(Any, self.xmpp.plugin["xep_0198"])
        sm.seq, sm.last_ack = 0, 0

    def _on_session_resumed(self, _event: Any) -> None:
        # Back in business: the next drop starts again from the shortest wait, instead of each drop
        # (an attack could cause them) waiting longer than the one before, up to the cap.
        self.backoff.reset()
        self._online.set()

    def _on_failed_auth(self, _event: Any) -> None:
        self._auth_failed = "login refused (not-authorized): check the account's password file"
        self._stopping = True  # retrying a wrong password only locks the account out
        self._gave_up.set()

    def _on_disconnected(self, _event: Any) -> None:
        self._online.clear()
        self.vertebra.fail_pending(ConnectionError("connection to the XMPP server lost"))
        self._reconnect_later("disconnected")

    def _on_connection_failed(self, _event: Any) -> None:
        # slixmpp would try the same address again after its own fixed schedule; instead the actor
        # ends that attempt and tries the endpoint's next server after a jittered backoff.
        self.xmpp.cancel_connection_attempt()
        if self._refused_servers is not None and not self._online.is_set():  # start(once=True): each server once
            self._refused_servers.add(self.server_address)
            if len(self._refused_servers) >= len(set(self._addresses)):
                self._stopping = True
                self._gave_up.set()
                return
        self._reconnect_later("could not connect")

    def _reconnect_later(self, why: str) -> None:
        if self._stopping or (self._reconnect is not None and not self._reconnect.done()):
            return
        delay = self.backoff.next()
        log.info("%s: %s; reconnecting in %.2fs", self.xmpp.boundjid, why, delay)
        self._reconnect = self.spawn(self._reconnect_after(delay), name=f"reconnect {self.xmpp.boundjid}")

    async def _keepalive(self) -> None:
        """XEP-0199 keepalive for as long as the actor runs: every ``interval`` while online, ping the
        server and reconnect when the answer does not come within ``timeout``, except that a
        connection which delivered anything while the ping was out is alive: a busy actor (a broker
        reading the presences of thousands of agents) reads its ping's answer late, behind what came
        first, and reconnecting would cost it its session."""
        ping = cast(Any, self.xmpp.plugin["xep_0199"])
        while True:
            await asyncio.sleep(ping.interval)
            if not self._online.is_set():
                continue  # between sessions: the reconnection has its own timeouts
            sent = self.xmpp.loop.time()
            try:
                await ping.ping(self.xmpp.boundjid.host, timeout=ping.timeout)
            except IqTimeout:
                if self.xmpp.last_received > sent:
                    log.info("%s: the keepalive ping was not answered within %gs, but the server kept sending;"
                             " the connection is kept", self.xmpp.boundjid, ping.timeout)
                elif self._online.is_set():
                    # Said at WARNING: a new session costs a broker its directory (it greets every agent again).
                    log.warning("%s: the keepalive ping was not answered within %gs and nothing arrived meanwhile;"
                                " reconnecting", self.xmpp.boundjid, ping.timeout)
                    self.xmpp.reconnect(0.0, f"Ping timeout after {ping.timeout:g}s")
            except IqError:
                pass  # an answer, if an error: the server is there

    async def _reconnect_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._stopping and self.xmpp.transport is None:
            self.xmpp.connect(*self._next_address())

    # -- requests ------------------------------------------------------------------------------

    async def send_iq(self, iq: Iq, timeout: float) -> Iq:
        """Send an IQ and return its reply (result or error). Raises asyncio.TimeoutError."""
        fut = self.vertebra.expect_reply(iq)
        try:
            self.xmpp.send(iq)
            return Iq(self.xmpp, xml=await asyncio.wait_for(fut, timeout))
        finally:
            self.vertebra.forget_reply(iq.xml.get("id", ""))

    def watch_job(self, agent: str, rid: str) -> asyncio.Queue[Any]:
        """Queue for the progress and outcome messages of request ``rid``, accepted only from ``agent``,
        and for the presences ``agent`` sends meanwhile."""
        self.vertebra.watch_job(agent, rid)
        return self.vertebra.job_queue(agent, rid)

    def unwatch_job(self, agent: str, rid: str) -> None:
        self.vertebra.unwatch_job(agent, rid)

    def on_event(self, event: str, handler: Callable[[Any], Any]) -> None:
        """Call ``handler`` with each slixmpp ``event`` of this actor's stream; a coroutine it returns
        runs as a task of this actor (:meth:`spawn`), which :meth:`stop` cancels.

        Registering with slixmpp directly would start a coroutine function in a task of slixmpp's own,
        which no stop reaches, and would drop unawaited the coroutine that a plain function (a lambda
        calling an ``async def``) returns: that handler would never run."""
        def run(data: Any) -> None:
            result = handler(data)
            if asyncio.iscoroutine(result):
                self.spawn(result, name=f"{event} handler of {self.xmpp.boundjid}")

        self.xmpp.add_event_handler(event, run)

    # -- calling ops ---------------------------------------------------------------------------

    async def request(self, target: str, op: str, args: dict[str, Any], *, on: Sequence[str] = (),
                      timeout: float, rid: str | None = None, progress: ProgressFn | None = None,
                      behalf: str | None = None, term: int | None = None,
                      job_events: JobEventFn | None = None) -> TargetResult:
        """Send one request to one agent and wait for its one outcome, at most ``timeout`` seconds.

        A long op's job is watched through the agent's presence: when the agent goes offline,
        ``job_events`` hears it at once, and the request waits ``Timeouts.offline_grace`` for it to
        come back (a restart) before it ends ``unreachable``, naming the job.

        ``behalf`` names the person this actor acts for (the broker running a workflow step, the chat
        bot relaying an operator); agents honour it only from the delegates they are configured with.
        ``term``: the leading broker instance's fencing token, on the workflow steps it sends."""
        results = await fanout.request_all(self, (target,), op, args, on=on, timeout=timeout, rid=rid,
                                           progress=progress, behalf=behalf, term=term, job_events=job_events)
        return results[0]
