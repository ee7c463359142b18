"""The README's short tour, run as a new user runs it, against what docs/tour.md says it prints.

`vertebra up` on the example mesh file (what `make run` runs); then every command of the tour's
command blocks, in order, with what it prints on stdout and stderr together, as a terminal shows them
(a pipe here: progress comes as plain lines). docs/tour.md must list exactly those commands, and each
must print what it shows there, once both are read the same way (``normalized``): times, durations,
rates, ids, numbers, sizes, check states and how clones share space vary from run to run and machine
to machine; the words, fields, columns and outcomes do not.

After an intended change of what the tour prints, rewrite the transcript from a run:
``VERTEBRA_TOUR_WRITE=1 .venv/bin/python -m pytest tests/integration/test_tour.py`` (and read its diff).
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import subprocess
import sys

from conftest import ROOT, vertebra_up

README = ROOT / "README.md"
TRANSCRIPT = ROOT / "docs" / "tour.md"
PROGRAMS = {".venv/bin/vertebra": "agents.cli", ".venv/bin/check_vertebra": "agents.monitor.check_vertebra"}
HEADER = """# The tour, as it prints

What each command of the README's short tour prints, stdout and stderr together, on the mesh that
`make run` starts (the example mesh file, a fresh state directory). Long ops print their progress on
stderr: plain lines like these in a pipe, a bar with bytes, rate and time left on a terminal.

tests/integration/test_tour.py runs the same commands against a fresh `vertebra up` and fails when
one prints anything else, apart from what varies between runs and machines: times, durations, rates,
ids, sizes, other numbers, check states and how clones share space (which depends on the filesystem).
"""


def tour_commands() -> list[str]:
    """The commands of the README tour's command blocks, in order, without their comments."""
    text = README.read_text()
    tour = text[text.index("## A short tour"):text.index("### Who may do what")]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", tour, re.S):
        for line in block.splitlines():
            command = re.split(r"\s+#", line, maxsplit=1)[0].strip()
            if command:
                commands.append(command)
    return commands


def transcript() -> list[tuple[str, str]]:
    """(command, what it printed) of each command docs/tour.md shows."""
    shown = re.findall(r"```console\n\$ (.*?)\n(.*?)```", TRANSCRIPT.read_text(), re.S)
    return [(command, output) for command, output in shown]


def run(command: str, env: dict[str, str]) -> str:
    """What ``command`` prints, stdout and stderr as one; `$PWD/.vertebra` (the state directory of
    `make run`, in the directory it runs in) is this run's state directory."""
    program, *args = shlex.split(command.replace("$PWD/.vertebra", env["VERTEBRA_HOME"]))
    done = subprocess.run([sys.executable, "-m", PROGRAMS[program], *args], cwd=ROOT, env=env, timeout=120,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return done.stdout


def normalized(text: str, home: str = "", port: str = "") -> str:
    """What does not vary: the state directory as `.vertebra`, the example's port, and placeholders
    for times, durations, rates, ids, numbers and check states; runs of spaces as one (a column's
    width follows its values)."""
    if home:
        text = text.replace(home, ".vertebra")
    if port:
        text = text.replace(f":{port}", ":5322")
    # How clones share space depends on the filesystem and on being root (reflinks, overlays, copies).
    text = re.sub(r'"clone_sharing": "[^"]*"', '"clone_sharing": SHARING', text)
    text = re.sub(r'(?m)^\s*"(overlay|reflink)-clones",?\n', "", text)
    for pattern, placeholder in (
            (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)?", "TIME"),
            (r"\b[0-9a-f]{12,64}\b", "ID"),
            (r"\b(OK|WARNING|CRITICAL|UNKNOWN)\b", "STATE"),
            (r"\b(in )?\d+(\.\d+)? (ms|s|min|h|d)\b", "DURATION"),
            (r"-?\d+(\.\d+)?(e[+-]?\d+)?", "N"),
            (r"\bN (B|KiB|MiB|GiB|TiB|PiB|EiB)\b", "SIZE"),  # sizes as the filesystem measures them
            (r"[ \t]+", " ")):
        text = re.sub(pattern, placeholder, text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def test_the_readme_tour_prints_what_docs_tour_shows(tmp_path):
    commands = tour_commands()
    assert commands, "no command blocks found in the README's tour"
    writing = bool(os.environ.get("VERTEBRA_TOUR_WRITE"))
    if not writing:
        assert [c for c, _ in transcript()] == commands, (
            "docs/tour.md does not show the README tour's commands in order; rewrite it (see this test's docstring)")
    with vertebra_up(tmp_path) as (home, _shown):
        port = str(__import__("yaml").safe_load((home / "mesh.yaml").read_text())["server"]["port"])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "VERTEBRA_HOME": str(home), "PYTHONUNBUFFERED": "1",
               "COLUMNS": "100"}
        printed = [(command, run(command, env)) for command in commands]
    if writing:
        blocks = [f"```console\n$ {c}\n{normalized_paths(out, str(home), port)}```\n" for c, out in printed]
        TRANSCRIPT.write_text(HEADER + "\n" + "\n".join(blocks))
        return
    for (command, expected), (_, got) in zip(transcript(), printed):
        want, have = normalized(expected), normalized(got, str(home), port)
        assert want == have, (f"`{command}` printed something other than docs/tour.md shows:\n"
                              + "\n".join(difflib.unified_diff(want.splitlines(), have.splitlines(),
                                                               "docs/tour.md", "this run", lineterm="")))


def normalized_paths(text: str, home: str, port: str) -> str:
    """A run's output as the transcript shows it: the state directory and port as `make run` has them."""
    text = text.replace(home, ".vertebra").replace(f":{port}", ":5322")
    return text if text.endswith("\n") or not text else text + "\n"
