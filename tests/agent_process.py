"""A gated agent (tests/gated_agent.py) in a process of its own, so that it can run on a simulated host
(``ip netns exec``) and be cut off with it.

``spawn_agent`` starts it and returns once it has its session. The test drives it over stdin, one
command a line, and each command is answered on stdout with one JSON line of what the agent has done:
``state`` (only that), ``release`` (let the gated op finish). The agent stops when its stdin closes,
however the test ends.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent


class AgentProcess:
    """The running agent: ``state()`` is ``{"runs", "gated_runs", "entered", "term"}`` (``term``: the
    newest term it has seen from its broker)."""

    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc, self.log = proc, log
        self._lock = threading.Lock()  # one command and its answer at a time

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the agent process has ended; see {self.log}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def state(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.ask, "state")

    async def release(self) -> None:
        await asyncio.to_thread(self.ask, "release")

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def spawn_agent(settings: dict[str, Any], path: Path, wrap: Sequence[str] = ()) -> AgentProcess:
    """Start the agent ``settings`` describes (written to ``path``: jid, password, host, port, domain,
    cert, resources, broker, admins, state_dir), through ``wrap`` if given; returns once it is online."""
    path.write_text(json.dumps(settings))
    log = path.with_suffix(".log")
    proc = subprocess.Popen([*wrap, sys.executable, str(Path(__file__)), str(path)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"),
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":  # the program exits (empty line) if it cannot start
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the agent did not start; see {log}")
    return AgentProcess(proc, log)


async def _run(s: dict[str, Any]) -> None:
    from agents.actor import Endpoint
    from agents.authz import AdminsOnly
    from gated_agent import GatedAgent

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=s["cert"])
    agent = GatedAgent(s["jid"], s["password"], Endpoint(s["host"], s["port"], s["domain"], ctx),
                       resources=s["resources"], broker=s["broker"], state_dir=Path(s["state_dir"]),
                       authorizer=AdminsOnly(s["admins"]))
    await agent.start(timeout=30)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        async for line in reader:  # ends when the test closes our stdin
            if line.strip() == b"release":
                agent.release.set()
            print(json.dumps({"runs": agent.runs, "gated_runs": agent.gated_runs, "entered": agent.entered.is_set(),
                              "term": agent._terms.newest(s["broker"])}), flush=True)
    finally:
        await agent.stop()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_run(json.loads(Path(sys.argv[1]).read_text())))
