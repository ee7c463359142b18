#!/usr/bin/env python3
"""Fencing through the mesh against fencing by hand, on one private Prosody, in one run.

Measured, each against a baseline taken in the same run:

1. `fence_dummy` off, run directly (one process, stdin `action=off`), vs `fence_vertebra` off as
   Pacemaker runs it (a new process: mesh file, local gateway, broker discovery, fencing agent,
   `fence_dummy` off, then `fence_dummy` status to verify). Target: added latency <= 100 ms at p50.
   For the breakdown: fence_dummy off+status run directly (what the agent must do to verify),
   the same off through `mesh_call` from a live process (no program start), and fence_vertebra's
   own start (`-o metadata`).
2. Ten concurrent `fence.off` requests for one node vs one request: wall time, and how many device
   actions ran (ten coalesce into one off and one status).

Usage: python bench/fencing.py [--runs N]. The server, the broker and agent processes and the
temporary home are removed at the end; every wait has a timeout. Exit status 0 when the target is met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import verdicts  # noqa: E402
from roundtrip import free_port  # noqa: E402
import yaml  # noqa: E402

from agents import config  # noqa: E402
from agents.server import PrivateServer  # noqa: E402
from agents.session import mesh_call  # noqa: E402

DOMAIN = "vertebra.test"
TARGET_ADDED_MS = 100.0
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000


def timed(argv: list[str], stdin: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60, env=ENV, cwd=ROOT)
    return time.perf_counter() - start, done


class Bench:
    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.home = Path(tempfile.mkdtemp(prefix="vertebra-bench-fencing-"))
        self.state = self.home / "node1.state"
        self.runs_log = self.home / "device-runs.log"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.server: PrivateServer | None = None

    def setup(self) -> None:
        port = free_port()
        counted = self.home / "fence_counted"
        counted.write_text("#!/bin/sh\ninput=$(cat)\n"
                           f'printf "%s\\n" "$input" | grep "^action=" >> {self.runs_log}\n'
                           'printf "%s\\n" "$input" | exec /usr/sbin/fence_dummy\n')
        counted.chmod(0o755)
        params = {"type": "file", "status_file": str(self.state)}
        mesh = {"server": {"domain": DOMAIN, "host": "127.0.0.1", "port": port},
                "broker": "broker", "operator": "operator", "admins": ["operator"],
                "agents": [{"name": "fence1", "kind": "fencing", "gateway": True, "settings": {
                    "cluster": "c1",
                    "fencing": {"devices": {"dummy": {"agent": "fence_dummy", "params": params},
                                            "counted": {"agent": str(counted), "params": params}},
                                "levels": {"node1": [["dummy"]], "node2": [["counted"]]}}}}]}
        (self.home / "mesh.yaml").write_text(yaml.safe_dump(mesh))
        self.server = PrivateServer(self.home, domain=DOMAIN, port=port)
        self.server.start()
        self.mesh = config.load(self.home / "mesh.yaml", self.home)
        self.server.register_many(self.mesh.ensure_passwords())
        base = [sys.executable, "-m", "agents.cli", "--home", str(self.home)]
        for name in ("broker", "fence1"):
            cmd = base + (["broker"] if name == "broker" else ["agent", name])
            self.procs.append(subprocess.Popen(cmd, env=ENV, cwd=ROOT, stderr=open(self.home / f"{name}.log", "w")))
        for _ in range(150):
            listed = subprocess.run(base + ["agents", "--json"], capture_output=True, text=True, env=ENV, cwd=ROOT)
            if listed.returncode == 0 and json.loads(listed.stdout)["agents"] and self.mesh.gateway_socket.exists():
                return
            time.sleep(0.2)
        raise SystemExit("the fencing agent did not come up; see " + str(self.home))

    def teardown(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.server:
            self.server.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    def series(self, argv: list[str], stdin: str, expect: int) -> list[float]:
        """Time `runs` off requests, each from a node that is on; any that does not end off aborts."""
        samples = []
        for _ in range(self.runs):
            self.state.write_text("on")
            took, done = timed(argv, stdin)
            if done.returncode != expect or self.state.read_text() != "off":
                raise SystemExit(f"{argv[-1]} failed (exit {done.returncode}): {done.stderr}")
            samples.append(took)
        return samples

    async def mesh_off(self, node: str) -> float:
        start = time.perf_counter()
        report = await mesh_call(self.mesh, "fence.off", {"cluster": "c1", "node": node},
                                 on=[f"/cluster/c1/node/{node}"], scope="one", timeout=30)
        if not report.ok:
            raise SystemExit(f"fence.off {node} through the mesh failed: {report.to_dict()}")
        return time.perf_counter() - start

    async def in_process(self) -> tuple[list[float], float, float, list[str], list[str]]:
        await self.mesh_off("node1")  # the gateway's first login of this identity is not measured
        samples = []
        for _ in range(self.runs):
            self.state.write_text("on")
            samples.append(await self.mesh_off("node1"))
        self.state.write_text("on")
        self.runs_log.write_text("")
        one = await self.mesh_off("node2")
        one_runs = self.runs_log.read_text().splitlines()
        self.state.write_text("on")
        self.runs_log.write_text("")
        start = time.perf_counter()
        await asyncio.gather(*(self.mesh_off("node2") for _ in range(10)))
        ten = time.perf_counter() - start
        return samples, one, ten, one_runs, self.runs_log.read_text().splitlines()

    def run(self) -> int:
        dummy = ["/usr/sbin/fence_dummy"]
        device = f"type=file\nstatus_file={self.state}\n"
        fv = [sys.executable, "-m", "agents.fencing.fence_vertebra"]
        pcmk = f"action=off\nport=node1\nnodename=node1\ncluster=c1\nvertebra_home={self.home}\n"

        self.series(fv, pcmk, 0)  # warm caches (and the gateway's session) before measuring
        direct = self.series(dummy, "action=off\n" + device, 0)
        verify = []
        for _ in range(self.runs):
            self.state.write_text("on")
            start = time.perf_counter()
            timed(dummy, "action=off\n" + device)
            timed(dummy, "action=status\n" + device)
            verify.append(time.perf_counter() - start)
        through = self.series(fv, pcmk, 0)
        startup = [timed(fv, "action=metadata\n")[0] for _ in range(self.runs)]
        imports = [timed([sys.executable, "-c", "import agents.fencing.fence_vertebra, agents.config,"
                          " agents.session"], "")[0] for _ in range(self.runs)]
        mesh_samples, one, ten, one_runs, ten_runs = asyncio.run(self.in_process())

        added = p50(through) - p50(direct)
        print(f"\nfence off, {self.runs} runs each (ms)            p50      p95")
        rows = [("fence_dummy off, direct (baseline)", direct),
                ("fence_dummy off + status, direct", verify),
                ("fence_vertebra off -> mesh -> agent", through),
                ("mesh_call fence.off from a live process", mesh_samples),
                ("fence_vertebra start alone (metadata)", startup),
                ("python + the mesh runtime's imports", imports)]
        for label, samples in rows:
            print(f"  {label:<42} {p50(samples):7.1f}  {p95(samples):7.1f}")
        print(f"  added latency at p50: {added:.1f} ms (target <= {TARGET_ADDED_MS:.0f} ms);"
              f" of it, verifying by status: {p50(verify) - p50(direct):.1f} ms")
        print(f"\ncoalescing: one fence.off {one * 1000:.1f} ms ({len(one_runs)} device runs: {one_runs});"
              f" ten concurrent {ten * 1000:.1f} ms ({len(ten_runs)} device runs: {ten_runs});"
              f" ratio {ten / one:.2f}x")
        met = verdicts.record("fence_vertebra off: added latency p50", f"{added:.1f} ms",
                              f"<= {TARGET_ADDED_MS:.0f} ms", added <= TARGET_ADDED_MS)
        met &= verdicts.record("ten concurrent fence.off: device runs", str(len(ten_runs)), "2 (one off, one status)",
                               ten_runs == ["action=off", "action=status"])
        verdicts.save()
        print("\ntarget met" if met else "\ntarget NOT met")
        return 0 if met else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="samples per series (default 15)")
    bench = Bench(parser.parse_args().runs)
    verdicts.begin()
    try:
        bench.setup()
        return bench.run()
    finally:
        bench.teardown()


if __name__ == "__main__":
    sys.exit(main())
