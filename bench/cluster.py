#!/usr/bin/env python3
"""The mesh on a two-node ejabberd cluster (loopback), in one run: what crossing nodes costs.

Measured, with the caller (a Vertebra Client) always on node 1:

1. sequential op round trips (Client.request of a one-argument op) to an agent on the caller's node
   vs to an agent on the other node — p50, p95, ratio; a bare IQ between the same connections,
   for information;
2. scatter/gather (``Client.call(op, args, to=[...])``) to N agents all on the caller's node, all on
   the other node, and spread half and half over both nodes — median wall time, ratio to all-local;
3. how many agents each node held (ejabberd's own count of sessions on that node) and memory per
   agent on the server: the growth of each node's ejabberd RSS (beam.smp) from before the agents
   logged in to after, divided by the agents on that node;
4. the broker's shared state (bench/cluster_state.py): workflow step latency and throughput on etcd
   vs SQLite (ratios), and how long a new leader takes over when the leader hangs or stops.

Agents run in worker processes (many agents per event loop), bench/roundtrip.py's workers; each
worker logs all its agents in to one node, so where an agent lives is known.

Usage::

    python bench/cluster.py            # N = 1,000 (2,000 agents: N per node)
    python bench/cluster.py --quick    # smoke run: N = 100, fewer iterations
    python bench/cluster.py --agents 500

Both nodes, their epmd, every worker and the temporary home are removed at the end, also on Ctrl-C
or error; every wait has a timeout. Nothing is asserted: the exit status is 0 when every call
succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import cluster_state  # noqa: E402  (the broker's shared state on etcd vs SQLite)
import roundtrip as rt  # noqa: E402  (its worker processes, BenchAgent and helpers)
import verdicts  # noqa: E402
from agents.actor import Endpoint  # noqa: E402
from agents.errors import Outcome  # noqa: E402

DOMAIN = rt.DOMAIN
OP = rt.OP
PW = rt.PASSWORD_PREFIX
ANCHOR = "Choria: 50,000 nodes on one broker answered in about 2 s (its Go client)"


class ClusterBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.home = Path(tempfile.mkdtemp(prefix="vertebra-cluster-"))
        self.nodes: list[Any] = []
        self.workers: list[rt.Worker] = []
        self.client: Any = None
        self.rows: list[tuple[str, str, str, str]] = []
        self.notes: list[str] = []
        self.failed = False

    # -- the cluster (blocking; called outside the event loop) --------------------------------------

    def start_cluster(self) -> None:
        from agents.ejabberd import PrivateEjabberd, ejabberd_installed

        if not ejabberd_installed():
            raise SystemExit("ejabberd is not installed: run `apt-get install -y ejabberd`")
        epmd = rt.free_port()  # a private epmd, never the machine's own on 4369
        first = PrivateEjabberd(self.home, DOMAIN, port=rt.free_port(), node_name="bench1@127.0.0.1",
                                epmd_port=epmd)
        second = PrivateEjabberd(self.home, DOMAIN, port=rt.free_port(), node_name="bench2@127.0.0.1",
                                 epmd_port=epmd, cluster_join=first.node_name, tls_from=first.dir)
        self.nodes = [first, second]
        t = time.monotonic()
        first.start(timeout=60)
        second.start(timeout=60)
        print(f"two-node ejabberd cluster on 127.0.0.1:{first.port} and :{second.port}"
              f" ({time.monotonic() - t:.1f}s), home {self.home}", flush=True)

    def stop_cluster(self) -> None:
        for node in reversed(self.nodes):
            try:
                node.stop(timeout=20)
            except Exception as exc:
                print(f"warning: stopping {node.node_name}: {exc}", file=sys.stderr)
        if not self.args.keep:
            shutil.rmtree(self.home, ignore_errors=True)

    def node_rss_kib(self, node: Any) -> int:
        return rt.rss_kib(node.status()["pid"] or 0)

    def sessions_on(self, node: Any) -> int | None:
        with contextlib.suppress(Exception):
            out = node.ctl("stats", "onlineusersnode", timeout=30)
            m = re.search(r"\d+", out)
            return int(m.group()) if m else None
        return None

    # -- helpers ---------------------------------------------------------------------------------

    def row(self, name: str, a: str, b: str, ratio: float | None) -> None:
        r = "" if ratio is None or math.isnan(ratio) else f"{ratio:.2f}x"
        self.rows.append((name, a, b, r))
        print(f"  {name}: {a} | {b} | {r}", flush=True)

    async def spawn(self, node: Any, users: list[str]) -> list[str]:
        """Log ``users`` in as BenchAgents on ``node``, in worker processes; their full JIDs."""
        nworkers = max(1, math.ceil(len(users) / self.args.per_worker))
        chunks = [users[i::nworkers] for i in range(nworkers)]
        start_timeout = 60 + 0.25 * max(len(c) for c in chunks)
        made = await rt.start_workers(self.workers, [{
            "host": node.host, "port": node.port, "domain": DOMAIN, "cert": str(self.nodes[0].cert_path),
            "admins": [self.client_jid], "broker": None, "agents": chunk, "bare": [],
            "concurrency": self.args.login_concurrency, "start_timeout": start_timeout,
        } for chunk in chunks], self.home)
        return [j for w in made for j in w.ready["jids"]]

    async def request_rt(self, to: str, n: int) -> None:
        res = await self.client.request(to, OP, {"n": n}, timeout=10)
        if res.outcome is not Outcome.OK or res.result != n:
            raise RuntimeError(f"request to {to}: {res.outcome.value} {res.error}")

    async def bare_rt(self, to: str, n: int) -> None:
        iq = self.client.xmpp.make_iq_get(ito=to)
        iq["bench_ping"]["n"] = str(n)
        reply = await iq.send(timeout=10)
        if reply["bench_ping"]["n"] != str(n):
            raise RuntimeError(f"bare reply from {to} did not echo {n}")

    async def gather(self, jids: list[str]) -> float:
        t = time.perf_counter()
        report = await self.client.call(OP, {"n": 1}, to=jids, timeout=120)
        elapsed = time.perf_counter() - t
        if report.counts() != {"ok": len(jids)}:
            errors = sorted({r.error or "" for r in report.results if r.error})[:2]
            raise RuntimeError(f"call to {len(jids)} agents: {report.counts()} {'; '.join(e[:200] for e in errors)}")
        return elapsed

    # -- the run ---------------------------------------------------------------------------------

    async def run(self) -> None:
        from agents.client import Client

        args = self.args
        n = args.agents
        first, second = self.nodes
        local_users = [f"l{i:05d}" for i in range(n)]
        remote_users = [f"r{i:05d}" for i in range(n)]
        accounts = {u: PW + u for u in ["bench", "echo1", "echo2", *local_users, *remote_users]}
        t = time.monotonic()
        await asyncio.to_thread(first.register_many, accounts)
        print(f"registered {len(accounts):,} accounts through node 1 in {time.monotonic() - t:.1f}s", flush=True)
        idle_rss = [self.node_rss_kib(x) for x in self.nodes]

        self.client_jid = f"bench@{DOMAIN}"
        endpoint = Endpoint(first.host, first.port, DOMAIN, first.ssl_context())
        self.client = Client(self.client_jid, PW + "bench", endpoint, broker="")
        await self.client.start(timeout=30)

        # 1: one agent on each node, each alone in a worker.
        print("\n[1] op round trip: an agent on the caller's node vs on the other node", flush=True)
        (near,) = await self.spawn(first, ["echo1"])
        (far,) = await self.spawn(second, ["echo2"])
        count, rounds = (200, 3) if args.quick else (1000, 5)
        for fn in (self.request_rt, self.bare_rt):
            for i in range(50):
                await fn(near, i)
                await fn(far, i)
        samples: dict[tuple[str, str], list[float]] = {}
        clock = time.perf_counter
        for _ in range(rounds):  # interleaved, so drift hits both sides alike
            for kind, fn in (("op", self.request_rt), ("bare", self.bare_rt)):
                for where, to in (("near", near), ("far", far)):
                    s = samples.setdefault((kind, where), [])
                    for i in range(count):
                        t0 = clock()
                        await fn(to, i)
                        s.append(clock() - t0)
        for kind, label in (("op", "op round trip"), ("bare", "bare IQ round trip (info)")):
            for p, pname in ((.5, "p50"), (.95, "p95")):
                a = rt.percentile(samples[(kind, "near")], p) * 1e3
                b = rt.percentile(samples[(kind, "far")], p) * 1e3
                self.row(f"{label} {pname}", f"{a:.2f} ms", f"{b:.2f} ms", b / a)

        # 2: N agents on each node.
        print(f"\n[2] starting {n:,} agents on node 1 and {n:,} on node 2", flush=True)
        t = time.monotonic()
        local = await self.spawn(first, local_users)
        print(f"  {len(local):,} on node 1 after {time.monotonic() - t:.1f}s", flush=True)
        t = time.monotonic()
        remote = await self.spawn(second, remote_users)
        print(f"  {len(remote):,} on node 2 after {time.monotonic() - t:.1f}s", flush=True)
        held = [await asyncio.to_thread(self.sessions_on, x) for x in self.nodes]
        full_rss = [self.node_rss_kib(x) for x in self.nodes]
        spread = local[: n // 2] + remote[: n - n // 2]
        reps = 3 if args.quick else 5
        sets = {"all on the caller's node": local, "all on the other node": remote, "spread over both": spread}
        for jids in sets.values():  # warm-up: first contact with each agent
            await self.gather(jids)
        times: dict[str, list[float]] = {k: [] for k in sets}
        for _ in range(reps):
            for k, jids in sets.items():
                times[k].append(await self.gather(jids))
        base = statistics.median(times["all on the caller's node"]) * 1e3
        for k in sets:
            m = statistics.median(times[k]) * 1e3
            self.row(f"scatter/gather to {n:,} agents, {k}", f"{base:,.0f} ms", f"{m:,.0f} ms", m / base)
        spread_ms = statistics.median(times["spread over both"]) * 1e3
        # For comparison only: bench/scale.py (in make bench) measures 50,000 and holds the target.
        self.row("  naive linear extrapolation to 50,000 agents, spread", "2,000 ms (Choria)",
                 f"{spread_ms * 50_000 / n:,.0f} ms", spread_ms * 50_000 / n / 2000)

        # 3: what the nodes held, and what it cost them.
        on_node = [n + 1, n + 1]  # the agents of [2] plus the echo agent of [1]; node 1 also has the client
        for i, node in enumerate(self.nodes):
            grew = full_rss[i] - idle_rss[i]
            self.notes.append(
                f"node {i + 1} ({node.node_name}) held {held[i] if held[i] is not None else '?':,} sessions"
                f" ({on_node[i] + (1 if i == 0 else 0):,} expected); ejabberd RSS {idle_rss[i] / 1024:,.0f} MiB idle"
                f" -> {full_rss[i] / 1024:,.0f} MiB: "
                + (f"~{grew / on_node[i]:,.1f} KiB per agent on the server" if grew > 0
                   else "the growth is below the noise of the VM's own allocation at this N"))
        wrss = [await w.rss() for w in self.workers]
        wbase = [w.ready.get("base_rss_kib", 0) for w in self.workers]
        self.notes.append(f"{2 * n + 2:,} agents in {len(self.workers)} Python worker processes:"
                          f" ~{(sum(wrss) - sum(wbase)) / (2 * n + 2):,.0f} KiB per agent on the agents' side")
        self.notes.append(f"anchor: {ANCHOR}; this run: 2 nodes on one {os.cpu_count()}-core machine,"
                          f" agents and caller on the same machine")

    async def close(self) -> None:
        await rt.stop_workers(self.workers)
        if self.client is not None:
            await rt.quietly(self.client.stop(), 5)

    def cleanup_sync(self) -> None:
        for w in self.workers:
            w.kill()
        self.stop_cluster()

    def table(self) -> None:
        verdicts.print_table(("measurement", "baseline (caller's node)", "measured", "ratio"), self.rows, self.notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: N=100, fewer iterations")
    parser.add_argument("--agents", type=int, default=None, help="agents per node for scatter/gather (1000)")
    rt.add_worker_options(parser)
    args = parser.parse_args(argv)
    args.agents = args.agents or (100 if args.quick else 1000)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    rt.raise_nofile()
    verdicts.begin()
    bench = ClusterBench(args)
    t = time.monotonic()
    ok = rt.drive(bench, lambda: bench.workers, start=bench.start_cluster)
    bench.table()
    # The broker's shared state: workflow steps on etcd vs SQLite, and leader failover on etcd.
    print("\n=== the broker's shared state (bench/cluster_state.py)")
    ok = cluster_state.run(quick=args.quick) and ok
    verdicts.save()
    print(f"\n{'done' if ok else 'FAILED'} ({time.monotonic() - t:.0f}s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
