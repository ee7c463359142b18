#!/usr/bin/env python3
"""`make bench`: every benchmark in turn, then one table of every target (figure, MET or MISS).

Each benchmark runs in a process of its own and writes its verdicts to ``bench/results/<name>.json``
(bench/verdicts.py); one that fails or stops without a verdict shows as a MISS with its exit status,
and the others still run. The summary, with the machine's cores and load average at the start, is
printed and written to ``bench/results/summary.json``. Each benchmark starts once the load average the one
before left has fallen under 1 (or after three minutes of waiting for it). Exit status 0 only when every
target is met.

Usage::

    python bench/run.py                 # every benchmark
    python bench/run.py roundtrip flood # some of them
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import verdicts

BENCH = Path(__file__).resolve().parent
# Each benchmark with the arguments make bench gives it. scale measures only the size the target names
# (its default adds 10,000, 20,000 and the login storm: another quarter of an hour).
BENCHMARKS = {"roundtrip": [], "authz": [], "flood": [], "checks": [], "fencing": [], "storage": [],
              "cluster": [], "scale": ["--agents", "50000", "--no-storm"]}


# The longest a benchmark waits for the one before it to stop weighing on the load average.
SETTLE_SECONDS = 180.0


def settle() -> None:
    """Wait (at most SETTLE_SECONDS) for the 1-minute load average to fall under verdicts.BUSY_LOAD: the
    benchmark before leaves it high for a minute or so (and sometimes work behind it: a server stopping,
    writeback), and each benchmark should start as it would alone on a quiet machine."""
    started = time.monotonic()
    while os.getloadavg()[0] >= verdicts.BUSY_LOAD and time.monotonic() - started < SETTLE_SECONDS:
        time.sleep(5)
    waited = time.monotonic() - started
    if waited >= 5:
        print(f"(waited {waited:.0f} s for the load average to fall: {os.getloadavg()[0]:.2f} now)", flush=True)


def run(name: str) -> list[dict]:
    """Run one benchmark; its recorded targets, or one MISS row saying why there are none."""
    out = verdicts.RESULTS_DIR / f"{name}.json"
    out.unlink(missing_ok=True)
    print(f"\n=== bench/{name}.py", flush=True)
    settle()
    started = time.monotonic()
    status = subprocess.call([sys.executable, str(BENCH / f"{name}.py"), *BENCHMARKS[name]], cwd=BENCH)
    elapsed = time.monotonic() - started
    targets = json.loads(out.read_text())["targets"] if out.is_file() else []
    if not targets:
        targets = [{"name": f"{name}: ran to the end", "figure": f"exit {status} after {elapsed:.0f} s, no verdicts",
                    "target": "every target reported", "status": "MISS"}]
    return [{"benchmark": name, **t} for t in targets]


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    machine = verdicts.begin()
    rows = [row for name in names for row in run(name)]
    head = ("benchmark", "target", "figure", "wanted", "status")
    table = [head] + [(r["benchmark"], r["name"], r["figure"], r["target"], r["status"]) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    print(f"\nsummary: {machine['cores']} cores, load average {machine['load_average']:.2f} at the start"
          f" ({machine['started']})")
    for k, row in enumerate(table):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    missed = sum(r["status"] != "MET" for r in rows)
    print(f"{len(rows) - missed} of {len(rows)} targets met" + (f"; {missed} MISS" if missed else ""))
    verdicts.RESULTS_DIR.mkdir(exist_ok=True)
    (verdicts.RESULTS_DIR / "summary.json").write_text(json.dumps({"machine": machine, "targets": [
        {"benchmark": r["benchmark"], "name": r["name"], "figure": r["figure"], "target": r["target"],
         "status": r["status"]} for r in rows]}, indent=1) + "\n")
    return 0 if missed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
