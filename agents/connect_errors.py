"""The errors of a caller's way to the mesh: no session could be had, or it broke during a call.

Apart from agents.errors (which re-exports both), whose op outcomes are an enum: a short program
that reaches the mesh through the gateway needs only these, and ``import enum`` costs it ~3 ms of a
start (check_vertebra runs once per Nagios check).
"""


class ConnectError(Exception):
    """No session with the mesh could be had; the message says why and what to check."""


class CallInterrupted(ConnectError):
    """The way to the mesh broke during a call: the op may have run (a timeout, not unreachable)."""
