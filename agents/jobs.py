"""The life of a long op's job on the agent's side, from its ``<accepted>`` to the caller's receipt for its
outcome, kept on disk so that no caller is left in silence.

:class:`Jobs` is the agent's component for it (``Agent.jobs``): it accepts a job, runs it, reports its
sequence-numbered progress, and sends its one outcome until the caller's XEP-0184 receipt says it arrived
(again after the server or the agent restarted); a caller that repeats a running job's request (the same
request id, from another session) is attached to the job and gets the outcome too. :class:`JobStore` keeps
the jobs: each is written when its ``<accepted>`` is sent (who asked, for which op, under which request id,
where the outcome goes and until when that caller waits), again when it ends (its outcome), and once more
when the receipt comes. After a crash or a kill the agent finds the jobs that were still running: their
coroutines are gone, so each is ended as ``interrupted`` and its outcome sent like any other, unless the
job waits on work that carries on by itself after a restart (``Job.work``: a replication update the
replicator resumes), which the agent follows again (``Agent.follow_job``), so the job keeps running and
ends with that work's real outcome. Ended jobs are kept ``RETENTION`` seconds, for ``job.status`` and for
outcomes still on their way (docs/protocol.md 7.5).

The file is read and written on its own thread (``agents.db.Store``), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import time
import uuid
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slixmpp.xmlstream import ET

from . import protocol
from .actor import Backoff
from .db import Store
from .errors import InternalError, Interrupted, OpError
from .idempotency import Answer, RequestLog
from .ops import OpSpec

if TYPE_CHECKING:
    from .agent import Agent, Call

log = logging.getLogger(__name__)

RETENTION = 24 * 3600.0  # seconds an ended job is kept, as an op's durable outcome is (section 8)

_MIGRATIONS = [
    "CREATE TABLE jobs (job TEXT PRIMARY KEY, op TEXT, caller TEXT, sender TEXT, reply_to TEXT, rid TEXT,"
    " fingerprint TEXT, accepted_at REAL, deadline REAL, state TEXT, status TEXT, condition TEXT, payload TEXT,"
    " ended_at REAL, delivered INTEGER)",
    "ALTER TABLE jobs ADD COLUMN work TEXT NOT NULL DEFAULT ''",
    # Callers that repeated a job's request (another session of the same account), sent its outcome too.
    "CREATE TABLE attached (job TEXT, reply_to TEXT, rid TEXT, deadline REAL, delivered INTEGER NOT NULL DEFAULT 0,"
    " PRIMARY KEY (job, reply_to))",
]


@dataclass
class Job:
    """One accepted long op. ``caller`` is whom it runs for (the person, for a delegated request),
    ``sender`` the bare JID that sent it (the request log's key), ``reply_to`` the full JID its
    outcome goes to, ``deadline`` the caller's end (Unix time): the outcome is sent until then."""

    job: str
    op: str
    caller: str
    sender: str
    reply_to: str
    rid: str
    fingerprint: str
    accepted_at: float
    deadline: float
    state: str = "running"  # running, ended
    status: str = ""  # ok, failed, denied, timeout (the outcome's status attribute)
    condition: str = ""
    payload: str = ""  # base64 msgpack: the result, or the error sentence
    ended_at: float | None = None
    delivered: bool = False  # the caller's receipt for the outcome came back
    # The durable work the job waits on, named by the op ("replication r1a2b3c4d"): a restarted agent
    # that resumes it follows it again (Agent.follow_job) instead of reporting the job interrupted.
    work: str = ""

    @property
    def end(self) -> tuple[str, str, str]:
        """(status, condition, encoded payload), as the outcome message carries them."""
        return self.status, self.condition, self.payload

    def describe(self) -> dict[str, Any]:
        """What ``job.status`` answers about it."""
        out: dict[str, Any] = {"job": self.job, "op": self.op, "caller": self.caller, "rid": self.rid,
                               "state": self.state, "accepted_at": self.accepted_at, "ended_at": self.ended_at,
                               "delivered": self.delivered}
        if self.state == "ended":
            value = protocol.decode(self.payload)
            out.update({"status": self.status, "condition": self.condition or None,
                        "result" if self.status == "ok" else "error": value})
        return out


class JobStore:
    """The agent's jobs, in ``path`` (None: in memory only, for an agent without a state directory)."""

    def __init__(self, path: Path | None) -> None:
        # FULL: a job accepted, or ended, must still be known after a power cut, not only after a crash.
        self._store = Store(path, _MIGRATIONS, name=f"jobs {path.name if path else ':memory:'}", synchronous="FULL")
        self._store.submit(_forget_before, time.time() - RETENTION)

    async def accepted(self, job: Job) -> None:
        """On disk before its ``<accepted>`` is sent."""
        await self._store.run(_put, job)

    async def ended(self, job: Job, end: tuple[str, str, str]) -> None:
        job.state, job.ended_at = "ended", time.time()
        job.status, job.condition, job.payload = end
        await self._store.run(_put, job)

    async def delivered(self, job: Job) -> None:
        job.delivered = True
        await self._store.run(_put, job)

    async def follows(self, job: Job, work: str) -> None:
        job.work = work
        await self._store.run(_put, job)

    async def attach(self, job: str, reply_to: str, rid: str, deadline: float) -> None:
        """``reply_to`` repeated the job's request: its outcome goes there too, also after a restart."""
        await self._store.run(_attach, job, reply_to, rid, deadline)

    async def attached(self, job: str) -> list[tuple[str, str, float]]:
        """(reply_to, rid, deadline) of the callers attached to ``job`` that still wait for its outcome."""
        return await self._store.run(_attached, job, time.time())

    async def attached_undelivered(self) -> list[Job]:
        """For each ended job's attached caller still waiting for the outcome without a receipt: a copy of
        the job addressed to that caller (its reply_to, rid and deadline)."""
        return await self._store.run(_attached_undelivered, time.time())

    async def attached_delivered(self, job: str, reply_to: str) -> None:
        await self._store.run(_attached_delivered, job, reply_to)

    async def get(self, job_id: str) -> Job | None:
        return await self._store.run(_get, job_id)

    def left_running(self) -> list[Job]:
        """The jobs still marked running: the process that ran them is gone. Read once as the agent
        starts, before it can accept a job (so it waits here)."""
        return self._store.call(_running)

    def interrupt(self, job: Job, agent: str) -> None:
        """End as ``interrupted`` a job the previous run left running, whose work cannot go on."""
        text = (f"{agent} stopped while running {job.op} as job {job.job}; it may have done part of its work."
                " Look at what it changes, then run it again with a new request id if it is still wanted")
        job.state, job.ended_at = "ended", time.time()
        job.status, job.condition, job.payload = "failed", Interrupted.condition, protocol.encode(text)
        self._store.call(_put, job)

    async def undelivered(self) -> list[Job]:
        """Ended jobs whose outcome no receipt has confirmed yet, and whose caller still waits."""
        return await self._store.run(_undelivered, time.time())

    async def aclose(self) -> None:
        await self._store.aclose()



class Jobs:
    """The long ops ``agent`` accepted, from their ``<accepted>`` to their outcome's receipt: the running
    ones and the callers attached to them in memory, every job in ``path`` (None: in memory only, for an
    agent without a state directory). ``requests`` is the agent's request log, which keeps a job's final
    outcome for a repeat of its request."""

    def __init__(self, agent: Agent, path: Path | None, requests: RequestLog) -> None:
        self.agent = agent
        self.requests = requests
        self.store = JobStore(path)
        self.running: dict[str, tuple[Job, asyncio.Future[None]]] = {}  # job id -> (job, its end)
        self.delivering: dict[str, str] = {}  # job id (or "job caller") -> caller, of outcomes sent until a receipt
        self.attached: dict[str, set[str]] = {}  # job id -> callers that repeated its request while it runs
        # Jobs a previous run left running: those whose work may go on are followed (or interrupted) on the
        # first session, when the kind's work can reach its peers (Agent.follow_job); the others end now,
        # sent with the other outcomes on the first session.
        self._left_running: list[Job] | None = []
        for job in self.store.left_running():
            if job.work:
                self._left_running.append(job)
            else:
                self._interrupt(job)

    async def get(self, job_id: str) -> Job | None:
        """The job ``job_id`` as its record says, running or ended (for ``job.status``)."""
        return await self.store.get(job_id)

    async def wait(self, job_id: str, timeout: float) -> None:
        """Return when the job ``job_id`` ends, or after ``timeout`` seconds (at once if it is not running)."""
        running = self.running.get(job_id)
        if running is not None and timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(running[1]), timeout)

    async def accept(self, spec: OpSpec, call: Call, args: dict[str, Any], reply_to: str, key: tuple[str, str],
                     fp: str, deadline: float) -> Answer:
        """Accept an admitted long op as a job for ``reply_to`` (the caller's full JID), which waits until
        ``deadline`` (Unix time): on disk first, then run; the answer names the job, or says why it was not
        started. ``key`` and ``fp`` are its request's in the request log."""
        call.reply_to, call.job = reply_to, uuid.uuid4().hex
        job = Job(call.job, spec.name, call.caller, key[0], reply_to, call.rid, fp, time.time(), deadline)
        try:  # on disk before it is accepted: after a crash it is reported, never forgotten
            await self.store.accepted(job)
        except sqlite3.Error as exc:
            log.exception("could not record job %s", job.job)
            return Answer(error=InternalError(f"{spec.name} was not started: its job could not be recorded ({exc})"))
        loop = asyncio.get_running_loop()
        self.running[job.job] = (job, loop.create_future())
        # Directed presence (RFC 6121 4.6): the server sends the caller our unavailable presence
        # the moment this session ends, so a caller waiting on the job learns it at once.
        self.agent.presence(reply_to)
        answer = Answer(job=job.job, job_end=loop.create_future(), admitted=True)
        self.agent.spawn(self._run(spec, call, args, answer, key, fp))
        return answer

    def send_progress(self, call: Call, seq: int, payload: Any) -> None:
        """Report the progress of ``call``'s job to its caller, as its ``seq``-th report."""
        msg = self.agent.xmpp.make_message(mto=call.reply_to)
        msg["vertebra_progress"]["job"] = call.job
        msg["vertebra_progress"]["rid"] = call.rid
        msg["vertebra_progress"]["seq"] = str(seq)
        msg["vertebra_progress"].xml.text = protocol.encode(payload, what="a progress report")
        msg.send()

    async def follows(self, job_id: str, work: str) -> None:
        """Name ``work`` on a running job's record: the durable work it waits on (``Call.follows``)."""
        if job_id in self.running:
            await self.store.follows(self.running[job_id][0], work)

    async def _run(self, spec: OpSpec, call: Call, args: dict[str, Any], answer: Answer,
                   key: tuple[str, str], fp: str) -> None:
        try:
            end = ("ok", "", await self.agent.execute(spec, call, args))
        except OpError as exc:
            end = (exc.outcome.value, exc.condition, protocol.encode(exc.text[:4000]))
        assert answer.job_end is not None, "a long op's answer carries its job's end"
        answer.job_end.set_result(end)
        if spec.changes_state:
            await self.requests.finish_job(key, fp, end)
        job, ended = self.running.pop(call.job)
        try:
            await self.store.ended(job, end)
        except sqlite3.Error:  # the outcome still goes out; only a restart before it arrives would lose it
            log.exception("could not record the end of job %s", job.job)
        ended.set_result(None)
        await self._deliver(job)

    def _interrupt(self, job: Job) -> None:
        self.store.interrupt(job, self.agent.name)
        log.warning("job %s (%s for %s) was cut off when %s stopped: reporting it interrupted", job.job, job.op,
                    job.caller, self.agent.name)

    def on_session(self) -> None:
        """On each new session: on the first, follow again the jobs a previous run left running whose work
        goes on; on every one, tell the callers of running jobs we are here, and send every outcome not
        acknowledged yet (``_resend``)."""
        if self._left_running is not None:
            self._recover(self._left_running)
            self._left_running = None
        self.agent.spawn(self._resend(), name=f"jobs of {self.agent.name}")

    def _recover(self, jobs: list[Job]) -> None:
        """Follow again each job a previous run left running whose work carries on (``Agent.follow_job``):
        it stays running, a repeat of its request attaches to it, and its real outcome is delivered; end
        the others as interrupted (sent with the other outcomes by ``_resend``)."""
        from .agent import Call  # the agent's module imports this one

        loop = asyncio.get_running_loop()
        for job in jobs:
            spec = self.agent.ops.get(job.op)
            call = Call(self.agent, job.caller, job.rid, [], loop.time() + max(0.0, job.deadline - time.time()),
                        reply_to=job.reply_to, job=job.job)
            work = self.agent.follow_job(job, call) if spec is not None else None
            if work is None:
                self._interrupt(job)
                continue
            assert spec is not None
            log.info("job %s (%s for %s) follows %s, resumed after %s restarted", job.job, job.op, job.caller,
                     job.work, self.agent.name)
            answer = Answer(job=job.job, job_end=loop.create_future(), admitted=True)
            key = (job.sender, job.rid)
            self.requests.follow(key, job.fingerprint, answer)
            self.running[job.job] = (job, loop.create_future())
            call.waits_on = work
            self.agent.spawn(self._run(spec, call, {}, answer, key, job.fingerprint))
            self.agent.spawn(self._reattach(answer))

    async def _reattach(self, answer: Answer) -> None:
        """Attach again the callers that repeated a followed job's request before the restart."""
        for to, rid, deadline in await self.store.attached(answer.job):
            self.agent.spawn(self._attached_until_end(answer, to, rid, deadline))

    async def _resend(self) -> None:
        """Direct presence again to the callers of running jobs (the server forgot the old session's), and
        send every outcome not yet acknowledged (those of jobs a previous run of this agent left running
        too: ended as interrupted when it started)."""
        for job, _end in self.running.values():
            self.agent.presence(job.reply_to)
            for attached in self.attached.get(job.job, ()):
                self.agent.presence(attached)
        for job in await self.store.undelivered():
            if job.job not in self.delivering:
                self.agent.spawn(self._deliver(job), name=f"outcome of job {job.job}")
        for copy in await self.store.attached_undelivered():  # to callers that repeated the request
            if f"{copy.job} {copy.reply_to}" not in self.delivering:
                self.agent.spawn(self._deliver(copy, attached=True),
                                 name=f"outcome of job {copy.job} to {copy.reply_to}")

    async def repeated(self, answer: Answer, to: str, rid: str, deadline: float) -> None:
        """``to`` repeated the request of the job ``answer`` names, under ``rid``, and waits until
        ``deadline`` (Unix time). Unless it is the session the job answers already (its own delivery
        reaches it), it is attached to the job like the first caller: on the job's record when this
        returns, so send its ``<accepted>`` only then (a job is on disk before its own is sent, too) and
        its outcome reaches it after a restart as well (``JobStore.attach``); then the outcome is sent
        to it until its own receipt comes."""
        if any(job.job == answer.job and job.reply_to == to for job, _ in self.running.values()):
            return
        try:
            await self.store.attach(answer.job, to, rid, deadline)
        except sqlite3.Error:
            log.exception("could not record that %s repeated the request of job %s", to, answer.job)
        self.agent.spawn(self._attached_until_end(answer, to, rid, deadline))

    async def _attached_until_end(self, answer: Answer, to: str, rid: str, deadline: float) -> None:
        """An attached caller: directed presence while the job runs (so it hears at once if this agent goes
        offline), then the job's one outcome, sent until its receipt comes or ``deadline`` has passed."""
        assert answer.job_end is not None, "a long op's answer carries its job's end"
        if not answer.job_end.done():
            callers = self.attached.setdefault(answer.job, set())
            callers.add(to)
            self.agent.presence(to)
            try:
                await asyncio.shield(answer.job_end)
            finally:
                callers.discard(to)
                if not callers:
                    self.attached.pop(answer.job, None)
        status, condition, payload = await asyncio.shield(answer.job_end)  # its record may not say so yet
        job = Job(answer.job, "", "", "", to, rid, "", time.time(), deadline, "ended", status, condition, payload)
        await self._deliver(job, attached=True)

    async def _deliver(self, job: Job, *, attached: bool = False) -> None:
        """Send a job's outcome until the caller's XEP-0184 receipt says it arrived, the server bounces
        it (the caller's session is gone), or the caller's deadline has passed: an outcome lost while
        the server restarted is sent again. ``job.status`` still has it afterwards. ``attached``: to a
        caller that repeated the job's request (``job`` then stands for its copy: its address, deadline
        and the job's outcome), whose receipt is not the job's own."""
        agent = self.agent
        msg_id = outcome_id(job.job, job.rid, job.reply_to)
        backoff = Backoff(base=1.0, cap=15.0)
        delivering = f"{job.job} {job.reply_to}" if attached else job.job
        self.delivering[delivering] = job.reply_to
        try:
            while (left := job.deadline - time.time()) > 0:
                arrived = agent.vertebra.expect_receipt(msg_id)
                if agent.online:
                    agent.presence(job.reply_to)  # one more: a caller that came back learns we are here
                    self.send_outcome(job.end, job.reply_to, job.job, job.rid)
                try:
                    received = await asyncio.wait_for(asyncio.shield(arrived), min(backoff.next(), left))
                except TimeoutError:
                    continue
                if received and attached:
                    await self.store.attached_delivered(job.job, job.reply_to)
                elif received:
                    await self.store.delivered(job)
                else:
                    log.info("the outcome of job %s was bounced: %s is gone; job.status keeps it", job.job,
                             job.reply_to)
                return
        finally:
            del self.delivering[delivering]
            agent.vertebra.forget_receipt(msg_id)
            if agent.online and not self._jobs_for(job.reply_to) and not agent.is_broker(job.reply_to):
                # Directed unavailable presence takes the caller off the server's list of whom to tell
                # when we go (RFC 6121 4.6.3), which would otherwise grow with every caller for as long
                # as this session lasts. Never to a broker: it lists us by our presence.
                agent.xmpp.make_presence(pto=job.reply_to, ptype="unavailable").send()

    def _jobs_for(self, reply_to: str) -> bool:
        """Whether a job of ``reply_to``'s still runs here, or its outcome is still on its way."""
        return reply_to in self.delivering.values() or any(j.reply_to == reply_to for j, _ in self.running.values())

    def send_outcome(self, end: tuple[str, str, str], to: str, job: str, rid: str) -> None:
        """Send a job's outcome (status, condition, encoded payload) to ``to`` once."""
        msg = self.agent.xmpp.make_message(mto=to)
        # The same id on every resend, with a request for an XEP-0184 receipt, which answers to it.
        msg["id"] = outcome_id(job, rid, to)
        ET.SubElement(msg.xml, f"{{{protocol.RECEIPTS}}}request")
        outcome = msg["vertebra_outcome"]
        outcome["job"], outcome["rid"], outcome["status"] = job, rid, end[0]
        if end[1]:
            outcome["condition"] = end[1]
        outcome.xml.text = end[2]
        msg.send()

    async def aclose(self) -> None:
        await self.store.aclose()


