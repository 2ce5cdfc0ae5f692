"""Typed errors of the SIP stack.

Every way a message can be unusable raises a subclass of :class:`SipParseError`, never a generic
exception, so the transport can answer 400 (when enough of a request was read) or drop and count.
``kind`` is a short stable label for counters; ``reason`` is fit for a 400 reason phrase.
"""

from __future__ import annotations


class SipParseError(ValueError):
    """The bytes are not a usable SIP message."""

    kind = "malformed"

    def __init__(self, reason: str, kind: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if kind is not None:
            self.kind = kind


class LimitExceeded(SipParseError):
    """The message is larger than a configured limit (size, header count, line or URI length)."""

    kind = "limit"


class IncompleteMessage(SipParseError):
    """A stream has not delivered the whole message yet (not an error on its own)."""

    kind = "incomplete"
