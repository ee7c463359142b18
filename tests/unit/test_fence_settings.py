"""A fencing agent's settings: each node's cluster, its resource path, and every mistake named."""

import pytest

from agents.fencing.devices import FencingConfigError
from agents.fencing.settings import FencingSettings

DEVICES = {"d": {"agent": "fence_dummy", "plugs": {"n1": "1", "n2": "2", "n3": "3"}}}
LEVELS = {"n1": [["d"]], "n2": [["d"]], "n3": [["d"]]}


def problems(settings):
    with pytest.raises(FencingConfigError) as info:
        FencingSettings.from_settings(settings)
    return info.value.problems


def test_one_cluster_for_every_node():
    s = FencingSettings.from_settings({"cluster": "c1", "fencing": {"devices": DEVICES, "levels": LEVELS}})
    assert s.resources() == ["/cluster/c1/node/n1", "/cluster/c1/node/n2", "/cluster/c1/node/n3"]
    assert s.by_cluster() == {"c1": ["n1", "n2", "n3"]}


def test_several_clusters():
    s = FencingSettings.from_settings({"clusters": {"a": ["n1", "n2"], "b": ["n3"]},
                                       "fencing": {"devices": DEVICES, "levels": LEVELS}})
    assert s.clusters == {"n1": "a", "n2": "a", "n3": "b"}
    assert s.resources()[-1] == "/cluster/b/node/n3"


def test_no_fencing_section_means_no_devices_yet():
    s = FencingSettings.from_settings({})
    assert s.registry is None and s.resources() == []


@pytest.mark.parametrize("settings, expected", [
    ({"fencing": {"devices": DEVICES, "levels": LEVELS}}, "name the cluster the nodes belong to"),
    ({"cluster": "c/1", "fencing": {"devices": DEVICES, "levels": LEVELS}}, "settings.cluster: expected"),
    ({"cluster": "c1", "clusters": {"c1": ["n1"]}, "fencing": {"devices": DEVICES, "levels": LEVELS}},
     "not both"),
    ({"clusters": {"a": ["n1", "n2"]}, "fencing": {"devices": DEVICES, "levels": LEVELS}},
     "node 'n3' is in no cluster"),
    ({"clusters": {"a": ["n1", "n2", "n3"], "b": ["n3"]}, "fencing": {"devices": DEVICES, "levels": LEVELS}},
     "node 'n3' is also in cluster 'a'"),
    ({"clusters": {"a": ["n1", "n2", "n3", "n9"]}, "fencing": {"devices": DEVICES, "levels": LEVELS}},
     "node 'n9' has no fencing levels"),
    ({"cluster": "c1"}, "settings.fencing (devices and levels) is missing"),
    ({"cluster": "c1", "fencing": {"devices": DEVICES, "levels": LEVELS}, "colour": 1},
     "settings.colour: unknown key"),
])
def test_mistakes_are_named(settings, expected):
    assert any(expected in p for p in problems(settings)), problems(settings)


def test_registry_problems_come_with_the_rest():
    found = problems({"clusters": {"a": ["n1"]}, "fencing": {"devices": {"d": {"agent": "fence_nope"}},
                                                             "levels": {"n1": [["d"]]}}, "x": 1})
    assert any("unknown agent program" in p for p in found) and any("settings.x" in p for p in found)


def test_node_names_must_fit_a_resource_path():
    devices = {"d": {"agent": "fence_dummy", "plugs": {"bad node": "1"}}}
    found = problems({"cluster": "c1", "fencing": {"devices": devices, "levels": {"bad node": [["d"]]}}})
    assert any("levels.bad node: a node name must be" in p for p in found)
