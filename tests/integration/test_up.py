"""`vertebra up` (what `make run` runs): the whole mesh comes up, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT, free_port


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_up_starts_server_broker_and_agents_and_ctrl_c_stops_them_all(tmp_path):
    home = tmp_path / "up-home"
    home.mkdir()
    mesh = yaml.safe_load((ROOT / "deploy" / "mesh.example.yaml").read_text())
    mesh["server"]["port"] = free_port()
    (home / "mesh.yaml").write_text(yaml.safe_dump(mesh))
    proc = subprocess.Popen([sys.executable, "-m", "agents.cli", "--home", str(home), "up"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        shown = "".join(lines)
        assert "storage   storage1@vertebra.test/agent" in shown, shown
        assert "monitor   monitor1@vertebra.test/agent" in shown
        assert "fencing   fence1@vertebra.test/agent" in shown
        assert "call monitor.check check=load" in shown
        assert _processes_mentioning(str(home)), "nothing runs for this mesh"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()  # its agents die with it (PR_SET_PDEATHSIG); the server is stopped below
            proc.wait()
            subprocess.run([sys.executable, "-m", "agents.cli", "--home", str(home), "server", "stop"], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=30)
    assert _processes_mentioning(str(home)) == []
    assert not (home / "run" / "gateway.sock").exists()
