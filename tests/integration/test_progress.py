"""Progress people can watch, through a real mesh: the storage agent's byte counts of a snapshot and a
clone on the embedded driver, shown by the `vertebra` command line as plain lines when its stderr is a
pipe, and as a redrawn bar with bytes, rate and time left when it is a terminal (a pty); a call to
several agents shows how many have answered."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, running, vertebra

MIB = 1024 * 1024
AGENTS = [{"name": "pstore", "kind": "storage", "resources": ["/host/progress"], "gateway": True},
          {"name": "pother", "kind": "storage", "resources": ["/host/progress-other"]}]


@pytest.fixture
def mesh_with_data(mesh_home):
    """Two storage agents; the volume db on one of them holding 6 MiB in two files (one with two names)."""
    home = mesh_home(AGENTS)
    with running(home, expect_agents=2):
        made = vertebra(home, "call", "storage.volume.create", "volume=db", "--json")
        assert made.returncode == 0, made.stdout + made.stderr
        path = Path(json.loads(made.stdout)["results"][0]["result"]["path"])
        (path / "big.bin").write_bytes(os.urandom(5 * MIB))
        (path / "small.bin").write_bytes(os.urandom(MIB))
        os.link(path / "big.bin", path / "big-again.bin")  # stored once, counted once
        yield home


def test_a_pipe_gets_plain_lines_ending_with_the_byte_counts(mesh_with_data):
    home = mesh_with_data
    snap = vertebra(home, "call", "storage.snapshot.create", "volume=db", "snapshot=s1")
    assert snap.returncode == 0, snap.stdout + snap.stderr
    lines = snap.stderr.splitlines()
    holder = lines[0].split(":")[0] if lines else ""  # the agent the volume was created on
    assert holder.startswith(("pstore", "pother")) and all(line.startswith(holder + ": ") for line in lines), \
        snap.stderr
    assert lines[0] == f"{holder}: capturing volume=db", snap.stderr
    # The last report reached the total, and nothing of a terminal's redrawing is in a pipe.
    assert re.fullmatch(rf"{holder}: capturing volume=db: 6 MiB of 6 MiB \(100%\), [\d.]+ [KMG]?i?B/s", lines[-1]), \
        snap.stderr
    assert "\x1b" not in snap.stderr and "ETA" not in lines[-1]
    assert "storage.snapshot.create: 1 of 1 ok" in snap.stdout  # the result on stdout, progress on stderr

    clone = vertebra(home, "call", "storage.clone.create", "volume=db", "snapshot=s1", "clone=dev")
    assert clone.returncode == 0, clone.stdout + clone.stderr
    # The first clone of a snapshot writes its tree (the base it shares, or a full copy): 6 MiB.
    assert re.search(rf"^{holder}: cloning from=db@s1 clone=dev: 6 MiB of 6 MiB \(100%\), [\d.]+ [KMG]?i?B/s$",
                     clone.stderr, re.M), clone.stderr


def _under_a_terminal(home: Path, *args: str) -> tuple[int, str, str]:
    """Run `vertebra` with its stderr on a pseudo-terminal: (exit code, stdout, what the terminal got)."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "agents.cli", "--home", str(home), *args], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    os.close(slave)
    shown = b""
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError as exc:  # every writer closed: the program has ended
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out, shown.decode(errors="replace")


def test_a_terminal_gets_a_bar_with_bytes_rate_and_time_left(mesh_with_data):
    home = mesh_with_data
    code, out, shown = _under_a_terminal(home, "call", "storage.snapshot.create", "volume=db", "snapshot=s2")
    assert code == 0, out + shown
    # The first byte count is drawn at once: part of the total, its rate and the time left.
    bar = re.search(r"p(store|other)\d*  capturing volume=db  \[#*-*\] \d+%  [\d.]+ [KM]?i?B of 6 MiB"
                    r"  [\d.]+ [KMG]?i?B/s  ETA (<?\d|unknown)", shown)
    assert bar, repr(shown)
    # Redrawn in place and wiped before the result, which goes to stdout alone.
    assert "\x1b[J" in shown and shown.rstrip("\r\n").endswith("\x1b[J"), repr(shown)
    assert "storage.snapshot.create: 1 of 1 ok" in out and "capturing" not in out

    code, out, shown = _under_a_terminal(home, "call", "storage.volume.list")
    assert code == 0, out + shown
    assert re.search(r"\[-+\]  0 of 2 answered", shown) and "2 of 2 answered" in shown, repr(shown)
    assert "storage.volume.list: 2 of 2 ok" in out
