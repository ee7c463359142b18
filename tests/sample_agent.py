"""A small agent kind that exists only for the tests: each op exercises one path of the runtime."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from agents.agent import Agent, Call
from agents.errors import OpError
from agents.ops import Arg, op


class SampleAgent(Agent):
    kind = "sample"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.runs = 0

    @op("sample.echo", effect="read", deadline=5)
    async def echo(self, call: Call, text: Annotated[str, Arg("what to send back")],
                   times: Annotated[int, Arg("how often", min=1, max=10)] = 1,
                   mode: Literal["plain", "upper"] = "plain") -> dict:
        """Send the text back."""
        out = text.upper() if mode == "upper" else text
        return {"text": out * times, "caller": call.caller, "resources": call.resources}

    @op("sample.count", effect="change", deadline=5)
    async def count(self, call: Call) -> int:
        """Count how often this op really ran (for idempotency tests)."""
        self.runs += 1
        await asyncio.sleep(0.2)
        return self.runs

    @op("sample.toggle", effect="destructive", deadline=5)
    async def toggle(self, call: Call, target: str) -> int:
        """A destructive op with a visible effect: append a line to a file, return how many it has."""
        with open(target, "a") as f:
            f.write("toggled\n")
        with open(target) as f:
            return len(f.readlines())

    @op("sample.sleep", effect="read", deadline=30)
    async def sleep(self, call: Call, seconds: float) -> str:
        """Sleep, then answer."""
        await asyncio.sleep(seconds)
        return "awake"

    @op("sample.fail", effect="read", deadline=5)
    async def fail(self, call: Call) -> None:
        """Always fail, with a sentence a person can act on."""
        raise OpError("the sample device is unplugged: plug it in and retry")

    @op("sample.crash", effect="read", deadline=5)
    async def crash(self, call: Call) -> None:
        """Raise an unexpected exception."""
        raise RuntimeError("boom")

    @op("sample.steps", effect="destructive", deadline=10, progress=True)
    async def steps(self, call: Call, steps: int = 3) -> dict:
        """A long op: report each step, then finish."""
        for i in range(steps):
            await call.progress({"step": i + 1, "of": steps})
            await asyncio.sleep(0.02)
        return {"done": steps}

    @op("sample.wait", effect="change", deadline=300, progress=True)
    async def wait(self, call: Call, seconds: float) -> str:
        """A long op that reports once, then waits (for tests that cut it off)."""
        await call.progress({"waiting": seconds})
        await asyncio.sleep(seconds)
        return "waited"


if __name__ == "__main__":
    # Run one sample agent as its own process:
    #     python sample_agent.py JID PASSWORD PORT CERT BROKER ADMIN RESOURCE [STATE_DIR]
    import sys
    from pathlib import Path

    from agents.actor import Endpoint
    from agents.authz import AdminsOnly

    jid, password, port, cert, broker, admin, resource = sys.argv[1:8]

    async def main() -> None:
        agent = SampleAgent(jid, password, Endpoint.pinned("127.0.0.1", int(port), "vertebra.test", cert),
                            resources=[resource], broker=broker, authorizer=AdminsOnly([admin]),
                            state_dir=Path(sys.argv[8]) if len(sys.argv) > 8 else None)
        await agent.start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
