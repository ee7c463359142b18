#!/usr/bin/env python3
"""check_vertebra against NRPE and against the bare plugin, and the monitor agent's throughput
against a plain spawn loop, all in one run on this machine.

1. latency, sequential, one check each, run as Nagios runs plugins: as user ``nagios`` (with the group
   ``vertebra`` that may reach the gateway socket), from /tmp, in a clean environment, started
   directly (fork and exec, no shell, no runuser). ``check_vertebra -H bench -c dummy`` goes through
   the local gateway, which knows nagios by its uid (SO_PEERCRED) and calls as the mesh file's
   ``nagios`` service identity, with no password on disk for nagios, to a monitor agent that runs
   check_dummy; vs ``check_nrpe`` with TLS to a local NRPE daemon (Debian nagios-nrpe-server, started
   here on loopback) running the same check_dummy, vs check_dummy alone. Target: check_vertebra p50
   <= 0.5x check_nrpe p50. The start-up probe (also as nagios) has already made the gateway log the
   nagios identity in and learn which agent holds /host/bench, so the timed runs are the steady state
   Nagios sees: one XMPP round trip per check (no discovery).
2. throughput: monitor.check calls with CONCURRENCY in flight from one client vs a plain asyncio
   loop spawning check_dummy with the same concurrency. Target: agent >= 0.8x the spawn loop.

Usage (as root, after deploy/install.sh made the group ``vertebra``): python bench/checks.py [--runs N]
[--seconds S]. User nagios runs the project with Debian's /usr/bin/python3 (tests/readable_python.py:
the checkout's venv, or a readable copy of it). Everything started here (Prosody, broker, agent, NRPE)
is stopped at the end, also on error; the exit status is 0 when both targets are met.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import grp
import pwd
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

sys.path.insert(1, str(ROOT / "tests"))

import verdicts  # noqa: E402
from roundtrip import free_port  # noqa: E402
from readable_python import python_for_others  # noqa: E402
from agents import config as meshconf  # noqa: E402
from agents.cli import start_server, _server  # noqa: E402
from agents.client import Client  # noqa: E402

DUMMY = "/usr/lib/nagios/plugins/check_dummy"
CHECK_NRPE = "/usr/lib/nagios/plugins/check_nrpe"
NRPE = shutil.which("nrpe") or "/usr/sbin/nrpe"
CHECK_VERTEBRA = Path(sys.executable).with_name("check_vertebra")
CONCURRENCY = 16
NAGIOS_USER = "nagios"
GROUP = "vertebra"  # may connect to the gateway socket (deploy/install.sh creates it)


def as_nagios(argv: list[str], extra_env: dict[str, str] | None = None) -> dict:
    """subprocess arguments that start ``argv`` as Nagios starts a plugin: user nagios with its groups and
    ``vertebra``, from /tmp, with only PATH (and what the interpreter needs) in the environment."""
    return {"args": argv, "user": NAGIOS_USER, "group": NAGIOS_USER,
            "extra_groups": [*(g.gr_name for g in grp.getgrall() if NAGIOS_USER in g.gr_mem), GROUP],
            "env": {"PATH": "/usr/bin:/bin", **(extra_env or {})}, "cwd": "/tmp"}


def check_vertebra_argv(home: Path) -> dict:
    """check_vertebra as user nagios runs it: the console script's own call, with an interpreter and
    code nagios can read (tests/readable_python.py)."""
    python, env = python_for_others()
    for entry in filter(None, env.get("PYTHONPATH", "").split(":")):
        if Path(entry, "agents").is_dir():  # bytecode as an installed package has it
            compileall.compile_dir(str(Path(entry, "agents")), quiet=1)
    code = "import sys; from agents.monitor.check_vertebra import main; sys.exit(main())"
    return as_nagios([python, "-c", code, "--home", str(home), "-H", "bench", "-c", "dummy"], env)


def timed(how: dict, runs: int, expect: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run(**how, capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - start)
        if out.returncode != expect:
            raise SystemExit(f"{how['args']} exited {out.returncode}, expected {expect}: {out.stdout}{out.stderr}")
    return times


def p(times: list[float], q: float) -> float:
    return sorted(times)[min(len(times) - 1, int(q * len(times)))] * 1000


class Mesh:
    def __init__(self, home: Path) -> None:
        self.home = home
        # The example policy's grant for Nagios: the checks and what finding the agent needs.
        (home / "policy.yaml").write_text(json.dumps({
            "roles": {"admin": {}, "nagios": {}},
            "members": {"admin": ["operator@vertebra.test"], "nagios": ["nagios@vertebra.test"]},
            "grants": [{"role": "admin", "ops": ["**"]},
                       {"role": "nagios", "ops": ["mesh.discover", "monitor.check"]}]}))
        (home / "mesh.yaml").write_text(json.dumps({
            "server": {"port": free_port()}, "broker": "broker", "operator": "operator", "policy": "policy.yaml",
            "services": [{"name": "nagios", "unix_user": NAGIOS_USER}],
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
        probe = check_vertebra_argv(self.home)
        while (done := subprocess.run(**probe, capture_output=True, text=True)).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"check_vertebra as {NAGIOS_USER} did not get an answer: {done.stdout}{done.stderr}"
                                 f" (see {self.home})")
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
        while subprocess.run(**self.check_argv(), capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the NRPE daemon did not answer")
            time.sleep(0.1)

    def check_argv(self) -> dict:
        """check_nrpe as Nagios runs it (as nagios, from /tmp)."""
        return as_nagios([CHECK_NRPE, "-H", "127.0.0.1", "-p", str(self.port), "-c", "check_dummy"])

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
    try:
        grp.getgrnam(GROUP)
        pwd.getpwnam(NAGIOS_USER)
    except KeyError as missing:
        print(f"missing {missing}: the user nagios (nagios4-core) and the group vertebra (deploy/install.sh)",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("run as root: the benchmark starts check_vertebra and check_nrpe as user nagios", file=sys.stderr)
        return 2
    # Bytecode as an installed package has it (pip compiles on install): a shell with
    # PYTHONDONTWRITEBYTECODE set would otherwise make every check_vertebra compile what it imports.
    for package in ("agents", "rbac"):
        compileall.compile_dir(str(ROOT / package), quiet=1)
    verdicts.begin()
    home = Path(tempfile.mkdtemp(prefix="vertebra-bench-checks-", dir="/tmp"))  # the gateway lets nagios in
    mesh, nrpe = Mesh(home), Nrpe(home)
    try:
        mesh.start()
        nrpe.start()
        vertebra = timed(check_vertebra_argv(home), ns.runs, 0)
        via_nrpe = timed(nrpe.check_argv(), ns.runs, 0)
        alone = timed(as_nagios([DUMMY, "0", "bench"]), ns.runs, 0)
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
                        ("check_dummy alone", alone)):  # each as user nagios
        print(f"  {name:<26} {p(times, 0.5):8.1f} {p(times, 0.95):8.1f}")
    print(f"  check_vertebra / check_nrpe p50: {latency_ratio:.2f}x (target <= 0.5x)"
          f" {'MET' if latency_ratio <= 0.5 else 'MISS'}")
    print(f"throughput, {CONCURRENCY} in flight, {ns.seconds:g} s each")
    print(f"  monitor agent (monitor.check dummy)  {agent:8.1f} checks/s")
    print(f"  plain asyncio spawn loop             {spawn:8.1f} checks/s")
    print(f"  agent / spawn loop: {rate_ratio:.2f}x (target >= 0.8x) {'MET' if rate_ratio >= 0.8 else 'MISS'}")
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ok = verdicts.record("check_vertebra p50 / check_nrpe (TLS) p50", f"{latency_ratio:.2f}x", "<= 0.5x",
                         latency_ratio <= 0.5)
    ok &= verdicts.record("monitor agent checks/s / spawn loop", f"{rate_ratio:.2f}x", ">= 0.8x", rate_ratio >= 0.8)
    verdicts.save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
