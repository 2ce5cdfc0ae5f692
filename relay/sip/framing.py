"""Stream framing for SIP over TCP/TLS (RFC 3261 §18.3, RFC 5626 §4.4.1 keep-alives).

Sans-IO: :meth:`StreamFramer.feed` takes whatever bytes a read returned and gives back complete
messages (bytes) and keep-alive events. Partial reads and several messages in one read are both
normal. Content-Length is mandatory on streams; a message without it, with several, or larger
than the limit makes the stream unusable and raises :class:`SipParseError` (close the connection).

Keep-alives: a CRLFCRLF "ping" between messages must be answered with a CRLF "pong"
(:class:`Ping`); a lone CRLF is a pong from the peer and is ignored.
"""

from __future__ import annotations

import re

from clearip.relay.sip.errors import LimitExceeded, SipParseError
from clearip.relay.sip.parser import DEFAULT_LIMITS, Limits


class Ping:
    """The peer sent CRLFCRLF: answer with :data:`PONG`."""

    __slots__ = ()


PING = Ping()
PONG = b"\r\n"
_content_length_re = re.compile(rb"\r\n(?:content-length|l)[ \t]*:[ \t]*(\S*)[ \t]*(?=\r\n)", re.I)


class StreamFramer:
    """Cuts a byte stream into SIP messages."""

    __slots__ = ("_buffer", "_limits")

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._buffer = bytearray()
        self._limits = limits

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held (0 between messages)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes | Ping]:
        buffer = self._buffer
        buffer += data
        out: list[bytes | Ping] = []
        while buffer:
            if buffer[:1] == b"\r":
                if buffer[:4] == b"\r\n\r\n":
                    out.append(PING)
                    del buffer[:4]
                    continue
                if len(buffer) < 4 and b"\r\n\r\n".startswith(bytes(buffer)):
                    break  # could still become a ping
                if buffer[:2] == b"\r\n":
                    del buffer[:2]  # a pong
                    continue
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > self._limits.max_message_size:
                    raise LimitExceeded("headers larger than the message size limit", "too-large")
                break
            lengths = _content_length_re.findall(buffer, 0, end + 2)
            if not lengths:
                raise SipParseError("Content-Length is required on stream transports", "framing")
            if len(set(lengths)) > 1 or not lengths[0].isdigit():
                raise SipParseError("ambiguous or malformed Content-Length", "content-length")
            total = end + 4 + int(lengths[0])
            if total > self._limits.max_message_size:
                raise LimitExceeded(
                    f"message larger than {self._limits.max_message_size} bytes", "too-large"
                )
            if len(buffer) < total:
                break
            out.append(bytes(buffer[:total]))
            del buffer[:total]
        return out
