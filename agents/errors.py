"""The errors an op can end in, and how each travels on the wire.

Each error has an application condition (an element in the Vertebra namespace), the standard XMPP
stanza error condition and type it rides on, and the outcome a caller reports for it. This table is
the only place that mapping is written; the agent uses it to answer and the client to read answers.
"""

from __future__ import annotations

from enum import Enum

# The errors of the way to the mesh live apart, where a short program can have them without enum.
from .connect_errors import CallInterrupted as CallInterrupted, ConnectError as ConnectError


class Outcome(str, Enum):
    """The one named state every target of a call ends in."""

    OK = "ok"
    FAILED = "failed"
    DENIED = "denied"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    NOT_DISCOVERED = "not-discovered"


class OpError(Exception):
    """An op ended without a result. The message is a sentence a person can act on."""

    condition = "failed"  # application condition
    stanza_condition = "undefined-condition"
    stanza_type = "cancel"
    outcome = Outcome.FAILED

    def __init__(self, text: str, **details: object) -> None:
        super().__init__(text)
        self.text = text
        self.details = details


class BadArguments(OpError):
    condition, stanza_condition, stanza_type = "bad-argument", "bad-request", "modify"


class BadPayload(OpError):
    condition, stanza_condition, stanza_type = "bad-payload", "bad-request", "modify"


class TooLarge(OpError):
    # RFC 6120's not-acceptable ("does not meet criteria defined by the recipient"); slixmpp cannot
    # emit policy-violation, which it does not know.
    condition, stanza_condition, stanza_type = "too-large", "not-acceptable", "modify"


class UnknownOp(OpError):
    condition, stanza_condition, stanza_type = "unknown-op", "feature-not-implemented", "cancel"


class Denied(OpError):
    condition, stanza_condition, stanza_type = "denied", "forbidden", "auth"
    outcome = Outcome.DENIED


class OpTimeout(OpError):
    condition, stanza_condition, stanza_type = "timeout", "remote-server-timeout", "wait"
    outcome = Outcome.TIMEOUT


class Expired(OpTimeout):
    """A request that reached its agent after its deadline and was never started. On the wire it is a
    plain ``timeout``; the agent does not remember it under its rid, so a retry with time left runs."""


class StaleTerm(Denied):
    """A workflow step from a broker instance whose lead has ended: the agent has seen a newer term (the
    leader's fencing token) from that broker. On the wire a plain ``denied``; the agent does not remember
    it under its rid, so the same step sent by the current leader still runs."""


class InternalError(OpError):
    condition, stanza_condition, stanza_type = "internal", "internal-server-error", "cancel"


class Interrupted(OpError):
    """An admitted request for an op that changes state, cut off before its outcome was recorded (its agent
    stopped or was killed while running it): it may or may not have taken effect, and a repeat of its rid
    gets this answer instead of running it again (agents/idempotency.py)."""

    condition, stanza_condition, stanza_type = "interrupted", "undefined-condition", "cancel"


class ResourceConstraint(OpError):
    """A request refused unread because its sender is over its rate or has too many waiting (intake.py)."""

    condition, stanza_condition, stanza_type = "resource-constraint", "resource-constraint", "wait"


_BY_CONDITION = {cls.condition: cls for cls in
                 (OpError, BadArguments, BadPayload, TooLarge, UnknownOp, Denied, OpTimeout, InternalError,
                  Interrupted, ResourceConstraint)}

# Stanza errors the server itself returns when the addressee is gone before a request reached it.
# Not recipient-unavailable: Prosody bounces with it the stanzas a dropped session had received but
# not yet acknowledged (XEP-0198), so the request may have run; a caller reports that as a timeout.
UNREACHABLE_CONDITIONS = {"service-unavailable", "item-not-found", "remote-server-not-found", "gone"}


def error_for(condition: str | None, text: str) -> OpError:
    """Rebuild the error an agent sent, from its application condition."""
    return _BY_CONDITION.get(condition or "", OpError)(text)
