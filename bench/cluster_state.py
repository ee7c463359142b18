#!/usr/bin/env python3
"""Workflow steps on the broker's two shared stores, and how long a new leader takes to take over.

The broker's instances share their state in SQLite files on one machine, or in etcd across machines
(broker/state_etcd.py). On a private Prosody and a private three-member etcd on loopback, measured:

1. step latency: one workflow of STEPS sequential steps (``bench.echo``) run by a broker on each
   store, asked with ``workflow.run`` and waited for: wall time per step, median of the runs; ratio
   etcd / SQLite;
2. step throughput: WORKFLOWS such workflows at once: steps per second; ratio etcd / SQLite;
3. failover on etcd: two broker instances, the leader in a process of its own; the time from
   suspending it (SIGSTOP, as a machine that hangs) until the other leads, and from a clean stop
   (SIGTERM: the lead is given up at once) until the other leads.

Usage::

    python bench/cluster_state.py            # 10 steps, 5 runs, 20 workflows at once
    python bench/cluster_state.py --quick    # smoke run

``bench/cluster.py`` runs it after its ejabberd measurements. Everything it starts is stopped at the
end, also on error; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import verdicts  # noqa: E402
from roundtrip import OP, BenchAgent, free_port  # noqa: E402

from agents.actor import Endpoint  # noqa: E402
from agents.authz import AdminsOnly  # noqa: E402
from agents.client import Client  # noqa: E402
from agents.config import StateConfig  # noqa: E402
from agents.errors import Outcome  # noqa: E402
from agents.server import PrivateServer  # noqa: E402
from broker.service import Broker  # noqa: E402
from etcd_broker import spawn_broker  # noqa: E402  (the private etcd and broker process of the tests)
from etcd_cluster import PrivateEtcd  # noqa: E402

DOMAIN = "vertebra.test"
# etcd's step time at most this many times SQLite's: each step is a few consensus writes (its attempt,
# its start with its performed event, its outcome) and a renewal of the lead, against local file writes.
LATENCY_RATIO_TARGET = 5.0
FAILOVER_TARGET = 10.0  # seconds from a hung leader to the next: the 6 s lease and a 2 s renewal, plus margin


class StateBench:
    def __init__(self, args: argparse.Namespace, home: Path) -> None:
        self.args, self.home = args, home
        self.server = PrivateServer(home / "xmpp", domain=DOMAIN, port=free_port())
        self.etcd = PrivateEtcd(home / "etcd")
        self.actors: list[Any] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.workflows = home / "workflows"
        self.rows: list[tuple[str, str, str, str]] = []

    def start(self) -> None:
        self.server.start()
        self.etcd.start()
        self.server.register_many({"broker": "pw-b", "sqlbroker": "pw-s", "agent": "pw-a", "sqlagent": "pw-a",
                                     "operator": "pw-o"})
        self.workflows.mkdir()
        steps = [{"name": f"s{n}", "op": OP, "on": ["/host/bench"], "args": {"n": n}}
                 for n in range(self.args.steps)]
        (self.workflows / "steps.yaml").write_text(yaml.safe_dump({"name": "steps", "steps": steps}))

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
        self.etcd.stop()
        self.server.stop()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.server.host, self.server.port, DOMAIN, self.server.ssl_context())

    async def start_actor(self, actor: Any) -> Any:
        await actor.start(timeout=30)
        self.actors.append(actor)
        return actor

    async def broker(self, account: str, resource: str, state: StateConfig | None) -> Broker:
        own = self.home / f"{account}-{resource}"
        own.mkdir()
        broker = Broker(f"{account}@{DOMAIN}", "pw-b" if account == "broker" else "pw-s", self.endpoint,
                        resource=resource, state_dir=own, shared_dir=self.home / f"{account}-shared", state=state,
                        authorizer=AdminsOnly([f"operator@{DOMAIN}"]), settings={"workflows": str(self.workflows)})
        (self.home / f"{account}-shared").mkdir(exist_ok=True)
        broker.admit(f"{'agent' if account == 'broker' else 'sqlagent'}@{DOMAIN}", "bench", ["/host/bench"])
        return await self.start_actor(broker)

    async def run(self) -> None:
        etcd_state = StateConfig(endpoints=tuple(self.etcd.endpoints), prefix="/bench")
        on_sqlite = await self.broker("sqlbroker", "broker", None)
        on_etcd = await self.broker("broker", "broker", etcd_state)
        for account, broker in (("agent", "broker"), ("sqlagent", "sqlbroker")):  # an agent for each broker
            await self.start_actor(BenchAgent(f"{account}@{DOMAIN}", "pw-a", self.endpoint, resources=["/host/bench"],
                                              broker=f"{broker}@{DOMAIN}",
                                              authorizer=AdminsOnly([f"operator@{DOMAIN}"])))
        client = await self.start_actor(Client(f"operator@{DOMAIN}", "pw-o", self.endpoint, broker=""))
        for broker in (on_sqlite, on_etcd):
            await until(lambda b=broker: b.leadership.leading and len(b.directory) == 1, 30, "a broker ready")
        latency = {name: await self.step_time(client, b) for name, b in (("SQLite", on_sqlite), ("etcd", on_etcd))}
        rate = {name: await self.step_rate(client, b) for name, b in (("SQLite", on_sqlite), ("etcd", on_etcd))}
        ratio = latency["etcd"] / latency["SQLite"]
        self.rows += [("workflow step latency (median per step)", f"{latency['SQLite'] * 1000:.1f} ms",
                       f"{latency['etcd'] * 1000:.1f} ms", f"{ratio:.2f}x"),
                      (f"step throughput ({self.args.workflows} workflows at once)", f"{rate['SQLite']:.0f}/s",
                       f"{rate['etcd']:.0f}/s", f"{rate['etcd'] / rate['SQLite']:.2f}x")]
        verdicts.record("workflow step latency on etcd vs SQLite", f"{ratio:.2f}x ({latency['etcd'] * 1000:.1f} ms"
                        f" vs {latency['SQLite'] * 1000:.1f} ms)", f"<= {LATENCY_RATIO_TARGET:g}x",
                        ratio <= LATENCY_RATIO_TARGET)
        hung, stopped = await self.failover(on_etcd, etcd_state)
        self.rows += [("failover: leader hung (SIGSTOP) -> next leads", "", f"{hung:.1f} s", ""),
                      ("failover: leader stopped (SIGTERM) -> next leads", "", f"{stopped:.1f} s", "")]
        verdicts.record("leader failover on etcd when the leader hangs", f"{hung:.1f} s", f"<= {FAILOVER_TARGET:g} s",
                        hung <= FAILOVER_TARGET)

    async def run_workflow(self, client: Client, broker: Broker) -> None:
        res = await client.request(str(broker.jid), "workflow.run", {"workflow": "steps", "wait": 50}, timeout=80)
        if res.outcome is not Outcome.OK or res.result["state"] != "done":
            raise RuntimeError(f"a workflow on {broker.jid} did not finish: {res.error or res.result}")

    async def step_time(self, client: Client, broker: Broker) -> float:
        await self.run_workflow(client, broker)  # warm up
        times = []
        for _ in range(self.args.runs):
            t = time.perf_counter()
            await self.run_workflow(client, broker)
            times.append((time.perf_counter() - t) / self.args.steps)
        return statistics.median(times)

    async def step_rate(self, client: Client, broker: Broker) -> float:
        t = time.perf_counter()
        await asyncio.gather(*(self.run_workflow(client, broker) for _ in range(self.args.workflows)))
        return self.args.workflows * self.args.steps / (time.perf_counter() - t)

    async def failover(self, follower: Broker, state: StateConfig) -> tuple[float, float]:
        """Seconds until ``follower`` leads after the leader (a process of its own) hangs; and after
        the leader stops cleanly."""
        results = []
        for how in (signal.SIGSTOP, signal.SIGTERM):
            await follower.leadership.stop_leading()  # let the process take the lead first
            own = self.home / f"leader-{how.name}"
            own.mkdir()
            settings = {"jid": f"broker@{DOMAIN}", "password": "pw-b", "host": self.server.host,
                        "port": self.server.port, "domain": DOMAIN, "cert": str(self.server.cert_path),
                        "resource": f"leader-{how.name.lower()}", "state_dir": str(own), "shared_dir": str(own),
                        "etcd": list(state.endpoints), "prefix": state.prefix, "admins": [f"operator@{DOMAIN}"],
                        "workflows": str(self.workflows), "admit": []}
            proc = await asyncio.to_thread(spawn_broker, settings, self.home / f"leader-{how.name}.json")
            self.procs.append(proc)
            from broker.state_etcd import EtcdLease
            observer = EtcdLease(state, "observer", term=6)
            await until(functools.partial(_leads, observer, settings["resource"]), 30, "the process to lead")
            follower.leadership.start_leading()
            await until(functools.partial(_in_election, observer, 2), 30, "the follower in the election")
            t = time.perf_counter()
            proc.send_signal(how)
            await until(lambda: follower.leadership.leading, 60, "the follower to lead")
            results.append(time.perf_counter() - t)
            await observer.aclose()
        return results[0], results[1]

    def table(self) -> None:
        verdicts.print_table(("measurement", "SQLite", "etcd", "ratio"), self.rows)


async def _leads(observer: Any, resource: str) -> bool:
    found = await observer.leader()
    return found is not None and found[0].endswith("/" + resource)


async def _in_election(observer: Any, count: int) -> bool:
    return len(await observer.holders()) >= count


async def until(predicate: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"no {what} within {timeout:g} s")
        await asyncio.sleep(0.02)


async def _measure(bench: StateBench) -> None:
    try:
        await bench.run()
    finally:
        for actor in reversed(bench.actors):
            await actor.stop()


def run(quick: bool = False, argv: list[str] | None = None) -> bool:
    """Measure and print the table; True when it ran to the end (``bench/cluster.py`` calls this)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 steps, 2 runs, 5 workflows at once")
    parser.add_argument("--steps", type=int, default=None, help="steps per workflow (10)")
    parser.add_argument("--runs", type=int, default=None, help="timed workflows per store (5)")
    parser.add_argument("--workflows", type=int, default=None, help="workflows at once for throughput (20)")
    args = parser.parse_args(argv or [])
    quick = quick or args.quick
    args.steps = args.steps or (5 if quick else 10)
    args.runs = args.runs or (2 if quick else 5)
    args.workflows = args.workflows or (5 if quick else 20)
    with tempfile.TemporaryDirectory(prefix="vertebra-bench-state-") as home:
        bench = StateBench(args, Path(home))
        ok = False
        try:
            bench.start()
            asyncio.run(_measure(bench))
            ok = True
        except BaseException as exc:
            print(f"\nstate benchmark failed: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        finally:
            bench.stop()
        bench.table()
    return ok


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    verdicts.begin()
    ok = run(argv=sys.argv[1:] if argv is None else argv)
    verdicts.save("cluster_state")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
