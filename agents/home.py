"""The state directory: where a mesh keeps everything it writes, and the one rule that finds it.

``--home`` (fence_vertebra: ``vertebra_home=``), else ``$VERTEBRA_HOME``, else a default: ``./.vertebra``
for `vertebra` and check_vertebra, ``/var/lib/vertebra`` for fence_vertebra, which Pacemaker runs from no
directory in particular. Inside: ``mesh.yaml``; ``server/`` (the private server); ``secrets/`` (generated
passwords); ``state/NAME/`` (each actor's databases and logs of decisions); ``logs/`` (what `vertebra up`
started); ``run/`` (the gateway socket, and the lock a running `vertebra up` holds).

Only the standard library here: the short-lived programs Nagios and Pacemaker run import it.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "VERTEBRA_HOME"
DEFAULT = ".vertebra"


def state_home(given: str | os.PathLike[str] | None = None, default: str = DEFAULT) -> Path:
    """The state directory, absolute: ``given``, else ``$VERTEBRA_HOME``, else ``default``."""
    return Path(given or os.environ.get(ENV) or default).absolute()


def actor_state(home: Path, name: str) -> Path:
    """Where the actor running as account ``name`` keeps its state."""
    return home / "state" / name
