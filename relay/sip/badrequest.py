"""A 400 Bad Request for a request the parser rejected (RFC 3261 §8.2.6, §21.4.1).

When a request is malformed but its Via, From, To, Call-ID and CSeq lines can still be found,
the sender deserves a 400 whose reason phrase names the problem instead of silence. Those lines
are copied as received; nothing else of the request is trusted. ACKs are never answered.
"""

from __future__ import annotations

import re

_line_re = re.compile(
    rb"^(via|v|from|f|to|t|call-id|i|cseq)[ \t]*:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*", re.I | re.M
)
_REQUIRED = {b"via", b"from", b"to", b"call-id", b"cseq"}
_COMPACT = {b"v": b"via", b"f": b"from", b"t": b"to", b"i": b"call-id"}
_reason_unsafe_re = re.compile(r"[^\x20-\x7e]")


def build_bad_request(data: bytes, reason: str) -> bytes | None:
    """The bytes of a 400 answering ``data``, or None when it cannot or must not be answered."""
    head = data.split(b"\r\n\r\n", 1)[0]
    start = head.split(b"\r\n", 1)[0]
    if start.startswith(b"SIP/") or start.startswith(b"ACK ") or b" " not in start:
        return None
    lines: list[bytes] = []
    seen: set[bytes] = set()
    for m in _line_re.finditer(head):
        name = m.group(1).lower()
        seen.add(_COMPACT.get(name, name))
        line = m.group(0)
        if _COMPACT.get(name, name) == b"to" and b";tag=" not in line.lower():
            line += b";tag=400bad"
        lines.append(line)
    if not seen >= _REQUIRED:
        return None
    phrase = _reason_unsafe_re.sub("?", reason)[:120] or "Bad Request"
    return b"\r\n".join([f"SIP/2.0 400 {phrase}".encode(), *lines, b"Content-Length: 0", b"", b""])
