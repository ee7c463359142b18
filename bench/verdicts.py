"""What every benchmark reports the same way: the machine it ran on, and each target's verdict.

A benchmark calls ``begin()`` first (it prints the machine's cores and load average, and warns when
the load is above 1: figures from a busy machine are not comparable), ``record()`` once per target,
and ``save()`` at the end, which writes ``bench/results/<benchmark>.json`` (ignored by git): one
object per target with ``name``, ``figure``, ``target`` and ``status`` (``MET`` or ``MISS``).
``bench/run.py`` (``make bench``) runs every benchmark and prints one table of all of them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().with_name("results")
BUSY_LOAD = 1.0

_machine: dict = {}
_targets: list[dict] = []


def machine() -> dict:
    """Cores and the 1-minute load average now."""
    return {"cores": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2)}


def begin() -> dict:
    """Note the machine at the start; warn on stderr when it is busy."""
    _machine.update(machine(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    print(f"machine: {_machine['cores']} cores, load average {_machine['load_average']:.2f} at the start", flush=True)
    if _machine["load_average"] > BUSY_LOAD:
        print(f"warning: the load average is {_machine['load_average']:.2f} (above {BUSY_LOAD:g}): other work shares"
              " this machine, and the figures below are not comparable with a quiet run", file=sys.stderr, flush=True)
    return dict(_machine)


def record(name: str, figure: str, target: str, met: bool) -> bool:
    """One target's outcome, e.g. ``record("op round trip p50 / bare", "1.21x", "<= 1.3x", True)``."""
    _targets.append({"name": name, "figure": figure, "target": target, "status": "MET" if met else "MISS"})
    return met


def save(benchmark: str | None = None) -> Path:
    """Write what was recorded to ``bench/results/<benchmark>.json``; the benchmark's file name by default."""
    benchmark = benchmark or Path(sys.argv[0]).stem
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{benchmark}.json"
    doc = {"benchmark": benchmark, "machine": _machine or machine(), "targets": _targets}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path


def all_met() -> bool:
    return bool(_targets) and all(t["status"] == "MET" for t in _targets)


def print_table(head: Sequence[str], rows: Iterable[Sequence[str]], notes: Iterable[str] = ()) -> None:
    """A benchmark's own table, as each prints it: after a blank line, the head underlined, then a row
    a line (the first column left-aligned, the figures right-aligned), then each note as ``- note``."""
    table = [tuple(head), *(tuple(r) for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print()
    for k, r in enumerate(table):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    for note in notes:
        print(f"- {note}")
