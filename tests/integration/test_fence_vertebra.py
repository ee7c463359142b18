"""fence_vertebra as a program: metadata valid against the installed RelaxNG schema and accepted by
Pacemaker's stonith_admin, validate-all, option=, and an honest failure without a mesh."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCHEMA = "/usr/share/cluster/relaxng/metadata.rng"


def fence_vertebra(*argv: str, stdin: str = "", env: dict | None = None, cwd: Path = REPO):
    return subprocess.run(
        [sys.executable, "-m", "agents.fencing.fence_vertebra", *argv],
        input=stdin, capture_output=True, text=True, timeout=30, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_metadata_validates_against_the_relaxng_schema(tmp_path):
    done = fence_vertebra("-o", "metadata")
    assert done.returncode == 0
    xml = tmp_path / "metadata.xml"
    xml.write_text(done.stdout)
    check = subprocess.run(["xmllint", "--noout", "--relaxng", SCHEMA, str(xml)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    for name in ("plug", "port", "nodename", "vertebra_home", "account", "cluster", "timeout"):
        assert f'<parameter name="{name}"' in done.stdout


def test_metadata_from_stdin_is_the_same():
    assert fence_vertebra(stdin="action=metadata\n").stdout == fence_vertebra("-o", "metadata").stdout


def test_a_broken_metadata_document_fails_the_schema(tmp_path):
    # The schema check above can fail: drop the required vendor-url and xmllint must refuse it.
    text = fence_vertebra("-o", "metadata").stdout
    start, end = text.index("<vendor-url>"), text.index("</vendor-url>") + len("</vendor-url>")
    xml = tmp_path / "broken.xml"
    xml.write_text(text[:start] + text[end:])
    check = subprocess.run(["xmllint", "--noout", "--relaxng", SCHEMA, str(xml)],
                           capture_output=True, text=True)
    assert check.returncode != 0


def test_validate_all_accepts_what_pacemaker_sends():
    done = fence_vertebra(stdin="nodename=node1\naction=validate-all\nport=node1\ntimeout=5\n"
                                "vertebra_home=/var/lib/vertebra\ncluster=c1\n")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("line, message", [
    ("timeout=abc", "not a valid time in seconds"),
    ("timeout=9999", "at most"),
    ("vertebra_home=relative/dir", "must be an absolute path"),
    ("vertebra_hme=/x", "unknown parameter 'vertebra_hme'"),
])
def test_validate_all_names_the_problem(line, message):
    done = fence_vertebra(stdin=f"action=validate-all\n{line}\n")
    assert done.returncode == 1
    assert message in done.stderr


@pytest.mark.parametrize("stdin", ["action=off\nport=node1\n", "action=reboot\nplug=node1\n",
                                   "action=status\nnodename=node1\n"])
def test_power_actions_fail_honestly_without_a_mesh(stdin, tmp_path):
    done = fence_vertebra(stdin=stdin, env={"VERTEBRA_HOME": str(tmp_path)})
    assert done.returncode == 1
    assert f"no mesh file at {tmp_path}/mesh.yaml" in done.stderr
    assert not (tmp_path / "mesh.yaml").exists()  # never created on a guess


def test_deprecated_option_key_is_an_action_with_a_warning_never_a_reboot(tmp_path):
    done = fence_vertebra(stdin="option=status\nport=node1\n", env={"VERTEBRA_HOME": str(tmp_path)})
    assert "deprecated" in done.stderr and "read option=status as action=status" in done.stderr
    assert "reboot" not in done.stderr
    assert done.returncode == 1


def test_missing_action_and_missing_node_are_errors():
    done = fence_vertebra(stdin="port=node1\n")
    assert done.returncode == 1 and "no action given" in done.stderr
    done = fence_vertebra(stdin="action=off\n")
    assert done.returncode == 1 and "needs the node" in done.stderr


def test_command_line_options_work_and_ignore_stdin(tmp_path):
    done = fence_vertebra("-o", "off", "-n", "node2", "--vertebra-home", str(tmp_path),
                          stdin="action=metadata\n")
    assert done.returncode == 1 and "no mesh file at" in done.stderr and "<resource-agent" not in done.stdout


def test_help_lists_the_options():
    done = fence_vertebra("-h")
    assert done.returncode == 0 and "--vertebra-home" in done.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("stonith_admin")
                    or not shutil.which("unshare"),
                    reason="needs root, unshare and stonith_admin (pacemaker-cli-utils)")
def test_stonith_admin_reads_metadata_and_validates(tmp_path):
    # Pacemaker finds agents only in /usr/sbin; in a private mount namespace, fence_vertebra is
    # bind-mounted over fence_dummy's name, and nothing outside the namespace changes.
    program = tmp_path / "fence_vertebra"
    program.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} "
                       "-m agents.fencing.fence_vertebra \"$@\"\n")
    program.chmod(0o755)
    script = (f"mount --bind {program} /usr/sbin/fence_dummy || exit 99\n"
              "stonith_admin --metadata --agent fence_dummy; echo \"rc=$?\"\n"
              "stonith_admin --validate --agent fence_dummy --option timeout=5; echo \"rc=$?\"\n"
              "stonith_admin --validate --agent fence_dummy --option timeout=abc; echo \"rc=$?\"\n")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)
    if done.returncode == 99:
        pytest.skip("cannot bind-mount in a private mount namespace here")
    out = done.stdout
    assert 'resource-agent name="fence_vertebra"' in out
    codes = [line for line in out.splitlines() if line.startswith("rc=")]
    assert codes[0] == "rc=0" and codes[1] == "rc=0" and codes[2] != "rc=0", out
    assert "Validation of fence_dummy succeeded" in out
    assert "not a valid time in seconds" in out


def test_power_actions_never_use_the_working_directory(tmp_path):
    (tmp_path / ".vertebra").mkdir()
    (tmp_path / ".vertebra" / "mesh.yaml").write_text("operator: operator\n")
    env = {k: v for k, v in os.environ.items() if k != "VERTEBRA_HOME"}
    done = subprocess.run([sys.executable, "-m", "agents.fencing.fence_vertebra"], input="action=off\nport=node1\n",
                          capture_output=True, text=True, timeout=30, cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1 and str(tmp_path) not in done.stderr, done.stderr
    if not os.path.exists("/etc/vertebra/mesh.yaml"):  # a machine that is not a Vertebra site
        assert "no mesh file at /etc/vertebra/mesh.yaml" in done.stderr, done.stderr


def test_power_actions_refuse_a_state_directory_others_may_write(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "mesh.yaml").write_text("operator: operator\n")
    os.chmod(home, 0o775)
    done = fence_vertebra(stdin=f"action=off\nport=node1\ncluster=c1\nvertebra_home={home}\n")
    assert done.returncode == 1
    assert (f"Failed: refusing the state directory {home}: it is writable by its group (mode 0775); only root and"
            f" its owner may write it (chmod go-w {home})") in done.stderr, done.stderr
    os.chmod(home, 0o755)
    os.chmod(home / "mesh.yaml", 0o666)
    done = fence_vertebra(stdin=f"action=status\nport=node1\ncluster=c1\nvertebra_home={home}\n")
    assert done.returncode == 1
    assert f"Failed: refusing the mesh file {home}/mesh.yaml: it is writable by its group and everyone" in done.stderr
