"""`vertebra up` (what `make run` runs): the whole mesh comes up, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

from conftest import vertebra_up


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
