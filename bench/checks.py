#!/usr/bin/env python3
"""check_vertebra against NRPE and against the bare plugin, and the monitor agent's throughput
against a plain spawn loop, all in one run on this machine.

1. latency, sequential, one check each: ``check_vertebra -H bench -c dummy`` (through the local
   gateway, to a monitor agent, which runs check_dummy) vs ``check_nrpe`` with TLS to a local NRPE
   daemon (Debian nagios-nrpe-server, started here on loopback) running the same check_dummy, vs
   check_dummy alone. Target: check_vertebra p50 <= 0.5x check_nrpe p50. The start-up probe has
   already made the gateway log the operator in and learn which agent holds /host/bench, so the
   timed runs are the steady state Nagios sees: one XMPP round trip per check (no discovery).
2. throughput: monitor.check calls with CONCURRENCY in flight from one client vs a plain asyncio
   loop spawning check_dummy with the same concurrency. Target: agent >= 0.8x the spawn loop.

Usage: python bench/checks.py [--runs N] [--seconds S]. Everything started here (Prosody, broker,
agent, NRPE) is stopped at the end, also on error; the exit status is 0 when both targets are met.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import verdicts  # noqa: E402
from agents import config as meshconf  # noqa: E402
from agents.cli import start_server, _server  # noqa: E402
from agents.client import Client  # noqa: E402

DUMMY = "/usr/lib/nagios/plugins/check_dummy"
CHECK_NRPE = "/usr/lib/nagios/plugins/check_nrpe"
NRPE = shutil.which("nrpe") or "/usr/sbin/nrpe"
CHECK_VERTEBRA = Path(sys.executable).with_name("check_vertebra")
CONCURRENCY = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(argv: list[str], runs: int, expect: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - start)
        if out.returncode != expect:
            raise SystemExit(f"{argv[0]} exited {out.returncode}, expected {expect}: {out.stdout}{out.stderr}")
    return times


def p(times: list[float], q: float) -> float:
    return sorted(times)[min(len(times) - 1, int(q * len(times)))] * 1000


class Mesh:
    def __init__(self, home: Path) -> None:
        self.home = home
        (home / "mesh.yaml").write_text(json.dumps({
            "server": {"port": free_port()}, "broker": "broker", "operator": "operator",
            "agents": [{"name": "mon", "kind": "monitor", "resources": ["/host/bench"], "gateway": True,
                        "settings": {"max_concurrent": CONCURRENCY}}]}))
        self.mesh = meshconf.load(home / "mesh.yaml", home)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        start_server(self.mesh)
        base = [sys.executable, "-m", "agents.cli", "--home", str(self.home)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for cmd in (["broker"], ["agent", "mon"]):
            self.procs.append(subprocess.Popen(base + cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                               stderr=open(self.home / f"{cmd[-1]}.log", "wb")))
        deadline = time.monotonic() + 30
        while subprocess.run([str(CHECK_VERTEBRA), "--home", str(self.home), "-H", "bench", "-c", "dummy"],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"the monitor agent did not come up; see {self.home}")
            time.sleep(0.3)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=15)
        _server(self.mesh).stop()


class Nrpe:
    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.config = home / "nrpe.cfg"
        self.config.write_text(
            f"server_port={self.port}\nserver_address=127.0.0.1\nallowed_hosts=127.0.0.1\n"
            f"nrpe_user=nagios\nnrpe_group=nagios\npid_file={home}/nrpe.pid\ndont_blame_nrpe=0\n"
            f"debug=0\ncommand_timeout=10\ncommand[check_dummy]={DUMMY} 0 bench\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([NRPE, "-c", str(self.config), "-f"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run([CHECK_NRPE, "-H", "127.0.0.1", "-p", str(self.port), "-c", "check_dummy"],
                             capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the NRPE daemon did not answer")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


async def agent_rate(mesh: meshconf.MeshConfig, seconds: float) -> float:
    client = Client(mesh.jid(mesh.operator), mesh.password(mesh.operator), mesh.endpoint(), broker=mesh.broker_jid)
    await client.start()
    target = f"{mesh.jid('mon')}/agent"
    done = 0
    try:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                res = await client.request(target, "monitor.check", {"check": "dummy"}, timeout=30)
                if res.outcome.value != "ok" or res.result["code"] != 0:
                    raise SystemExit(f"monitor.check failed: {res}")
                done += 1
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return done / (time.perf_counter() - start)
    finally:
        await client.stop()


async def spawn_rate(seconds: float) -> float:
    done = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            proc = await asyncio.create_subprocess_exec(DUMMY, "0", stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.DEVNULL)
            await proc.communicate()
            done += 1
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=40, help="sequential runs per latency measurement")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each throughput measurement")
    ns = ap.parse_args(argv)
    for need in (DUMMY, CHECK_NRPE, NRPE, str(CHECK_VERTEBRA)):
        if not Path(need).exists():
            print(f"missing {need}: install monitoring-plugins-basic, nagios-nrpe-server, nagios-nrpe-plugin"
                  " and the project (make install)", file=sys.stderr)
            return 2
    # Bytecode as an installed package has it (pip compiles on install): a shell with
    # PYTHONDONTWRITEBYTECODE set would otherwise make every check_vertebra compile what it imports.
    for package in ("agents", "rbac"):
        compileall.compile_dir(str(ROOT / package), quiet=1)
    verdicts.begin()
    home = Path(tempfile.mkdtemp(prefix="vertebra-bench-checks-"))
    mesh, nrpe = Mesh(home), Nrpe(home)
    try:
        mesh.start()
        nrpe.start()
        vertebra = timed([str(CHECK_VERTEBRA), "--home", str(home), "-H", "bench", "-c", "dummy"], ns.runs, 0)
        via_nrpe = timed([CHECK_NRPE, "-H", "127.0.0.1", "-p", str(nrpe.port), "-c", "check_dummy"], ns.runs, 0)
        alone = timed([DUMMY, "0", "bench"], ns.runs, 0)
        agent = asyncio.run(agent_rate(mesh.mesh, ns.seconds))
        spawn = asyncio.run(spawn_rate(ns.seconds))
    finally:
        nrpe.stop()
        mesh.stop()
        shutil.rmtree(home, ignore_errors=True)

    latency_ratio = p(vertebra, 0.5) / p(via_nrpe, 0.5)
    rate_ratio = agent / spawn
    print(f"latency, {ns.runs} sequential runs each     p50 ms   p95 ms")
    for name, times in (("check_vertebra (gateway)", vertebra), ("check_nrpe (TLS)", via_nrpe),
                        ("check_dummy alone", alone)):
        print(f"  {name:<26} {p(times, 0.5):8.1f} {p(times, 0.95):8.1f}")
    print(f"  check_vertebra / check_nrpe p50: {latency_ratio:.2f}x (target <= 0.5x)"
          f" {'met' if latency_ratio <= 0.5 else 'NOT met'}")
    print(f"throughput, {CONCURRENCY} in flight, {ns.seconds:g} s each")
    print(f"  monitor agent (monitor.check dummy)  {agent:8.1f} checks/s")
    print(f"  plain asyncio spawn loop             {spawn:8.1f} checks/s")
    print(f"  agent / spawn loop: {rate_ratio:.2f}x (target >= 0.8x) {'met' if rate_ratio >= 0.8 else 'NOT met'}")
    ok = verdicts.record("check_vertebra p50 / check_nrpe (TLS) p50", f"{latency_ratio:.2f}x", "<= 0.5x",
                         latency_ratio <= 0.5)
    ok &= verdicts.record("monitor agent checks/s / spawn loop", f"{rate_ratio:.2f}x", ">= 0.8x", rate_ratio >= 0.8)
    verdicts.save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
