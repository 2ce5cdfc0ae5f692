"""The control socket's wire format, what both ends share: one JSON object per line.

A module of its own so that the daemon (:mod:`clearip.relay.service.control`) and clearipctl
(:mod:`clearip.ctl.client`) write and read lines one way, and clearipctl does not load the
server (asyncio, the policy) to do it.
"""

from __future__ import annotations

import json
from typing import Any


def encode_line(message: object) -> bytes:
    """A request, a reply or a trace record as one line."""
    return json.dumps(message).encode() + b"\n"


def decode_reply(line: bytes) -> dict[str, Any] | None:
    """A reply as sent (a JSON object); None when the line is not one (garbled, cut short)."""
    try:
        reply = json.loads(line)
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None
