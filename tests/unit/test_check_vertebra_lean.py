"""check_vertebra's lean path: its command-line reading agrees with the full parser, and what it
keeps from the mesh file follows every edit of the file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agents import config as meshconf, fastpath
from agents.home import UnsafePath
from agents.monitor import check_vertebra as cv
from agents.monitor.ranges import State
from agents.plain_names import is_resource

LEAN = [
    ["-H", "db1", "-c", "load"],
    ["-c", "load", "-H", "db1"],
    ["--hostname", "db1", "--check", "load", "-a", "warn=1", "--arg", "crit=2", "-a", "x=a b;c"],
    ["-R", "/cluster/c1", "-c", "disk", "-t", "12.5"],
    ["-H", "db1", "-c", "load", "--home", "/tmp/h", "--mesh", "m.yaml", "--account", "nagios", "--timeout", "7"],
]
FULL_ONLY = [
    [],
    ["-h"],
    ["-V"],
    ["-H", "db1"],
    ["-H", "db1", "-R", "/x", "-c", "load"],
    ["-H", "db1", "-c", "load", "-t", "5:CRITICAL"],
    ["-H", "db1", "-c", "load", "-t", "0"],
    ["-H", "db1", "-c", "load", "-t", "nan"],
    ["-Hdb1", "-c", "load"],
    ["--hostname=db1", "-c", "load"],
    ["--host", "db1", "-c", "load"],
    ["-H", "db1", "-c", "load", "-c", "disk"],
    ["-H", "db1", "-c", "load", "-a", "-w"],
    ["-H", "", "-c", "load"],
    ["-H", "db1", "-c"],
    ["-H", "db1", "-c", "load", "extra"],
]


@pytest.mark.parametrize("argv", LEAN, ids=" ".join)
def test_lean_reading_matches_the_full_parser(argv: list[str]) -> None:
    lean = cv.lean_args(argv)
    full = cv._parser().parse_args(argv)
    assert lean is not None
    assert lean.get("hostname") == full.hostname and lean.get("resource") == full.resource
    assert lean["check"] == full.check and lean["arg"] == full.arg
    assert (lean["timeout"], State.UNKNOWN) == full.timeout
    for key in ("home", "mesh", "account"):
        assert lean.get(key) == getattr(full, key)


@pytest.mark.parametrize("argv", FULL_ONLY, ids=lambda a: " ".join(a) or "(none)")
def test_other_spellings_go_the_full_way(argv: list[str]) -> None:
    assert cv.lean_args(argv) is None


def test_home_is_found_as_programs_others_start_find_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".vertebra").mkdir()
    monkeypatch.delenv("VERTEBRA_HOME", raising=False)
    assert cv._site(None, None) == ("/var/lib/vertebra", "/etc/vertebra/mesh.yaml")  # never ./.vertebra
    assert cv._site(None, None) != (str(meshconf.default_home(None)), str(meshconf.default_home(None) / "mesh.yaml"))
    monkeypatch.setenv("VERTEBRA_HOME", str(tmp_path / "env"))
    assert cv._site(None, None) == (str(tmp_path / "env"), str(tmp_path / "env" / "mesh.yaml"))
    with pytest.raises(UnsafePath, match="not an absolute path"):
        cv._site("rel/h", None)


def _home(tmp_path: Path, domain: str, operator: str = "operator") -> Path:
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True, exist_ok=True)
    os.chmod(home / "run", 0o700)
    (home / "secrets").mkdir(exist_ok=True)
    (home / "secrets" / f"{operator}.password").write_text(f"pw-{operator}\n")
    (home / "mesh.yaml").write_text(f"server: {{domain: {domain}}}\noperator: {operator}\n")
    return home


def _identity(options: dict[str, str], home: Path) -> tuple[str, str] | tuple[None, None] | None:
    return cv._identity(options, str(home), str(home / "mesh.yaml"))


def test_identity_follows_every_edit_of_the_mesh_file(tmp_path: Path) -> None:
    home = _home(tmp_path, "one.test")
    assert _identity({}, home) == ("operator@one.test", "pw-operator")
    cache = home / "run" / cv.CACHE_NAME
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert _identity({}, home) == ("operator@one.test", "pw-operator")  # from the cache
    # Same length, same second: only the content differs, and that is what the cache is keyed by.
    _home(tmp_path, "two.test", "operatoz")
    assert _identity({}, home) == ("operatoz@two.test", "pw-operatoz")
    assert _identity({"account": "operator"}, home) == ("operator@two.test", "pw-operator")


def test_password_is_read_every_time(tmp_path: Path) -> None:
    home = _home(tmp_path, "one.test")
    assert _identity({}, home) == ("operator@one.test", "pw-operator")
    (home / "secrets" / "operator.password").write_text("rotated\n")
    assert _identity({}, home) == ("operator@one.test", "rotated")
    (home / "secrets" / "operator.password").unlink()
    assert _identity({}, home) is None  # the full path says which password is missing


def test_a_cache_anyone_else_could_write_is_ignored(tmp_path: Path) -> None:
    home = _home(tmp_path, "one.test")
    _identity({}, home)
    cache = home / "run" / cv.CACHE_NAME
    key = {"v": fastpath.CACHE_VERSION, "parser": fastpath.parser_stamp(), "mesh": str(home / "mesh.yaml"),
           "home": str(home), "bytes": (home / "mesh.yaml").read_bytes()}
    assert fastpath.read_cache(str(cache), key) is not None
    os.chmod(cache, 0o666)
    assert fastpath.read_cache(str(cache), key) is None
    os.chmod(cache, 0o600)
    assert fastpath.read_cache(str(cache), {**key, "bytes": b"server: {domain: evil.test}\n"}) is None


def test_a_mesh_file_that_does_not_load_goes_the_full_way(tmp_path: Path) -> None:
    home = _home(tmp_path, "one.test")
    (home / "mesh.yaml").write_text("server: [unclosed\n")
    assert _identity({}, home) is None
    assert not (home / "run" / cv.CACHE_NAME).exists()


def test_one_reads_the_report_as_the_full_path_did() -> None:
    ok = {"results": [{"target": "mon@x.test/agent", "outcome": "ok", "error": None,
                       "result": {"output": "OK: fine | a=1", "code": 0}}]}
    assert cv._one(ok, "/host/a", 3) == ("OK: fine | a=1", 0)
    missing = {"results": [{"target": "/host/a", "outcome": "not-discovered", "error": "no live agent",
                            "result": None}]}
    assert cv._one(missing, "/host/a", 3) == ("UNKNOWN - check_vertebra: not-discovered on /host/a: no live agent", 3)
    slow = {"results": [{"target": "mon@x.test/agent", "outcome": "timeout", "error": "no answer", "result": None}]}
    assert cv._one(slow, "/host/a", 2) == ("CRITICAL - check_vertebra: timeout on mon@x.test: no answer", 2)
    assert cv._one({"results": []}, "/host/a", 3)[1] == 3


PATHS = ["/host/db1", "/cluster/c1/node/3", "/h", "/", "", "host/db1", "/host/", "//x", "/host/./x", "/host/..",
         "/.x", "/_x", "/a.b:c@d+e-f", "/-x", "/x-", "/x y", "/x\n", "/x\x00", "/é", "/x%2f", "/x/" + "a" * 128,
         "/x/" + "a" * 129, "/" + "/".join("s" * 16), "/" + "/".join("s" * 17), "/a*", "/a/**", "/A/Z9"]


@pytest.mark.parametrize("path", PATHS)
def test_lean_resource_check_agrees_with_the_path_rules(path: str) -> None:
    from agents import resources

    try:
        resources.check(path)
        canonical = True
    except resources.BadResource:
        canonical = False
    assert is_resource(path) is canonical


def test_lean_resource_check_agrees_on_every_character() -> None:
    from agents import resources

    for code in range(0x180):
        for path in (f"/{chr(code)}", f"/a{chr(code)}", f"/a{chr(code)}b/c"):
            try:
                canonical = resources.check(path) == path
            except resources.BadResource:
                canonical = False
            assert is_resource(path) is canonical, repr(path)


def test_the_lean_path_loads_neither_enum_nor_the_msgpack_library() -> None:
    """The lean path writes its states from agents.monitor.exit_codes (the names agree with State's) and
    its frames with agents.lean_msgpack; it finds and checks the state directory without pathlib.
    Each of enum, msgpack, the range parser, argparse, asyncio, re and pathlib costs a start
    milliseconds."""
    import subprocess
    import sys

    from agents.monitor import exit_codes, ranges, states

    assert ranges.State is states.State and cv.UNKNOWN == State.UNKNOWN
    assert exit_codes.NAMES == tuple(s.name for s in State) and [s.value for s in State] == [0, 1, 2, 3]
    assert states.plain_text is exit_codes.plain_text
    probe = ("import sys; from agents.monitor import check_vertebra as cv; from agents import gateway_client as g;"
             " cv.lean_args(['-H', 'h', '-c', 'c']); cv._problem('timeout', 'h', None, 2); cv._site('/usr', None);"
             " cv._one({'results': [{'target': 'm@x/a', 'outcome': 'ok', 'result': {'output': 'OK', 'code': 0}}]},"
             " 'h', 3); g.unpack(g.frame(g.request(None, None, {'op': 'monitor.check', 'timeout': 1.5}, None))[4:]);"
             " print(sorted(m for m in ('agents.monitor.ranges', 'argparse', 'asyncio', 're', 'pathlib', 'enum',"
             " 'msgpack', 'datetime', 'agents.errors', 'agents.monitor.states') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
