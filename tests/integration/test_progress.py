"""Progress people can watch, through a real mesh: the storage agent's byte counts of a snapshot and a
clone on the embedded driver, shown by the `vertebra` command line as plain lines when its stderr is a
pipe, and as a redrawn bar with bytes, rate and time left when it is a terminal (a pty); a call to
several agents shows how many have answered."""

from __future__ import annotations

import errno
import json
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, running, vertebra

MIB = 1024 * 1024
NOOP_HOOK = {"masking": {"hooks": {"noop": {"argv": ["/bin/true"], "timeout": 30}}}}
AGENTS = [{"name": "pstore", "kind": "storage", "resources": ["/host/progress"], "gateway": True,
           "settings": NOOP_HOOK},
          {"name": "pother", "kind": "storage", "resources": ["/host/progress-other"], "settings": NOOP_HOOK}]


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
    # The command's own lines (the request id, the job it became) aside, the agent's reports follow.
    lines = [line for line in snap.stderr.splitlines() if not line.startswith("vertebra: ")]
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
    cloning = [line for line in clone.stderr.splitlines() if line.startswith(f"{holder}: cloning")]
    assert cloning and cloning[0] == f"{holder}: cloning from=db@s1 clone=dev", clone.stderr
    # A clone that writes a tree (a full copy, or a base its snapshot did not make) counts its bytes to
    # the total: 6 MiB; one over a base the snapshot already made writes none and says only its phase.
    assert len(cloning) == 1 or re.fullmatch(
        rf"{holder}: cloning from=db@s1 clone=dev: 6 MiB of 6 MiB \(100%\), [\d.]+ [KMG]?i?B/s", cloning[-1]), \
        clone.stderr

    # Masking: the hook's phase, then the bytes of the masked snapshot it takes, to their total.
    mask = vertebra(home, "call", "storage.mask", "clone=dev", "snapshot=masked", "hook=noop")
    assert mask.returncode == 0, mask.stdout + mask.stderr
    lines = [line for line in mask.stderr.splitlines() if not line.startswith("vertebra: ")]
    assert lines[0] == f"{holder}: masking clone=dev hook=noop deadline=30 s", mask.stderr
    assert re.fullmatch(rf"{holder}: capturing clone=dev snapshot=masked: ([\d.]+ MiB) of \1 \(100%\), .*/s",
                        lines[-1]), mask.stderr


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


COPY_WORKFLOW = """
name: copy
description: Snapshot a volume (once someone performs it), then clone a snapshot of it.
params:
  volume: {help: "the volume"}
  snapshot: {help: "the new snapshot"}
  source: {help: "the snapshot to clone"}
steps:
  - name: snapshot
    op: storage.snapshot.create
    on: ["/volume/{volume}"]
    args: {volume: "{volume}", snapshot: "{snapshot}"}
    hold: true
  - name: clone
    op: storage.clone.create
    on: ["/volume/{volume}"]
    args: {volume: "{volume}", snapshot: "{source}", clone: "{volume}-{snapshot}"}
"""


