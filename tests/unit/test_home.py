"""One rule finds the state directory, for `vertebra`, check_vertebra and fence_vertebra alike."""

from __future__ import annotations

from pathlib import Path

from agents import config
from agents.fencing import fence_vertebra
from agents.home import state_home
from agents.monitor import check_vertebra


def test_given_then_environment_then_default(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VERTEBRA_HOME", raising=False)
    assert state_home() == tmp_path / ".vertebra" == config.default_home()
    assert Path(check_vertebra._home(None)) == tmp_path / ".vertebra"
    assert fence_vertebra.vertebra_home({}) == Path("/var/lib/vertebra")
    monkeypatch.setenv("VERTEBRA_HOME", str(tmp_path / "env"))
    for found in (state_home(), config.default_home(), Path(check_vertebra._home(None)),
                  fence_vertebra.vertebra_home({})):
        assert found == tmp_path / "env"
    assert state_home("given") == tmp_path / "given" == Path(check_vertebra._home("given"))
    assert fence_vertebra.vertebra_home({"vertebra_home": "/srv/v"}) == Path("/srv/v")


def test_an_actors_state_is_under_the_state_directory(tmp_path):
    mesh = config.parse({"agents": [{"name": "s1", "kind": "storage"}]}, tmp_path / "mesh.yaml", tmp_path)
    assert mesh.state_dir("s1") == tmp_path / "state" / "s1"
