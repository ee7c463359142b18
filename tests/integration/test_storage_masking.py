"""Masked copies end to end on the embedded driver, with real hook processes: developers get only masked
data, a failing or hanging hook stops the round with its output and leaves no developer clone."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agents.storage.driver import StorageError
from agents.storage.embedded import EmbeddedDriver
from agents.storage.hooks import run_hook
from agents.storage.masking import masked_copies

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
echo $! > "$PIDFILE"
sleep 60
"""


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(body)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def store(tmp_path):
    drv = EmbeddedDriver(tmp_path / "store")
    drv.create_volume("prod")
    (drv.path("prod") / "users.csv").write_text("1,ann@example.com\n2,bo@example.com\n")
    yield drv
    drv.close()


async def test_developers_get_masked_clones_and_later_a_refresh(store, tmp_path):
    mask = script(tmp_path, "mask", MASK)
    done = await masked_copies(store, source="prod", snapshot="s1", developers=["alice", "bob"], hook=[mask],
                               timeout=30)
    assert done.masked == "prod-masked@s1" and done.clones == ("alice", "bob")
    assert "masked 2 rows" in done.hook_output
    for dev in ("alice", "bob"):
        text = (store.path(dev) / "users.csv").read_text()
        assert "example.com" not in text and text.count("user@masked.invalid") == 2
    assert "ann@example.com" in (store.path("prod") / "users.csv").read_text()

    (store.path("prod") / "users.csv").write_text("1,ann@example.com\n2,bo@example.com\n3,cy@example.com\n")
    await masked_copies(store, source="prod", snapshot="s2", developers=["alice", "bob"], hook=[mask], timeout=30)
    clones = {v.name: v for v in store.list_volumes()}
    assert clones["alice"].origin == ("prod-masked", "s2") and clones["bob"].origin == ("prod-masked", "s2")
    assert (store.path("alice") / "users.csv").read_text().count("user@masked.invalid") == 3


async def test_a_failing_hook_leaves_no_developer_clone_and_reports_its_output(store, tmp_path):
    with pytest.raises(StorageError) as err:
        await masked_copies(store, source="prod", snapshot="s1", developers=["alice"],
                            hook=[script(tmp_path, "fail", FAIL)], timeout=30)
    assert err.value.code == "hook_failed"
    assert "exited with code 3" in str(err.value) and "rules.yaml not found" in str(err.value)
    assert "connecting to the masking catalogue" in str(err.value)
    assert [v.name for v in store.list_volumes()] == ["prod"]


async def test_a_failing_second_round_keeps_developers_on_the_last_masked_copy(store, tmp_path):
    await masked_copies(store, source="prod", snapshot="s1", developers=["alice"],
                        hook=[script(tmp_path, "mask", MASK)], timeout=30)
    before = (store.path("alice") / "users.csv").read_text()
    with pytest.raises(StorageError):
        await masked_copies(store, source="prod", snapshot="s2", developers=["alice", "bob"],
                            hook=[script(tmp_path, "fail", FAIL)], timeout=30)
    names = {v.name: v for v in store.list_volumes()}
    assert "bob" not in names and names["alice"].origin == ("prod-masked", "s1")
    assert (store.path("alice") / "users.csv").read_text() == before
    # The masking volume went back to its masked state: no unmasked tree is left lying around.
    assert "example.com" not in (store.path("prod-masked") / "users.csv").read_text()


async def test_a_hanging_hook_is_killed_with_everything_it_started(store, tmp_path):
    pidfile = tmp_path / "child.pid"
    with pytest.raises(StorageError) as err:
        await masked_copies(store, source="prod", snapshot="s1", developers=["alice"],
                            hook=[script(tmp_path, "hang", HANG)], timeout=0.5, env={"PIDFILE": str(pidfile)})
    assert err.value.code == "hook_failed" and "did not finish within its deadline" in str(err.value)
    assert [v.name for v in store.list_volumes()] == ["prod"]
    child = int(pidfile.read_text())
    # The background sleep was in the hook's process group; it is gone (or a zombie being reaped).
    for _ in range(100):
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


@pytest.mark.parametrize("hook, words", [
    (["mask.sh"], "must be absolute"),
    ("/bin/true --x", "not a command line"),
    (["/nonexistent/mask"], "does not exist"),
])
async def test_a_hook_that_cannot_run_changes_nothing(store, hook, words):
    with pytest.raises(StorageError) as err:
        await masked_copies(store, source="prod", snapshot="s1", developers=["alice"], hook=hook, timeout=5)
    assert err.value.code == "invalid" and words in str(err.value)
    assert [v.name for v in store.list_volumes()] == ["prod"] and store.list_snapshots("prod") == []


async def test_hook_output_is_captured_in_order_and_capped(tmp_path):
    noisy = script(tmp_path, "noisy", "#!/bin/sh\necho one\necho two >&2\necho three\nhead -c 100000 /dev/zero\n")
    result = await run_hook([noisy], tmp_path, timeout=10, output_cap=1000)
    assert result.ok and result.truncated
    assert result.output.startswith("one\ntwo\nthree\n") and len(result.output) == 1000
