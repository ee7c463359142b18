"""check_vertebra: the Nagios plugin that asks the mesh instead of NRPE.

Not ready yet: the monitor issue builds it (-H, -R, -c, -a, -t, -h, -V by the Monitoring Plugins
guidelines). Until then it answers every call as a plugin must when it cannot check anything:
one line on stdout and exit code 3 (UNKNOWN).
"""

from __future__ import annotations

import sys

UNKNOWN = 3


def main(argv: list[str] | None = None) -> int:
    print("UNKNOWN - check_vertebra is not ready yet: the monitor agent's issue builds it; use NRPE or"
          " `vertebra call` until then")
    return UNKNOWN


if __name__ == "__main__":
    sys.exit(main())
