"""The check states as a plugin's exit codes and their names, and ``plain_text``: what a plugin needs to
write its one line, with nothing to import.

``agents.monitor.states`` has the same states as an enum (``State``, with parsing and the severity
order) and re-exports ``plain_text``. check_vertebra's lean path uses this module instead, because
``import enum`` costs it ~3 ms of a start and Nagios starts it for every check
(tests/unit/test_check_vertebra_lean.py holds the names here to ``State``'s).
"""

NAMES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")  # the name of each exit code, 0 to 3
UNKNOWN = 3

# Nagios reads everything after a line's first "|" as perfdata. Text that is not a plugin's own output
# (a caller's value echoed in an error, usage text, a host's line in an aggregate) has each bar written
# as U+00A6 BROKEN BAR, which reads the same and splits nothing.
BAR_IN_TEXT = "\u00a6"


def plain_text(text: str) -> str:
    """``text`` as plugin output text that Nagios keeps whole: no ``|``, which would start perfdata."""
    return text.replace("|", BAR_IN_TEXT)
