"""The monitor agent kind: Nagios-style check plugins run through the Unix process API.

``states`` holds the check states (``exit_codes`` their plain codes and names, for check_vertebra's
lean path) and ``ranges`` the threshold-range rules (both shared with ``check_vertebra``),
``perfdata`` the performance-data grammar, ``output`` how Nagios splits plugin output, ``runner``
how a plugin is spawned, bounded and killed, and ``checks`` the catalogue of named checks with typed
arguments that callers may set.
"""
