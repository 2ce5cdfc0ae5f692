"""Stream framing for SIP over TCP/TLS (RFC 3261 §18.3, RFC 5626 §4.4.1 keep-alives).

Sans-IO: :meth:`StreamFramer.feed` takes whatever bytes a read returned and gives back complete
messages (bytes) and keep-alive events. Partial reads and several messages in one read are both
normal. Content-Length is mandatory on streams; a message without it, with several, or larger
than the limit makes the stream unusable and raises :class:`SipParseError` (close the connection).

Keep-alives: a CRLFCRLF "ping" between messages must be answered with a CRLF "pong"
(:class:`Ping`); a lone CRLF is a pong from the peer (:class:`Pong`). A lone CRLF could also be
the first half of a ping, so it is held until the next bytes decide, except right after we sent
a ping ourselves (:meth:`StreamFramer.expect_pong`): then the next CRLF is that ping's pong
(RFC 5626 §4.4.1), reported at once, and two pongs in a row are never mistaken for a ping.
"""

from __future__ import annotations

import re

from clearip.relay.sip.errors import LimitExceeded, SipParseError
from clearip.relay.sip.parser import DEFAULT_LIMITS, Limits


class Ping:
    """The peer sent CRLFCRLF: answer with :data:`PONG`."""

    __slots__ = ()


class Pong:
    """The peer sent a lone CRLF: the answer to a ping (proof that it is alive)."""

    __slots__ = ()


PING = Ping()
PONG_RECEIVED = Pong()
PING_BYTES = b"\r\n\r\n"
PONG = b"\r\n"
_KEEPALIVE_PREFIXES = (b"\r", b"\r\n", b"\r\n\r")
_content_length_re = re.compile(rb"\r\n(?:content-length|l)[ \t]*:[ \t]*(\S*)[ \t]*(?=\r\n)", re.I)


class StreamFramer:
    """Cuts a byte stream into SIP messages."""

    __slots__ = ("_awaiting_pong", "_buffer", "_limits")

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._buffer = bytearray()
        self._limits = limits
        self._awaiting_pong = False

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held (0 between messages; a held CRLF that may
        become a ping is not a message, so it starts no deadline)."""
        buffer = self._buffer
        if buffer in _KEEPALIVE_PREFIXES:
            return 0
        return len(buffer)

    def expect_pong(self) -> None:
        """We sent a ping: the next CRLF from the peer is its pong."""
        self._awaiting_pong = True

    def feed(self, data: bytes) -> list[bytes | Ping | Pong]:
        buffer = self._buffer
        buffer += data
        out: list[bytes | Ping | Pong] = []
        while buffer:
            if buffer[:1] == b"\r":
                if self._awaiting_pong and buffer[:2] == b"\r\n":
                    self._awaiting_pong = False
                    out.append(PONG_RECEIVED)
                    del buffer[:2]
                    continue
                if buffer[:4] == b"\r\n\r\n":
                    out.append(PING)
                    del buffer[:4]
                    continue
                if len(buffer) < 4 and b"\r\n\r\n".startswith(bytes(buffer)):
                    break  # could still become a ping
                if buffer[:2] == b"\r\n":
                    out.append(PONG_RECEIVED)
                    del buffer[:2]
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
