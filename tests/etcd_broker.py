"""One broker instance on etcd in a process of its own, for tests that suspend (SIGSTOP) or kill it.

Run as ``python tests/etcd_broker.py SETTINGS`` (a JSON file): it names the account, the server, the
etcd cluster and the agents to admit (``spawn_broker`` writes it). The program prints ``ready`` once
the instance has its session, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent


def spawn_broker(settings: dict[str, Any], path: Path, wrap: Sequence[str] = ()) -> subprocess.Popen[str]:
    """Start the instance ``settings`` describes (written to ``path``), through ``wrap`` if given (on
    a simulated host: ``ip netns exec NS``); returns once it is ready."""
    path.write_text(json.dumps(settings))
    proc = subprocess.Popen([*wrap, sys.executable, str(Path(__file__)), str(path)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=open(path.with_suffix(".log"), "w"),
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the program exits (empty line) if it cannot start
    if line.strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the broker instance did not start; see {path.with_suffix('.log')}")
    return proc


async def _run(s: dict[str, Any]) -> None:
    from agents.actor import Endpoint
    from agents.authz import AdminsOnly
    from agents.config import StateConfig
    from broker.service import Broker

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=s["cert"])
    broker = Broker(s["jid"], s["password"], Endpoint(s["host"], s["port"], s["domain"], ctx),
                    resource=s["resource"], state_dir=Path(s["state_dir"]), shared_dir=Path(s["shared_dir"]),
                    state=StateConfig(endpoints=tuple(s["etcd"]), prefix=s["prefix"]),
                    authorizer=AdminsOnly(s["admins"]), settings={"workflows": s["workflows"]})
    for jid, kind, resources in s["admit"]:
        broker.admit(jid, kind, resources)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await broker.start(timeout=30)
    print("ready", flush=True)
    await stop.wait()
    await broker.stop()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_run(json.loads(Path(sys.argv[1]).read_text())))
