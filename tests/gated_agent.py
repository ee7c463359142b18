"""An agent whose ``sample.gated`` op holds until the test lets it finish, and a three-step workflow
around it: a broker instance can then be stopped, suspended or cut off while a step is certainly in
flight, and the test can count how often each step ran."""

from __future__ import annotations

import asyncio
from typing import Any

from agents.agent import Call
from agents.ops import op
from sample_agent import SampleAgent

RELAY = {"name": "relay", "steps": [
    {"name": "first", "op": "sample.count", "on": ["/host/a"]},
    {"name": "gated", "op": "sample.gated", "on": ["/host/a"]},
    {"name": "last", "op": "sample.count", "on": ["/host/a"]}]}


class GatedAgent(SampleAgent):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.gated_runs = 0

    @op("sample.gated", effect="change", deadline=60)
    async def gated(self, call: Call) -> int:
        """Wait for the test, then answer how often this ran."""
        self.gated_runs += 1
        self.entered.set()
        await self.release.wait()
        return self.gated_runs
