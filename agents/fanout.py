"""One op sent to one or many agents: the requests written as text in one write, the answers taken off
the raw XML, and for each target exactly one outcome.

``Actor.request`` (one target) and ``Client.call`` (every target of a scope-all call) both go through
:func:`request_all`. Profiled at 50,000 targets, building each request as slixmpp stanza objects,
serialising and writing it on its own, and building a stanza object of each answer cost the caller
~190 us of CPU per answer (bench/README.md). Here a call's request is serialised once: only each
IQ's ``id`` and ``to`` (and ``on``, when it differs per target) change, so each target costs a string
concatenation; the batch goes out in one transport write; each answer is matched by IQ id on the
element the parser produced (``XEP_Vertebra.take_reply``), before slixmpp builds a stanza of it; and
one future waits for the whole call instead of a task per target. A long op's accepted job is then
followed by a task of its own (``follow_job``), as one request always did.

A target that dies while it runs a quick op never answers, and the server does not always say so: Prosody
bounces the request (``recipient-unavailable``) when the dead session had not acknowledged it; ejabberd
bounced nothing in the same test (tests/integration/test_request_ids_restart.py), presumably because the
session had acknowledged it. The caller therefore pings (XEP-0199, which every actor answers) the targets
that leave a request unanswered for ``Timeouts.straggler_ping`` seconds; the server's error for one whose
session is gone ends its wait then, not at the deadline. A call to many pings only once at most
``_PROBE_MAX`` are left: before that its stragglers are mostly just slow, and the pings would add to their
load.

What goes on the wire is what slixmpp would have written (docs/protocol.md 3), and XEP-0198 counts
each request as slixmpp's own send path does: :func:`write_stanzas` does its counting (``seq``, the
``unacked_queue`` a resumed stream resends, the ack request every ``window`` stanzas), and the
answers are counted as handled on the way in. Both stand in for slixmpp code of one release range;
``xmpp_speedups.ORIGINALS`` records a hash of each function whose behaviour they repeat, and
``tests/unit/test_xmpp_speedups.py`` fails when an upgrade changes one. When anything else would see an
outgoing stanza (another filter registered, stanzas still queued ahead, no session), the requests
take slixmpp's own path, one stanza object each, as before.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from slixmpp import JID, Iq, Presence
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins.xep_0198.stream_management import MAX_SEQ

from . import protocol
from .errors import UNREACHABLE_CONDITIONS, OpError, Outcome, error_for
from .report import JobEventFn, ProgressFn, TargetResult
from .xmpp_speedups import escape

# Outgoing filters that never touch an IQ (so a request written without them is written as slixmpp
# would); any other filter sends the requests through slixmpp's own path. The roster's does see a
# presence: it keeps the last one sent to each JID, which slixmpp sends again only to answer a
# subscription request (agents never subscribe), so a directed presence written past it loses
# nothing (and a broker greeting 50,000 agents keeps 50,000 stanza objects fewer).
_IQ_NEUTRAL_OUT_FILTERS = {"Roster._save_last_status"}

_OUTCOME, _ACCEPTED = f"{{{protocol.NS}}}outcome", f"{{{protocol.NS}}}accepted"

def _filters(xmpp: Any) -> dict[str, list[Any]]:
    filters: dict[str, list[Any]] = xmpp._XMLStream__filters  # slixmpp keeps them private
    return filters


def write_stanzas(xmpp: Any, stanzas: list[str]) -> bool:
    """Write serialised IQ stanzas (or directed presences: the broker's greetings and
    acknowledgements) in one transport write, counted for XEP-0198 as slixmpp's send path counts each
    (``XEP_0198._handle_outgoing``), and return True; or write nothing and return False when they
    must go slixmpp's own way: no connection or no session yet (slixmpp holds stanzas until the
    session starts), stanzas still queued to be sent (these would be overtaken), or an outgoing
    filter that could change or see them."""
    if xmpp.transport is None or not xmpp._session_started or not xmpp.waiting_queue.empty():
        return False
    filters = _filters(xmpp)
    sm = xmpp.plugin.get("xep_0198", None)
    counting = [sm._handle_outgoing] if sm is not None else []
    if filters["out_sce"] or filters["out_sync"] != counting or any(
            getattr(f, "__qualname__", "") not in _IQ_NEUTRAL_OUT_FILTERS for f in filters["out"]):
        return False
    ask = False
    if sm is not None and sm.enabled_out:
        # What _handle_outgoing does for each stanza: the next sequence number, the stanza kept until
        # the server acknowledges it (a resumed stream resends it from here: slixmpp sends a string as
        # it is), and an ack request when the window is used up, here one after the whole batch.
        seq, unacked = sm.seq, sm.unacked_queue
        for text in stanzas:
            seq = (seq + 1) % MAX_SEQ
            unacked.append((seq, text))
        sm.seq = seq
        n, left = len(stanzas), sm.window_counter
        if sm.window > 0 and n >= left > 0:
            sm.window_counter = sm.window - (n - left) % sm.window
            ask = True
        else:
            sm.window_counter = left - n
    xmpp.send_raw("".join(stanzas))
    if ask:
        sm.request_ack()
    return True


def from_error(target: str, reply: Iq) -> TargetResult:
    """The result an IQ error answering a request stands for."""
    err = reply["error"]
    condition = protocol.app_condition(reply)
    text = err["text"] or err["condition"]
    if condition is None and err["condition"] in UNREACHABLE_CONDITIONS:
        return TargetResult(target, Outcome.UNREACHABLE, error=f"{target} is not connected ({err['condition']})")
    if condition is None and err["condition"] == "recipient-unavailable":
        return went_away(target, "recipient-unavailable")
    if condition is None:
        return TargetResult(target, Outcome.FAILED, error=f"{err['condition']}: {text}")
    return TargetResult(target, error_for(condition, text).outcome, error=f"{condition}: {text}")


def went_away(target: str, why: str) -> TargetResult:
    """A target whose session ended with the request in it, unanswered: it may have run, so the outcome is
    ``timeout``, never ``unreachable`` (docs/protocol.md 11.1, rows 3a and 5a)."""
    return TargetResult(target, Outcome.TIMEOUT, error=f"{target} went away before answering; the op may have run"
                                                       f" ({why})")


def from_outcome(target: str, outcome: Any) -> TargetResult:
    """The result an ``<outcome>`` element (of a reply or a job's message; None if absent) stands for."""
    try:
        payload = protocol.decode(outcome.text)
    except Exception as exc:  # an agent's malformed answer is that agent's failure, not ours
        return TargetResult(target, Outcome.FAILED, error=f"unreadable outcome: {exc}")
    if outcome.get("status") == "ok":
        return TargetResult(target, Outcome.OK, result=payload)
    condition = outcome.get("condition") or "failed"
    return TargetResult(target, error_for(condition, str(payload)).outcome, error=f"{condition}: {payload}")


async def request_all(actor: Any, targets: Sequence[str], op: str, args: dict[str, Any], *,
                      on: Sequence[str] = (), on_each: Sequence[Sequence[str]] | None = None, timeout: float,
                      rid: str | None = None, progress: ProgressFn | None = None, behalf: str | None = None,
                      term: int | None = None, job_events: JobEventFn | None = None,
                      answered: Any = None) -> list[TargetResult]:
    """Send one request for ``op`` to each of ``targets`` (all with the same ``rid``, arguments and
    deadline) and wait for each target's one outcome, at most ``timeout`` seconds; the results in the
    order of ``targets``. ``on_each``, when given, is each target's addressed resources (else ``on``
    for all); ``answered`` is called with each result as it is known. See ``Actor.request`` for the
    rest."""
    if not targets:
        return []
    if not timeout > 0:  # a request sent now would reach its agent already expired, or be run late
        return [TargetResult(t, Outcome.TIMEOUT, error=f"no time was left to send {op}; nothing was sent")
                for t in targets]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    rid = rid or uuid.uuid4().hex
    budget_ms = max(1, int((timeout - actor.timeouts.reply_margin) * 1000))
    # The same moment on our wall clock: an agent that gets the request only after it (stopped,
    # or the request held up on the way) never starts it (docs/protocol.md section 9).
    base = {"name": op, "rid": rid, "timeout": str(budget_ms), "deadline": str(int(time.time() * 1000) + budget_ms)}
    try:
        text = protocol.encode(args, what=f"the arguments of {op}")
    except OpError as exc:  # nothing was sent: each target's failure, not a crash of the call
        return [TargetResult(t, exc.outcome, error=f"{exc.condition}: {exc.text}") for t in targets]
    call = Fanout(actor, list(targets), rid, end, timeout, progress, job_events, answered)
    ons = on_each if on_each is not None else [on] * len(call.targets)
    return await call.run(base, behalf, term, text, ons)


def serialise_requests(ids: Sequence[str], targets: Sequence[str], base: dict[str, str], behalf: str | None,
                       term: int | None, text: str, ons: Sequence[Sequence[str]]
                       ) -> tuple[list[str], list[dict[str, str]]]:
    """Each target's request IQ as the text slixmpp would write for it (``protocol.request``), and the
    ``<op>`` attributes of each: the op element is written once per distinct ``on``, and each IQ only
    adds its ``id`` and ``to``."""
    tails: dict[str, tuple[dict[str, str], str]] = {}  # per distinct ``on``: the op's attributes, the rest
    stanzas, attrs_each = [], []
    for iq_id, target, resources in zip(ids, targets, ons):
        on = " ".join(resources)
        tail = tails.get(on)
        if tail is None:
            attrs = dict(base)
            if on:
                attrs["on"] = on
            if behalf:
                attrs["for"] = behalf
            if term is not None:
                attrs["term"] = str(term)
            quoted = "".join(f' {k}="{escape(v)}"' for k, v in attrs.items())
            body = f">{escape(text)}</op>" if text else " />"
            tail = tails[on] = attrs, f'"><op xmlns="{protocol.NS}"{quoted}{body}</iq>'
        stanzas.append(f'<iq type="set" id="{iq_id}" to="{escape(target)}' + tail[1])
        attrs_each.append(tail[0])
    return stanzas, attrs_each


_PROBE_MAX = 100     # stragglers a call pings at a time (see the module docstring)


class Fanout:
    """The requests of one call in flight: one IQ per target, registered in the protocol plugin's
    ``pending`` by id as ``(self, index)``, so that the plugin hands each answer here by index."""

    def __init__(self, actor: Any, targets: list[str], rid: str, end: float, timeout: float,
                 progress: ProgressFn | None, job_events: JobEventFn | None, answered: Any) -> None:
        self.actor, self.targets, self.rid, self.end, self.timeout = actor, targets, rid, end, timeout
        self.progress, self.job_events, self.answered = progress, job_events, answered
        self.vertebra = actor.vertebra
        self.results: list[TargetResult | None] = [None] * len(targets)
        self.left = len(targets)
        self.followed: dict[int, asyncio.Task[TargetResult]] = {}  # accepted long ops, by target index
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ids: list[str] = []
        self.pings: dict[int, asyncio.Task[None]] = {}  # by target index, while out
        self.probe: asyncio.TimerHandle | None = None   # the next round of pings (_probe)

    async def run(self, base: dict[str, str], behalf: str | None, term: int | None, text: str,
                  ons: Sequence[Sequence[str]]) -> list[TargetResult]:
        xmpp, vertebra, rid = self.actor.xmpp, self.vertebra, self.rid
        prefix = uuid.uuid4().hex  # ids of this call's IQs: the prefix and the target's index
        self.ids = [f"{prefix}.{i}" for i in range(len(self.targets))]
        stanzas, attrs_each = serialise_requests(self.ids, self.targets, base, behalf, term, text, ons)
        pending = vertebra.pending
        for i, target in enumerate(self.targets):
            pending[self.ids[i]] = (self, i)
            # Before sending: a job's progress and presence may follow its acceptance at once.
            vertebra.watch_job(target, rid)
        loop = asyncio.get_running_loop()
        timer = loop.call_at(self.end, self._expire)
        self.probe = loop.call_later(self.actor.timeouts.straggler_ping, self._probe)
        try:
            if not write_stanzas(xmpp, stanzas):
                for i, target in enumerate(self.targets):
                    xmpp.send(protocol.request(xmpp, target, attrs_each[i], text, iq_id=self.ids[i]))
            del stanzas, attrs_each
            if self.left:
                await self.done
            return self.results  # type: ignore[return-value]  # every entry is set once done
        finally:
            timer.cancel()
            if self.probe is not None:
                self.probe.cancel()
            for ping in self.pings.values():
                ping.cancel()
            pending = vertebra.pending
            for i, iq_id in enumerate(self.ids):
                pending.pop(iq_id, None)
                if self.results[i] is None and i not in self.followed:  # the others are unwatched already
                    vertebra.unwatch_job(self.targets[i], rid)
            for task in self.followed.values():
                task.cancel()  # only still running when this call was cancelled

    def _set(self, i: int, result: TargetResult) -> None:
        if self.results[i] is not None:
            return
        self.vertebra.unwatch_job(self.targets[i], self.rid)
        self.results[i] = result
        self.left -= 1
        if self.answered is not None:
            try:
                self.answered(result)
            except Exception as exc:  # the caller's fault ends its call, never the stream it came in on
                if not self.done.done():
                    self.done.set_exception(exc)
        if not self.left and not self.done.done():
            self.done.set_result(None)

    def reply(self, i: int, xml: Any) -> None:
        """The answer to target ``i``'s request (the plugin took it off pending and checked its sender)."""
        if self.results[i] is not None or i in self.followed:
            return
        target = self.targets[i]
        if xml.get("type") == "error":
            result = from_error(target, Iq(self.actor.xmpp, xml=xml))
        else:
            accepted = xml.find(_ACCEPTED)
            if accepted is not None:
                self._follow(i, accepted.get("job", ""))
                return
            result = from_outcome(target, xml.find(_OUTCOME))
        self._set(i, result)

    def failed(self, i: int, error: BaseException | None) -> None:
        """The connection was lost (``error``) or the actor stopped (None) before target ``i`` answered."""
        self.vertebra.pending.pop(self.ids[i], None)
        if error is None:  # stopping: the call ends cancelled, as a request waiting for its reply does
            if not self.done.done():
                self.done.cancel()
            return
        # The request may have arrived and run: that is not "unreachable", which would let scope one
        # try the next target.
        self._set(i, TargetResult(self.targets[i], Outcome.TIMEOUT,
                                  error=f"{error} before an answer came; the op may have run"))

    def _expire(self) -> None:
        for i, result in enumerate(self.results):
            if result is None and i not in self.followed:
                self._set(i, TargetResult(self.targets[i], Outcome.TIMEOUT,
                                          error=f"no answer within {self.timeout:g}s"))

    def _probe(self) -> None:
        """Ping the targets still silent (see the module docstring), and come back after another wait."""
        loop = asyncio.get_running_loop()
        # Full JIDs only: the server itself answers a ping to a bare JID.
        silent = [i for i, result in enumerate(self.results)
                  if result is None and i not in self.followed and i not in self.pings and "/" in self.targets[i]]
        if len(silent) <= _PROBE_MAX:
            for i in silent:
                self.pings[i] = loop.create_task(self._ping(i))
        wait = self.actor.timeouts.straggler_ping
        if loop.time() + wait < self.end:
            self.probe = loop.call_later(wait, self._probe)

    async def _ping(self, i: int) -> None:
        target, left = self.targets[i], self.end - asyncio.get_running_loop().time()
        try:
            await self.actor.xmpp.plugin["xep_0199"].send_ping(JID(target), timeout=max(0.1, left))
        except IqError as exc:
            # The server's answer for a full JID with no session (RFC 6121 8.5.3.2.1), or a bounce: the
            # request had reached that session, so it may have run (docs/protocol.md 11.1, row 3a).
            condition = exc.iq["error"]["condition"]
            if condition in UNREACHABLE_CONDITIONS or condition == "recipient-unavailable":
                self._set(i, went_away(target, f"a ping found its session gone: {condition}"))
        except IqTimeout:
            pass            # no word either way: the deadline decides
        finally:
            self.pings.pop(i, None)

    def _follow(self, i: int, job: str) -> None:
        target = self.targets[i]
        queue = self.vertebra.job_queue(target, self.rid)
        task = asyncio.get_running_loop().create_task(
            follow_job(self.actor, target, job, queue, self.end, self.timeout, self.progress, self.job_events))
        self.followed[i] = task

        def finished(task: asyncio.Task[TargetResult]) -> None:
            exc = None if task.cancelled() else task.exception()
            if task.cancelled() or exc is not None:
                self.vertebra.unwatch_job(target, self.rid)
                if exc is not None and not self.done.done():  # a callback's fault ends the call, as it always did
                    self.done.set_exception(exc)
                return
            self._set(i, task.result())

        task.add_done_callback(finished)


async def follow_job(actor: Any, target: str, job: str, jobs: asyncio.Queue[Any], end: float, timeout: float,
                     progress: ProgressFn | None, job_events: JobEventFn | None) -> TargetResult:
    """Wait for the outcome of the long op ``target`` accepted as ``job``: its progress reports go to
    ``progress``; when the agent goes offline, ``job_events`` hears it at once, and the wait goes on
    for ``Timeouts.offline_grace`` for it to come back (a restart) before it ends ``unreachable``."""
    loop = asyncio.get_running_loop()

    def notice(event: str) -> None:
        if job_events is not None:
            job_events(target, job, event)

    notice("accepted")
    offline_since: float | None = None  # the agent's session ended while its job ran
    while True:
        give_up = end if offline_since is None else min(end, offline_since + actor.timeouts.offline_grace)
        try:
            msg = await asyncio.wait_for(jobs.get(), max(0.0, give_up - loop.time()))
        except TimeoutError:
            if offline_since is not None:
                return TargetResult(target, Outcome.UNREACHABLE, job=job, error=(
                    f"the agent went offline while running job {job} and did not come back within"
                    f" {loop.time() - offline_since:.0f}s; the job may have done part of its work"))
            return TargetResult(target, Outcome.TIMEOUT, job=job,
                                error=f"accepted as job {job}, but no outcome within {timeout:g}s")
        if isinstance(msg, Presence):
            # Directed to us when the job was accepted: the server sends the unavailable
            # presence the moment the agent's session ends (docs/protocol.md 7.2).
            if msg["type"] == "unavailable" and offline_since is None:
                offline_since = loop.time()
                notice("offline")
            elif msg["type"] == "available" and offline_since is not None:
                offline_since = None
                notice("back")
            continue
        outcome = msg.xml.find(_OUTCOME)
        if outcome is not None:
            result = from_outcome(target, outcome)
            result.job = job
            return result
        if progress is not None:
            p = msg["vertebra_progress"]
            try:
                progress(target, int(p["seq"] or 0), protocol.decode(p.xml.text))
            except (ValueError, OpError):  # a garbled report is skipped; the outcome still counts
                pass
