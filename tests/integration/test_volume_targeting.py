"""Volume targeting through the real command line, with two storage agents as processes on a real
Prosody: a volume is created on one agent, not on every one; `--on /volume/NAME` reaches the agent that
holds NAME (the broker knows from the agents' volume reports, their advertisements staying what the mesh
file configures); ops that name a volume go there without --on; a destroy destroys it at its holder only."""

from __future__ import annotations

import json

import pytest

from conftest import running, vertebra

AGENTS = [{"name": "store-a", "kind": "storage", "resources": ["/host/a", "/pool/a"]},
          {"name": "store-b", "kind": "storage", "resources": ["/host/b", "/pool/b"]}]


def call(home, *args):
    out = vertebra(home, "call", *args, "--json")
    return out.returncode, (json.loads(out.stdout)["results"] if out.stdout.strip() else out.stderr)


def holders(home, cfg, volume: str) -> list[str]:
    return [a["name"] for a in cfg["agents"]
            if (home / "state" / a["name"] / "storage" / "volumes" / volume).exists()]


@pytest.fixture
def two_stores(mesh_home):
    home = mesh_home(AGENTS)
    with running(home, expect_agents=2) as cfg:
        yield home, cfg


def test_a_volume_lives_on_one_agent_and_calls_on_it_reach_that_agent(two_stores):
    home, cfg = two_stores
    code, results = call(home, "storage.volume.create", "volume=db")
    assert code == 0 and len(results) == 1, results
    (owner,) = holders(home, cfg, "db")      # one agent made it, not both
    assert results[0]["target"].startswith(owner + "@")

    code, results = call(home, "storage.snapshot.create", "volume=db", "snapshot=s1", "--on", "/volume/db")
    assert code == 0 and [r["target"].split("@")[0] for r in results] == [owner], results

    # Without --on, an op naming a volume goes where the volume is (its declaration says so).
    code, results = call(home, "storage.snapshot.list", "volume=db")
    assert code == 0 and len(results) == 1 and [s["name"] for s in results[0]["result"]] == ["s1"], results

    code, results = call(home, "storage.snapshot.list", "volume=nothere", "--on", "/volume/nothere")
    assert code == 6 and results[0]["outcome"] == "not-discovered", results

    # Every agent still answers an op that addresses nothing in particular.
    code, results = call(home, "storage.volume.list")
    assert code == 0 and len(results) == 2

    assert call(home, "storage.snapshot.destroy", "volume=db", "snapshot=s1")[0] == 0
    code, results = call(home, "storage.volume.destroy", "volume=db")
    assert code == 0 and len(results) == 1, results
    assert holders(home, cfg, "db") == []
    # The broker forgot the volume with the agent's next report.
    code, results = call(home, "storage.snapshot.list", "volume=db")
    assert code == 6, results
