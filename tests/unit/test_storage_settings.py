"""The storage agent's settings: each mistake is refused with the setting's name and what to write."""

from __future__ import annotations

import pytest

from agents.storage.agent import SettingsError, open_driver
from agents.storage.driver import StorageError


@pytest.mark.parametrize("settings, words", [
    ({"driver": "zfs"}, ["driver", "'zfs'", "embedded, btrfs"]),
    ({"root": "relative/dir"}, ["root", "absolute", "'relative/dir'"]),
    ({"root": 5}, ["root", "absolute"]),
    ({"pool": "tank"}, ["storage settings: top level: unknown key 'pool'",
                        "driver, inbox_advertise, inbox_host, keep_received,", "masking"]),
    ({"keep_received": 0}, ["keep_received", "at least 1", "0"]),
    ({"keep_received": "7"}, ["keep_received", "'7'"]),
    ({"keep_received": True}, ["keep_received", "True"]),
])
def test_bad_settings_say_what_to_write(settings, words, tmp_path):
    with pytest.raises(SettingsError) as err:
        open_driver(settings, tmp_path)
    for word in words:
        assert word in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_without_root_or_state_dir_it_asks_for_a_root():
    with pytest.raises(SettingsError, match="set settings.root"):
        open_driver({}, None)


def test_embedded_by_default_under_the_state_dir(tmp_path):
    drv = open_driver({}, tmp_path)
    try:
        assert drv.name == "embedded" and drv.root == (tmp_path / "storage").resolve()
    finally:
        drv.close()


def test_btrfs_on_a_directory_that_is_not_btrfs_says_so(tmp_path):
    with pytest.raises(StorageError) as err:
        open_driver({"driver": "btrfs", "root": str(tmp_path / "x")}, None)
    assert err.value.code == "environment"
