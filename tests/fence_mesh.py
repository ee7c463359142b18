"""Test helper: a fencing mesh as real processes (broker and a fencing agent serving the gateway)
over a state directory made by the `mesh_home` fixture, and a way to run fence_vertebra against it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


from conftest import ROOT, running, vertebra  # noqa: F401 (running: the fence tests' mesh)


def dummy_device(status_file: Path, **params: str) -> dict[str, Any]:
    return {"agent": "fence_dummy",
            "params": {"type": "file", "status_file": str(status_file), "power_timeout": "2", **params}}


def fencing_settings(devices: dict[str, Any], levels: dict[str, Any], cluster: str = "c1") -> dict[str, Any]:
    return {"cluster": cluster, "fencing": {"devices": devices, "levels": levels}}


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
