"""The README's masked-copy example on the default mesh: `vertebra up` (what `make run` runs) with the
example mesh file gives the volume `demo` holding a real database with personal data, and the README's
command, run as the mesh's operator with no other account or approval, gives each developer a clone in
which none of that data is left."""

from __future__ import annotations

import json
import re
import sqlite3


from conftest import vertebra, vertebra_up

PERSONAL = [b"ada.lovelace@example.com", b"Lovelace", b"4556 7375 8689 9855", b"+44 20 7946 0018"]


def test_up_gives_the_demo_source_and_the_readme_workflow_masks_it_for_each_developer(tmp_path):
    with vertebra_up(tmp_path) as (home, shown):
        assert "demo      volume demo on storage1" in shown, shown
        assert "workflow run masked-copy volume=demo" in shown, shown
        source = home / "state" / "storage1" / "storage" / "volumes" / "demo" / "app.db"
        assert all(value in source.read_bytes() for value in PERSONAL)

        # The README's command, as printed by `up`.
        run = vertebra(home, "workflow", "run", "masked-copy", "volume=demo", "snapshot=s1", "developers=alice",
                       "developers=bob")
        assert run.returncode == 0, run.stdout + run.stderr
        assert re.search(r"^  state: +done$", run.stdout, re.M), run.stdout  # the instance, as people read it
        for dev in ("alice", "bob"):
            clone = home / "state" / "storage1" / "storage" / "volumes" / f"demo-{dev}"
            data = b"".join(p.read_bytes() for p in clone.rglob("*") if p.is_file())
            assert data and not [v for v in PERSONAL if v in data]
            with sqlite3.connect(clone / "app.db") as db:
                email = db.execute("SELECT email FROM customers WHERE id = 1").fetchone()
                assert email == ("customer1@masked.invalid",)
        # Each clone is addressed by its volume, as the README shows.
        listed = vertebra(home, "call", "storage.snapshot.list", "volume=demo-masking-s1", "--json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert [s["name"] for s in json.loads(listed.stdout)["results"][0]["result"]] == ["masked"]
