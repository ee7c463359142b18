"""`vertebra up` (what `make run` runs): the whole mesh comes up, Ctrl-C leaves nothing behind, a settings
mistake stops it before anything starts, and a second `up` on the same state directory is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from agents import cli
from conftest import ROOT, free_port, vertebra, vertebra_up


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
    with vertebra_up(tmp_path) as (home, shown):
        assert "storage   storage1@vertebra.test/agent" in shown, shown
        assert "monitor   monitor1@vertebra.test/agent" in shown
        assert "fencing   fence1@vertebra.test/agent" in shown
        assert "call monitor.check check=load" in shown
        assert _processes_mentioning(str(home)), "nothing runs for this mesh"
    assert _processes_mentioning(str(home)) == []
    assert not (home / "run" / "gateway.sock").exists()


def test_a_settings_typo_stops_up_naming_the_line_before_anything_starts(tmp_path):
    home = tmp_path / "up-home"
    home.mkdir()
    mesh = yaml.safe_load((ROOT / "deploy" / "mesh.example.yaml").read_text())
    mesh["server"]["port"] = free_port()
    monitor = next(i for i, a in enumerate(mesh["agents"]) if a["kind"] == "monitor")
    mesh["agents"][monitor]["settings"]["schedule"]["load"]["intervl"] = 60
    text = yaml.safe_dump(mesh)
    (home / "mesh.yaml").write_text(text)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "intervl" in t)

    up = vertebra(home, "up")
    assert up.returncode == 2, up.stdout + up.stderr
    assert (f"{home / 'mesh.yaml'}:{line}: agents[{monitor}].settings.schedule.load: unknown key 'intervl'"
            in up.stderr), up.stderr
    assert "mesh is up" not in up.stdout
    assert _processes_mentioning(str(home)) == []
    assert not (home / "server").exists() and not (home / "logs").exists()


def test_a_second_up_on_the_same_state_directory_is_refused(tmp_path):
    with vertebra_up(tmp_path) as (home, _):
        running = sorted(_processes_mentioning(str(home)))
        holder = (home / "run" / "up.lock").read_text().strip()
        second = vertebra(home, "up")
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"a mesh is already running in {home} (`vertebra up`, pid {holder})" in second.stderr
        assert f"kill {holder}" in second.stderr
        assert sorted(_processes_mentioning(str(home))) == running  # nothing more started


def test_an_agent_that_dies_at_start_makes_up_fail_with_its_log(tmp_path):
    home = tmp_path / "up-home"
    home.mkdir()
    mesh = yaml.safe_load((ROOT / "deploy" / "mesh.example.yaml").read_text())
    mesh["server"]["port"] = free_port()
    storage = next(a for a in mesh["agents"] if a["kind"] == "storage")
    storage["settings"]["root"] = "/proc/vertebra-cannot-be-made"  # valid settings, but no driver opens there
    (home / "mesh.yaml").write_text(yaml.safe_dump(mesh))

    up = vertebra(home, "up", timeout=180)
    assert up.returncode == 1, up.stdout + up.stderr
    assert f"{storage['name']} exited" in up.stderr and "/proc/vertebra-cannot-be-made" in up.stderr, up.stderr
    assert "mesh is up" not in up.stdout
    assert _processes_mentioning(str(home)) == []


def test_stopping_kills_every_actor_that_ignores_term_by_one_deadline_and_names_it(monkeypatch, capsys):
    # Actors that hang on TERM: each is killed once the one deadline has passed, and named on stderr.
    monkeypatch.setattr(cli, "STOP_GRACE", 0.5)
    ignore_term = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True);"
                   " time.sleep(120)")
    stubborn = [subprocess.Popen([sys.executable, "-c", ignore_term], stdout=subprocess.PIPE) for _ in range(3)]
    polite = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE)
    children = [*stubborn, polite]
    for c in children:
        assert c.stdout is not None and c.stdout.readline() == b"\n"   # its handler is in place
    names = {c.pid: f"actor{n}" for n, c in enumerate(children)}
    cli._stop_children(children, names)
    assert [c.returncode for c in children] == [-9, -9, -9, -15]
    said = capsys.readouterr().err
    for n in range(3):
        assert f"vertebra: actor{n} did not stop within 0.5 s of TERM; killed it" in said
    assert "actor3" not in said
