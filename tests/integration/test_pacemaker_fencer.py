"""Pacemaker's own fencer runs fence_vertebra: the standalone `pacemaker-fenced -s`, in a private
mount namespace where fence_vertebra is bind-mounted over an installed agent's name (Pacemaker runs
agents only from /usr/sbin), fences a node through fence_vertebra -> gateway -> fencing agent ->
fence_dummy. `stonith_admin --fence` succeeds only once the device has powered the node off and
status has confirmed it, and fails when the device fails.

The fencer is this test's alone. Pacemaker's clients find the fencer through libqb IPC, abstract Unix
sockets (one namespace per network namespace) and shared memory in /dev/shm, machine-wide: a second
fencer on the machine (another test run, a real cluster) would answer this test's stonith_admin, or
this fencer another's. So the fencer and stonith_admin run in their own network, IPC and mount
namespaces with a private /dev/shm (fence_vertebra still reaches the gateway, a socket in the
filesystem); and the test checks that the fencer answering is its own: it lists no device before
this test registers one, and its own log records the fencing of node1 by this test's device."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fence_mesh import dummy_device, fencing_settings, running, wrapper_program

FENCED = "/usr/lib/pacemaker/pacemaker-fenced"
STAND_IN = "/usr/sbin/fence_apc"  # any installed agent; only its name is borrowed, in the namespace

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(FENCED) or not os.path.exists(STAND_IN)
    or not shutil.which("stonith_admin") or not shutil.which("unshare"),
    reason="needs root, unshare, pacemaker-fenced, stonith_admin and fence-agents")


def recording_device(tmp_path: Path, state: Path, events: Path) -> str:
    """fence_dummy behind a script that writes down when the device's off finished."""
    path = tmp_path / "fence_recorded"
    path.write_text("#!/bin/sh\ninput=$(cat)\n"
                    'printf "%s\\n" "$input" | /usr/sbin/fence_dummy; rc=$?\n'
                    'case "$input" in *action=off*)'
                    f' echo "device off exit=$rc state=$(cat {state})" >> {events};; esac\n'
                    "exit $rc\n")
    path.chmod(0o755)
    return str(path)


def test_stonith_admin_fences_through_fence_vertebra_and_the_mesh(mesh_home, tmp_path):
    state1, state2, events = tmp_path / "node1.state", tmp_path / "node2.state", tmp_path / "events"
    state1.write_text("on")
    state2.write_text("on")
    settings = fencing_settings(
        {"rec": {**dummy_device(state1), "agent": recording_device(tmp_path, state1, events)},
         "bad": {"agent": "fence_dummy", "params": {"type": "fail", "power_timeout": "1"}}},
        {"node1": [["rec"]], "node2": [["bad"]]})
    home = mesh_home([{"name": "fence", "kind": "fencing", "gateway": True, "settings": settings}])
    program = wrapper_program(tmp_path / "fence_vertebra")
    log, asker = tmp_path / "fenced.log", tmp_path / "stonith_admin.pid"
    script = f"""
mount --bind {program} {STAND_IN} || exit 99
mount -t tmpfs -o mode=1777 tmpfs /dev/shm || exit 99
{FENCED} -s -l {log} &
fenced=$!
for i in $(seq 100); do stonith_admin --list-registered >/dev/null 2>&1 && break; sleep 0.1; done
echo "before: $(stonith_admin --list-registered 2>&1 | tr '\n' ' ')" >> {events}
stonith_admin --register vertebra --agent {Path(STAND_IN).name} --option vertebra_home={home} \\
    --option cluster=c1 --option pcmk_host_list="node1 node2" --option pcmk_host_check=static-list
echo "register rc=$?" >> {events}
stonith_admin --fence node1 --timeout 60 &
asked=$!
wait $asked
echo "stonith_admin node1 rc=$? state=$(cat {state1})" >> {events}
echo $asked > {asker}
stonith_admin --fence node2 --timeout 60
echo "stonith_admin node2 rc=$? state=$(cat {state2})" >> {events}
kill $fenced; wait $fenced
"""
    with running(home):
        done = subprocess.run(["unshare", "--mount", "--net", "--ipc", "--propagation", "private", "sh", "-c", script],
                              capture_output=True, text=True, timeout=180)
    if done.returncode == 99:
        pytest.skip("cannot bind-mount in a private mount namespace here")
    lines = events.read_text().splitlines() if events.exists() else []
    # Its own fencer: nothing registered before this test's device.
    assert lines[:1] and lines[0].startswith("before: ") and "vertebra" not in lines[0], lines
    assert "0 fence devices found" in lines[0] or lines[0].strip() == "before:", lines
    lines = lines[1:]
    assert lines[:1] == ["register rc=0"], (lines, done.stderr, log.read_text() if log.exists() else "")
    # The device's verified off happened before stonith_admin reported success, and said off.
    assert lines[1:3] == ["device off exit=0 state=off", "stonith_admin node1 rc=0 state=off"], \
        (lines, done.stderr)
    # A device that cannot power off makes the fence fail, and the node stays on.
    assert lines[3].startswith("stonith_admin node2 rc=") and lines[3].endswith(" state=on"), lines
    assert lines[3] != "stonith_admin node2 rc=0 state=on", lines
    # Its own fencer carried out its own stonith_admin's request for node1 (pacemaker-fenced logs the
    # asking process), with this test's device.
    pattern = (r"Operation 'off' \[\d+\] targeting node1 using vertebra returned 0 \| call \d+ from"
               rf" stonith_admin\.{asker.read_text().strip()}\b")
    assert re.search(pattern, log.read_text()), log.read_text()
