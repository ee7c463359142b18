"""The monitor agent kind: Nagios-style check plugins run through the Unix process API.

``ranges`` holds the threshold-range rules and check states (shared with ``check_vertebra``),
``perfdata`` the performance-data grammar, ``output`` how Nagios splits plugin output, ``runner``
how a plugin is spawned, bounded and killed, and ``checks`` the catalogue of named checks with typed
arguments that callers may set.
"""
