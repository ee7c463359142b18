"""Test helper: a fencing mesh as real processes (broker and a fencing agent serving the gateway)
over a state directory made by the `mesh_home` fixture, and a way to run fence_vertebra against it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from conftest import ROOT, vertebra


def dummy_device(status_file: Path, **params: str) -> dict[str, Any]:
    return {"agent": "fence_dummy",
            "params": {"type": "file", "status_file": str(status_file), "power_timeout": "2", **params}}


def fencing_settings(devices: dict[str, Any], levels: dict[str, Any], cluster: str = "c1") -> dict[str, Any]:
    return {"cluster": cluster, "fencing": {"devices": devices, "levels": levels}}


@contextlib.contextmanager
def running(home: Path, expect_agents: int = 1) -> Iterator[dict[str, Any]]:
    """Start the broker and every agent of HOME/mesh.yaml as processes; stop them afterwards."""
    cfg = yaml.safe_load((home / "mesh.yaml").read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "agents.cli", "--home", str(home)]
    procs = [subprocess.Popen(base + ["broker"], env=env, cwd=ROOT,
                              stderr=open(home / "broker.log", "w"))]
    procs += [subprocess.Popen(base + ["-v", "agent", a["name"]], env=env, cwd=ROOT,
                               stderr=open(home / f"{a['name']}.log", "w")) for a in cfg["agents"]]
    try:
        out = None
        for _ in range(150):
            out = vertebra(home, "agents", "--json")
            if out.returncode == 0 and len(json.loads(out.stdout)["agents"]) == expect_agents \
                    and (home / "run" / "gateway.sock").exists():
                break
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"agents did not come up: {out and out.stdout} {out and out.stderr}")
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            logs = "\n".join(f.read_text() for f in home.glob("*.log"))
            raise AssertionError(f"{dead} exited early:\n{logs}")
        yield cfg
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def fence_vertebra(stdin: str = "", *argv: str, env: dict[str, str] | None = None,
                   timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run the real fence_vertebra program as Pacemaker would (stdin) or by options (argv)."""
    return subprocess.run(
        [sys.executable, "-m", "agents.fencing.fence_vertebra", *argv],
        input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def wrapper_program(path: Path) -> Path:
    """fence_vertebra as one executable file, for Pacemaker, which runs agents by file name."""
    path.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} "
                    "-m agents.fencing.fence_vertebra \"$@\"\n")
    path.chmod(0o755)
    return path
