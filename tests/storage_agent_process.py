"""A storage agent run as a process of its own, for tests that kill it with SIGKILL, optionally at an exact
point in one op's path, so that the kill falls where the test needs it and not wherever a timer happens to
land:

- ``--die-after-running OP``: once OP's implementation has returned (its effect is on the store), before the
  agent records its outcome;
- ``--die-before-answering OP``: once OP's outcome is recorded, just before the agent sends it (the IQ result
  of a quick op, the outcome message of a long op's job).

Either way the process kills itself with SIGKILL, as ``kill -9`` would: no cleanup runs, nothing is flushed.

    python storage_agent_process.py JID PASSWORD PORT CERT ADMIN DRIVER ROOT STATE [--broker JID]
        [--resource PATH] [--die-after-running OP] [--die-before-answering OP]

It prints ``online`` once its session is up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from agents.actor import Endpoint
from agents.authz import AdminsOnly
from agents.storage.agent import StorageAgent


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class DyingStorageAgent(StorageAgent):
    """A storage agent that kills itself at the chosen point of the chosen op (see the module docstring)."""

    def __init__(self, *args: Any, after_running: str = "", before_answering: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.after_running, self.before_answering = after_running, before_answering
        self.answers_to_die_on: set[str] = set()  # rids of long ops whose outcome message is the kill point
        send_outcome = self.jobs.send_outcome

        def send_outcome_or_die(end: tuple[str, str, str], to: str, job: str, rid: str) -> None:
            if rid in self.answers_to_die_on:
                die()
            send_outcome(end, to, job, rid)

        self.jobs.send_outcome = send_outcome_or_die  # type: ignore[method-assign]

    async def perform(self, spec: Any, call: Any, args: dict[str, Any]) -> Any:
        result = await super().perform(spec, call, args)
        if spec.name == self.after_running:
            die()
        if spec.name == self.before_answering and spec.progress:
            self.answers_to_die_on.add(call.rid)
        return result

    def _reply(self, iq: Any, answer: Any) -> Any:
        if iq["vertebra_op"]["name"] == self.before_answering and not answer.job:
            die()
        return super()._reply(iq, answer)


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("jid", "password", "port", "cert", "admin", "driver", "root", "state"):
        parser.add_argument(name)
    parser.add_argument("--broker")
    parser.add_argument("--resource", default="/site/a")
    parser.add_argument("--die-after-running", default="")
    parser.add_argument("--die-before-answering", default="")
    ns = parser.parse_args()

    async def run() -> None:
        agent = DyingStorageAgent(ns.jid, ns.password,
                                  Endpoint.pinned("127.0.0.1", int(ns.port), "vertebra.test", ns.cert),
                                  resources=[ns.resource], broker=ns.broker,
                                  authorizer=AdminsOnly([ns.admin, *([ns.broker] if ns.broker else [])]),
                                  settings={"driver": ns.driver, "root": ns.root}, state_dir=Path(ns.state),
                                  after_running=ns.die_after_running, before_answering=ns.die_before_answering)
        await agent.start()
        print("online", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
