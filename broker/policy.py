"""Policy distribution: the broker holds the mesh's authorization policy and pushes it to agents.

``policy.reload`` (an authorized op like any other) re-reads the broker's policy file, lints it and
checks its examples; a refused file leaves the last good version in force everywhere and says why.
An accepted one is pushed to every agent in the directory with ``policy.install`` (which agents take
from their broker only, see ``agents.policy_sync``), and to each agent as it joins. The broker also
re-pushes the current version now and then, which restarts each agent's policy age: an agent that
stops hearing from its broker refuses destructive ops once its copy is older than policy_max_age.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

from agents.agent import Call
from agents.authz import PolicyAuthorizer, policy_of
from agents.errors import OpError
from agents.ops import op
from agents.policy_sync import INSTALL_OP

log = logging.getLogger(__name__)

PUSH_TIMEOUT = 10.0
REPUSH_INTERVAL = 60.0  # seconds between confirmations; keep it well under any agent's max age


async def push(broker: Any, targets: list[str], op_name: str, args: dict[str, Any], what: str,
               session: str | None = None) -> dict[str, str]:
    """Send one install op to every target at once; returns each target's error ("" when it took it).
    ``session`` is the broker session the push was decided in (a listing's, or one whose state was read
    for it): once another session has begun, nothing is sent and nothing returned, as each agent that
    session lists is pushed then (on_join), with what is read for it."""
    if session is not None and broker.session != session:
        return {}
    results = await asyncio.gather(*(broker.request(jid, op_name, args, timeout=PUSH_TIMEOUT) for jid in targets))
    out = {r.target: ("" if r.outcome.value == "ok" else str(r.error)) for r in results}
    for jid, error in out.items():
        if error:
            log.warning("pushing %s to %s failed: %s", what, jid, error)
    return out


class PolicyDistribution:
    """A component of the broker (broker/service.py): the ``policy.reload`` op and the pushes, sent
    through ``broker``, whose authorizer is the policy (replaced, at times, while it runs)."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self._policy_text: str | None = None
        self._policy_issued = 0.0
        self._repusher: asyncio.Task[None] | None = None

    def _policy_authorizer(self) -> PolicyAuthorizer | None:
        return policy_of(self.broker.authorizer)

    @op("policy.reload", effect="destructive", deadline=60)
    async def policy_reload(self, call: Call) -> dict:
        """Re-read the mesh's policy file, install it here if it is valid, and push it to every agent."""
        authorizer = self._policy_authorizer()
        source = authorizer.source if authorizer is not None else None
        if authorizer is None or source is None:
            raise OpError("this mesh runs without a policy file (admins only): add `policy: FILE` to the"
                          " mesh file and restart the broker")
        try:
            text = source.read_text(encoding="utf-8")
        except OSError as exc:
            raise OpError(f"cannot read the policy file {source}: {exc.strerror}") from None
        result = authorizer.load(text)
        if not result.ok:
            raise OpError(f"{source}: {result}")
        authorizer.digest = hashlib.sha256(text.encode()).hexdigest()
        self._policy_text, self._policy_issued = text, time.time()
        pushed = await self.push_policy()
        out = {"version": result.version, "agents": len(pushed), "failed": {j: e for j, e in pushed.items() if e}}
        broker = self.broker
        if call.via != broker.jid.bare:
            # The broker's other instances (one per cluster node) reload too, or their re-pushes would
            # bring the old version back; asked for the same person, so they decide as here.
            answers = await asyncio.gather(*(broker.request(j, "policy.reload", {}, behalf=call.caller,
                                                            timeout=PUSH_TIMEOUT)
                                             for j in sorted(broker.leadership.siblings)))
            out["instances"] = {r.target: "ok" if r.outcome.value == "ok" else f"{r.outcome.value}: {r.error}"
                                for r in answers}
        return out

    def _current_policy(self) -> tuple[str, float] | None:
        authorizer = self._policy_authorizer()
        if self._policy_text is None and authorizer is not None and authorizer.source:
            self._policy_text = authorizer.source.read_text(encoding="utf-8")
            self._policy_issued = time.time()
        return (self._policy_text, self._policy_issued) if self._policy_text is not None else None

    async def push_policy(self, targets: list[str] | None = None, session: str | None = None) -> dict[str, str]:
        """Push the current policy; returns each target's error ("" when it installed it). ``session``: see
        ``push``."""
        current = self._current_policy()
        if current is None:
            return {}
        text, issued = current
        targets = targets if targets is not None else [e.jid for e in self.broker.directory.entries()]
        return await push(self.broker, targets, INSTALL_OP, {"text": text, "issued_at": issued}, "the policy",
                          session)

    def on_join(self, jid: str) -> None:
        """A newly listed agent gets the current policy at once."""
        if self._current_policy() is not None:
            self.broker.spawn(self.push_policy([jid], self.broker.session))
        if self._repusher is None:
            self._repusher = self.broker.spawn(self._repush_forever(), name="policy re-push")

    async def _repush_forever(self) -> None:
        while True:
            await asyncio.sleep(REPUSH_INTERVAL)
            if self._current_policy() is not None:
                self._policy_issued = time.time()  # "still current as of now"
                await self.push_policy()
