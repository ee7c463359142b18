"""fence_vertebra end to end: the program, as Pacemaker runs it, through the local gateway (or a
direct login) to a fencing agent process, which drives real fence_dummy devices."""

from __future__ import annotations

import pytest

from fence_mesh import dummy_device, fence_vertebra, fencing_settings, running


@pytest.fixture
def fencing_home(mesh_home, tmp_path):
    state = tmp_path / "node1.state"
    state.write_text("on")
    settings = fencing_settings(
        {"dev": dummy_device(state),
         "bad": {"agent": "fence_dummy", "params": {"type": "fail", "power_timeout": "1"}}},
        {"node1": [["dev"]], "node2": [["bad"]]})
    home = mesh_home([{"name": "fence", "kind": "fencing", "resources": ["/host/fencer"],
                       "gateway": True, "settings": settings}])
    return home, state


def test_off_status_on_reboot_list_monitor_through_the_mesh(fencing_home):
    home, state = fencing_home
    pcmk = f"vertebra_home={home}\ncluster=c1\nnodename=node1\n"
    with running(home):
        done = fence_vertebra(f"action=off\nport=node1\n{pcmk}")
        assert done.returncode == 0, done.stderr
        assert state.read_text() == "off" and "Success:" in done.stdout

        done = fence_vertebra(f"action=status\nplug=node1\n{pcmk}")
        assert (done.returncode, done.stdout.strip()) == (2, "Status: OFF"), done.stderr

        done = fence_vertebra(f"action=on\nplug=node1\n{pcmk}")
        assert done.returncode == 0 and state.read_text() == "on", done.stderr
        done = fence_vertebra(f"action=status\nplug=node1\n{pcmk}")
        assert (done.returncode, done.stdout.strip()) == (0, "Status: ON")

        done = fence_vertebra(f"action=reboot\nplug=node1\n{pcmk}")
        assert done.returncode == 0 and state.read_text() == "on", done.stderr

        done = fence_vertebra(f"action=list\nvertebra_home={home}\n")
        assert done.returncode == 0 and done.stdout.splitlines() == ["node1,", "node2,"]
        done = fence_vertebra(f"action=monitor\nvertebra_home={home}\n")
        assert done.returncode == 0, done.stderr

        # Without cluster=, the node's cluster is found from the fencing agents' lists.
        done = fence_vertebra("", "-o", "off", "-n", "node1", "--vertebra-home", str(home))
        assert done.returncode == 0 and state.read_text() == "off", done.stderr


def test_a_failing_device_or_unknown_node_is_exit_1_never_success(fencing_home):
    home, state = fencing_home
    with running(home):
        done = fence_vertebra(f"action=off\nplug=node2\ncluster=c1\nvertebra_home={home}\n")
        assert done.returncode == 1
        assert "Timed out waiting to power OFF" in done.stderr and "NOT known to be off" in done.stderr
        done = fence_vertebra(f"action=status\nplug=node2\ncluster=c1\nvertebra_home={home}\n")
        # type=fail never changes power: its status honestly still says ON after the failed off.
        assert (done.returncode, done.stdout.strip()) == (0, "Status: ON"), done.stderr

        done = fence_vertebra(f"action=off\nplug=node7\nvertebra_home={home}\n")
        assert done.returncode == 1 and "no fencing agent in the mesh can fence node node7" in done.stderr
        done = fence_vertebra(f"action=off\nplug=node1\ncluster=c9\nvertebra_home={home}\n")
        assert done.returncode == 1 and "not-discovered" in done.stderr
    assert state.read_text() == "on"


def test_a_short_timeout_fails_inside_it(fencing_home, tmp_path):
    home, _ = fencing_home
    hang = tmp_path / "fence_hang"
    hang.write_text("#!/bin/sh\nsleep 300\n")
    hang.chmod(0o755)
    import yaml
    cfg = yaml.safe_load((home / "mesh.yaml").read_text())
    cfg["agents"][0]["settings"]["fencing"]["devices"]["dev"] = {"agent": str(hang), "timeout": 300}
    (home / "mesh.yaml").write_text(yaml.safe_dump(cfg))
    with running(home):
        done = fence_vertebra(f"action=off\nplug=node1\ncluster=c1\nvertebra_home={home}\ntimeout=8\n")
    assert done.returncode == 1
    assert "dev: off timed out" in done.stderr, done.stderr


def test_no_mesh_or_no_agent_is_an_honest_failure(fencing_home, tmp_path):
    home, state = fencing_home
    done = fence_vertebra(f"action=off\nplug=node1\ncluster=c1\nvertebra_home={tmp_path / 'none'}\n")
    assert done.returncode == 1 and "no mesh file at" in done.stderr
    # A mesh file, but nothing runs: no gateway, and the direct login finds no agent (or server).
    done = fence_vertebra(f"action=off\nplug=node1\ncluster=c1\nvertebra_home={home}\ntimeout=5\n")
    assert done.returncode == 1 and "Failed" in done.stderr
    assert state.read_text() == "on"
