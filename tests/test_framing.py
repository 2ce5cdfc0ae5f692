"""Stream framing: partial reads, pipelining, keep-alives, missing or oversize lengths."""

from __future__ import annotations

import pytest

from clearip.relay.sip.errors import LimitExceeded, SipParseError
from clearip.relay.sip.framing import PING, PONG_RECEIVED, StreamFramer
from clearip.relay.sip.parser import Limits

MSG = (
    b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nCall-ID: x\r\n"
    b"CSeq: 1 OPTIONS\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nContent-Length: 5\r\n\r\nhello"
)


def test_split_reads_reassemble() -> None:
    framer = StreamFramer()
    out = []
    for i in range(len(MSG)):
        out += framer.feed(MSG[i : i + 1])
    assert out == [MSG]
    assert framer.pending == 0


def test_pipelined_messages_in_one_read() -> None:
    framer = StreamFramer()
    assert framer.feed(MSG * 3 + MSG[:10]) == [MSG, MSG, MSG]
    assert framer.pending == 10


def test_keepalive_ping_and_pong() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n") == [PING]
    assert framer.feed(b"\r\n") == []  # could be half a ping: held
    assert framer.pending == 0  # ...but it is no message: no deadline runs for it
    assert framer.feed(MSG) == [PONG_RECEIVED, MSG]  # ...it was a pong
    assert framer.feed(b"\r\n\r\n" + MSG) == [PING, MSG]


def test_pong_after_our_ping_is_reported_at_once() -> None:
    """After we ping (RFC 5626 §4.4.1) the next CRLF is the pong: reported without waiting for
    more bytes, and two pongs in a row are two pongs, never a ping to answer."""
    framer = StreamFramer()
    framer.expect_pong()
    assert framer.feed(b"\r\n") == [PONG_RECEIVED]
    assert framer.pending == 0
    framer.expect_pong()
    assert framer.feed(b"\r") == []
    assert framer.feed(b"\n") == [PONG_RECEIVED]
    framer.expect_pong()
    assert framer.feed(b"\r\n" + MSG) == [PONG_RECEIVED, MSG]
    # Not expecting one: the same CRLF is held, and with a second it is a ping.
    assert framer.feed(b"\r\n") == []
    assert framer.feed(b"\r\n") == [PING]


def test_missing_content_length_breaks_the_stream() -> None:
    with pytest.raises(SipParseError, match="Content-Length"):
        StreamFramer().feed(MSG.replace(b"Content-Length: 5\r\n", b""))


def test_conflicting_content_length_breaks_the_stream() -> None:
    with pytest.raises(SipParseError):
        StreamFramer().feed(MSG.replace(b"Content-Length: 5\r\n", b"l: 5\r\nContent-Length: 7\r\n"))


def test_oversize_is_refused_before_it_is_buffered() -> None:
    framer = StreamFramer(Limits(max_message_size=200))
    with pytest.raises(LimitExceeded):
        framer.feed(MSG.replace(b"Content-Length: 5", b"Content-Length: 5000"))
    with pytest.raises(LimitExceeded):
        StreamFramer(Limits(max_message_size=200)).feed(b"X" * 300)
