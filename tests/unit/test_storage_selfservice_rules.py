"""The storage agent's clones settings and the rules they make: errors name the key and say what
to write; expiry and quota refusals say what was wrong and what to do."""

from __future__ import annotations

import pytest

from agents.storage.driver import StorageError, VolumeInfo
from agents.storage.selfservice import SelfServiceSettingsError, clone_rules, owner_resources


@pytest.mark.parametrize("settings,words", [
    ({"per_owner": 0}, "clones.per_owner: must be a positive number"),
    ({"per_owner": True}, "clones.per_owner: must be a positive number"),
    ({"max_expiry": "1d"}, "clones.max_expiry: must be a positive number"),
    ({"ttl": 5}, "clones: unknown key 'ttl'"),
    ([1], "clones: must be a mapping"),
])
def test_bad_settings_name_the_key(settings, words):
    with pytest.raises(SelfServiceSettingsError, match=words):
        clone_rules(settings)


def test_expiry_defaults_to_the_maximum_and_refuses_more():
    rules = clone_rules({"max_expiry": 100})
    assert rules.expiry(0, 1000.0) == 1100.0 and rules.expiry(10, 1000.0) == 1010.0
    with pytest.raises(StorageError, match="at most 100s"):
        rules.expiry(101, 1000.0)
    assert clone_rules(None).expiry(0, 1000.0) is None       # no maximum: never expires unless asked


def test_quota_counts_and_bytes():
    owned = [VolumeInfo("c1", "clone", 0, "du", exclusive_bytes=600)]
    with pytest.raises(StorageError, match="quota exceeded: a@x already holds 1 clones \\(c1\\)") as exc:
        clone_rules({"per_owner": 1}).check_quota("a@x", owned, 0)
    assert exc.value.code == "quota"
    with pytest.raises(StorageError, match="over the 1000 bytes allowed"):
        clone_rules({"bytes_per_owner": 1000}).check_quota("a@x", owned, 500)
    clone_rules({"per_owner": 2, "bytes_per_owner": 1000}).check_quota("a@x", owned, 400)


def test_owned_clones_are_named_with_their_owner():
    assert owner_resources(["/volume/c1", "/volume/prod", "/host/db1", "/volume/c1/x"], {"c1": "a@x"}) == \
        ["/volume/c1/owner/a@x", "/volume/prod", "/host/db1", "/volume/c1/x"]