class _Follower:
    """`vertebra workflow ACTION WORD... --follow` running in the background; its stderr read line by line."""

    def __init__(self, home: Path, *words: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "agents.cli", "--home", str(home), "workflow", *words,
                                      "--follow"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.lines: queue.Queue[str] = queue.Queue()
        self.said: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put("")

    def until(self, pattern: str) -> None:
        """Wait (at most a minute) for a line of the follower matching ``pattern``."""
        while True:
            line = self.lines.get(timeout=60)
            assert line, f"the follower ended before saying {pattern!r}:\n" + "".join(self.said)
            self.said.append(line)
            if re.search(pattern, line):
                return

    def end(self) -> tuple[int, str, str]:
        """Its exit code, stdout and everything it said on stderr."""
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:  # a follower that does not end is a failure, and is not left behind
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()  # stderr is the reader thread's alone
        while (line := self.lines.get(timeout=60)):
            self.said.append(line)
        return self.proc.returncode, out, "".join(self.said)


def test_workflow_status_follow_shows_each_step_until_the_end(mesh_with_data):
    """A follower started while the instance waits at a held step sees it wait, then sees the step run
    once it is performed, with the bytes its agent reports, and ends with the instance: 0 when done, 1
    when it failed."""
    home = mesh_with_data
    (home / "workflows").mkdir(exist_ok=True)
    (home / "workflows" / "copy.yaml").write_text(COPY_WORKFLOW)

    run = vertebra(home, "workflow", "run", "copy", "volume=db", "snapshot=w1", "source=w1", "--json")
    assert run.returncode == 0, run.stdout + run.stderr  # waiting for a performer is not a failure
    iid = json.loads(run.stdout)["results"][0]["result"]["instance"]
    follower = _Follower(home, "status", iid)
    follower.until(rf"instance {iid} \(copy\): waiting: step snapshot is held")
    # The broker announces changes: a status request given the digest of what the caller has is held
    # until the instance changes (here: performed), well before its wait of 8 s would let it go.
    broker = yaml.safe_load((home / "mesh.yaml").read_text())["broker"]
    seen = json.loads(vertebra(home, "call", "workflow.status", "--to", broker, f"instance={iid}", "--json").stdout)
    since = seen["results"][0]["result"]["changes"]
    watcher = subprocess.Popen([sys.executable, "-m", "agents.cli", "--home", str(home), "call", "workflow.status",
                                "--to", broker, f"instance={iid}", "wait=8", f"since={since}", "--json",
                                "--timeout", "6"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    performed = vertebra(home, "workflow", "perform", iid, "snapshot")
    assert performed.returncode == 0, performed.stdout + performed.stderr
    watched, _ = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, watched
    assert json.loads(watched)["results"][0]["result"]["changes"] != since
    code, out, said = follower.end()
    assert code == 0, out + said
    assert re.search(r"step snapshot \(storage\.snapshot\.create\): held: step snapshot is held", said, re.M), said
    # The step's own progress, relayed by the broker: the bytes its snapshot read, to their total.
    assert re.search(r"^step snapshot: capturing volume=db: 6 MiB of 6 MiB \(100%\), [\d.]+ [KMG]?i?B/s$", said,
                     re.M), said
    assert re.search(r"step snapshot \(storage\.snapshot\.create\): ok on p(store|other)\d*$", said, re.M), said
    assert re.search(r"step clone \(storage\.clone\.create\): ok on p(store|other)\d*$", said, re.M), said
    assert said.rstrip().endswith(f"instance {iid} (copy): done"), said
    assert re.search(r"^  state: +done$", out, re.M), out  # then the instance, as status shows it

    # A step that fails ends the follower non-zero, naming the step and why; so does `workflow perform`.
    # This time the run itself follows (`workflow run ... --follow`).
    follower = _Follower(home, "run", "copy", "volume=db", "snapshot=w2", "source=nosuch")
    follower.until(r"instance [0-9a-f]{12} \(copy\): waiting")
    iid = re.search(r"instance ([0-9a-f]{12}) \(copy\)", "".join(follower.said))[1]
    performed = vertebra(home, "workflow", "perform", iid, "snapshot")
    assert performed.returncode == 1 and re.search(r"^  state: +failed$", performed.stdout, re.M), \
        performed.stdout + performed.stderr
    code, out, said = follower.end()
    assert code == 1, out + said
    assert re.search(r"step clone \(storage\.clone\.create\): failed on p(store|other)\d*: .*nosuch", said, re.M), said
    assert re.search(rf"instance {iid} \(copy\): failed: ", said), said
    assert re.search(r"^  state: +failed$", out, re.M), out

    listed = vertebra(home, "workflow", "list", "--follow")
    assert listed.returncode == 2 and "--follow follows one instance" in listed.stderr
