"""fence_vertebra's lean path: it takes exactly the requests the full path would carry out without a
word, reads them the same way, answers reports the same way, and keeps its own identity cache."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agents import fastpath
from agents.fencing import fence_api, names
from agents.fencing import fence_vertebra as fv

PCMK = "port=node1\nnodename=node1\ncluster=c1\nvertebra_home=/var/lib/v\n"
LEAN = [
    "action=off\n" + PCMK,
    "action=reboot\nplug=node1\n",
    "action=STATUS\nport=node1\nplug=node1\ntimeout=12.5\n",
    "# a comment\n\naction=on\nnodename=db.1@x\naccount=pcmk-c1\ntimeout=\"600\"\n",
    "action=list\n",
    "action=monitor\ncluster=c1\nvertebra-home=/h\n",
    "action=list\nport=\nnodename=n2\n",
    "action=off\nplug=node1\nport=\nnodename=other\n",
]
FULL_ONLY = [
    "",
    "action=metadata\n",
    "action=validate-all\n" + PCMK,
    "action=off\n",                                   # no node
    "action=off\nplug=a\nport=b\n",                   # two targets
    "option=off\nport=node1\n",                       # deprecated key: a warning
    "action=off\nport=node1\nverbose=1\n",            # not a lean key
    "action=off\nport=node1\npcmk_host_list=x\n",     # unknown: a warning
    "action=off\nport=node1\naction=off\n",           # repeated
    "action=off\nport=node1\ntimeout=0\n",
    "action=off\nport=node1\ntimeout=601\n",
    "action=off\nport=node1\ntimeout=nan\n",
    "action=off\nport=node1\ntimeout=soon\n",
    "action=off\nport=node1\nvertebra_home=rel\n",
    "action=off\nport=node1\nvertebra_home=\n",
    "action=off\nport=node1\ncluster=\n",
    "action=off\nport=bad/node\n",
    "action=off\nport=node1\naccount=-x\n",
    "action = off\nport=node1\n",
    "action=off\nport=node1\njunk\n",
    "action=dance\nport=node1\n",
]


def _full(stdin: str) -> tuple[str, str | None, dict[str, str]] | None:
    """What the full path would carry out without a word, or None."""
    try:
        request = fence_api.build_request(fence_api.parse_stdin(stdin), fv.parameters())
    except fence_api.FenceApiError:
        return None
    if request.warnings or request.unknown or fv.validate(request) or request.action not in fv.HOT_ACTIONS:
        return None
    return request.action, request.node, request.options


@pytest.mark.parametrize("stdin", LEAN)
def test_lean_reading_matches_the_full_path(stdin: str) -> None:
    lean = fv.lean_request([], stdin)
    assert lean is not None
    full = _full(stdin)
    assert full is not None
    assert lean[:2] == full[:2]
    for key in ("cluster", "vertebra_home", "account", "timeout"):
        assert lean[2].get(key) == full[2].get(key)


@pytest.mark.parametrize("stdin", FULL_ONLY)
def test_other_requests_go_the_full_way(stdin: str) -> None:
    assert fv.lean_request([], stdin) is None


def test_command_lines_go_the_full_way() -> None:
    assert fv.lean_request(["-o", "off", "-n", "node1"], None) is None


def test_a_relative_vertebra_home_in_the_environment_goes_the_full_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERTEBRA_HOME", "rel")
    assert fv.lean_request([], "action=off\nport=node1\n") is None
    assert _full("action=off\nport=node1\n") is None
    assert fv.lean_request([], "action=off\nport=node1\nvertebra_home=/h\n") is not None


def test_exit_codes_are_the_fence_api_ones() -> None:
    assert (fv.SUCCESS, fv.FAILURE, names.EXIT_STATUS_OFF) == (fence_api.ExitCode.SUCCESS, fence_api.ExitCode.FAILURE,
                                                       fence_api.ExitCode.STATUS_OFF)
    for state in ("on", "off", "unknown"):
        assert fv.STATUS_EXIT.get(state, fv.FAILURE) == fence_api.status_exit_for(state)
    # One definition (agents/fencing/names.py), not copies held in agreement.
    assert fv.TARGET_ACTIONS is fence_api.TARGET_ACTIONS
    assert fv.NODE_KEYS is fence_api.NODE_KEYS
    assert fv.STATUS_EXIT is names.STATUS_EXIT


def _talk(action: str, node: str | None, options: dict[str, str], reports: list[dict]) -> tuple[list, int]:
    asked = []
    replies = iter(reports)

    def ask(*request):  # type: ignore[no-untyped-def]
        asked.append(request)
        return next(replies)
    return asked, fv._drive(fv.conversation(action, node, options), ask)


def _ok(result: dict, target: str = "fence1@x.test/agent") -> dict:
    return {"op": "x", "results": [{"target": target, "outcome": "ok", "result": result, "error": None}]}


def test_an_off_without_a_cluster_asks_which_cluster_first(capsys: pytest.CaptureFixture[str]) -> None:
    asked, code = _talk("off", "node1", {}, [_ok({"clusters": {"c1": ["node1"], "c2": ["db1"]}}),
                                             _ok({"ok": True, "state": "off", "message": "node1 is off"})])
    assert asked == [("fence.list", {"cluster": ""}, [], "all"),
                     ("fence.off", {"cluster": "c1", "node": "node1"}, ["/cluster/c1/node/node1"], "one")]
    assert code == 0 and capsys.readouterr().out == "Success: node1 is off\n"


def test_status_and_failures_read_as_before(capsys: pytest.CaptureFixture[str]) -> None:
    assert _talk("status", "n", {"cluster": "c"}, [_ok({"state": "off"})])[1] == 2
    assert capsys.readouterr().out == "Status: OFF\n"
    denied = {"op": "x", "results": [{"target": "/cluster/c/node/n", "outcome": "denied", "result": None,
                                      "error": "no"}]}
    assert _talk("off", "n", {"cluster": "c"}, [denied])[1] == 1
    err = capsys.readouterr().err
    assert "Failed: off n via /cluster/c/node/n: denied: no" in err and "n is NOT known to be off" in err
    assert _talk("off", "n", {"cluster": "c"}, [_ok({"ok": True, "state": "on"})])[1] == 1
    assert _talk("list", None, {}, [_ok({"clusters": {"c": ["b", "a"]}})])[1] == 0
    assert capsys.readouterr().out == "a,\nb,\n"
    with pytest.raises(fv.MeshUnavailableError, match="no fencing agent in the mesh can fence node z"):
        _talk("off", "z", {}, [_ok({"clusters": {"c": ["a"]}})])


def test_its_own_identity_cache(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    os.chmod(home / "run", 0o700)
    (home / "secrets").mkdir()
    (home / "secrets" / "pcmk.password").write_text("pw\n")
    (home / "mesh.yaml").write_text("server: {domain: one.test}\noperator: operator\n")
    got = fastpath.identity(str(home / "mesh.yaml"), str(home), "pcmk", fv.CACHE_NAME)
    assert got == ("pcmk@one.test", "pw")
    assert stat.S_IMODE((home / "run" / fv.CACHE_NAME).stat().st_mode) == 0o600
    assert fv.CACHE_NAME != "check_vertebra.cache"
    # Read back from the cache (the mesh file's parser is not loaded), without the msgpack library.
    code = ("import sys; from agents import fastpath;"
            f" got = fastpath.identity({str(home / 'mesh.yaml')!r}, {str(home)!r}, 'pcmk', {fv.CACHE_NAME!r});"
            " print(got, sorted({'msgpack', 'yaml', 'agents.config'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True, timeout=60)
    assert done.stdout.strip() == "('pcmk@one.test', 'pw') []", done.stderr


def test_no_gateway_means_the_full_path_and_its_message(tmp_path: Path) -> None:
    """Without a gateway socket the lean path steps aside; the full path says what is missing."""
    done = subprocess.run([sys.executable, "-m", "agents.fencing.fence_vertebra"], text=True, capture_output=True,
                          input=f"action=status\nport=node1\ncluster=c1\nvertebra_home={tmp_path}\ntimeout=5\n",
                          timeout=60)
    assert done.returncode == 1
    assert f"no mesh file at {tmp_path}/mesh.yaml" in done.stderr


def test_the_lean_path_loads_neither_asyncio_nor_the_device_registry_nor_re_enum_or_msgpack() -> None:
    """Each costs a start milliseconds, and Pacemaker starts fence_vertebra for every action."""
    code = ("import sys, agents.fencing.fence_vertebra as fv; from agents import gateway_client as g;"
            " fv.lean_request([], 'action=off\\nport=n\\ncluster=c1\\n');"
            " g.unpack(g.frame(g.request(None, None, {'op': 'fence.off', 'timeout': 2.5}, None))[4:]);"
            " bad = {'asyncio', 'yaml', 'agents.fencing.devices', 'agents.fencing.settings',"
            " 'agents.fencing.fence_api', 're', 'enum', 'msgpack', 'agents.errors'} & set(sys.modules);"
            " print(sorted(bad))")
    done = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


def test_keys_are_checked_as_the_fence_agent_api_says() -> None:
    """agents.plain_names checks without re what the Fence Agent API's key rule says, for every
    character (segments: tests/unit/test_rbac_paths.py)."""
    import re

    from agents.plain_names import is_key

    key_rule = r"[A-Za-z0-9][A-Za-z0-9_-]*"
    words = ["", "n1", "_x", "-x", "x-", "a_b-c", "node 1", "n\n", "é"]
    words += [f"{c}" for c in map(chr, range(0x180))] + [f"a{c}b" for c in map(chr, range(0x180))]
    for word in words:
        assert is_key(word) is bool(re.fullmatch(key_rule, word)), repr(word)
