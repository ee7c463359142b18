"""A Python that other Unix users (nagios, nobody) can run Vertebra with, wherever the checkout is.

Tests that run Vertebra as another user (as Nagios runs check_vertebra) need that user to reach the
interpreter and the code. A checkout in a private directory (``mktemp -d`` makes it 0700) is out of
their reach; so, when the checkout or its venv cannot be reached by others, the packages and the venv's
site-packages are copied once per test session into a directory everyone may read, and run with
Debian's /usr/bin/python3 (which deploy/install.sh makes the venv from: the same compiled modules).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import stat
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PACKAGES = ("agents", "broker", "rbac")


def reachable_by_others(path: Path) -> bool:
    """Whether every directory down to ``path`` may be entered by any user (the ``x`` bit for others)."""
    for directory in [*reversed(path.parents), path] if path.is_dir() else reversed(path.parents):
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return False
    return True


@functools.cache
def python_for_others() -> tuple[str, dict[str, str]]:
    """(interpreter, extra environment) another user can import Vertebra with."""
    site = Path(sysconfig.get_paths(vars={"base": str(ROOT / ".venv"), "platbase": str(ROOT / ".venv")})["purelib"])
    if reachable_by_others(ROOT) and reachable_by_others(site):
        if os.path.realpath(VENV_PYTHON).startswith("/usr/"):
            return str(VENV_PYTHON), {}
        return "/usr/bin/python3", {"PYTHONPATH": f"{ROOT}:{site}"}  # a venv made from a private Python
    copy = Path(tempfile.mkdtemp(prefix="vertebra-readable-"))
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    skip = shutil.ignore_patterns("__pycache__")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, copy / package, ignore=skip)
    shutil.copytree(site, copy / "site", ignore=skip, symlinks=True)
    for directory, _dirs, files in os.walk(copy):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644 | (os.stat(os.path.join(directory, name)).st_mode & 0o111))
    return "/usr/bin/python3", {"PYTHONPATH": f"{copy}:{copy / 'site'}"}
