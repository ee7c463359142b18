"""fence_vertebra with `identity=NAME`, as a site's stonith device is configured (docs/pacemaker.md): the
gateway calls as that identity of the mesh file, reading its password itself; the policy's fencer role
(as deploy/policy.example.yaml writes it) lets it fence its own cluster's nodes and nothing else; the
audit names it; a name the mesh file does not list is refused with what to do."""

from __future__ import annotations

import pytest
import yaml

from conftest import DOMAIN, ROOT, vertebra
from fence_mesh import dummy_device, fence_vertebra, fencing_settings, running


@pytest.fixture
def fencing_home(mesh_home, server, tmp_path):
    state = tmp_path / "node1.state"
    state.write_text("on")
    home = mesh_home([{"name": "fence", "kind": "fencing", "resources": ["/host/fencer"], "gateway": True,
                       "settings": fencing_settings({"dev": dummy_device(state)}, {"node1": [["dev"]]})}])
    cfg = yaml.safe_load((home / "mesh.yaml").read_text())
    suffix = cfg["broker"].removeprefix("broker")
    fencer, other = f"fence-c1-{suffix}", f"fence-c2-{suffix}"
    cfg["services"] = [{"name": fencer}, {"name": other}]
    cfg["policy"] = "policy.yaml"
    # The fencer roles' grants exactly as the example policy writes them.
    example = yaml.safe_load((ROOT / "deploy" / "policy.example.yaml").read_text())
    fencers = [{"on" if k is True else k: v for k, v in g.items()}  # YAML 1.1 reads a bare on: as true
               for g in example["grants"] if g["role"] in ("fencer-c1", "fencer-c2")]
    assert fencers
    (home / "policy.yaml").write_text(yaml.safe_dump({
        "roles": {"admin": {}, "fencer-c1": {}, "fencer-c2": {}},
        "members": {"admin": [f"{cfg['operator']}@{DOMAIN}"], "fencer-c1": [f"{fencer}@{DOMAIN}"],
                    "fencer-c2": [f"{other}@{DOMAIN}"]},
        "grants": [{"role": "admin", "ops": ["**"]}, *fencers]}))
    (home / "mesh.yaml").write_text(yaml.safe_dump(cfg))
    from agents import config

    server.register_many(config.load(home / "mesh.yaml", home).ensure_passwords())
    return home, state, fencer, other


def test_identity_fences_its_own_cluster_through_the_gateway(fencing_home):
    home, state, fencer, other = fencing_home
    device = f"vertebra_home={home}\ncluster=c1\nidentity={fencer}\n"
    with running(home):
        done = fence_vertebra(f"action=off\nplug=node1\n{device}")
        assert done.returncode == 0 and state.read_text() == "off", done.stderr
        done = fence_vertebra(f"action=monitor\n{device}")
        assert done.returncode == 0, done.stderr
        done = fence_vertebra(f"action=on\nplug=node1\n{device}")
        assert done.returncode == 0 and state.read_text() == "on", done.stderr

        # Another cluster's identity may not fence c1's nodes.
        done = fence_vertebra(f"action=off\nplug=node1\nvertebra_home={home}\ncluster=c1\nidentity={other}\n")
        assert done.returncode == 1 and "denied" in done.stderr, done.stderr
        assert state.read_text() == "on"

        refused = fence_vertebra(f"action=off\nplug=node1\nvertebra_home={home}\ncluster=c1\nidentity=mallory\n")
        assert refused.returncode == 1
        assert "'mallory' is none; add it under people: or services: there first" in refused.stderr

        both = fence_vertebra(f"action=off\nplug=node1\n{device}account={fencer}\n")
        assert both.returncode == 1 and "give one of them" in both.stderr

    shown = vertebra(home, "audit", "show", "--caller", f"{fencer}@{DOMAIN}", "--op", "fence.off")
    assert "fence.off" in shown.stdout, shown.stdout + shown.stderr
