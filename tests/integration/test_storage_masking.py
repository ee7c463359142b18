"""Masking on the embedded driver, with real hook processes (agents/storage/masking.py): a successful hook
yields a snapshot recorded as masked, the only kind a masked-only clone is made from; a failing or hanging
hook takes no snapshot and reports its exit, deadline and output; settings that cannot work are refused
when the agent starts, with a sentence saying which setting."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from agents.storage.driver import StorageError
from agents.storage.embedded import EmbeddedDriver
from agents.storage.hooks import run_hook
from agents.storage.masking import MaskingSettingsError, SHIPPED_HOOKS, mask_clone, masking_from_settings

MASK = r"""#!/bin/sh
# Replace every e-mail address in users.csv, as a real masking script would.
sed -i 's/[a-z]*@example\.com/user@masked.invalid/g' users.csv
echo "masked $(wc -l < users.csv) rows in $VERTEBRA_VOLUME_PATH"
"""
FAIL = """#!/bin/sh
echo "connecting to the masking catalogue"
echo "error: masking rules file /etc/mask/rules.yaml not found" >&2
exit 3
"""
HANG = """#!/bin/sh
sleep 60 &
echo $! > "$VERTEBRA_VOLUME_PATH/child.pid"
sleep 60
"""


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(body)
    path.chmod(0o755)
    return str(path)


def hook(argv, **extra):
    return masking_from_settings({"hooks": {"h": {"argv": argv, **extra}}}).hook("")


@pytest.fixture
def store(tmp_path):
    drv = EmbeddedDriver(tmp_path / "store")
    drv.create_volume("prod")
    (drv.path("prod") / "users.csv").write_text("1,ann@example.com\n2,bo@example.com\n")
    drv.snapshot("prod", "s1")
    drv.clone("prod", "s1", "work")
    yield drv
    drv.close()


async def test_a_successful_mask_takes_a_masked_snapshot_that_masked_only_clones_accept(store, tmp_path):
    done = await mask_clone(store, "work", "masked", hook([script(tmp_path, "mask", MASK)]))
    assert done["exit_code"] == 0 and done["masked"] == "work@masked" and done["masked_from"] == "prod@s1"
    assert "masked 2 rows" in done["output"] and done["deadline"] == 60 and not done["output_truncated"]
    assert store.masking_of("work", "masked")["hook"] == "h"
    store.clone("work", "masked", "alice", masked_only=True)
    text = (store.path("alice") / "users.csv").read_text()
    assert "example.com" not in text and text.count("user@masked.invalid") == 2
    # Production's own snapshot was never masked: a masked-only clone of it is refused, by name.
    with pytest.raises(StorageError) as err:
        store.clone("prod", "s1", "bob", masked_only=True)
    assert err.value.code == "not_masked" and "prod@s1 was not produced by a successful masking hook" in str(err.value)
    # A snapshot of the clone taken by hand is not masked either, whatever it is called.
    store.snapshot("work", "masked-too")
    with pytest.raises(StorageError):
        store.clone("work", "masked-too", "bob", masked_only=True)
    # A masked copy is refreshed only to another masked snapshot, never to one taken by hand.
    with pytest.raises(StorageError) as err:
        store.refresh_clone("alice", "masked-too")
    assert err.value.code == "not_masked" and "'alice' is a masked copy of work@masked" in str(err.value)
    assert "example.com" not in (store.path("alice") / "users.csv").read_text()
    await mask_clone(store, "work", "masked-2", hook([script(tmp_path, "mask", MASK)]))
    assert store.refresh_clone("alice", "masked-2").origin == ("work", "masked-2")
    # The record is durable: a reopened catalog still knows, and it goes with the snapshot.
    root = store.root
    store.close()
    again = EmbeddedDriver(root)
    try:
        assert again.masking_of("work", "masked") is not None and again.masking_of("work", "masked-too") is None
        again.destroy_snapshot("work", "masked")
        again.snapshot("work", "masked")
        assert again.masking_of("work", "masked") is None
    finally:
        again.close()


async def test_a_failing_hook_takes_no_snapshot_and_reports_its_exit_and_output(store, tmp_path):
    with pytest.raises(StorageError) as err:
        await mask_clone(store, "work", "masked", hook([script(tmp_path, "fail", FAIL)]))
    text = str(err.value)
    assert err.value.code == "hook_failed" and "exited with code 3" in text and "rules.yaml not found" in text
    assert "connecting to the masking catalogue" in text and "still holds what the hook left" in text
    assert store.list_snapshots("work") == []


async def test_a_failing_second_mask_rolls_the_clone_back_to_its_masked_snapshot(store, tmp_path):
    await mask_clone(store, "work", "m1", hook([script(tmp_path, "mask", MASK)]))
    (store.path("work") / "users.csv").write_text("3,cy@example.com\n")  # as a refresh would bring back
    with pytest.raises(StorageError) as err:
        await mask_clone(store, "work", "m2", hook([script(tmp_path, "fail", FAIL)]))
    assert "rolled back to its last masked snapshot work@m1" in str(err.value)
    assert "example.com" not in (store.path("work") / "users.csv").read_text()
    assert [s.name for s in store.list_snapshots("work")] == ["m1"]


async def test_a_hanging_hook_is_killed_with_everything_it_started(store, tmp_path):
    with pytest.raises(StorageError) as err:
        await mask_clone(store, "work", "masked", hook([script(tmp_path, "hang", HANG)], timeout=0.5))
    assert err.value.code == "hook_failed" and "did not finish within its deadline" in str(err.value)
    assert store.list_snapshots("work") == []
    child = int((store.path("work") / "child.pid").read_text())
    # The background sleep was in the hook's process group; it is gone (or a zombie being reaped).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
            state = Path(f"/proc/{child}/stat").read_text().split()[2]
        except (ProcessLookupError, FileNotFoundError):
            break
        if state == "Z":
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"the hook's background child {child} survived the deadline")


async def test_masking_runs_on_clones_only(store, tmp_path):
    with pytest.raises(StorageError) as err:
        await mask_clone(store, "prod", "masked", hook([script(tmp_path, "mask", MASK)]))
    assert err.value.code == "invalid" and "never on a source volume" in str(err.value)
    assert "ann@example.com" in (store.path("prod") / "users.csv").read_text()


@pytest.mark.parametrize("settings, words", [
    ({"hooks": {"h": {"argv": "/bin/true --x"}}}, "not a command line"),
    ({"hooks": {"h": {"argv": ["/nonexistent/mask"]}}}, "does not exist"),
    ({"hooks": {"h": {"argv": ["masking/no-such-hook"]}}}, "does not exist"),
    ({"hooks": {"h": {"argv": ["/bin/true"], "timeout": 0}}}, "masking.hooks.h.timeout"),
    ({"hooks": {"h": {"argv": ["/bin/true"], "shell": True}}}, "masking.hooks.h: must be a map with argv"),
    ({"hooks": {"a": {"argv": ["/bin/true"]}}, "default": "b"}, "masking.default: names 'b'"),
    ({"hooks": {"bad/name": {"argv": ["/bin/true"]}}}, "masking hook name"),
])
def test_masking_settings_that_cannot_work_are_refused(settings, words):
    with pytest.raises(MaskingSettingsError) as err:
        masking_from_settings(settings)
    assert words in str(err.value)


def test_a_caller_chooses_among_configured_hooks_only():
    masking = masking_from_settings({"hooks": {"a": {"argv": ["/bin/true"]}, "b": {"argv": ["/bin/false"]}}})
    with pytest.raises(StorageError, match="name the masking hook to run"):
        masking.hook("")
    with pytest.raises(StorageError, match="no masking hook '/bin/sh'"):
        masking.hook("/bin/sh")
    assert masking.hook("b").argv == ("/bin/false",)


async def test_the_shipped_sqlite_hook_masks_the_demo_database(tmp_path):
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as conn:
        conn.executescript((SHIPPED_HOOKS / "masking" / "demo-source.sql").read_text())
    assert b"ada.lovelace@example.com" in db.read_bytes()
    demo = masking_from_settings({"hooks": {"demo": {"argv": ["masking/sqlite-mask", "app.db", "mask-demo.sql"]}}})
    result = await run_hook(demo.hook("demo").argv, tmp_path, timeout=30)
    assert result.ok, result.describe()
    assert "masked 4 customers" in result.output
    raw = db.read_bytes()   # the file itself, free pages included: nothing personal survives
    assert b"example.com" not in raw and b"Lovelace" not in raw and b"4556 7375" not in raw


async def test_hook_output_is_captured_in_order_and_capped(tmp_path):
    noisy = script(tmp_path, "noisy", "#!/bin/sh\necho one\necho two >&2\necho three\nhead -c 100000 /dev/zero\n")
    result = await run_hook([noisy], tmp_path, timeout=10, output_cap=1000)
    assert result.ok and result.truncated
    assert result.output.startswith("one\ntwo\nthree\n") and len(result.output) == 1000


async def test_the_shipped_sqlite_hook_fails_on_a_database_it_cannot_mask(store):
    with sqlite3.connect(store.path("work") / "app.db") as db:
        db.execute("CREATE TABLE accounts(email TEXT)")  # not the schema mask-demo.sql masks
    demo = masking_from_settings({"hooks": {"demo": {"argv": ["masking/sqlite-mask", "app.db", "mask-demo.sql"]}}})
    with pytest.raises(StorageError) as err:
        await mask_clone(store, "work", "masked", demo.hook(""))
    assert err.value.code == "hook_failed" and "no such table: customers" in str(err.value)
    assert store.list_snapshots("work") == []
