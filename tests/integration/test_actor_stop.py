"""Stopping an actor cancels every task it started: a request still being served, a long op's job,
the announcer that keeps telling an absent broker about the agent, the audit flusher and a pending
reconnect. Nothing of a stopped actor keeps running on the event loop."""

from __future__ import annotations

import asyncio

from conftest import DOMAIN, until
from sample_agent import SampleAgent


def started_by(actor) -> list[asyncio.Task]:
    """The event loop's unfinished tasks whose coroutine is a method of ``actor``, its intake or its jobs."""
    owners = [owner for owner in (actor, getattr(actor, "intake", None), getattr(actor, "jobs", None))
              if owner is not None]
    return [t for t in asyncio.all_tasks() if not t.done()
            and getattr(t.get_coro(), "cr_frame", None) is not None
            and t.get_coro().cr_frame.f_locals.get("self") in owners]


async def test_stop_cancels_every_task_the_actor_started(mesh):
    # A broker account nobody logs in as: the agent keeps announcing itself to it until stopped.
    jid, password = mesh.account("sample")
    agent = await mesh.start(SampleAgent(jid, password, mesh.endpoint, resources=["/host/a"], authorizer=mesh.admins,
                                         broker=f"absent-broker@{DOMAIN}", state_dir=mesh.home / "stop-state"))
    client = await mesh.client()
    calls = [asyncio.ensure_future(client.request(str(agent.jid), "sample.sleep", {"seconds": 60}, timeout=60)),
             asyncio.ensure_future(client.request(str(agent.jid), "sample.steps", {"steps": 10_000}, timeout=60))]
    try:
        await until(lambda: agent.intake.tasks and any("Jobs._run" in repr(t.get_coro()) for t in agent._tasks),
                    what="the sleeping request being served and the long op's job running")
        await until(lambda: agent._announcer is not None and agent._audit_flusher is not None,
                    what="the announcer and the audit flusher running")
        tasks = set(agent._tasks)
        assert len(tasks) >= 4, tasks
        assert started_by(agent), "the test should see the agent's own tasks running before stop"

        await agent.stop()

        assert all(t.done() for t in tasks), [t for t in tasks if not t.done()]
        assert not agent._tasks
        assert not started_by(agent), started_by(agent)
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


async def test_event_handlers_run_as_the_actors_tasks(mesh):
    """A handler given to ``Actor.on_event`` runs whether it is an ``async def`` or a plain function (a
    lambda) returning a coroutine, and one still running when the actor stops is cancelled."""
    client = await mesh.client()
    seen: list[str] = []
    blocked = asyncio.Event()

    async def note(what: str) -> None:
        seen.append(what)

    async def forever(_data) -> None:
        blocked.set()
        await asyncio.Event().wait()

    client.on_event("vertebra_test", lambda data: note(f"lambda {data}"))
    client.on_event("vertebra_test", forever)
    client.xmpp.event("vertebra_test", "fired")
    await until(lambda: seen == ["lambda fired"] and blocked.is_set(), what="both handlers running")
    handlers = [t for t in client._tasks if "vertebra_test" in t.get_name()]
    assert len(handlers) == 1, handlers  # the lambda's coroutine has ended; ``forever`` has not

    await client.stop()

    assert all(t.done() for t in handlers)
    assert not started_by(client), started_by(client)