def outcome_id(job: str, rid: str, to: str) -> str:
    """The message id of a job's outcome for one caller of it (a repeat from another session gets its own,
    so each caller's receipt answers for its own copy)."""
    return f"outcome-{job}-{rid}-{hashlib.sha256(to.encode()).hexdigest()[:12]}"


_COLUMNS = ", ".join(f.name for f in fields(Job))


def _row(row: tuple[Any, ...]) -> Job:
    job = Job(*row)
    job.delivered = bool(job.delivered)
    return job


def _put(db: sqlite3.Connection, job: Job) -> None:
    db.execute(f"INSERT OR REPLACE INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * len(fields(Job)))})",
               astuple(job))


def _get(db: sqlite3.Connection, job_id: str) -> Job | None:
    row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job = ?", (job_id,)).fetchone()
    return _row(row) if row else None


def _running(db: sqlite3.Connection) -> list[Job]:
    return [_row(r) for r in db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state = 'running'")]


def _undelivered(db: sqlite3.Connection, now: float) -> list[Job]:
    return [_row(r) for r in db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state = 'ended' AND NOT delivered"
                                        " AND deadline > ?", (now,))]


def _attach(db: sqlite3.Connection, job: str, reply_to: str, rid: str, deadline: float) -> None:
    db.execute("INSERT OR REPLACE INTO attached (job, reply_to, rid, deadline) VALUES (?, ?, ?, ?)",
               (job, reply_to, rid, deadline))


def _attached(db: sqlite3.Connection, job: str, now: float) -> list[tuple[str, str, float]]:
    return list(db.execute("SELECT reply_to, rid, deadline FROM attached WHERE job = ? AND NOT delivered"
                           " AND deadline > ?", (job, now)))


def _attached_undelivered(db: sqlite3.Connection, now: float) -> list[Job]:
    columns = ", ".join(f"a.{f.name}" if f.name in ("reply_to", "rid", "deadline") else f"j.{f.name}"
                        for f in fields(Job))
    return [_row(r) for r in db.execute(f"SELECT {columns} FROM jobs j JOIN attached a ON a.job = j.job"
                                        " WHERE j.state = 'ended' AND NOT a.delivered AND a.deadline > ?", (now,))]


def _attached_delivered(db: sqlite3.Connection, job: str, reply_to: str) -> None:
    db.execute("UPDATE attached SET delivered = 1 WHERE job = ? AND reply_to = ?", (job, reply_to))


def _forget_before(db: sqlite3.Connection, horizon: float) -> None:
    db.execute("DELETE FROM jobs WHERE state = 'ended' AND ended_at < ?", (horizon,))
    db.execute("DELETE FROM attached WHERE job NOT IN (SELECT job FROM jobs)")
